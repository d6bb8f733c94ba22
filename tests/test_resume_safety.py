"""Issue 12: a resume never continues from state that is not what was saved, and never drops or
ignores state or settings silently (header integrity, changed hyperparameters, stock optimizers on
our checkpoints, optimizer files from another step, legacy optimizer.pt files)."""

from __future__ import annotations

import pytest
import torch

from hf_mousse import Mousse, load_optimizer, save_optimizer
from hf_mousse.errors import CheckpointError


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def mousse(model, **kw):
    return Mousse.for_model(model, **{"lr": 0.02, "refresh_every": 10, **kw})


def stepped(model, steps=2, **kw):
    opt = mousse(model, **kw)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


def snapshot(opt):
    """Everything a load restores: each parameter's state, the groups (less the tensors), the counters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state.get(p, {}).items()}
             for p in params]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, groups, opt.stats()


def same(a, b) -> bool:
    (state_a, groups_a, stats_a), (state_b, groups_b, stats_b) = a, b
    if groups_a != groups_b or stats_a != stats_b:
        return False
    if [s.keys() for s in state_a] != [s.keys() for s in state_b]:
        return False
    for sa, sb in zip(state_a, state_b):
        for k, x in sa.items():
            y = sb[k]
            if isinstance(x, torch.Tensor):
                if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                    return False
            elif type(x) is not type(y) or x != y:
                return False
    return True


# ---------------------------------------------------------------------------- 1. every byte is checked
def test_every_single_bit_flip_is_refused_at_load_or_harmless(tmp_path, single_thread):
    """One bit flipped in every byte of the header (its 8-byte length included) and in a sample of
    tensor bytes: each load either raises CheckpointError naming the file, leaving the optimizer
    untouched, or restores exactly what was saved. (Before the header was checksummed, ~19% of header
    bit flips of this file resumed with other state: momentum 0.95 -> 9.95, a step counter, ...)"""
    model = small_model()
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(stepped(model), path)
    reference = mousse(model)
    load_optimizer(reference, path)
    expected = snapshot(reference)
    data = open(path, "rb").read()
    end_of_header = 8 + int.from_bytes(data[:8], "little")
    tensor_sample = range(end_of_header, len(data), max(1, (len(data) - end_of_header) // 300))
    bad = str(tmp_path / "flipped.safetensors")
    outcomes = {"refused": 0, "harmless": 0}
    for pos in [*range(end_of_header), *tensor_sample]:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (pos % 8)
        with open(bad, "wb") as f:
            f.write(flipped)
        opt = mousse(model)
        try:
            load_optimizer(opt, bad)
        except CheckpointError as e:
            assert bad in str(e), e
            assert not opt.state, f"byte {pos}: a refused load changed the optimizer"
            outcomes["refused"] += 1
            continue
        assert same(snapshot(opt), expected), f"byte {pos}: resumed silently with different state"
        outcomes["harmless"] += 1
    assert outcomes["refused"] >= end_of_header  # every header flip, at least, was caught


def resign(path: str, edit) -> None:
    """Rewrite ``path`` with ``edit(metadata, tensors)`` applied and a valid digest: what a writer with
    a bug (or a hand edit) would leave, which the checksum cannot catch."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hf_mousse.integration.checkpoint import DIGEST, _digest

    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(metadata, tensors)
    metadata[DIGEST] = _digest(metadata, tensors)
    save_file(tensors, path, metadata=metadata)


def _set_group_value(key, value):
    import json

    def edit(metadata, tensors):
        groups = json.loads(metadata["param_groups"])
        groups[0][key] = value
        metadata["param_groups"] = json.dumps(groups)
    return edit


@pytest.mark.parametrize("key, value", [("momentum", 9.95), ("refresh_every", 0), ("lr", -1.0),
                                        ("sides", "top"), ("betas", [0.9])])
def test_loaded_groups_pass_the_constructor_validation(tmp_path, key, value):
    model = small_model()
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(stepped(model), path)
    resign(path, _set_group_value(key, value))
    opt = mousse(model)
    with pytest.raises(CheckpointError, match=rf"{path}: .*saved param group.*invalid {key}="):
        load_optimizer(opt, path)
    assert not opt.state


def _with(key, fn):
    def edit(sd):
        st = sd["state"][0]
        st[key] = fn(st[key])
    return edit


def _drop(key):
    return lambda sd: sd["state"][0].pop(key)


