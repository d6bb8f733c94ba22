"""Checks of hyperparameter values, shared by the optimizers' validation and the resume checks."""

from __future__ import annotations

import math

import torch

from ..errors import InvalidHyperparameterError


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise InvalidHyperparameterError(f"invalid {key}={value!r}: expected {expected}")


def _is_real(v) -> bool:
    """A finite int or float, not a bool (inf, NaN and True are never a valid hyperparameter)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The smallest floor (eps) that holds in the fp32 state: float32's smallest normal number.
MIN_FLOOR = torch.finfo(torch.float32).tiny


def _is_int(v) -> bool:
    """An int, not a bool (True is an int to Python, never a step count or a period here)."""
    return isinstance(v, int) and not isinstance(v, bool)
