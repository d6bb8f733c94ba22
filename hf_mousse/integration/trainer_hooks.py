"""What ``Trainer`` does differently when its optimizer is ours: saving, loading and logging.

* ``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler``: the optimizer state goes
  to ``optimizer.safetensors`` (no ``optimizer.pt``), the scheduler to ``scheduler.pt``, both
  written atomically, the optimizer file last, recording the global step and the scheduler file's
  digest. Resuming is an error, never a silent fresh start or a mix of two saves, when the
  checkpoint has no optimizer state (transformers skips silently when ``optimizer.pt`` is
  missing), when its optimizer file belongs to another step (``trainer_state.json``) or another
  ``scheduler.pt``, and when a checkpoint with our state is resumed by an optimizer that is not
  ours (that check runs for every Trainer once hf_mousse is imported). Legacy ``optimizer.pt``
  files of our optimizers load with the same state checks.
* ``log``: ``eval_perplexity = exp(eval_loss)`` and, when enabled, optimizer diagnostics.
* ``log`` and ``_save_checkpoint`` first call the optimizer's ``check_finite()``: ``step()`` never reads
  the device, so a step with a non-finite gradient (which changed nothing) is reported here, at the
  next log or before the next checkpoint is started, whichever comes first.

Single-process, DDP and FSDP2 checkpoints take the safetensors path (a split optimizer gathers its
state from every rank; rank 0 writes one file in the single-process format, so a checkpoint resumes
at any world size). How the optimizer is
chosen and built is :mod:`.registry` and :mod:`.config`; :mod:`.registry` installs these hooks.
"""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointError
from ..metrics import perplexity_from_loss
from ..optim.base import SpectralOptimizer
from .checkpoint import OPTIMIZER_FILE, atomic_save, load_optimizer, save_optimizer, saved_optimizer_name
from .config import CONFIGS, NAMES, optim_name

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


def _our_engine(trainer) -> bool:
    """One process, DDP or FSDP2 (DeepSpeed and FSDP1 are refused when the optimizer is built)."""
    return not getattr(trainer, "is_deepspeed_enabled", False)


def _save(self, output_dir: str, original) -> None:
    opt = ours(self)
    if opt is None or not _our_engine(self):
        return original(self, output_dir)
    split = opt.split_world() is not None  # its state is gathered from every rank: all take part
    if self.args.should_save or split:
        # The scheduler first: the optimizer file, written last, records the step and the scheduler
        # file's digest, so a save interrupted in between (or a file copied from another step) is
        # refused on resume instead of mixing two steps' state.
        sched_path = os.path.join(output_dir, SCHEDULER_FILE)
        if self.args.should_save:
            state = self.lr_scheduler.state_dict()
            atomic_save(lambda tmp: torch.save(state, tmp), sched_path)
        save_optimizer(opt, os.path.join(output_dir, OPTIMIZER_FILE), self.model,
                       global_step=self.state.global_step, companions=(sched_path,),
                       write=self.args.should_save)


def _refuse_foreign_optimizer(self, checkpoint: str) -> None:
    """A checkpoint with our optimizer state resumed by an optimizer that is not ours (``--optim
    adamw_torch`` on a Mousse checkpoint): transformers would find no ``optimizer.pt``, skip the
    optimizer and the scheduler silently, and restart the LR schedule."""
    path = os.path.join(checkpoint, OPTIMIZER_FILE)
    if not os.path.isfile(path):
        return
    opt = inner_optimizer(self)
    saved = saved_optimizer_name(path)
    name = next((n for n, c in CONFIGS.items() if c.optimizer_cls.__name__ == saved), None)
    raise CheckpointError(
        f"cannot resume from {checkpoint} with {type(opt).__name__} (optim={optim_name(self.args)!r}): its "
        f"optimizer state is {OPTIMIZER_FILE}, written by hf_mousse's {saved or 'optimizer'}, which "
        f"{type(opt).__name__} cannot read, so its state would be dropped and the LR schedule restarted. "
        f"Resume with the optimizer that wrote it{f' (--optim {name})' if name else ''}, or delete "
        f"{OPTIMIZER_FILE} and {SCHEDULER_FILE} from the checkpoint to restart the optimizer deliberately "
        "from these weights"
    )