STATE_EDITS = {
    "transposed momentum": (_with("momentum", lambda t: t.mT.contiguous()),
                            r"momentum is \(6, 8\).*needs \(8, 6\)"),
    "float64 factor": (_with("kron_left", lambda t: t.double()), "kron_left is .*float64.*needs .*float32"),
    "factor of another size": (_with("kron_right", lambda t: t[:, :3, :3]), r"kron_right is \(1, 3, 3\)"),
    "missing factor": (_drop("kron_left_eigvecs"), r"missing: \['kron_left_eigvecs'\]"),
    "unexpected entry": (lambda sd: sd["state"][0].update(exp_avg_sq=torch.zeros(8, 6)),
                         r"unexpected: \['exp_avg_sq'\]"),
    "negative step": (_with("step", lambda v: -1), r"step=-1 is not an int"),
    "bool step": (_with("step", lambda v: True), r"step=True is not an int"),
    "tensor where a counter is": (_with("step", lambda v: torch.tensor(2.0)), "step=tensor"),
    "unknown parameter index": (lambda sd: sd["state"].update({99: {}}), "parameter index 99"),
    "bad counters": (lambda sd: sd["hf_mousse_stats"].update(eigh_failures=-3), "optimizer counters"),
}


@pytest.mark.parametrize("edit, message", STATE_EDITS.values(), ids=STATE_EDITS.keys())
def test_state_entries_are_checked_against_their_parameters(edit, message):
    """load_state_dict (the safetensors path and torch.save'd state dicts alike) refuses state that a
    fresh state of the parameter would not have: other shapes, dtypes, entries, counters."""
    model = small_model()
    sd = stepped(model).state_dict()
    edit(sd)
    opt = mousse(model)
    with pytest.raises(CheckpointError, match=message):
        opt.load_state_dict(sd)
    assert not opt.state and opt.param_groups[0]["momentum"] == 0.95  # untouched


def test_staggered_refresh_phases_are_checked(tmp_path):
    model = small_model()
    sd = stepped(model, refresh_schedule="staggered", refresh_every=3).state_dict()
    assert {sd["state"][i]["refresh_phase"] for i in (0, 1)} <= {0, 1, 2}
    sd["state"][0]["refresh_phase"] = 3
    with pytest.raises(CheckpointError, match=r"refresh_phase=3 is not an int in \[0, 3\)"):
        mousse(model, refresh_schedule="staggered", refresh_every=3).load_state_dict(sd)


# ---------------------------------------------------------------------------- 2. changed settings
def test_changed_hyperparameters_apply_and_each_is_logged(tmp_path, caplog):
    """The optimizer's own hyperparameters: the requested values (this optimizer's) apply, and each
    change is logged with the saved and the requested value. (torch's rule kept the saved ones,
    silently.)"""
    model = small_model()
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(stepped(model, weight_decay=0.01), path)
    opt = mousse(model, refresh_every=3, alpha=0.5, weight_decay=0.5)
    with caplog.at_level("WARNING", logger="hf_mousse"):
        load_optimizer(opt, path)
    matrix = opt.param_groups[0]
    assert (matrix["refresh_every"], matrix["alpha"], matrix["weight_decay"]) == (3, 0.5, 0.5)
    logged = [r.getMessage() for r in caplog.records]
    for key, old, new in (("refresh_every", 10, 3), ("alpha", 0.125, 0.5), ("weight_decay", 0.01, 0.5)):
        assert any(f"{key} was {old!r} when saved and is {new!r} now" in m and "requested value applies" in m
                   for m in logged), (key, logged)
    assert len(logged) == 3  # nothing else changed; the scalar groups' weight decay is their own
    x = torch.randn(5, 6)
    model(x).square().sum().backward()
    opt.step()  # trains on
    assert torch.isfinite(model[0].weight).all()


@pytest.mark.parametrize("key, old, new", [("sides", "both", "left"), ("scalar_optimizer", "adamw", "lion"),
                                           ("refresh_schedule", "together", "staggered")])
def test_settings_the_state_depends_on_cannot_change(tmp_path, key, old, new):
    model = small_model()
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(stepped(model), path)
    opt = mousse(model, **{key: new})
    message = rf"{path}: cannot resume group .* with {key}={new!r}: the state was saved with {key}={old!r}"
    with pytest.raises(CheckpointError, match=message + rf".*Resume with {key}={old!r}"):
        load_optimizer(opt, path)
    assert not opt.state


def _with_scheduler(opt, peak):
    """What the Trainer does before loading: a scheduler made on the optimizer records initial_lr."""
    for g in opt.param_groups:
        g["lr"] = peak
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 * (step + 1))


