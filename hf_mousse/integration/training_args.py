"""``MousseTrainingArguments``: ``TrainingArguments`` plus typed ``mousse_*`` optimizer fields.

Every field defaults to None (not set); set ones are merged with ``--optim_args`` into the same
config dataclass (:func:`config_from_training_args`), so the two spellings cannot disagree silently.
Each field's ``--help`` is the config key's help text (:data:`hf_mousse.optim.HELP`).
"""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from .config import NAMES, config_from_training_args, optim_name, typed_fields
from .registry import register


def _post_init(self) -> None:
    register()  # a pickled instance must be loadable, and optim="mousse" valid, in this process
    TrainingArguments.__post_init__(self)
    if optim_name(self) in NAMES:
        config_from_training_args(self)  # fail now, not after the model and data are loaded


MousseTrainingArguments = dataclasses.make_dataclass(
    "MousseTrainingArguments",
    typed_fields(),
    bases=(TrainingArguments,),
    namespace={"__post_init__": _post_init, "__doc__": __doc__},
)
MousseTrainingArguments.__module__ = __name__  # pickle (training_args.bin) finds the class here
