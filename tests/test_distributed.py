"""The matrix work split over ranks (DDP, FSDP2) and checkpoints that move between world sizes.

Each test starts 2 CPU processes with torchrun (gloo), the way users launch, running
tests/scripts/dist_train.py, and compares with one process on the same global batches. The runs of
one process differ from the two-process runs only by the order in which the gradient reduction adds
(DDP, FSDP2), so parameters agree to bf16 tolerance, not bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = str(Path(__file__).parent / "scripts" / "dist_train.py")
BIN = Path(sys.executable).parent
BF16_RTOL = 1.6e-2  # torch.testing's tolerance for bfloat16, applied to each tensor's norm
STEPS = 20


def launch(out: Path, *args: str, nproc: int = 2) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*start, SCRIPT, "--out", str(out), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**json.loads((out / "result.json").read_text()), "weights": torch.load(out / "final.pt")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs, by their arguments (cached: several two-process runs compare with one)."""
    runs = {}

    def get(*args: str) -> dict:
        if args not in runs:
            runs[args] = launch(tmp_path_factory.mktemp("one"), *args, nproc=1)
        return runs[args]

    return get


def assert_same_weights(one: dict, two: dict) -> None:
    assert one.keys() == two.keys()
    for name, a in one.items():
        err = ((a - two[name]).norm() / a.norm().clamp_min(1e-12)).item()
        assert err <= BF16_RTOL, f"{name}: relative error {err:.2e} after {STEPS} steps"


def matrix_blocks_per_step(model: str, lora: bool) -> int:
    """Blocks orthogonalised per step: GPT-2's c_attn splits into Q, K, V (3), then c_proj, c_fc and
    the MLP's c_proj, per layer; Qwen3's 7 projections per layer; LoRA: v_proj's A and B (rank 2;
    q_proj's rank-1 factors take the scalar path)."""
    per_layer = 2 if lora else (6 if model == "gpt2" else 7)
    return 2 * per_layer


def assert_work_split(run: dict, model: str = "gpt2", lora: bool = False) -> None:
    counts = [s["matrix_updates"] for s in run["stats"]]
    assert sum(counts) == matrix_blocks_per_step(model, lora) * STEPS  # each block by exactly one rank
    assert all(c > 0 for c in counts), counts  # and every rank took a share


@pytest.mark.parametrize("optim", ["muon", "mousse", "mimuon", "mousse_newton", "mousse_delay"])
def test_ddp_split_matches_one_process(tmp_path, reference, optim):
    one = reference("--optim", optim)
    two = launch(tmp_path, "--optim", optim, "--engine", "ddp")
    assert two["world"] == 2
    assert_same_weights(one["weights"], two["weights"])
    assert_work_split(two)
    assert one["stats"][0]["matrix_updates"] == matrix_blocks_per_step("gpt2", False) * STEPS
    # each rank keeps only its matrices' state: together, the one process's
    ranks = [s["state_bytes_matrix"] for s in two["stats"]]
    assert sum(ranks) == one["stats"][0]["state_bytes_matrix"] and all(0 < r for r in ranks), ranks


@pytest.mark.parametrize(("optim", "model", "build", "lora"), [
    ("mousse", "gpt2", "after", False),   # the optimizer built on the DTensor parameters
    ("mousse", "gpt2", "before", False),  # built before sharding, parameters swapped after (accelerate)
    ("mousse", "qwen3", "after", False),  # odd dimensions (35, 37): uneven shards
    ("muon", "qwen3", "after", False),
    ("mimuon", "qwen3", "after", False),
    ("mousse", "qwen3", "before", True),  # LoRA: a rank-1 factor leaves one rank an empty shard
])
def test_fsdp2_matches_one_process(tmp_path, reference, optim, model, build, lora):
    extra = ("--lora",) if lora else ()
    one = reference("--optim", optim, "--model", model, *extra)
    two = launch(tmp_path, "--optim", optim, "--model", model, "--engine", "fsdp2", "--build", build,
                 *extra)
    assert_same_weights(one["weights"], two["weights"])
    assert_work_split(two, model, lora)


def _max_rel_err(one: dict, two: dict) -> float:
    return max(((a - two[n]).norm() / a.norm().clamp_min(1e-12)).item() for n, a in one.items())


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_split_applies_weight_decay(tmp_path, reference, engine):
    """lr * wd = 0.02: the decay alone shrinks the matrices by 0.98 per step, so over the run it moves
    the weights far beyond the tolerance (checked against the default weight decay, 1e-4 per step); a
    split step that dropped or mis-scaled the decay could not match the single process."""
    decayed = ("--optim", "muon", "--weight-decay", "10")
    one = reference(*decayed)
    assert _max_rel_err(one["weights"], reference("--optim", "muon")["weights"]) > 10 * BF16_RTOL
    two = launch(tmp_path, *decayed, "--engine", engine)
    assert_same_weights(one["weights"], two["weights"])
    assert_work_split(two)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_fsdp2_nonfinite_shard_skips_the_step_on_every_rank(tmp_path, reference, nonfinite):
    """A NaN in rank 0's shard of one gradient only: rank 1's shards are finite, yet every rank must
    skip the step alike (the finite flags are agreed over the ranks), so no rank changes any of its
    shards, every rank counts the skip, and with "raise" check_finite() raises on every rank. The run
    then goes on as the single process with the same NaN (which sees the whole gradient) does.
    --timeout: a rank left waiting in a collective by another that skipped fails instead of hanging."""
    args = ("--optim", "mousse", "--steps", "5", "--nan-at", "3", "--nonfinite", nonfinite)
    two = launch(tmp_path, *args, "--engine", "fsdp2", "--timeout", "60")
    bad = "transformer.h.0.mlp.c_fc.weight"  # the script's --nan-in
    for rank, step in enumerate(two["nan_step"]):
        assert step["changed"] == [], (rank, step["changed"])
        if nonfinite == "raise":
            assert f"non-finite gradient (inf or NaN) in {bad} " in (step["error"] or ""), rank
        else:
            assert step["error"] is None, rank
    assert [s["nonfinite_skips"] for s in two["stats"]] == [1, 1]
    one = reference(*args)
    assert one["stats"][0]["nonfinite_skips"] == 1 and one["nan_step"][0]["changed"] == []
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert_same_weights(one["weights"], two["weights"])


