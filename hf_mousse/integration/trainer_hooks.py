"""What ``Trainer`` does differently when its optimizer is ours.

* ``get_optimizer_cls_and_kwargs`` and the handler table: ``optim="mousse"`` etc. build the
  optimizer from :func:`config_from_training_args` (transformers' own ``--optim_args`` parser
  crashes on malformed strings with an unpacking error, so ours runs instead).
* ``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler``: the optimizer state goes
  to ``optimizer.safetensors`` (no ``optimizer.pt``), the scheduler to ``scheduler.pt``, both
  written atomically; resuming from a checkpoint without our state is an error, never a silent
  fresh start (transformers skips silently when ``optimizer.pt`` is missing).
* ``log``: ``eval_perplexity = exp(eval_loss)`` and, when enabled, optimizer diagnostics.

Only single-process and DDP checkpoints take the safetensors path; other engines keep
transformers' own code (FSDP2 writes ``optimizer.bin`` through accelerate).
"""

from __future__ import annotations

import math
import os

import torch

from ..errors import CheckpointError, UnsupportedSetupError
from ..optim.base import SpectralOptimizer
from .checkpoint import OPTIMIZER_FILE, atomic_save, load_optimizer, save_optimizer
from .config import CONFIGS, config_from_training_args
from .registry import registered_names

SCHEDULER_FILE = "scheduler.pt"
LEGACY_OPTIMIZER_FILE = "optimizer.pt"


def _is_true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def refuse_unsupported_engines(args) -> None:
    """DeepSpeed ZeRO and FSDP1 hand the optimizer flat 1-D shards: no matrices are left to orthogonalise."""
    optim = str(getattr(args.optim, "value", args.optim))
    if getattr(args, "deepspeed", None) or _is_true(os.environ.get("ACCELERATE_USE_DEEPSPEED")):
        raise UnsupportedSetupError(
            f"optim={optim!r} cannot run under DeepSpeed: ZeRO gives the optimizer flattened 1-D partitions, "
            "so there are no weight matrices to orthogonalise. Use FSDP2 (--fsdp full_shard with "
            "fsdp_config version 2, or accelerate's FSDP2 plugin) or DDP; for Muon under DeepSpeed use "
            "DeepSpeed's native Muon (\"optimizer\": {\"type\": \"Muon\"} in the DeepSpeed config)"
        )
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    fsdp1 = bool(getattr(args, "fsdp", None)) and int(fsdp_config.get("version", 2)) == 1
    fsdp1 |= _is_true(os.environ.get("ACCELERATE_USE_FSDP")) and os.environ.get("FSDP_VERSION", "2") == "1"
    if fsdp1:
        raise UnsupportedSetupError(
            f"optim={optim!r} cannot run under FSDP1: it flattens parameters into 1-D FlatParameters. "
            "Use FSDP2 (fsdp_config={'version': 2}, the default in transformers 5) or DDP"
        )


def hf_no_decay_names(model) -> set[str]:
    """Trainable parameters the Trainer would not decay (biases, norms): they stay undecayed."""
    from transformers import Trainer

    # get_decay_parameter_names reads nothing from self in transformers 5.x (checked on 5.23).
    decay = set(Trainer.get_decay_parameter_names(None, model))
    return {n for n, p in model.named_parameters() if p.requires_grad and n not in decay}


class TrainerOptimizerFactory:
    """Trainer's factory protocol: instantiated without arguments, then called with (model, **kwargs)."""

    def __call__(self, model, *, config, **kwargs) -> SpectralOptimizer:
        flat = [n for n, _ in model.named_parameters() if "_fsdp_wrapped_module" in n or "flat_param" in n]
        if flat:
            raise UnsupportedSetupError(
                f"the model's parameters are FSDP1 FlatParameters ({flat[0]!r}); {config.name} needs the "
                "original weight matrices. Use FSDP2 (fsdp_config={'version': 2}) or DDP"
            )
        return config.build(model, no_decay=hf_no_decay_names(model), **kwargs)