def test_the_learning_rate_schedule_resumes_and_a_changed_peak_is_refused(tmp_path, caplog):
    model = small_model()
    opt = mousse(model)
    sched = _with_scheduler(opt, 0.02)
    x = torch.randn(5, 6)
    for _ in range(3):
        model(x).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(opt, path)
    same = mousse(model)
    _with_scheduler(same, 0.02)
    with caplog.at_level("WARNING", logger="hf_mousse"):
        load_optimizer(same, path)
    assert [g["lr"] for g in same.param_groups] == [g["lr"] for g in opt.param_groups]  # the schedule's
    assert not caplog.records
    changed = mousse(model)
    _with_scheduler(changed, 0.05)
    with pytest.raises(CheckpointError, match=r"peak learning rate 0\.05: the state was saved with 0\.02"):
        load_optimizer(changed, path)


def test_a_changed_lr_without_a_schedule_is_kept_and_logged(tmp_path, caplog):
    model = small_model()
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(stepped(model), path)
    opt = mousse(model, lr=0.05)
    with caplog.at_level("WARNING", logger="hf_mousse"):
        load_optimizer(opt, path)
    assert opt.param_groups[0]["lr"] == 0.02
    assert any("lr was 0.02 when saved and is 0.05 now" in r.getMessage() and "saved value applies"
               in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- the Trainer
def run(out, text_file, *, optim="mousse", optim_args="", max_steps=4, resume=None, **kw):
    from helpers import byte_blocks, tiny_gpt2
    from transformers import Trainer, TrainingArguments

    import hf_mousse

    hf_mousse.register()
    train_set, _ = byte_blocks(text_file)
    args = dict(output_dir=str(out), optim=optim, optim_args=optim_args, max_steps=max_steps,
                per_device_train_batch_size=4, learning_rate=3e-3, weight_decay=0.1,
                lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, save_strategy="steps",
                save_steps=2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=tiny_gpt2(), args=TrainingArguments(**{**args, **kw}), train_dataset=train_set)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, text_file):
    """A Mousse run to step 4 with checkpoints at steps 2 and 4 (copied per test)."""
    out = tmp_path_factory.mktemp("mousse-run")
    trainer = run(out, text_file)
    return out, trainer.optimizer.optimizer.state_dict()


@pytest.fixture
def run_dir(tmp_path, checkpoints):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(checkpoints[0], out)
    return out


def inner(trainer):
    return trainer.optimizer.optimizer


def test_trainer_resume_applies_changed_settings_and_logs_them(run_dir, text_file, caplog):
    """The issue's case: --optim_args refresh_every=3,alpha=0.5 and --weight_decay 0.5 on resume."""
    with caplog.at_level("WARNING", logger="hf_mousse"):
        trainer = run(run_dir, text_file, optim_args="refresh_every=3,alpha=0.5", weight_decay=0.5,
                      max_steps=5, resume=run_dir / "checkpoint-4")
    matrix = [g for g in inner(trainer).param_groups if g["role"] == "matrix"]
    assert all((g["refresh_every"], g["alpha"], g["weight_decay"]) == (3, 0.5, 0.5) for g in matrix)
    logged = " | ".join(r.getMessage() for r in caplog.records)
    for change in ("refresh_every was 10 when saved and is 3 now",
                   "alpha was 0.125 when saved and is 0.5 now",
                   "weight_decay was 0.1 when saved and is 0.5 now"):
        assert change in logged


def test_trainer_resume_with_another_learning_rate_is_refused(run_dir, text_file):
    with pytest.raises(CheckpointError, match=r"peak learning rate 0\.001: the state was saved with 0\.003"):
        run(run_dir, text_file, learning_rate=1e-3, max_steps=5, resume=run_dir / "checkpoint-4")


# ---------------------------------------------------------------------------- 3. a stock optimizer
@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_a_stock_optimizer_cannot_resume_our_checkpoint(run_dir, text_file, optim):
    """transformers would find no optimizer.pt, skip optimizer and scheduler, and restart the LR
    schedule: refused, with the way out."""
    with pytest.raises(CheckpointError, match=rf"cannot resume from .*checkpoint-4 with .*optim='{optim}'.*"
                                              r"written by hf_mousse's Mousse.*--optim mousse.*or delete "
                                              r"optimizer.safetensors and scheduler.pt"):
        run(run_dir, text_file, optim=optim, max_steps=6, resume=run_dir / "checkpoint-4")


# ---------------------------------------------------------------------------- 4. files of other steps
def test_an_optimizer_file_from_another_step_is_refused(run_dir, text_file):
    import shutil

    shutil.copy(run_dir / "checkpoint-2" / "optimizer.safetensors", run_dir / "checkpoint-4")
    with pytest.raises(CheckpointError, match=r"written at global step 2 but the checkpoint is at step 4"):
        run(run_dir, text_file, max_steps=6, resume=run_dir / "checkpoint-4")


