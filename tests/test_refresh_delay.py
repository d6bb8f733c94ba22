"""Mousse's ``refresh_delay`` d: a refresh due at step t > 1 is computed in the background from the
factors as of step t and used from step t + d on (the one at step 1 at once). The run equals the
float64 reference that applies each basis d steps late, whenever the background work finishes; a
checkpoint taken while a refresh is pending resumes exactly."""

from __future__ import annotations

import copy
import time

import pytest
import reference as ref
import torch

from hf_mousse import Mousse, load_optimizer, save_optimizer
from hf_mousse.errors import CheckpointError, InvalidHyperparameterError, NonFiniteGradientError
from hf_mousse.optim import kronecker, state_keys

pytestmark = pytest.mark.usefixtures("single_thread")

T = 4
STEPS = 14  # refreshes at t = 1, 5, 9, 13 (together)
KW = dict(lr=0.02, weight_decay=0.01, refresh_every=T, eps=1e-3)


def grads_for(shape, seed, steps=STEPS):
    g = torch.Generator().manual_seed(seed)
    row = torch.logspace(0, 1, shape[0], dtype=torch.float64)[:, None]
    col = torch.logspace(0.5, 0, shape[1], dtype=torch.float64)[None, :]
    return [torch.randn(shape, generator=g, dtype=torch.float64) * row * col for _ in range(steps)]


