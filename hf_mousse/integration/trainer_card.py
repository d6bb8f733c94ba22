"""The model card that ``Trainer.push_to_hub()`` / ``create_model_card()`` write, when the optimizer is ours.

transformers' card says ``optimizer: Use OptimizerNames.MOUSSE and the args are: No additional optimizer
arguments`` (the raw ``--optim``/``--optim_args``, wrong for ``optimizers=``/``optimizer_cls_and_kwargs``
and silent about the defaults in effect); TRL's card says nothing about the optimizer. Every Trainer
(TRL's included) calls ``create_optimizer()`` whatever the route, so :func:`adopt`, run right after it:

* tags the model with ``hf_mousse`` and the optimizer's name (``add_model_tags``, as TRL tags its
  models), which ``push_to_hub`` passes on to the card's ``tags``;
* wraps this trainer's ``create_model_card`` (an instance attribute, so a subclass's own card writer,
  e.g. TRL's, is wrapped too): after the card is written, the tags are ensured in its metadata, the
  misleading transformers line is replaced, and an *Optimizer* section lists the effective
  hyperparameters read from the built optimizer.
"""

from __future__ import annotations

import functools
import os
import re

from .config import CONFIGS
from .model_card import (
    CARD_FILE,
    OPTIMIZER_TAGS,
    OPTIMIZER_TITLES,
    hyperparameter_table,
    optimizer_hyperparameters,
)
from .trainer_hooks import ours

SECTION_TITLE = "## Optimizer (hf_mousse)"
# transformers' modelcard.py writes "- optimizer: Use {optim} and the args are:\n{optim_args}".
_TRANSFORMERS_LINE = re.compile(r"^- optimizer: Use .*?\n(?:(?!- |#|\n).*\n)?", re.MULTILINE)


def optimizer_name(opt) -> str:
    """The ``--optim`` name of one of our optimizer objects (``Mousse`` -> ``mousse``)."""
    found = (n for n, c in CONFIGS.items() if isinstance(opt, c.optimizer_cls))
    return next(found, type(opt).__name__.lower())


def tags_for(opt) -> list[str]:
    return ["hf_mousse", *OPTIMIZER_TAGS.get(optimizer_name(opt), [optimizer_name(opt)])]


def _tag_models(trainer, tags: list[str]) -> None:
    """Tag the model the trainer pushes (and, under PEFT, the base model whose tags PEFT reads)."""
    model = trainer.model
    base = getattr(model, "base_model", None)
    for m in (model, base, getattr(base, "model", None)):
        if hasattr(m, "add_model_tags"):
            try:
                m.add_model_tags(tags)
            except Exception:  # noqa: BLE001 (a tagging failure must never stop training)
                continue


def section(opt) -> str:
    """The card's *Optimizer* section: what ran, with every effective hyperparameter."""
    from ..version import __version__

    name = optimizer_name(opt)
    title = OPTIMIZER_TITLES.get(name, type(opt).__name__)
    return (f"{SECTION_TITLE}\n\nTrained with **{title}** (`optim=\"{name}\"`) from "
            f"hf_mousse {__version__}. Hidden weight matrices take "
            f"the {title} update; embeddings, the output head, norms and biases take the scalar optimizer "
            "(`scalar_optimizer`). The effective hyperparameters, defaults included, as the optimizer "
            f"ran them:\n\n{hyperparameter_table(name, optimizer_hyperparameters(opt))}\n")


def amend_card(path: str, opt) -> None:
    """Add our tags, replace transformers' optimizer line, (re)write our section: the card at ``path``."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in tags_for(opt) if t not in tags]
    name = optimizer_name(opt)
    text = _TRANSFORMERS_LINE.sub(
        f"- optimizer: {OPTIMIZER_TITLES.get(name, name)} (hf_mousse); effective hyperparameters under "
        f"*{SECTION_TITLE[3:]}* below\n", card.text)
    start = text.find(SECTION_TITLE)
    if start >= 0:  # written before (a second push): replace our section, keep what follows it
        end = text.find("\n## ", start + len(SECTION_TITLE))
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    card.text = text.rstrip("\n") + "\n\n" + section(opt)
    card.save(path)


def adopt(trainer) -> None:
    """Tag the model and hook this trainer's card writer, if its optimizer is ours (idempotent)."""
    opt = ours(trainer)
    if opt is None:
        return
    _tag_models(trainer, tags_for(opt))
    if "create_model_card" in vars(trainer):
        return
    original = trainer.create_model_card  # bound: the class's own (TRL's, transformers')

    @functools.wraps(original)
    def create_model_card(*args, **kwargs):
        result = original(*args, **kwargs)
        path = os.path.join(trainer.args.output_dir, CARD_FILE)
        if trainer.is_world_process_zero() and os.path.isfile(path):
            amend_card(path, ours(trainer) or opt)
        return result

    trainer.create_model_card = create_model_card