def _checkpoint_files(checkpoint: str, opt: SpectralOptimizer) -> tuple[str, str]:
    """(optimizer file: ours, else a legacy ``optimizer.pt``; scheduler file) of ``checkpoint``.
    Raises when the optimizer state or the scheduler is missing."""
    path = os.path.join(checkpoint, OPTIMIZER_FILE)
    if not os.path.isfile(path):
        path = os.path.join(checkpoint, LEGACY_OPTIMIZER_FILE)  # torch.save'd before registration
    if not os.path.isfile(path):
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it has no optimizer state ({OPTIMIZER_FILE}), so "
            f"{type(opt).__name__}'s momentum and factors and the LR schedule would restart from zero. "
            "To start fresh from these weights, load the model from that directory without "
            "resume_from_checkpoint"
        )
    sched_path = os.path.join(checkpoint, SCHEDULER_FILE)
    if not os.path.isfile(sched_path):
        raise CheckpointError(f"cannot resume from {checkpoint}: {os.path.basename(path)} is there but "
                              f"{SCHEDULER_FILE} is missing; the checkpoint is incomplete")
    return path, sched_path


def _torch_load(path: str):
    """``torch.load`` (weights only) of a checkpoint file, its failures as a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, unpickling refused, ...: torch raises many types
        raise CheckpointError(f"{path} is not readable ({type(e).__name__}: {str(e)[:200]}); it is truncated "
                              "or corrupted. Resume from an earlier checkpoint") from None


def _load(self, checkpoint: str | None, original) -> None:
    if checkpoint is None:
        return original(self, checkpoint)
    opt = ours(self)
    if opt is None:
        _refuse_foreign_optimizer(self, checkpoint)
    if opt is None or not _our_engine(self):
        return original(self, checkpoint)
    path, sched_path = _checkpoint_files(checkpoint, opt)
    if path.endswith(OPTIMIZER_FILE):
        # self.state is the checkpoint's trainer_state.json: transformers loads it before this hook.
        load_optimizer(opt, path, self.model, global_step=self.state.global_step)
    else:  # legacy optimizer.pt: no names, step or digest to check, but the same state checks
        try:
            opt.load_state_dict(_torch_load(path))
        except CheckpointError as e:
            raise CheckpointError(
                f"{path}: {e}. If another optimizer wrote it, resume with that optimizer, or delete "
                f"{LEGACY_OPTIMIZER_FILE} and {SCHEDULER_FILE} to restart the optimizer deliberately"
            ) from None
    self.lr_scheduler.load_state_dict(_torch_load(sched_path))


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
        logs.update(applicable_diagnostics(opt))
        _shorten_console_lines(self)


# Counters only an optimizer with an eigenbasis refresh (Mousse) can move; others would log zeros forever.
EIGH_COUNTERS = "optim/eigh_"


def applicable_diagnostics(opt: SpectralOptimizer) -> dict[str, float]:
    """``opt.diagnostics()`` without the entries that cannot apply to its algorithm (``optim/eigh_*``
    for optimizers without a refresh: Muon, MiMuon)."""
    from ..optim import Mousse

    diagnostics = opt.diagnostics()
    if isinstance(opt, Mousse):
        return diagnostics
    return {k: v for k, v in diagnostics.items() if not k.startswith(EIGH_COUNTERS)}


def _shorten_console_lines(trainer) -> None:
    """Keep ``optim/*`` diagnostics out of the lines the progress bar / printer callbacks print (a dozen
    numbers per log line would bury the loss); TensorBoard and other callbacks still receive them."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, (ProgressCallback, PrinterCallback)) and "on_log" not in vars(callback):
            printing = callback.on_log

            def on_log(args, state, control, logs=None, _printing=printing, **kwargs):
                short = logs and {k: v for k, v in logs.items() if not k.startswith("optim/")}
                return _printing(args, state, control, logs=short, **kwargs)

            callback.on_log = on_log


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