def problem(shapes):
    w0 = [torch.randn(s, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
          for i, s in enumerate(shapes)]
    return w0, [grads_for(s, seed=10 + i) for i, s in enumerate(shapes)]


def run(w0, grads, steps=STEPS, **kw):
    params = [torch.nn.Parameter(w.float().clone()) for w in w0]
    opt = Mousse(params, **kw)
    trajectory = []
    for t in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[t].float()
        opt.step()
        trajectory.append([p.detach().double().clone() for p in params])
    return trajectory, opt, params


def rel_err(fast, expected, w0):
    return ((fast - expected).norm() / (expected - w0).norm()).item()


# One matrix; three of one shape (one bucket) and one of another shape. Tall and wide shapes put
# the left and right factors in different roles.
LAYOUTS = {"one": [(10, 6)], "bucket": [(10, 6), (10, 6), (10, 6), (6, 9)]}


@pytest.mark.parametrize("schedule", ["together", "staggered"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("delay", [1, 2, 3])
def test_delayed_refresh_equals_reference_applied_d_steps_late(delay, layout, schedule):
    """Every step of every matrix within 1e-4 of the float64 reference that installs the step-t
    basis at t + d (with the matrix's staggered phase), and measurably different from d = 0."""
    w0, grads = problem(LAYOUTS[layout])
    got, opt, params = run(w0, grads, refresh_delay=delay, refresh_schedule=schedule, **KW)
    for i, (w, g) in enumerate(zip(w0, grads)):
        phase = opt.state[params[i]].get(state_keys.REFRESH_PHASE, 0)
        expected = ref.mousse(w, g, **KW, refresh_phase=phase, refresh_delay=delay)
        for t in range(STEPS):
            assert rel_err(got[t][i], expected[t], w) < 1e-4, f"matrix {i}, step {t + 1}"
        on_time = ref.mousse(w, g, **KW, refresh_phase=phase)
        assert rel_err(got[-1][i], on_time[-1], w) > 1e-3, f"matrix {i}: the delay made no difference"
    phases = [opt.state[p].get(state_keys.REFRESH_PHASE, 0) for p in params]
    assert opt.stats()["eigh_refreshes"] == sum(
        2 for phase in phases for t in range(1, STEPS + 1) if t == 1 or (t - 1 - phase) % T == 0)


def test_newton_refresh_is_delayed_too():
    w0, grads = problem([(10, 6)])
    got, _, _ = run(w0, grads, refresh_delay=2, refresh="newton", **KW)
    expected = ref.mousse(w0[0], grads[0], **KW, refresh_delay=2)
    for t in range(STEPS):
        assert rel_err(got[t][0], expected[t], w0[0]) < 1e-4, f"step {t + 1}"


def slow_eigh(monkeypatch, seconds):
    """Make every background decomposition take ``seconds`` longer (the main thread's are not slowed)."""
    real = kronecker._eigh
    main = __import__("threading").main_thread()

    def eigh(f, stats):
        if __import__("threading").current_thread() is not main:
            time.sleep(seconds)
        return real(f, stats)

    monkeypatch.setattr(kronecker, "_eigh", eigh)


def test_a_slow_refresh_changes_nothing_but_time(monkeypatch):
    """With every background eigh 0.5 s late, the weights are bitwise those of a prompt run, and the
    step that starts a refresh does not wait for it (it returns before the refresh could finish)."""
    w0, grads = problem(LAYOUTS["bucket"])
    prompt, _, _ = run(w0, grads, refresh_delay=2, **KW)
    slow_eigh(monkeypatch, 0.5)
    params = [torch.nn.Parameter(w.float().clone()) for w in w0]
    opt = Mousse(params, refresh_delay=2, **KW)
    seconds = []
    for t in range(STEPS):
        for p, g in zip(params, grads):
            p.grad = g[t].float()
        start = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - start)
        assert all(torch.equal(p.detach().double(), w) for p, w in zip(params, prompt[t])), f"step {t + 1}"
    # t = 5 and 9 start 8 background decompositions (4 matrices x 2 sides) and return at once; t = 7
    # and 11 wait for them (4 s each, minus what steps 5 and 6 took).
    assert max(seconds[4], seconds[8]) < 0.5, seconds
    assert min(seconds[6], seconds[10]) > 2.0, seconds


def test_a_failing_background_refresh_raises_in_the_step_that_needs_it(monkeypatch):
    w0, grads = problem([(10, 6)])
    params = [torch.nn.Parameter(w0[0].float().clone())]
    opt = Mousse(params, refresh_delay=2, **KW)

    def broken(fn):
        raise RuntimeError("boom")

    for t in range(4):
        params[0].grad = grads[0][t].float()
        opt.step()
    monkeypatch.setattr(kronecker, "inverse_root_newton", broken)  # unused by eigh: no effect
    monkeypatch.setattr(kronecker, "_eigh", lambda f, stats: broken(f))
    params[0].grad = grads[0][4].float()
    opt.step()  # t = 5 starts the refresh
    params[0].grad = grads[0][5].float()
    opt.step()
    params[0].grad = grads[0][6].float()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()  # t = 7 installs it


@pytest.mark.parametrize("via", ["state_dict", "safetensors"])
@pytest.mark.parametrize("schedule", ["together", "staggered"])
def test_checkpoint_with_a_refresh_pending_resumes_exactly(via, schedule, tmp_path, monkeypatch):
    """Saved at t = 6 (the t = 5 refresh is pending until t = 7, and slow), resumed in a fresh
    optimizer: the next 8 steps are bitwise those of the run that never stopped."""
    slow_eigh(monkeypatch, 0.2)
    w0, grads = problem(LAYOUTS["bucket"])
    names = [f"w{i}" for i in range(len(w0))]
    params = [torch.nn.Parameter(w.float().clone()) for w in w0]
    kw = dict(refresh_delay=2, refresh_schedule=schedule, **KW)
    opt = Mousse([{"params": params, "param_names": names}], **kw)

    def steps(o, ps, ts):
        for t in ts:
            for p, g in zip(ps, grads):
                p.grad = g[t].float()
            o.step()

    steps(opt, params, range(6))
    if schedule == "together":
        assert opt._background.pending() == 2 * len(params)  # the refresh of t = 5 is still out
    path = str(tmp_path / "optimizer.safetensors")
    sd = copy.deepcopy(opt.state_dict()) if via == "state_dict" else None  # torch's aliases the state
    if via == "safetensors":
        save_optimizer(opt, path)
    saved = [p.detach().clone() for p in params]
    steps(opt, params, range(6, STEPS))
    resumed = [torch.nn.Parameter(w) for w in saved]
    opt2 = Mousse([{"params": resumed, "param_names": names}], **kw)
    if via == "state_dict":
        opt2.load_state_dict(sd)
    else:
        load_optimizer(opt2, path)
    steps(opt2, resumed, range(6, STEPS))
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))


