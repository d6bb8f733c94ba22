"""Perplexity from per-example mean token losses, as an `evaluate` metric.

Loaded by path (`evaluate.load(hf_mousse.metrics.PERPLEXITY)`), so this file must stay self-contained:
evaluate copies it into its module cache and imports it on its own, outside the hf_mousse package.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """\
Perplexity of a causal language model, exp(mean natural-log NLL per token), computed from per-example mean
token losses. With `num_tokens`, each example's loss is weighted by its token count, which gives the
per-token mean over the whole set; without it every example has weight 1. For the whole eval set this matches
the Trainer convention `math.exp(eval_loss)`.
"""

_KWARGS_DESCRIPTION = """\
Args:
    losses (list of float): per-example mean token loss (natural-log NLL), finite and >= 0.
    num_tokens (list of int, optional): tokens behind each loss, > 0. Defaults to 1 per example.
Returns:
    perplexity (float): exp(loss).
    loss (float): token-weighted mean loss.
Examples:
    >>> metric = evaluate.load(hf_mousse.metrics.PERPLEXITY)
    >>> metric.compute(losses=[2.0, 1.0], num_tokens=[1, 3])
    {'perplexity': 3.4903429574618414, 'loss': 1.25}
"""

_CITATION = ""


def _exp(loss):
    # The package's one perplexity formula is hf_mousse.metrics.perplexity_from_loss; this file keeps its own
    # copy (same overflow guard) because evaluate copies and imports it outside the package.
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _check(losses, num_tokens):
    if len(losses) == 0:
        raise ValueError("perplexity: no losses were given (empty input)")
    if len(num_tokens) != len(losses):
        raise ValueError(f"perplexity: {len(losses)} losses but {len(num_tokens)} num_tokens")
    for loss in losses:
        if not math.isfinite(loss) or loss < 0:
            raise ValueError(f"perplexity: losses must be finite and >= 0, got {float(loss)}")
    for count in num_tokens:
        if count <= 0:
            raise ValueError(f"perplexity: num_tokens must be positive, got {int(count)}")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"losses": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}
            ),
        )

    # evaluate requires every declared input in every call, so these overrides fill in the optional weight.
    # They also validate before anything is written: a rejected batch leaves the metric usable, whereas an
    # error raised in _compute would leave evaluate's cache-file lock held. Each needs a docstring because
    # evaluate appends the inputs description to it.
    def add_batch(self, *, losses=None, num_tokens=None, **kwargs):
        """Add a batch of per-example losses (and optional token counts)."""
        if losses is not None:
            num_tokens = [1] * len(losses) if num_tokens is None else num_tokens
            _check(losses, num_tokens)
        return super().add_batch(losses=losses, num_tokens=num_tokens, **kwargs)

    def add(self, *, losses=None, num_tokens=None, **kwargs):
        """Add one per-example loss (and optional token count)."""
        if losses is not None:
            num_tokens = 1 if num_tokens is None else num_tokens
            _check([losses], [num_tokens])
        return super().add(losses=losses, num_tokens=num_tokens, **kwargs)

    def compute(self, *, losses=None, num_tokens=None, **kwargs):
        """Compute perplexity over everything added so far plus the given inputs."""
        if losses is None and self.writer is None:  # nothing added: evaluate's own error is obscure
            raise ValueError("perplexity: no losses were given (empty input)")
        if losses is not None and num_tokens is None:
            num_tokens = [1] * len(losses)
        return super().compute(losses=losses, num_tokens=num_tokens, **kwargs)

    def _compute(self, losses, num_tokens):
        mean_loss = math.fsum(loss * count for loss, count in zip(losses, num_tokens)) / sum(num_tokens)
        return {"perplexity": _exp(mean_loss), "loss": mean_loss}
