"""Perplexity, and local `evaluate` metric modules that load offline.

`perplexity_from_loss` is the one place the package turns a mean loss into a perplexity (the Trainer log,
the recipe runner's summary, the model card). Pass a path to `evaluate.load`, e.g.
`evaluate.load(hf_mousse.metrics.PERPLEXITY)`: evaluate's wheel ships no metric scripts and the Hub copies
cannot be fetched offline, but a local directory holding `<dirname>.py` is loaded without any network access.
"""

from __future__ import annotations

import math
from pathlib import Path

PERPLEXITY = str(Path(__file__).resolve().parent / "perplexity")

__all__ = ["PERPLEXITY", "perplexity_from_loss"]


def perplexity_from_loss(loss: float | None) -> float | None:
    """exp(loss) of a mean natural-log loss per token; inf when it overflows, NaN for NaN, None for None."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
