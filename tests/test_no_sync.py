"""Issue 9: ``step()`` does not synchronise the host with the device (DESIGN.md promise 4).

With ``nonfinite="raise"`` (the default) the finite check is a device flag that gates every write of
the step; the error is raised at the next natural synchronisation (``check_finite``, ``stats``,
``diagnostics``, ``state_dict``; in the Trainer: the next log or checkpoint). On CPU nothing really
synchronises, so the guard is that every tensor-to-host method raises during ``step()``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import pytest
import torch
from helpers import byte_blocks, tiny_gpt2
from test_robustness import make_params, set_grads
from transformers import Trainer, TrainingArguments

import hf_mousse
from hf_mousse import MiMuon, Mousse, Muon
from hf_mousse.errors import NonFiniteGradientError, NonFiniteUpdateError

hf_mousse.register()

ALL = [Muon, Mousse, MiMuon]
ids = [c.__name__ for c in ALL]
# Device-to-host reads (and host-to-device copies, which synchronise on CUDA too).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__array__")


@contextmanager
def no_host_reads():
    """Every tensor-to-host method, a ``.to`` naming "cpu" or another device than the tensor's, and
    tensors built from host data (``torch.tensor`` / ``torch.as_tensor``: a blocking host-to-device
    copy on CUDA) raise inside."""
    mp = pytest.MonkeyPatch()

    def refuse(what):
        def f(*args, **kwargs):
            raise AssertionError(f"{what} during step(): a host-device synchronisation")
        return f

    for name in HOST_READS:
        mp.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        targets = [a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device))]
        for target in targets:  # "cpu" named outright, or a move to another device
            if (isinstance(target, str) and target.startswith("cpu")) or torch.device(target) != self.device:
                raise AssertionError(f"Tensor.to({target!r}) during step(): a host-device copy")
        return real_to(self, *args, **kwargs)

    mp.setattr(torch.Tensor, "to", to)
    mp.setattr(torch, "tensor", refuse("torch.tensor"))
    mp.setattr(torch, "as_tensor", refuse("torch.as_tensor"))
    try:
        yield
    finally:
        mp.undo()


def named(params):
    return [{"params": params, "param_names": [f"w{i}" for i in range(len(params))]}]


def snapshot(opt, params):
    """Copies of the weights and of every optimizer tensor."""
    state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state.get(p, {}).items()
             if isinstance(v, torch.Tensor)}
    return [p.detach().clone() for p in params], state


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return torch.equal(a, b)


def assert_unchanged(opt, params, snap):
    weights, state = snap
    for i, (p, w) in enumerate(zip(params, weights)):
        assert same_bits(p.detach(), w), f"weight {i} changed"
    now = snapshot(opt, params)[1]
    assert now.keys() == state.keys()
    for key, v in state.items():
        assert same_bits(now[key], v), f"state {key} changed"


# ---------------------------------------------------------------------------- no host reads
CONFIGS = [
    (Muon, {}),
    (Muon, {"scalar_optimizer": "lion", "nesterov": False}),
    (Mousse, {}),
    (Mousse, {"nesterov": True, "sides": "left"}),
    (Mousse, {"refresh": "newton", "refresh_every": 2}),  # refreshes at steps 3 and 5 too
    # refreshes start at steps 3 and 5 in the background, the first installed at step 4
    (Mousse, {"refresh_every": 2, "refresh_delay": 1, "matmul_dtype": "bfloat16"}),
    (MiMuon, {}),
]
CONFIG_IDS = [f"{c.__name__}-{'-'.join(map(str, k.values())) or 'default'}" for c, k in CONFIGS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls, kw", CONFIGS, ids=CONFIG_IDS)
def test_step_reads_nothing_from_the_device(cls, kw, dtype):
    """Default nonfinite="raise", diagnostics off, matrices (a same-shape bucket, a 3-D stack), a
    scalar-path vector, weight decay on both paths. Step 1 refreshes (Mousse) / tests the gaps
    (MiMuon) and may read the device; steps 2-5 are ordinary steps and must not."""
    params = make_params(dtype)
    opt = cls(params, lr=0.02, scalar_weight_decay=0.1, **kw)
    assert opt.nonfinite == "raise" and not opt.diagnostics_enabled
    set_grads(params, 1)
    if cls is MiMuon:  # two equal singular values (gap 0): the SGD branch
        params[0].grad = torch.zeros_like(params[0])
        params[0].grad[0, 0] = params[0].grad[1, 1] = 1
    opt.step()
    if cls is MiMuon:  # the (8, 12) bucket is mixed: Newton–Schulz on a subset of its blocks
        branches = [b for i in (0, 2, 4) for b in opt._host_branch(opt.state[params[i]])]
        assert not all(branches) and any(branches)
    before = [p.detach().clone() for p in params]
    with no_host_reads():
        for s in range(2, 6):
            set_grads(params, s)
            opt.step()
    for p, b in zip(params, before):
        assert torch.isfinite(p.float()).all() and not torch.equal(p, b)
    assert opt.stats()["nonfinite_skips"] == 0


def test_the_guard_catches_a_host_read():
    """The guard itself: nonfinite="skip" reads the flag at every step (by design), so it trips."""
    params = make_params()
    opt = Muon(params, lr=0.02, nonfinite="skip")
    set_grads(params, 1)
    with no_host_reads(), pytest.raises(AssertionError, match="during step"):
        opt.step()


# ---------------------------------------------------------------------------- non-finite gradients
VARIANTS = [  # (bad value, parameter dtype, scalar optimizer)
    (float("nan"), torch.float32, "adamw"),
    (float("inf"), torch.float32, "adamw"),
    (-float("inf"), torch.float32, "adamw"),
    (float("nan"), torch.bfloat16, "lion"),  # bf16 weights take the exact decay-then-select path
]


@pytest.mark.parametrize("cls", ALL, ids=ids)
@pytest.mark.parametrize("bad, dtype, scalar_optimizer", VARIANTS,
                         ids=["nan", "inf", "-inf", "nan-bf16-lion"])
def test_nonfinite_step_changes_nothing_and_raises_at_the_next_check(cls, bad, dtype, scalar_optimizer):
    params = make_params(dtype)
    opt = cls(named(params), lr=0.02, weight_decay=0.1, scalar_weight_decay=0.1,
              scalar_optimizer=scalar_optimizer)
    set_grads(params, 1)
    opt.step()
    snap = snapshot(opt, params)
    set_grads(params, 2)
    params[2].grad[0, 0] = bad
    with no_host_reads():
        opt.step()  # does not raise, does not read the device
    assert_unchanged(opt, params, snap)
    message = r"in w2 \(1 step\(s\) since the last check\).*updated no parameter"
    with pytest.raises(NonFiniteGradientError, match=message) as info:
        opt.stats()
    assert "w0" not in str(info.value) and "w3" not in str(info.value)
    assert opt.stats()["nonfinite_skips"] == 1  # reported once, and counted

    set_grads(params, 3)
    opt.step()  # a finite step updates normally
    opt.check_finite()
    assert all(not torch.equal(p, w) for p, w in zip(params, snap[0]))
    assert opt.stats()["nonfinite_skips"] == 1


@pytest.mark.parametrize("delay", [0, 1])
@pytest.mark.parametrize("sync", ["state_dict", "diagnostics", "check_finite"])
def test_every_natural_sync_reports(sync, delay):
    """Two bad steps (an inf in a matrix at a refresh step, then a NaN in the scalar path): the next
    state_dict() / diagnostics() / check_finite() raises naming both (in param-group order: matrices
    first), and neither changed anything. The refresh at t = 3 would see factors that moved since the
    last refresh (t = 2 was a finite step), so an unguarded refresh would change the eigenbases.
    With refresh_delay=1 the refresh starts at t = 3 and is installed at t = 4, both bad steps: the
    pending result and the bases must stay as they were."""
    params = make_params()
    opt = Mousse(named(params), lr=0.02, scalar_weight_decay=0.1, refresh_every=2,  # refreshes t = 1, 3, 5
                 refresh_delay=delay)
    opt.diagnostics_enabled = sync == "diagnostics"
    for s in (1, 2):
        set_grads(params, s)
        opt.step()
    snap = snapshot(opt, params)
    set_grads(params, 3)
    params[4].grad[1, 0, 0] = float("inf")
    opt.step()  # t = 3: a refresh is due
    set_grads(params, 4)
    params[3].grad[1] = float("nan")
    opt.step()
    assert_unchanged(opt, params, snap)
    with pytest.raises(NonFiniteGradientError, match=r"in w4, w3 \(2 step\(s\)"):
        getattr(opt, sync)()
    assert opt.stats()["nonfinite_skips"] == 2
    opt.state_dict()  # reported: saving works again


def test_mimuon_gap_test_on_a_nonfinite_step_keeps_the_branch():
    """A gap test that falls on a non-finite step keeps the branch (on the device and its host copy);
    the next gap test on a finite step does switch it."""
    params = make_params()[:1]
    opt = MiMuon(named(params), lr=0.02, gap_every=2)
    params[0].grad = torch.zeros_like(params[0])
    params[0].grad[0, 0] = params[0].grad[1, 1] = 1  # two equal singular values: the SGD branch
    opt.step()
    state = opt.state[params[0]]
    assert state["muon_branch"].tolist() == [False]
    set_grads(params, 2)
    opt.step()  # t = 2: no gap test
    snap = snapshot(opt, params)
    set_grads(params, 3)
    params[0].grad[0, 0] = float("nan")
    opt.step()  # t = 3: a gap test, on a non-finite step
    assert_unchanged(opt, params, snap)
    assert opt._host_branch(state) == [False]
    with pytest.raises(NonFiniteGradientError, match="w0"):
        opt.check_finite()
    for s in (4, 5):  # t = 5: a gap test on a finite step, from a momentum with distinct singular values
        set_grads(params, s)
        opt.step()
    assert state["muon_branch"].tolist() == opt._host_branch(state) == [True]


def test_huge_but_finite_low_precision_gradients_are_finite():
    """An fp16 gradient of norm > 65504 (entries 6e4) and a bf16 one of norm > 3.4e38 (entries 1e38)
    are finite: the check uses the largest magnitude, which cannot overflow (a norm in the gradient
    dtype, or a sum of squares in fp32, would be inf)."""
    for dtype, value, scalar_optimizer in ((torch.float16, 6e4, "adamw"), (torch.bfloat16, 1e38, "lion")):
        params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in ((8, 12), (6,))]
        opt = Muon(params, lr=0.02, scalar_optimizer=scalar_optimizer)
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.full_like(p, value)
        assert torch.isinf(torch._foreach_norm([params[0].grad])[0])  # what a norm-based check would see
        opt.step()
        assert opt.stats()["nonfinite_skips"] == 0  # no NonFiniteGradientError either
        assert not torch.equal(params[1], before[1]), dtype  # the step ran
        if dtype == torch.float16:  # (bf16 1e38: Newton-Schulz's own fp32 norm overflows; not our concern)
            assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_a_nonfinite_update_is_never_written_and_is_reported_as_such(cls):
    """Finite gradients, but Newton-Schulz coefficients that diverge (finite, so accepted): every
    matrix update is inf/NaN. Under nonfinite="raise" no matrix weight changes (not even by weight
    decay), the scalar path still steps, step() reads nothing from the device, and the error names
    the update, not the gradient."""
    params = make_params()
    opt = cls(named(params), lr=0.02, weight_decay=0.1, ns=[(1e20, 1e20, 1e20)], ns_steps=5)
    if cls is MiMuon:
        opt.param_groups[0]["gap_threshold"] = 0.0  # every block on the Muon (Newton-Schulz) branch
    weights = [p.detach().clone() for p in params]
    set_grads(params, 1)
    with no_host_reads() if cls is not MiMuon else nullcontext():  # MiMuon reads at its gap tests
        opt.step()
    assert all(same_bits(params[i].detach(), weights[i]) for i in (0, 1, 2, 4))  # the matrices
    assert not torch.equal(params[3], weights[3])  # the vector (scalar path)
    message = r"non-finite update .* in w0, w1, w2, w4 \(1 step\(s\).*finite gradients.*not of the data"
    with pytest.raises(NonFiniteUpdateError, match=message) as info:
        opt.check_finite()
    assert "non-finite gradient" not in str(info.value)
    stats = opt.stats()
    assert stats["nonfinite_updates"] == 1 and stats["nonfinite_skips"] == 0


def test_only_the_bucket_with_a_nonfinite_update_is_withheld(monkeypatch):
    """Newton-Schulz fails (NaN) for the 12 x 8 matrix only: w1 keeps its weights and is named; the
    8 x 12 bucket (w0, w2 and the experts w4) updates as usual in the same step."""
    params = make_params()
    opt = Muon(named(params), lr=0.02)
    real = Muon.orthogonalize

    def fails_for_12x8(self, group, x):
        out = real(self, group, x)
        return out * math.nan if tuple(x.shape[-2:]) == (12, 8) else out

    monkeypatch.setattr(Muon, "orthogonalize", fails_for_12x8)
    weights = [p.detach().clone() for p in params]
    set_grads(params, 1)
    opt.step()
    assert same_bits(params[1].detach(), weights[1])
    assert all(not torch.equal(params[i], weights[i]) for i in (0, 2, 3, 4))
    with pytest.raises(NonFiniteUpdateError, match=r"update \(inf or NaN\) in w1 \(1 step"):
        opt.check_finite()
    monkeypatch.setattr(Muon, "orthogonalize", real)
    set_grads(params, 2)
    opt.step()
    opt.check_finite()  # reported once; a good step raises nothing
    assert not torch.equal(params[1], weights[1])


def test_bad_gradient_and_bad_update_in_one_check():
    """A non-finite gradient takes precedence (NonFiniteGradientError), and the message still tells
    about the non-finite update of another step."""
    params = make_params()
    opt = Muon(named(params), lr=0.02, ns=[(1e20, 1e20, 1e20)])
    set_grads(params, 1)
    opt.step()  # finite gradients, non-finite updates
    set_grads(params, 2)
    params[0].grad[0, 0] = math.nan
    opt.step()  # a non-finite gradient: not counted as a bad update as well
    message = r"gradient .* in w0 \(1 step.*non-finite update .* \(1 step"
    with pytest.raises(NonFiniteGradientError, match=message):
        opt.check_finite()
    assert opt.stats()["nonfinite_skips"] == 1 and opt.stats()["nonfinite_updates"] == 1


# ---------------------------------------------------------------------------- Trainer
class NanLossAt(Trainer):
    """Multiplies the loss by NaN in the step that starts at ``global_step == nan_at``."""

    nan_at = -1

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == self.nan_at else loss


def nan_trainer(tmp_path, text_file, nan_at, **kw):
    train, _ = byte_blocks(text_file)
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="muon")
    trainer = NanLossAt(model=tiny_gpt2(), args=TrainingArguments(**{**base, **kw}), train_dataset=train)
    trainer.nan_at = nan_at
    return trainer


def test_trainer_reports_a_nan_loss_at_the_next_log(tmp_path, text_file):
    trainer = nan_trainer(tmp_path, text_file, nan_at=2, logging_steps=2)  # NaN in step 3, logs at 2 and 4
    with pytest.raises(NonFiniteGradientError, match=r"transformer\.h\.0\..*\(1 step\(s\)"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [2]


def test_trainer_checks_before_writing_a_checkpoint(tmp_path, text_file):
    trainer = nan_trainer(tmp_path, text_file, nan_at=2, logging_steps=10, save_strategy="steps",
                          save_steps=3)
    with pytest.raises(NonFiniteGradientError):
        trainer.train()
    assert trainer.state.global_step == 3
    assert not (tmp_path / "checkpoint-3").exists()  # not even the model weights



@pytest.mark.parametrize("cls", ALL, ids=ids)
@pytest.mark.parametrize("nonfinite", ["raise", "skip", "ignore"])
def test_gated_bf16_weight_decay_is_exact(cls, nonfinite):
    """bf16 weights decay by W * (1 - lr wd) computed in fp32 and rounded to bf16 once, on both paths
    (matrix and scalar), gated (nonfinite="raise") or not. A bf16-rounded factor would not: 1 - 0.002
    is 0.99609375 in bf16, about twice the decay (and torch's in-place _foreach_mul_ on CPU rounds its
    scalar to the tensor's dtype: "skip" and "ignore" decayed twice as much before). Zero gradients:
    only the decay acts."""
    lr, decay = 0.02, 0.002
    params = make_params(torch.bfloat16)
    opt = cls(params, lr=lr, weight_decay=decay / lr, scalar_weight_decay=decay / lr, nonfinite=nonfinite)
    rounded_factor = torch.tensor(1 - decay, dtype=torch.bfloat16)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        # MiMuon reads at its gap tests, "skip" at every step
        with no_host_reads() if cls is not MiMuon and nonfinite != "skip" else nullcontext():
            opt.step()
        for i, (p, w) in enumerate(zip(params, before)):
            assert same_bits(p.detach(), (w.float() * (1 - decay)).to(torch.bfloat16)), f"weight {i}"
        # the rounded factor gives other bits: the check above tells the two apart
        assert any(not torch.equal(w * rounded_factor, p) for w, p in zip(before, params))
    opt.check_finite()
