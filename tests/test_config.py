"""One home per fact: config keys, defaults and help texts come from the optimizers; names, perplexity and
library versions have one definition each, used by every caller."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types

import pytest
from transformers import HfArgumentParser

import hf_mousse
from hf_mousse import param_groups
from hf_mousse.integration import checkpoint, model_card, trainer_hooks
from hf_mousse.integration.config import (
    CONFIGS,
    FROM_TRAINING_ARGS,
    LOGGING_KEYS,
    NAMES,
    ROLE_KEYS,
    TRAINER_DEFAULTS,
    optim_name,
)
from hf_mousse.metrics import perplexity_from_loss
from hf_mousse.optim import HELP, MiMuon, Mousse, Muon, constructor_defaults
from hf_mousse.version import library_versions


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_are_the_constructor_keywords(name):
    cls = CONFIGS[name]
    constructor = {k: d for k, (d, _) in constructor_defaults(cls.optimizer_cls).items()
                   if k not in FROM_TRAINING_ARGS}
    roles = inspect.signature(param_groups).parameters
    expected = {**{k: TRAINER_DEFAULTS.get(k, d) for k, d in constructor.items()},
                **{k: roles[k].default for k in ROLE_KEYS},
                **{k: d for k, (d, _, _) in LOGGING_KEYS.items()}}
    assert cls.keys() == list(expected)  # constructor order, then roles, then logging
    assert dataclasses.asdict(cls()) == expected
    assert cls().adjust_lr == "match_rms_adamw" != constructor["adjust_lr"]  # the one Trainer-route deviation


def test_a_new_constructor_keyword_becomes_a_config_key():
    """What happens when an optimizer gains a keyword (as MiMuon gains gap_rule): the config follows."""
    from hf_mousse.integration.config import _constructor_fields

    class Extended(Mousse):
        def __init__(self, params, *, refresh_every: int = 3, brand_new: float = 0.5, **kwargs):
            super().__init__(params, refresh_every=refresh_every, **kwargs)

    HELP["brand_new"] = "a keyword added later"
    try:
        specs = {name: (hint, f.default) for name, hint, f in _constructor_fields(Extended)}
    finally:
        del HELP["brand_new"]
    assert specs["brand_new"] == (float, 0.5) and specs["refresh_every"] == (int, 3)
    assert specs["alpha"] == (float, constructor_defaults(Mousse)["alpha"][0])
    assert "lr" not in specs and "betas" not in specs


def test_help_texts_come_from_one_source():
    for cls in CONFIGS.values():
        for f in dataclasses.fields(cls):
            expected = LOGGING_KEYS[f.name][2] if f.name in LOGGING_KEYS else HELP[f.name]
            assert f.metadata["help"] == expected, (cls.__name__, f.name)
    text = " ".join(HfArgumentParser(hf_mousse.MousseTrainingArguments).format_help().split())
    for key in ("alpha", "gap_every", "scalar_optimizer", "log_diagnostics"):
        help_text = LOGGING_KEYS[key][2] if key in LOGGING_KEYS else HELP[key]
        assert f"--mousse_{key}" in text and " ".join(help_text.split()) in text, key
    hyper = {"gap_every": 5, "lr": 0.1, "optimizer_class": "MiMuon"}
    rows = model_card._hyperparameter_rows("mimuon", hyper)
    assert [(r["name"], r["meaning"]) for r in rows] == [
        ("optimizer_class", "optimizer class"), ("lr", HELP["lr"]), ("gap_every", HELP["gap_every"])]


def test_names_are_the_configs():
    assert NAMES == ("mousse", "muon", "mimuon")
    assert {CONFIGS[n].optimizer_cls for n in NAMES} == {Mousse, Muon, MiMuon}
    for value in ("mousse", types.SimpleNamespace(value="mousse")):
        assert optim_name(types.SimpleNamespace(optim=value)) == "mousse"


def test_log_perplexity_is_overflow_safe():
    trainer = types.SimpleNamespace(optimizer=None, args=types.SimpleNamespace(optim="mousse"))
    logs = {"eval_loss": 1000.0, "test_loss": 2.0, "train_loss": 3.0, "loss": 3.0}
    trainer_hooks._add_metrics(trainer, logs)
    assert logs["eval_perplexity"] == math.inf == perplexity_from_loss(1000.0)
    assert logs["test_perplexity"] == pytest.approx(math.exp(2.0))
    assert "train_perplexity" not in logs


def test_checkpoint_header_records_the_library_versions(tmp_path):
    import torch

    model = torch.nn.Linear(4, 4)
    opt = Muon.for_model(model)
    path = str(tmp_path / "optimizer.safetensors")
    checkpoint.save_optimizer(opt, path)
    metadata, _ = checkpoint.read_optimizer_file(path)
    assert json.loads(metadata["versions"]) == library_versions()
    assert library_versions()["hf_mousse"] == hf_mousse.__version__