def test_resume_with_another_delay_is_refused_and_old_checkpoints_mean_zero():
    w0, grads = problem([(10, 6)])
    _, opt, _ = run(w0, grads, steps=6, refresh_delay=1, **KW)
    sd = opt.state_dict()
    other = Mousse([torch.nn.Parameter(w0[0].float())], refresh_delay=2, **KW)
    with pytest.raises(CheckpointError, match="refresh_delay"):
        other.load_state_dict(sd)
    # a checkpoint written before the option existed has no refresh_delay key and no pending state
    _, plain, _ = run(w0, grads, steps=6, **KW)
    old = plain.state_dict()
    for g in old["param_groups"]:
        g.pop("refresh_delay")
        g.pop("matmul_dtype")
    fresh = Mousse([torch.nn.Parameter(w0[0].float())], **KW)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["refresh_delay"] == 0


@pytest.mark.parametrize("delay", [-1, T, 1.0, True])
def test_invalid_delay_is_refused(delay):
    with pytest.raises(InvalidHyperparameterError, match="refresh_delay"):
        Mousse([torch.nn.Parameter(torch.randn(4, 4))], refresh_every=T, refresh_delay=delay)


def test_pending_results_are_state_only_with_a_delay():
    w0, grads = problem([(10, 6)])
    _, opt, params = run(w0, grads, steps=1, **KW)
    assert not any(k.endswith("_pending") for k in opt.state[params[0]])
    _, opt, params = run(w0, grads, steps=1, refresh_delay=1, refresh="newton", **KW)
    assert {k for k in opt.state[params[0]] if k.endswith("_pending")} == {
        state_keys.pending(state_keys.kron_root(s)) for s in ("left", "right")}


def test_a_nonfinite_step_installs_nothing():
    """The refresh started at t = 5 (finite) lands at t = 6, whose gradient holds a NaN: like every
    write of a non-finite step, the install is withheld (bases and pending results unchanged), and
    the error comes at the next check."""
    w0, grads = problem([(10, 6)])
    params = [torch.nn.Parameter(w0[0].float().clone())]
    opt = Mousse(params, refresh_delay=1, **KW)
    for t in range(5):
        params[0].grad = grads[0][t].float()
        opt.step()
    opt._background.wait_all()
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    assert not torch.equal(before["kron_left_eigvecs"], before["kron_left_eigvecs_pending"])  # a new basis
    params[0].grad = grads[0][5].float()
    params[0].grad[0, 0] = float("nan")
    opt.step()
    after = opt.state[params[0]]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient"):
        opt.check_finite()


def test_cuda_wiring_of_the_background_refresh(monkeypatch):
    """The CUDA branch of BackgroundRefresh, with stand-ins for torch.cuda's streams and events (no GPU
    here): the submission records an event on the main stream, the worker runs the task inside the
    side stream after waiting for that event and records a second event, and wait() makes the main
    stream (of the task's device) wait for the second one, never the host for the device."""
    log = []

    class Event:
        def __init__(self):
            self.name = f"event{sum(1 for e in log if e[0] == 'new event')}"
            log.append(("new event", self.name))

        def record(self, stream=None):
            log.append(("record", self.name, getattr(stream, "name", "main")))

    class Stream:
        def __init__(self, device):
            self.name = f"side:{device}"

        def wait_event(self, event):
            log.append(("wait", self.name, event.name))

    class Context:
        def __init__(self, what):
            self.what = what

        def __enter__(self):
            log.append(("enter", self.what))

        def __exit__(self, *exc):
            log.append(("exit", self.what))

    class Main:
        name = "main"

        def wait_event(self, event):
            log.append(("wait", "main", event.name))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Context(s.name))
    monkeypatch.setattr(torch.cuda, "device", lambda d: Context(str(d)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Main())
    runner = kronecker.BackgroundRefresh()
    runner.submit("task", lambda: log.append(("run",)), torch.device("cuda", 1))
    runner.wait("task")
    assert log == [
        ("new event", "event0"), ("record", "event0", "main"),  # submit, in this thread
        ("enter", "cuda:1"), ("enter", "side:cuda:1"), ("wait", "side:cuda:1", "event0"), ("run",),
        ("new event", "event1"), ("record", "event1", "side:cuda:1"), ("exit", "side:cuda:1"),
        ("exit", "cuda:1"),  # the worker
        ("wait", "main", "event1"),  # wait(): a stream wait, no host synchronisation
    ]
    assert runner.pending() == 0
