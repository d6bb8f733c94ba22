"""Mousse rows with optional settings, shared by the benchmarks, and whether the installed Mousse
accepts them. A row whose option this checkout's ``hf_mousse.Mousse`` does not take is skipped and
reported with the reason, never run with the option silently dropped."""

from __future__ import annotations

import inspect

# key -> options passed to hf_mousse.Mousse on top of the benchmark's own settings
MOUSSE_VARIANTS = {
    "mousse_newton": {"refresh": "newton"},
    "mousse_delay1": {"refresh_delay": 1},
    "mousse_bf16": {"matmul_dtype": "bfloat16"},
    "mousse_delay1_bf16": {"refresh_delay": 1, "matmul_dtype": "bfloat16"},
    # the GPU setting the README's cost model suggests: each step's background work ~1/T of a refresh,
    # two steps to finish it (Qwen3-0.6B: ~1.04 s of eigh per step against a ~0.82 s step)
    "mousse_gpu": {"refresh_schedule": "staggered", "refresh_delay": 2, "matmul_dtype": "bfloat16"},
}


def label(options: dict) -> str:
    """``hf_mousse.Mousse(refresh_delay=1, matmul_dtype=bfloat16)``."""
    return "hf_mousse.Mousse(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"


def unsupported(options: dict, cls=None) -> str | None:
    """Why the installed Mousse cannot run with ``options`` (None: it accepts every one of them by
    name). Values are not checked here: a rejected value raises when the optimizer is built."""
    if cls is None:
        import hf_mousse

        cls = hf_mousse.Mousse
    accepted = inspect.signature(cls).parameters
    missing = [k for k in options if k not in accepted]
    if not missing:
        return None
    return (f"{cls.__module__}.{cls.__qualname__} has no parameter {', '.join(missing)} "
            "(inspect.signature); this checkout's Mousse does not offer it")
