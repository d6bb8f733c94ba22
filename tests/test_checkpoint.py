"""optimizer.safetensors: exact Trainer resume, format, and loud failures on bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import StopAt, byte_blocks, tiny_gpt2, tiny_qwen3
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

import hf_mousse
from hf_mousse import MiMuon, Mousse, Muon, load_optimizer, save_optimizer
from hf_mousse.errors import CheckpointError

hf_mousse.register()


def train(tmp_path, text_file, optim, optim_args, *, stop_at=None, resume=None, max_steps=12):
    train_set, _ = byte_blocks(text_file)
    args = TrainingArguments(
        output_dir=str(tmp_path), optim=optim, optim_args=optim_args, max_steps=max_steps,
        per_device_train_batch_size=4, learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="cosine",
        warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=6, report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=tiny_gpt2(seed=0), args=args, train_dataset=train_set,
                      callbacks=[StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


# Refreshes / gap tests at steps 1, 5, 9: the stop at step 6 falls between two of them.
@pytest.mark.parametrize("optim, optim_args", [("mousse", "refresh_every=4"), ("mimuon", "gap_every=4"),
                                               ("muon", ""), ("mousse", "refresh_every=4, refresh=newton")])
def test_resume_is_exact(tmp_path, text_file, optim, optim_args):
    straight, losses = train(tmp_path / "straight", text_file, optim, optim_args)
    first, head = train(tmp_path / "split", text_file, optim, optim_args, stop_at=6)
    checkpoint = tmp_path / "split" / "checkpoint-6"
    assert first.state.global_step == 6
    assert (checkpoint / "optimizer.safetensors").is_file() and (checkpoint / "scheduler.pt").is_file()
    assert not (checkpoint / "optimizer.pt").exists()
    resumed, tail = train(tmp_path / "split", text_file, optim, optim_args, resume=str(checkpoint))
    assert len(losses) == 12 and len(head) == 6
    assert head + tail[-6:] == losses  # bitwise: the logged per-step losses are exact floats
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()


def test_file_layout(tmp_path, text_file):
    trainer, _ = train(tmp_path, text_file, "mousse", "refresh_every=4", max_steps=6)
    path = tmp_path / "checkpoint-6" / "optimizer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        factor = f.get_tensor("state/transformer.h.0.attn.c_attn.weight/kron_left")
    assert meta["format"] == "hf_mousse.optimizer" and meta["optimizer"] == "Mousse"
    assert json.loads(meta["versions"])["hf_mousse"] == hf_mousse.__version__
    groups = json.loads(meta["param_groups"])
    matrix = next(g for g in groups if g["group_name"] == "matrix.in_out.split3")
    assert matrix["param_names"] == [f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)]
    assert matrix["refresh_every"] == 4 and matrix["weight_decay"] == 0.1
    steps = json.loads(meta["scalars"])
    assert steps["transformer.wte.weight"]["step"] == 6
    assert factor.dtype == torch.float32 and factor.shape == (3, 32, 32)  # c_attn as three blocks
    assert {"state/transformer.wte.weight/exp_avg", "state/transformer.h.1.mlp.c_fc.weight/momentum",
            "state/transformer.h.1.mlp.c_fc.weight/kron_right_eigvecs"} <= keys


def _stepped(opt_cls, model, steps=2, **kw):
    opt = opt_cls.for_model(model, **kw)
    x = torch.arange(16).reshape(2, 8) % 256
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("opt_cls", [Mousse, MiMuon, Muon])
def test_round_trip_is_exact_and_keeps_fp32_state(tmp_path, opt_cls):
    model = tiny_qwen3().to(torch.bfloat16)
    opt = _stepped(opt_cls, model, lr=1e-3)
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(opt, path)
    assert [p.name for p in tmp_path.iterdir()] == ["optimizer.safetensors"]  # no temporary file left
    fresh = opt_cls.for_model(model, lr=1e-3)
    load_optimizer(fresh, path)
    saved_stats = {k: v for k, v in opt.stats().items() if k != "matrix_updates"}  # since construction
    assert fresh.stats() == {**saved_stats, "matrix_updates": 0}
    for p in opt.state:
        a, b = opt.state[p], fresh.state[p]
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
                if k != "muon_branch":
                    assert a[k].dtype == torch.float32  # bf16 parameters keep fp32 statistics
            else:
                assert a[k] == b[k]


@pytest.fixture
def saved(tmp_path):
    model = tiny_gpt2()
    opt = _stepped(Mousse, model, refresh_every=1)
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(opt, path)
    return model, path


def test_truncated_file_fails(saved):
    model, path = saved
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_optimizer(Mousse.for_model(model), path)


def test_flipped_bytes_fail_the_checksum(saved):
    model, path = saved
    with open(path, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    opt = Mousse.for_model(model)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_optimizer(opt, path)
    assert not opt.state  # untouched


def test_garbage_and_foreign_files_fail(tmp_path, saved):
    model, _ = saved
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_optimizer(Mousse.for_model(model), str(junk))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not an hf_mousse optimizer state"):
        load_optimizer(Mousse.for_model(model), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no optimizer state file"):
        load_optimizer(Mousse.for_model(model), str(tmp_path / "missing.safetensors"))


def test_mismatched_model_or_optimizer_fails(saved):
    model, path = saved
    with pytest.raises(CheckpointError, match="different parameters.*missing from the file.*model.layers"):
        load_optimizer(Mousse.for_model(tiny_qwen3()), path)
    with pytest.raises(CheckpointError, match=r"(momentum|exp_avg) is \(\d+,?.*needs .*different model"):
        load_optimizer(Mousse.for_model(tiny_gpt2(hidden=48)), path)
    with pytest.raises(CheckpointError, match="holds Mousse state but the optimizer is Muon"):
        load_optimizer(Muon.for_model(model), path)
    frozen = tiny_gpt2()
    frozen.transformer.wte.weight.requires_grad_(False)
    with pytest.raises(CheckpointError, match="not in this model: \\['transformer.wte.weight'\\]"):
        load_optimizer(Mousse.for_model(frozen), path)


def test_unnamed_parameters_are_named_from_the_model(tmp_path):
    model = tiny_gpt2()
    opt = Muon(model.parameters())
    x = torch.arange(8)[None]
    model(x, labels=x).loss.backward()
    opt.step()
    with pytest.raises(CheckpointError, match="without names"):
        save_optimizer(opt, str(tmp_path / "o.safetensors"))
    save_optimizer(opt, str(tmp_path / "o.safetensors"), model=model)
    fresh = Muon(model.parameters())
    load_optimizer(fresh, str(tmp_path / "o.safetensors"), model=model)
    assert all(torch.equal(opt.state[p]["momentum"], fresh.state[p]["momentum"])
               for g in opt.param_groups if g["role"] == "matrix" for p in g["params"])


def test_trainer_resume_fails_loudly(tmp_path, text_file):
    train(tmp_path, text_file, "mousse", "", max_steps=6)
    checkpoint = tmp_path / "checkpoint-6"
    with open(checkpoint / "optimizer.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        train(tmp_path, text_file, "mousse", "", resume=str(checkpoint))
    os.remove(checkpoint / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="no optimizer state.*restart from zero"):
        train(tmp_path, text_file, "mousse", "", resume=str(checkpoint))