def trainer_kwargs(config, args) -> tuple[type, dict]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``, with ``args``' lr, weight
    decay and Adam settings."""
    refuse_unsupported_engines(args)
    return TrainerOptimizerFactory, {
        "config": config,
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "scalar_eps": args.adam_epsilon,
    }


def optimizer_cls_and_kwargs(args, model=None) -> tuple[type, dict]:
    """What ``--optim mousse|muon|mimuon`` builds: the config from ``args``, then :func:`trainer_kwargs`."""
    return trainer_kwargs(config_from_training_args(args), args)


def handler(ctx) -> tuple[type, dict]:
    """Entry for transformers' ``_OPTIMIZER_HANDLERS``; ``ctx.optim_args`` (leniently parsed
    strings) is ignored in favour of our parser."""
    return optimizer_cls_and_kwargs(ctx.args, ctx.model)


# ---------------------------------------------------------------------------- Trainer patches
def ours(trainer) -> SpectralOptimizer | None:
    """The trainer's optimizer if it is one of ours, unwrapped from accelerate's wrapper."""
    opt = getattr(trainer, "optimizer", None)
    while opt is not None and not isinstance(opt, SpectralOptimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def _plain_engine(trainer) -> bool:
    return not (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))


def _optim_name(args) -> str:
    return str(getattr(args.optim, "value", args.optim))


def _save(self, output_dir: str, original) -> None:
    opt = ours(self)
    if opt is None or not _plain_engine(self):
        return original(self, output_dir)
    if self.args.should_save:
        save_optimizer(opt, os.path.join(output_dir, OPTIMIZER_FILE), self.model)
        state = self.lr_scheduler.state_dict()
        atomic_save(lambda tmp: torch.save(state, tmp), os.path.join(output_dir, SCHEDULER_FILE))


def _load(self, checkpoint: str | None, original) -> None:
    opt = ours(self)
    if checkpoint is None or opt is None or not _plain_engine(self):
        return original(self, checkpoint)
    path = os.path.join(checkpoint, OPTIMIZER_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(checkpoint, LEGACY_OPTIMIZER_FILE)):
            return original(self, checkpoint)  # written by torch.save before registration
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
    load_optimizer(opt, path, self.model)
    self.lr_scheduler.load_state_dict(torch.load(sched_path, map_location="cpu", weights_only=True))


def _add_metrics(self, logs: dict) -> None:
    opt = ours(self)
    if opt is None and _optim_name(self.args) not in CONFIGS:
        return
    for key in [k for k in logs if k.endswith("_loss") and k != "train_loss"]:
        try:
            logs[key[: -len("loss")] + "perplexity"] = math.exp(logs[key])
        except OverflowError:
            logs[key[: -len("loss")] + "perplexity"] = math.inf
    if opt is not None and opt.diagnostics_enabled and "loss" in logs:
        logs.update(opt.diagnostics())


def patch(trainer_cls) -> None:
    """Install the hooks on ``trainer_cls`` (idempotent; subclasses inherit them)."""
    if trainer_cls.__dict__.get("_hf_mousse_patched"):
        return
    save, load, log = (trainer_cls._save_optimizer_and_scheduler, trainer_cls._load_optimizer_and_scheduler,
                       trainer_cls.log)
    original_get = trainer_cls.__dict__["get_optimizer_cls_and_kwargs"].__func__

    def get_optimizer_cls_and_kwargs(args, model=None):
        if _optim_name(args) in registered_names():
            return optimizer_cls_and_kwargs(args, model)
        return original_get(args, model)

    def _save_optimizer_and_scheduler(self, output_dir):
        return _save(self, output_dir, save)

    def _load_optimizer_and_scheduler(self, checkpoint):
        return _load(self, checkpoint, load)

    def log_with_metrics(self, logs, *args, **kwargs):
        _add_metrics(self, logs)
        return log(self, logs, *args, **kwargs)

    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)
    trainer_cls._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    trainer_cls._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
    trainer_cls.log = log_with_metrics
    trainer_cls._hf_mousse_patched = True
