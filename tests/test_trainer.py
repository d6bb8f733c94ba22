"""transformers.Trainer integration: names, --optim_args, the three routes, diagnostics, perplexity."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from helpers import byte_blocks, tiny_gpt2, tiny_qwen3
from transformers import Trainer, TrainingArguments
from transformers.utils.generic import ExplicitEnum

import hf_mousse
from hf_mousse import MiMuon, Mousse, MousseConfig, Muon
from hf_mousse.errors import InvalidHyperparameterError, RegistrationError, UnsupportedSetupError
from hf_mousse.integration import registry
from hf_mousse.integration.config import (
    CONFIGS,
    MuonConfig,
    TrainerOptimizerFactory,
    config_from_training_args,
    refuse_unsupported_engines,
)

hf_mousse.register()


def args_for(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=3e-3,
                logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                seed=0)
    return TrainingArguments(**{**base, **kw})


def inner(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


# ---------------------------------------------------------------------------- names
def test_names_are_valid_everywhere_after_register(tmp_path):
    from transformers import HfArgumentParser
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    for name in ("mousse", "muon", "mimuon"):
        assert TrainingArguments(output_dir=str(tmp_path), optim=name).optim == name
        (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", name])
        assert parsed.optim is OptimizerNames(name)
        (from_dict,) = HfArgumentParser(TrainingArguments).parse_dict(
            {"output_dir": str(tmp_path), "optim": name})
        assert from_dict.optim == name
        assert name in _OPTIMIZER_HANDLERS
    trainer = Trainer(model=tiny_gpt2(), args=args_for(tmp_path, optim="mimuon"))
    assert isinstance(trainer.create_optimizer(), MiMuon)


def test_register_is_idempotent():
    from transformers.training_args import OptimizerNames

    before = list(OptimizerNames)
    hf_mousse.register()
    hf_mousse.register()
    assert list(OptimizerNames) == before
    assert registry.registered_names() == ("mousse", "muon", "mimuon")


def test_register_refuses_unknown_transformers_version(monkeypatch):
    import transformers

    for version in ("4.57.6", "6.1.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        with pytest.raises(RegistrationError, match=f"found {version}.*optimizers="):
            hf_mousse.register()


def test_existing_upstream_name_is_left_alone():
    class FakeNames(ExplicitEnum):
        ADAMW = "adamw"
        MUON = "muon"

    upstream = FakeNames("muon")
    with pytest.warns(UserWarning, match="already defines optim='muon'"):
        registry._add_enum_members(types.SimpleNamespace(OptimizerNames=FakeNames))
    assert FakeNames("muon") is upstream and not registry._ours(upstream)
    assert registry._ours(FakeNames("mousse")) and FakeNames("mimuon").value == "mimuon"


def test_bad_name_lists_ours(tmp_path):
    with pytest.raises(ValueError, match="mouse is not a valid OptimizerNames.*'mousse'"):
        TrainingArguments(output_dir=str(tmp_path), optim="mouse")


# ---------------------------------------------------------------------------- --optim_args
@pytest.mark.parametrize(
    "optim_args, message",
    [
        ("alpha", "malformed --optim_args item 'alpha'.*valid keys for mousse: momentum"),
        ("alpha=0.1=2", "malformed"),
        ("alpah=0.1", "unknown mousse option.*'alpah'.*valid keys: .*alpha"),
        ("lr=0.1", "'lr' comes from --learning_rate"),
        ("alpha=big", "bad value for mousse option 'alpha'.*'big'"),
        ("nesterov=maybe", "bad value for mousse option 'nesterov'"),
        ("alpha=0.1,alpha=0.2", "sets 'alpha' twice"),
        ("refresh_every=0", "invalid refresh_every=0"),
        ("sides=middle", "invalid sides='middle'"),
    ],
)
def test_bad_optim_args_name_the_problem(tmp_path, optim_args, message):
    # Reported when the arguments are created, before any model exists (tests/test_early_errors.py).
    with pytest.raises(InvalidHyperparameterError, match=message):
        args_for(tmp_path, optim="mousse", optim_args=optim_args)


def test_optim_args_are_typed_and_reach_every_group(tmp_path):
    args = args_for(tmp_path, optim="mousse",
                    optim_args="alpha=0.25, refresh_every=3,sides=left,adjust_lr=none,"
                    "nesterov=true,ns_steps=none")
    config = config_from_training_args(args)
    assert (config.alpha, config.refresh_every, config.sides, config.adjust_lr, config.nesterov,
            config.ns_steps) == (0.25, 3, "left", None, True, None)
    opt = Trainer(model=tiny_gpt2(), args=args).create_optimizer()
    assert all(g["alpha"] == 0.25 and g["refresh_every"] == 3 and g["adjust_lr"] is None
               for g in opt.param_groups)


def test_training_arguments_map_to_both_paths(tmp_path):
    args = args_for(tmp_path, optim="muon", learning_rate=2e-3, weight_decay=0.05, adam_beta1=0.8,
                    adam_beta2=0.9, adam_epsilon=1e-6)
    opt = Trainer(model=tiny_qwen3(), args=args).create_optimizer()
    for g in opt.param_groups:
        assert g["lr"] == 2e-3 and g["betas"] == (0.8, 0.9) and g["scalar_eps"] == 1e-6
        assert g["adjust_lr"] == "match_rms_adamw"  # the Trainer-route lr convention
        names = g["param_names"]
        if g["role"] == "matrix":
            assert g["weight_decay"] == 0.05
        else:  # embeddings/head: scalar_weight_decay (0); norms: excluded like HF does
            assert g["weight_decay"] == 0.0
        if any("norm" in n for n in names):
            assert g["group_name"].endswith("no_decay")


def test_config_defaults_match_the_constructors():
    import inspect

    for config_cls in CONFIGS.values():
        params = {}
        for klass in reversed(config_cls.optimizer_cls.__mro__):
            if "__init__" in klass.__dict__ and issubclass(klass, torch.optim.Optimizer):
                params.update(inspect.signature(klass.__init__).parameters)
        config = config_cls()
        for key, value in config.optimizer_kwargs().items():
            if key == "adjust_lr":
                continue  # deliberately different on the Trainer routes
            assert params[key].default == value, (config_cls.__name__, key)


def test_typed_training_arguments(tmp_path):
    args = hf_mousse.MousseTrainingArguments(output_dir=str(tmp_path), optim="mousse", mousse_alpha=0.2,
                                             mousse_refresh_every=7, mousse_adjust_lr="spectral_norm")
    config = config_from_training_args(args)
    assert (config.alpha, config.refresh_every, config.adjust_lr) == (0.2, 7, "spectral_norm")
    assert config == MousseConfig.from_string("alpha=0.2,refresh_every=7,adjust_lr=spectral_norm")
    with pytest.raises(InvalidHyperparameterError, match="both by --mousse_alpha and by --optim_args"):
        hf_mousse.MousseTrainingArguments(output_dir=str(tmp_path), optim="mousse", mousse_alpha=0.2,
                                          optim_args="alpha=0.3")
    with pytest.raises(InvalidHyperparameterError, match="--mousse_gap_threshold do.*not apply to optim="):
        hf_mousse.MousseTrainingArguments(output_dir=str(tmp_path), optim="mousse",
                                          mousse_gap_threshold=0.1)


def test_typed_fields_parse_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(hf_mousse.MousseTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "mimuon", "--mousse_gap_every", "5",
         "--mousse_nesterov", "false"])
    config = config_from_training_args(args)
    assert (config.gap_every, config.nesterov) == (5, False)


# ---------------------------------------------------------------------------- three routes
def test_three_routes_build_the_same_optimizer(tmp_path, text_file):
    train, _ = byte_blocks(text_file)
    kw = dict(learning_rate=3e-3, weight_decay=0.1, adam_beta2=0.98, max_steps=2)
    options = "alpha=0.25,refresh_every=1,beta=0.9"
    results = {}

    def run(name, args, **trainer_kw):
        trainer = Trainer(model=tiny_gpt2(seed=1), args=args, train_dataset=train, **trainer_kw)
        trainer.train()
        results[name] = (type(inner(trainer)), [g["group_name"] for g in inner(trainer).param_groups],
                         {n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    run("--optim", args_for(tmp_path / "a", optim="mousse", optim_args=options, **kw))
    args = args_for(tmp_path / "b", **kw)
    config = MousseConfig(alpha=0.25, refresh_every=1, beta=0.9)
    run("optimizer_cls_and_kwargs", args, optimizer_cls_and_kwargs=config.for_trainer(args))
    model = tiny_gpt2(seed=1)
    opt = Mousse.for_model(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.98), scalar_eps=1e-8,
                           adjust_lr="match_rms_adamw", alpha=0.25, refresh_every=1, beta=0.9)
    trainer = Trainer(model=model, args=args_for(tmp_path / "c", **kw), train_dataset=train,
                      optimizers=(opt, None))
    trainer.train()
    results["optimizers="] = (Mousse, None, {n: p.detach().clone() for n, p in model.named_parameters()})
    run("typed args", hf_mousse.MousseTrainingArguments(
        **{**args_for(tmp_path / "d", **kw).to_dict(), "output_dir": str(tmp_path / "d"), "optim": "mousse",
           "mousse_alpha": 0.25, "mousse_refresh_every": 1, "mousse_beta": 0.9}))

    reference = results["--optim"]
    assert reference[0] is Mousse
    start = dict(tiny_gpt2(seed=1).named_parameters())
    assert any(not torch.equal(start[n], p) for n, p in reference[2].items())  # it trained
    for name, (cls, groups, params) in results.items():
        assert cls is Mousse, name
        if groups is not None:
            assert groups == reference[1], name
        for n, p in params.items():
            assert torch.equal(p, reference[2][n]), (name, n)


# ---------------------------------------------------------------------------- refusals
def test_deepspeed_and_fsdp1_are_refused(monkeypatch):
    base = dict(optim="mousse", deepspeed=None, fsdp=[], fsdp_config={})
    with pytest.raises(UnsupportedSetupError, match="DeepSpeed.*FSDP2.*native Muon"):
        refuse_unsupported_engines(types.SimpleNamespace(**{**base, "deepspeed": "ds_config.json"}))
    with pytest.raises(UnsupportedSetupError, match="FSDP1.*FlatParameters.*FSDP2"):
        refuse_unsupported_engines(types.SimpleNamespace(**{**base, "fsdp": ["full_shard"],
                                                            "fsdp_config": {"version": 1}}))
    refuse_unsupported_engines(types.SimpleNamespace(**{**base, "fsdp": ["full_shard"],
                                                        "fsdp_config": {"version": 2}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UnsupportedSetupError, match="DeepSpeed"):
        refuse_unsupported_engines(types.SimpleNamespace(**base))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UnsupportedSetupError, match="FSDP1"):
        refuse_unsupported_engines(types.SimpleNamespace(**base))


def test_flattened_parameters_are_refused():
    wrapper = torch.nn.Module()
    wrapper._fsdp_wrapped_module = tiny_gpt2()
    with pytest.raises(UnsupportedSetupError, match="FSDP1 FlatParameters"):
        TrainerOptimizerFactory()(wrapper, config=MuonConfig(), lr=1e-3)
    # A matrix flattened after construction (what ZeRO does to the client optimizer) fails at step().
    model = tiny_gpt2()
    opt = Muon.for_model(model)
    model(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
    p = next(p for g in opt.param_groups if g["role"] == "matrix" for p in g["params"])
    p.data, p.grad = p.data.flatten(), p.grad.flatten()
    with pytest.raises(hf_mousse.errors.UnsupportedParameterError, match="flattened.*ZeRO or FSDP1"):
        opt.step()


# ---------------------------------------------------------------------------- logging
def test_perplexity_and_diagnostics_in_the_log(tmp_path, text_file):
    train, evaluation = byte_blocks(text_file)
    args = args_for(tmp_path, optim="mousse", optim_args="log_diagnostics=true,refresh_every=2", max_steps=3,
                    eval_strategy="steps", eval_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    for h in train_logs:
        assert h["optim/update_rms/matrix"] > 0 and h["optim/update_rms/scalar"] > 0
        assert h["optim/kron_left_cond_max"] >= 1 and h["optim/kron_right_cond_max"] >= 1
    # Refreshes are counted per matrix block and side: GPT-2's split c_attn gives 3 blocks per layer.
    blocks = sum(g["split"] * len(g["params"]) for g in inner(trainer).param_groups if g["role"] == "matrix")
    assert blocks == 2 * (3 + 1 + 1 + 1)
    assert [h["optim/eigh_refreshes"] for h in train_logs] == [2 * blocks, 2 * blocks, 4 * blocks]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and evals[0]["eval_perplexity"] == pytest.approx(math.exp(evals[0]["eval_loss"]))
    metrics = trainer.evaluate(metric_key_prefix="test")
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))


def test_diagnostics_are_off_and_free_by_default(tmp_path, text_file):
    train, _ = byte_blocks(text_file)
    trainer = Trainer(model=tiny_gpt2(), args=args_for(tmp_path, optim="mousse"), train_dataset=train)
    trainer.train()
    assert not any(k.startswith("optim/") for h in trainer.state.log_history for k in h)
    assert inner(trainer)._update_sq == {}  # nothing was accumulated on the device


def test_non_hf_mousse_trainers_are_untouched(tmp_path, text_file):
    train, evaluation = byte_blocks(text_file)
    trainer = Trainer(model=tiny_gpt2(), args=args_for(tmp_path, optim="adamw_torch", save_strategy="steps",
                                                        save_steps=2), train_dataset=train,
                      eval_dataset=evaluation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert "eval_perplexity" not in trainer.evaluate()
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()
    assert not (tmp_path / "checkpoint-2" / "optimizer.safetensors").exists()