def test_a_scheduler_from_another_save_is_refused(run_dir, text_file):
    """An interrupted save that replaced the scheduler but not the optimizer file (or a copy)."""
    import shutil

    shutil.copy(run_dir / "checkpoint-2" / "scheduler.pt", run_dir / "checkpoint-4")
    with pytest.raises(CheckpointError, match=r"scheduler.pt is not the file saved together with"):
        run(run_dir, text_file, max_steps=6, resume=run_dir / "checkpoint-4")


# ---------------------------------------------------------------------------- 7. legacy optimizer.pt
def _legacy(checkpoint, state_dict):
    (checkpoint / "optimizer.safetensors").unlink()
    torch.save(state_dict, checkpoint / "optimizer.pt")


def test_a_legacy_optimizer_pt_of_ours_resumes(run_dir, text_file, checkpoints):
    """optimizer.pt written by torch.save before registration: it loads, through the same checks."""
    _legacy(run_dir / "checkpoint-4", checkpoints[1])
    trainer = run(run_dir, text_file, max_steps=5, resume=run_dir / "checkpoint-4")
    assert trainer.state.global_step == 5


def test_a_legacy_optimizer_pt_of_another_optimizer_is_refused(run_dir, text_file):
    """A Muon state (the same parameters and groups) in a Mousse resume failed at the first step
    with KeyError: 'sides'; an AdamW one (other groups) is refused as well."""
    from helpers import tiny_gpt2

    from hf_mousse import Muon

    model = tiny_gpt2()
    muon = Muon.for_model(model)
    x = torch.arange(16).reshape(2, 8) % 256
    model(x, labels=x).loss.backward()
    muon.step()
    _legacy(run_dir / "checkpoint-4", muon.state_dict())
    message = r"optimizer.pt: the state was saved by 'Muon' but the optimizer is Mousse"
    with pytest.raises(CheckpointError, match=message + r".*delete optimizer.pt and scheduler.pt"):
        run(run_dir, text_file, max_steps=6, resume=run_dir / "checkpoint-4")
    unmarked = muon.state_dict()
    del unmarked["hf_mousse_optimizer"]  # as an earlier hf_mousse wrote it: its groups tell
    torch.save(unmarked, run_dir / "checkpoint-4" / "optimizer.pt")
    message = r"optimizer.pt: cannot resume group .*: the saved group has no refresh_schedule.*another"
    with pytest.raises(CheckpointError, match=message):
        run(run_dir, text_file, max_steps=6, resume=run_dir / "checkpoint-4")
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    torch.save(adamw.state_dict(), run_dir / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer.pt: the saved state has param groups of sizes"):
        run(run_dir, text_file, max_steps=6, resume=run_dir / "checkpoint-4")


# ---------------------------------------------------------------------------- 8. smaller
def test_a_truncated_scheduler_is_a_checkpoint_error(run_dir, text_file, checkpoints):
    """Was a raw RuntimeError from torch's zip reader. With our optimizer file its recorded digest
    catches it; beside a legacy optimizer.pt the load itself is wrapped."""
    path = run_dir / "checkpoint-4" / "scheduler.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"scheduler.pt is not the file saved together"):
        run(run_dir, text_file, max_steps=6, resume=run_dir / "checkpoint-4")
    _legacy(run_dir / "checkpoint-4", checkpoints[1])
    message = r"scheduler.pt is not readable \(RuntimeError.*truncated or corrupted"
    with pytest.raises(CheckpointError, match=message):
        run(run_dir, text_file, max_steps=6, resume=run_dir / "checkpoint-4")


def test_temporary_files_of_a_killed_writer_are_removed_on_the_next_save(tmp_path):
    """A hard kill between creating the temporary file and the rename leaves it behind; the next save
    of the same file deletes it, and nothing else."""
    model = small_model()
    orphans = [tmp_path / f".optimizer.safetensors.{'0123456789abcdef' * 2}.tmp",
               tmp_path / f".optimizer.safetensors.{'f' * 32}.tmp"]
    others = [tmp_path / f".scheduler.pt.{'0' * 32}.tmp", tmp_path / ".optimizer.safetensors.mine.tmp",
              tmp_path / "notes.txt"]
    for f in orphans + others:
        f.write_bytes(b"partial")
    save_optimizer(stepped(model), str(tmp_path / "optimizer.safetensors"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["optimizer.safetensors", *(f.name for f in others)])
