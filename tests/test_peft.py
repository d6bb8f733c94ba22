"""PEFT LoRA with the Trainer: roles of adapter parameters, fine-tuning, adapter reload, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import StopAt, byte_blocks, tiny_qwen3
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

import hf_mousse
from hf_mousse import Mousse

hf_mousse.register()

HEAD = "base_model.model.lm_head.modules_to_save.default.weight"


def lora_model(seed: int = 0, modules_to_save=("lm_head",), target_modules=("q_proj", "v_proj")):
    config = LoraConfig(r=4, target_modules=list(target_modules), task_type="CAUSAL_LM",
                        modules_to_save=list(modules_to_save) if modules_to_save else None)
    return get_peft_model(tiny_qwen3(seed=seed), config)


def args_for(output_dir, **kw) -> TrainingArguments:
    base = dict(output_dir=str(output_dir), optim="mousse", max_steps=30, per_device_train_batch_size=8,
                per_device_eval_batch_size=16, learning_rate=1e-2, logging_steps=5, save_strategy="no",
                report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def inner(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


# ---------------------------------------------------------------------------- roles
@pytest.mark.parametrize("target_modules", [("q_proj", "v_proj"), ("q_proj", "v_proj", "embed_tokens")])
def test_optimizer_holds_exactly_the_adapter_with_the_right_roles(tmp_path, target_modules):
    model = lora_model(target_modules=target_modules)
    opt = Trainer(model=model, args=args_for(tmp_path)).create_optimizer()
    assert isinstance(opt, Mousse)
    train_names = set(trainable(model))
    assert HEAD in train_names and len(train_names) < len(dict(model.named_parameters()))

    grouped = [(n, p, g) for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])]
    assert all(len(g["param_names"]) == len(g["params"]) for g in opt.param_groups)
    names = [n for n, _, _ in grouped]
    assert len(names) == len(set(names)) and set(names) == train_names  # each trainable once, nothing else
    params = dict(model.named_parameters())
    assert all(p is params[n] for n, p, _ in grouped)  # the names describe the very tensors
    frozen_ids = {id(p) for p in frozen(model).values()}
    assert frozen_ids and not frozen_ids & {id(p) for _, p, _ in grouped}

    by_group = {g["group_name"]: g for g in opt.param_groups}
    for part, side in (("lora_A", "left"), ("lora_B", "right")):
        g = by_group[f"matrix.{part}"]
        assert g["role"] == "matrix" and g["sides"] == side and g["layout"] == "linear" and g["split"] == 1
        expected = {n for n in train_names if f".{part}." in n}
        assert set(g["param_names"]) == expected and len(expected) == 4  # q_proj, v_proj x 2 layers
    matrix = {n for n, _, g in grouped if g["role"] == "matrix"}
    assert matrix == {n for n in train_names if ".lora_A." in n or ".lora_B." in n}
    # The modules_to_save head copy and embedding LoRA factors train on the scalar path.
    scalar = {n: g["group_name"] for n, _, g in grouped if g["role"] == "scalar"}
    assert set(scalar) == train_names - matrix
    assert scalar[HEAD] == "head"  # the modules_to_save copy is what get_output_embeddings() returns
    embedding_factors = {n for n in train_names if "lora_embedding_" in n}
    assert len(embedding_factors) == (2 if "embed_tokens" in target_modules else 0)
    assert all(scalar[n] == "embedding" for n in embedding_factors)


def test_mousse_whitens_only_the_rank_side_of_lora_factors(tmp_path, text_file):
    model = lora_model()
    trainer = Trainer(model=model, args=args_for(tmp_path, max_steps=2, optim_args="refresh_every=1"),
                      train_dataset=byte_blocks(text_file)[0])
    trainer.train()
    opt = inner(trainer)
    params = trainable(model)
    for n, p in params.items():
        state = opt.state[p]
        if ".lora_A." in n:  # r x in: whiten the r x r out side
            assert state["kron_left"].shape == (1, 4, 4) and "kron_right" not in state, n
        elif ".lora_B." in n:  # out x r: whiten the r x r in side
            assert state["kron_right"].shape == (1, 4, 4) and "kron_left" not in state, n
        else:
            assert "exp_avg" in state and "momentum" not in state, n
    for p in frozen(model).values():
        assert p not in opt.state


# ---------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """A LoRA + head model fine-tuned for 30 steps, with its eval metrics before and after."""
    train_set, eval_set = byte_blocks(text_file)
    model = lora_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = args_for(tmp_path_factory.mktemp("finetune"), optim_args="refresh_every=4")
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    return trainer, start, before, after


def test_lora_finetuning_lowers_eval_loss_and_leaves_the_base_alone(trained):
    trainer, start, before, after = trained
    model = trainer.model
    assert isinstance(inner(trainer), Mousse) and trainer.state.global_step == 30
    assert after["eval_loss"] < before["eval_loss"] - 1.0, (before["eval_loss"], after["eval_loss"])
    for metrics in (before, after):
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    for n, p in frozen(model).items():
        assert torch.equal(p, start[n]), n  # bitwise: no decay, no update on frozen base weights
    for n, p in trainable(model).items():
        assert not torch.equal(p, start[n]), n  # every adapter tensor (and the head copy) trained
    assert all(p.abs().max() > 0 for n, p in trainable(model).items() if ".lora_B." in n)  # B starts at 0


def test_lora_alone_learns_on_the_matrix_path(tmp_path, text_file):
    """Without a trainable head, every update comes from Mousse's matrix path on the LoRA factors."""
    train_set, eval_set = byte_blocks(text_file)
    model = lora_model(modules_to_save=None)
    opt_groups = Trainer(model=model, args=args_for(tmp_path)).create_optimizer().param_groups
    assert {g["role"] for g in opt_groups} == {"matrix"}
    trainer = Trainer(model=model, args=args_for(tmp_path, learning_rate=3e-2, optim_args="refresh_every=4"),
                      train_dataset=train_set, eval_dataset=eval_set)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05, (before, after)


