"""Exceptions raised by hf_mousse. Each message says what was wrong and what to do."""

from __future__ import annotations


class HfMousseError(Exception):
    """Base class of every hf_mousse error."""


class InvalidHyperparameterError(HfMousseError, ValueError):
    """A constructor argument or param-group value is out of range or of the wrong kind."""


class UnsupportedParameterError(HfMousseError, TypeError):
    """A parameter cannot be optimised (complex, sparse gradient, wrong shape for its role)."""


class NonFiniteGradientError(HfMousseError, RuntimeError):
    """A gradient holds inf or NaN and the optimizer was told to refuse it."""


class NonFiniteUpdateError(HfMousseError, RuntimeError):
    """A step computed an inf/NaN update from finite gradients (a numerical failure); it was not applied."""


class CheckpointError(HfMousseError, ValueError):
    """An optimizer checkpoint is unreadable, corrupted, or belongs to another model or optimizer."""


class RegistrationError(HfMousseError, RuntimeError):
    """hf_mousse cannot register its optimizers into this version of transformers."""


class UnsupportedSetupError(HfMousseError, ValueError):
    """A training setup the optimizer cannot run correctly in (DeepSpeed ZeRO, FSDP1)."""


class DataSpecError(InvalidHyperparameterError):
    """A recipe's ``tokenizer:`` or ``data:`` block is malformed, or the data it names cannot be used."""


class ModelCardError(HfMousseError, ValueError):
    """A training report cannot be turned into a model card (missing or malformed values, no template)."""


class HubUploadError(HfMousseError, ValueError):
    """An output directory cannot be uploaded as it is (missing, or without model weights)."""
