"""The benchmarks time CUDA phases with events on the current stream, not with device-wide synchronizes
(which would also wait for side streams). No GPU here: torch.cuda's Event and synchronize are replaced
by recorders, and the optimizers run on CPU tensors."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"




class FakeEvent:
    """torch.cuda.Event's timing interface, on the host clock; counts the waits."""

    waits = 0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def synchronize(self):
        FakeEvent.waits += 1

    def elapsed_time(self, end) -> float:
        return (end.at - self.at) * 1e3


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = {"synchronize": 0}
    FakeEvent.waits = 0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.__setitem__("synchronize",
                                                                              calls["synchronize"] + 1))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return calls


def test_phase_timer_reads_events_and_waits_for_the_last_one_only(fake_cuda):
    environment = load_benchmark("environment")
    timer = environment.PhaseTimer(torch.device("cuda"))
    timer.mark()
    time.sleep(0.02)
    timer.mark()
    timer.mark()
    first, second = timer.elapsed_ms()
    assert first >= 20 and second < first
    assert FakeEvent.waits == 1 and fake_cuda["synchronize"] == 0
    assert timer.marks == []


def test_step_time_does_not_synchronize_the_device_around_each_step(fake_cuda):
    step_time = load_benchmark("step_time")
    shapes = step_time.build_shapes("gpt2", 1, 0.05)
    params, grads = step_time.make_data(shapes, torch.device("cpu"), 0)
    rows = [r for r in step_time.optimizers(torch.device("cpu")) if r["key"] in ("hf_muon", "mousse_both")]
    results = step_time.time_rows(rows, params, grads, torch.device("cuda"), warmup=1, iters=3)
    assert all(len(r["times_ms"]) == 3 and min(r["times_ms"]) > 0 for r in results)
    assert fake_cuda["synchronize"] == 1  # once, after the last round, outside any timed step
    assert FakeEvent.waits == 4  # the last event of each round


def test_overhead_times_the_phases_without_synchronizing_inside_the_loop(monkeypatch):
    overhead = load_benchmark("overhead")
    syncs = []
    monkeypatch.setattr(overhead, "sync", lambda device: syncs.append(device))
    preset = overhead.PRESETS["tiny"]
    template, cfg = overhead.build_model(preset, 0)
    batches = overhead.make_batches(4, 2, 2, preset["seq_len"], cfg.vocab_size, 0, torch.device("cpu"))
    args = argparse.Namespace(lr=0.02, scalar_lr=3e-4, adamw_lr=3e-4, adamw_wd=0.1, warmup=1)
    r = overhead.run_one("mousse", template, batches, args, torch.device("cpu"))
    assert len(syncs) == 1  # after the last step only (before: four per step)
    times = r["times_ms"]
    assert len(times["step"]) == 4
    assert all(w >= f + o for w, f, o in zip(times["step"], times["fwd_bwd"], times["opt"]))
    assert r["refreshed"][0] and r["losses"][0] > 0