def test_adapter_save_and_reload_gives_identical_logits(tmp_path, text_file, trained):
    trainer, _, _, _ = trained
    model = trainer.model.eval()
    model.save_pretrained(str(tmp_path / "adapter"))
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert any("lm_head" in k for k in keys)  # the modules_to_save copy travels with the adapter

    reloaded = PeftModel.from_pretrained(tiny_qwen3(seed=0), str(tmp_path / "adapter")).eval()
    x = torch.tensor(byte_blocks(text_file)[1][:4]["input_ids"])
    with torch.no_grad():
        expected = model(input_ids=x).logits
        got = reloaded(input_ids=x).logits
        base = tiny_qwen3(seed=0).eval()(input_ids=x).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(base, expected, atol=1e-2)  # the adapter does change the outputs


# ---------------------------------------------------------------------------- resume
def train_lora(output_dir, text_file, *, stop_at=None, resume=None, max_steps=12):
    train_set, _ = byte_blocks(text_file)
    args = args_for(output_dir, optim_args="refresh_every=4", max_steps=max_steps,
                    per_device_train_batch_size=4, weight_decay=0.1, lr_scheduler_type="cosine",
                    warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=6)
    trainer = Trainer(model=lora_model(seed=0), args=args, train_dataset=train_set,
                      callbacks=[StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


# Mousse refreshes at steps 1, 5, 9: the stop at step 6 falls between two of them.
def test_lora_resume_is_exact(tmp_path, text_file):
    straight, losses = train_lora(tmp_path / "straight", text_file)
    first, head = train_lora(tmp_path / "split", text_file, stop_at=6)
    checkpoint = tmp_path / "split" / "checkpoint-6"
    assert first.state.global_step == 6
    assert (checkpoint / "optimizer.safetensors").is_file() and (checkpoint / "scheduler.pt").is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "optimizer.pt").exists()
    assert not (checkpoint / "model.safetensors").exists()  # PEFT checkpoints hold the adapter only
    with safe_open(str(checkpoint / "optimizer.safetensors"), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        keys = set(f.keys())
    names = {n for g in groups for n in g["param_names"]}
    assert names == set(trainable(first.model))  # the optimizer file holds the adapter's state only
    assert {g["sides"] for g in groups if g["group_name"].startswith("matrix.lora")} == {"left", "right"}
    assert f"state/{HEAD}/exp_avg" in keys

    resumed, tail = train_lora(tmp_path / "split", text_file, resume=str(checkpoint))
    assert len(losses) == 12 and len(head) == 6
    assert head + tail[-6:] == losses  # bitwise: the logged per-step losses are exact floats
    final, reference = dict(resumed.model.named_parameters()), dict(straight.model.named_parameters())
    assert final.keys() == reference.keys()
    for n, p in reference.items():
        assert torch.equal(final[n], p), n
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
