import math
import os
import socket

import evaluate
import pytest
import torch

from hf_mousse.metrics import PERPLEXITY


def _no_network(*args, **kwargs):
    raise OSError("network access attempted in an offline metric test")


@pytest.fixture(scope="module")
def load_perplexity(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_EVALUATE_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        # evaluate reads these at import time; the env vars alone would not reach an already imported copy.
        mp.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        mp.setattr(evaluate.config, "HF_MODULES_CACHE", cache / "modules")
        # Prove the load is offline rather than trusting the flags.
        mp.setattr(socket.socket, "connect", _no_network)
        yield lambda **kwargs: evaluate.load(PERPLEXITY, cache_dir=str(cache / "metrics"), **kwargs)


@pytest.fixture
def perplexity(load_perplexity):
    return load_perplexity()


def test_metric_dir_is_loadable_by_path(perplexity):
    assert os.path.isabs(PERPLEXITY)
    assert os.path.isfile(os.path.join(PERPLEXITY, "perplexity.py"))
    assert isinstance(perplexity, evaluate.Metric)
    assert perplexity.name == "perplexity"


def test_weighted_mean_matches_hand_formula(perplexity):
    result = perplexity.compute(losses=[2.0, 0.5, 1.25], num_tokens=[3, 1, 4])
    loss = (2.0 * 3 + 0.5 * 1 + 1.25 * 4) / (3 + 1 + 4)
    assert result["loss"] == pytest.approx(loss)
    assert result["perplexity"] == pytest.approx(math.exp(loss))


def test_without_num_tokens_each_example_weighs_one(perplexity):
    result = perplexity.compute(losses=[2.0, 0.5, 1.25])
    assert result["loss"] == pytest.approx((2.0 + 0.5 + 1.25) / 3)


def test_token_weighting_recovers_the_trainer_eval_loss(perplexity):
    # Trainer reports exp(eval_loss) with eval_loss the mean over all tokens; examples of unequal length must
    # be weighted by their token counts to get the same number.
    torch.manual_seed(0)
    lengths = [3, 7, 1, 12]
    logits = [torch.randn(n, 11) for n in lengths]
    labels = [torch.randint(0, 11, (n,)) for n in lengths]
    per_example = [torch.nn.functional.cross_entropy(x, y).item() for x, y in zip(logits, labels)]
    eval_loss = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(labels)).item()

    result = perplexity.compute(losses=per_example, num_tokens=lengths)
    assert result["loss"] == pytest.approx(eval_loss, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(eval_loss), rel=1e-6)


def test_add_batch_accumulates_and_compute_resets(perplexity):
    perplexity.add_batch(losses=[2.0, 1.0], num_tokens=[1, 3])
    perplexity.add_batch(losses=[0.5])  # default weight 1
    perplexity.add(losses=4.0, num_tokens=2)
    result = perplexity.compute()
    assert result["loss"] == pytest.approx((2.0 * 1 + 1.0 * 3 + 0.5 * 1 + 4.0 * 2) / 7)

    # The next compute starts from an empty stack.
    assert perplexity.compute(losses=[0.25])["loss"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"losses": []}, "empty input"),
        ({}, "empty input"),
        ({"losses": [1.0, -0.5]}, "finite and >= 0"),
        ({"losses": [float("nan")]}, "finite and >= 0"),
        ({"losses": [float("inf")]}, "finite and >= 0"),
        ({"losses": [1.0, 2.0], "num_tokens": [4, 0]}, "num_tokens must be positive"),
        ({"losses": [1.0], "num_tokens": [-3]}, "num_tokens must be positive"),
    ],
)
def test_invalid_inputs_raise(perplexity, inputs, message):
    with pytest.raises(ValueError, match=message):
        perplexity.compute(**inputs)


def test_mismatched_lengths_raise(perplexity):
    with pytest.raises(ValueError, match="2 losses but 1 num_tokens"):
        perplexity.compute(losses=[1.0, 2.0], num_tokens=[1])


def test_rejected_batch_leaves_the_metric_usable(perplexity):
    perplexity.add_batch(losses=[1.0], num_tokens=[2])
    with pytest.raises(ValueError, match="finite"):
        perplexity.add_batch(losses=[float("nan"), 3.0])
    with pytest.raises(ValueError, match="positive"):
        perplexity.add(losses=3.0, num_tokens=0)
    perplexity.add(losses=4.0)
    assert perplexity.compute()["loss"] == pytest.approx((1.0 * 2 + 4.0) / 3)


def test_in_memory_mode(load_perplexity):
    metric = load_perplexity(keep_in_memory=True)
    with pytest.raises(ValueError, match="empty input"):
        metric.compute()
    metric.add_batch(losses=[1.0, 3.0], num_tokens=[3, 1])
    assert metric.compute()["loss"] == pytest.approx(1.5)
