"""What ``Trainer`` does differently when its optimizer is ours: saving, loading and logging.

* ``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler``: the optimizer state goes
  to ``optimizer.safetensors`` (no ``optimizer.pt``), the scheduler to ``scheduler.pt``, both
  written atomically; resuming from a checkpoint without our state is an error, never a silent
  fresh start (transformers skips silently when ``optimizer.pt`` is missing).
* ``log``: ``eval_perplexity = exp(eval_loss)`` and, when enabled, optimizer diagnostics.
* ``log`` and ``_save_checkpoint`` first call the optimizer's ``check_finite()``: ``step()`` never reads
  the device, so a step with a non-finite gradient (which changed nothing) is reported here, at the
  next log or before the next checkpoint is started, whichever comes first.

Only single-process and DDP checkpoints take the safetensors path; other engines keep
transformers' own code (FSDP2 writes ``optimizer.bin`` through accelerate). How the optimizer is
chosen and built is :mod:`.registry` and :mod:`.config`; :mod:`.registry` installs these hooks.
"""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointError
from ..metrics import perplexity_from_loss
from ..optim.base import SpectralOptimizer
from .checkpoint import OPTIMIZER_FILE, atomic_save, load_optimizer, save_optimizer
from .config import NAMES, optim_name

SCHEDULER_FILE = "scheduler.pt"
LEGACY_OPTIMIZER_FILE = "optimizer.pt"


def inner_optimizer(trainer) -> torch.optim.Optimizer | None:
    """The trainer's optimizer without accelerate's wrapper(s); None before it is created."""
    opt = getattr(trainer, "optimizer", None)
    while getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    return opt


def ours(trainer) -> SpectralOptimizer | None:
    """The trainer's optimizer if it is one of ours, unwrapped from accelerate's wrapper."""
    opt = inner_optimizer(trainer)
    return opt if isinstance(opt, SpectralOptimizer) else None


def _plain_engine(trainer) -> bool:
    return not (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))


def _save(self, output_dir: str, original) -> None:
    opt = ours(self)
    if opt is None or not _plain_engine(self):
        return original(self, output_dir)
    if self.args.should_save:
        save_optimizer(opt, os.path.join(output_dir, OPTIMIZER_FILE), self.model)
        state = self.lr_scheduler.state_dict()
        atomic_save(lambda tmp: torch.save(state, tmp), os.path.join(output_dir, SCHEDULER_FILE))


def _checkpoint_files(checkpoint: str, opt: SpectralOptimizer) -> tuple[str, str] | None:
    """(optimizer file, scheduler file) of ``checkpoint``; None for a legacy ``optimizer.pt`` checkpoint.
    Raises when the optimizer state or the scheduler is missing."""
    path = os.path.join(checkpoint, OPTIMIZER_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(checkpoint, LEGACY_OPTIMIZER_FILE)):
            return None  # written by torch.save before registration
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it has no optimizer state ({OPTIMIZER_FILE}), so "
            f"{type(opt).__name__}'s momentum and factors and the LR schedule would restart from zero. "
            "To start fresh from these weights, load the model from that directory without "
            "resume_from_checkpoint"
        )
    sched_path = os.path.join(checkpoint, SCHEDULER_FILE)
    if not os.path.isfile(sched_path):
        raise CheckpointError(f"cannot resume from {checkpoint}: {OPTIMIZER_FILE} is there but "
                              f"{SCHEDULER_FILE} is missing; the checkpoint is incomplete")
    return path, sched_path


def _load(self, checkpoint: str | None, original) -> None:
    opt = ours(self)
    if checkpoint is None or opt is None or not _plain_engine(self):
        return original(self, checkpoint)
    files = _checkpoint_files(checkpoint, opt)
    if files is None:
        return original(self, checkpoint)
    path, sched_path = files
    load_optimizer(opt, path, self.model)
    self.lr_scheduler.load_state_dict(torch.load(sched_path, map_location="cpu", weights_only=True))


def _check_finite(self) -> None:
    """Raise the optimizer's pending NonFiniteGradientError (a no-op without a step since the last check)."""
    opt = ours(self)
    if opt is not None:
        opt.check_finite()


def _add_metrics(self, logs: dict) -> None:
    _check_finite(self)  # the Trainer has just read the loss from the device: the flags ride along
    opt = ours(self)
    if opt is None and optim_name(self.args) not in NAMES:
        return
    for key in [k for k in logs if k.endswith("_loss") and k != "train_loss"]:
        logs[key[: -len("loss")] + "perplexity"] = perplexity_from_loss(logs[key])
    if opt is not None and opt.diagnostics_enabled and "loss" in logs:
        logs.update(opt.diagnostics())


def patch(trainer_cls) -> None:
    """Wrap ``trainer_cls``'s optimizer save/load, ``log`` and ``_save_checkpoint`` (subclasses inherit
    them). Called once per class, by :mod:`.registry`."""
    save, load, log = (trainer_cls._save_optimizer_and_scheduler, trainer_cls._load_optimizer_and_scheduler,
                       trainer_cls.log)
    save_checkpoint = getattr(trainer_cls, "_save_checkpoint", None)

    def _save_optimizer_and_scheduler(self, output_dir):
        return _save(self, output_dir, save)

    def _load_optimizer_and_scheduler(self, checkpoint):
        return _load(self, checkpoint, load)

    def log_with_metrics(self, logs, *args, **kwargs):
        _add_metrics(self, logs)
        return log(self, logs, *args, **kwargs)

    trainer_cls._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    trainer_cls._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
    trainer_cls.log = log_with_metrics

    if save_checkpoint is not None:
        def _save_checkpoint(self, *args, **kwargs):
            _check_finite(self)  # before the model weights are written: no checkpoint is left half-done
            return save_checkpoint(self, *args, **kwargs)

        trainer_cls._save_checkpoint = _save_checkpoint
