"""The device-side finite flag of one optimizer step, and the gated writes built from it.

With ``nonfinite="raise"`` a step does not read the device to learn whether its gradients are
finite (that read would stall a GPU pipeline every step, DESIGN.md promise 4). It computes a 0-d
flag ``ok`` on the device instead, as ``torch.amp`` does with its found-inf tensor, and makes every
write of the step conditional on it: gradients are zeroed in place when ``ok`` is false, EMA and
decay coefficients become "leave unchanged" (weight 0, factor 1), and updates are zeroed. A step
with a non-finite gradient thus leaves every parameter and optimizer tensor as it was; the
optimizer reports it at its next natural synchronisation (``SpectralOptimizer.check_finite``).

A :class:`StepGate` without a flag (``nonfinite="skip"`` or ``"ignore"``) runs the plain
operations with Python scalars, exactly as the optimizer would without this module.

All gated forms are exact when ``ok`` is true: a coefficient is ``where(ok, value, off)`` in the
dtype of the tensor it multiplies (the value the Python scalar would have been rounded to), an
update is multiplied by exactly 1, and a select copies. Low-precision parameters keep their
weight decay exact by selecting between the decayed copy and the weights, not by multiplying by a
bf16-rounded factor (0.998 in bf16 is 1.0).
"""

from __future__ import annotations

from collections import defaultdict

import torch

_EXACT_SCALE_DTYPES = (torch.float32, torch.float64)


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups


class StepGate:
    """``ok``: a 0-d bool tensor (true: every gradient of the step is finite) or None (no gating)."""

    def __init__(self, ok: torch.Tensor | None = None):
        self.ok = ok
        self._flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._coefs: dict[tuple, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.ok is not None

    def flags(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ok, not ok) on ``device``. A model spread over GPUs gets a device-to-device copy (no host
        sync); one spread over CPU and GPU synchronises here, as it does anyway."""
        if device not in self._flags:
            ok = self.ok if self.ok.device == device else self.ok.to(device)
            self._flags[device] = (ok, ok.logical_not())
        return self._flags[device]

    def coef(self, value: float, off: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """0-d ``value`` on a finite step, ``off`` otherwise (no host data: a fill and a select)."""
        key = (value, off, dtype, device)
        if key not in self._coefs:
            v = torch.full((), value, dtype=dtype, device=device)
            self._coefs[key] = torch.where(self.flags(device)[0], v, off)
        return self._coefs[key]

    # ------------------------------------------------------------------ gated writes
    def zero_grads_(self, grads: list[torch.Tensor]) -> None:
        """Zero the gradients in place on a non-finite step (no NaN * 0 can leak into a write);
        on a finite step their values are unchanged."""
        if self.active:
            for g in grads:
                g.masked_fill_(self.flags(g.device)[1], 0)

    def lerp_(self, tensors: list[torch.Tensor], ends: list[torch.Tensor], weight: float) -> None:
        """``tensors <- lerp(tensors, ends, weight)``; unchanged on a non-finite step (weight 0)."""
        if not self.active:
            torch._foreach_lerp_(tensors, ends, weight)
        else:
            torch._foreach_lerp_(tensors, ends, [self.coef(weight, 0.0, t.dtype, t.device) for t in tensors])

    def mul_(self, tensors: list[torch.Tensor], factor: float) -> None:
        """``tensors *= factor`` (fp32/fp64 tensors: optimizer state); unchanged on a non-finite step."""
        if not self.active:
            torch._foreach_mul_(tensors, factor)
            return
        for (device, dtype), idx in _by_device_and_dtype(tensors).items():
            torch._foreach_mul_([tensors[i] for i in idx], self.coef(factor, 1.0, dtype, device))

    def decay_(self, params: list[torch.Tensor], shrink: float) -> None:
        """``params *= shrink`` (weight decay), parameters of any dtype; unchanged on a non-finite step."""
        if shrink == 1.0:
            return
        for (device, dtype), idx in _by_device_and_dtype(params).items():
            ps = [params[i] for i in idx]
            if dtype in _EXACT_SCALE_DTYPES:
                torch._foreach_mul_(ps, self.coef(shrink, 1.0, dtype, device) if self.active else shrink)
                continue
            # A bf16 / fp16 factor would be rounded (1 - 0.002 is 0.99609375 in bf16), and so is the
            # scalar of an in-place _foreach_mul_ on CPU: decay a copy (fp32 scalar), then write it.
            decayed = torch._foreach_mul(ps, shrink)
            if not self.active:
                torch._foreach_copy_(ps, decayed)
                continue
            ok = self.flags(device)[0]
            for p, d in zip(ps, decayed):
                torch.where(ok, d, p, out=p)

    def scale_(self, updates: list[torch.Tensor]) -> None:
        """Zero the (finite) updates on a non-finite step; multiply by exactly 1 otherwise."""
        if self.active:
            for (device, dtype), idx in _by_device_and_dtype(updates).items():
                torch._foreach_mul_([updates[i] for i in idx], self.coef(1.0, 0.0, dtype, device))

    def mask_(self, t: torch.Tensor) -> torch.Tensor:
        """Zero ``t`` in place on a non-finite step (whatever it holds); returns ``t``."""
        if self.active:
            t.masked_fill_(self.flags(t.device)[1], 0)
        return t

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst <- src``; unchanged on a non-finite step."""
        if not self.active:
            dst.copy_(src)
        else:
            torch.where(self.flags(dst.device)[0], src, dst, out=dst)

    def select(self, new: torch.Tensor, old) -> torch.Tensor:
        """``new`` on a finite step, ``old`` (a tensor or a scalar) otherwise."""
        if not self.active:
            return new
        return torch.where(self.flags(new.device)[0], new, old)


NO_GATE = StepGate()