def test_fsdp2_without_the_split_is_refused(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", SCRIPT, "--out", str(tmp_path),
           "--engine", "fsdp2", "--no-split", "--steps", "1"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert "sharded (DTensor) matrix" in proc.stderr and "distributed=False" in proc.stderr


@pytest.mark.parametrize(("engine", "optim"),
                         [("ddp", "mousse"), ("fsdp2", "mousse"), ("fsdp2", "mousse_newton")])
def test_save_on_two_ranks_resumes_on_one_and_on_two(tmp_path, reference, engine, optim):
    whole = reference("--optim", optim, "--model", "qwen3")
    saved = launch(tmp_path / "saved", "--optim", optim, "--model", "qwen3", "--engine", engine,
                   "--save-at", "10")
    assert (tmp_path / "saved" / "optimizer.safetensors").is_file()
    resumed = {n: launch(tmp_path / f"resumed{n}", "--optim", optim, "--model", "qwen3",
                         "--engine", engine, "--resume", str(tmp_path / "saved"), nproc=n) for n in (1, 2)}
    for n, run in resumed.items():
        assert len(run["losses"]) == STEPS - 10
        assert run["losses"] == pytest.approx(whole["losses"][10:], rel=1e-4), n
        assert run["losses"] == pytest.approx(saved["losses"][10:], rel=1e-4), n
        assert_same_weights(whole["weights"], run["weights"])


def test_trainer_save_under_fsdp_writes_our_format(tmp_path):
    # On CPU the Trainer's --fsdp route does not enable FSDP (is_fsdp_enabled stays False), so the
    # hook is driven directly: with FSDP enabled it must write optimizer.safetensors, not hand the
    # optimizer to transformers' FSDP path (accelerate's optimizer.bin, which cannot hold our state).
    import types

    from helpers import tiny_gpt2

    import hf_mousse
    from hf_mousse.integration import trainer_hooks

    model = tiny_gpt2()
    opt = hf_mousse.Mousse.for_model(model, lr=1e-3)
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    opt.step()
    trainer = types.SimpleNamespace(
        optimizer=opt, model=model, is_fsdp_enabled=True, is_deepspeed_enabled=False,
        args=types.SimpleNamespace(should_save=True), state=types.SimpleNamespace(global_step=1),
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))

    def transformers_path(self, output_dir):
        raise AssertionError("the FSDP optimizer state went to transformers' own save")

    trainer_hooks._save(trainer, str(tmp_path), transformers_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.safetensors", "scheduler.pt"]
    fresh = hf_mousse.Mousse.for_model(model, lr=1e-3)
    trainer.optimizer, trainer.lr_scheduler = fresh, torch.optim.lr_scheduler.LambdaLR(fresh, lambda _: 1.0)
    trainer_hooks._load(trainer, str(tmp_path), transformers_path)
    matrices = [p for p in model.parameters() if "momentum" in opt.state[p]]
    assert matrices
    assert all(torch.equal(fresh.state[p]["momentum"], opt.state[p]["momentum"]) for p in matrices)


@pytest.mark.parametrize(("layers", "world"), [(1, 2), (5, 2), (5, 4), (12, 4)])
def test_owners_balance_cost_and_pad_little(layers, world):
    # GPT-2 124M's matrices for Mousse: q, k, v, c_proj (768 x 768), c_fc (3072 x 768) and the MLP's
    # c_proj (768 x 3072) per layer; the 3072-sided ones cost ~10x a 768 x 768 one.
    from hf_mousse import Mousse
    from hf_mousse.optim.distributed import assign_owners

    opt = Mousse([torch.nn.Parameter(torch.zeros(2, 2))])
    group = opt.param_groups[0]
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    items = [((m, n), 1, opt._block_cost(group, m, n)) for _ in range(layers) for m, n in shapes]
    owners = assign_owners(items, world)
    load = [sum(c for (_, _, c), o in zip(items, owners) if o == r) for r in range(world)]
    assert max(load) <= 1.2 * sum(load) / world, load
    for key in {k for k, _, _ in items}:  # one all-gather per shape, padded to the largest share
        held = [sum(1 for (k, _, _), o in zip(items, owners) if k == key and o == r) for r in range(world)]
        assert max(held) - min(held) <= 1, (key, held)
