"""benchmarks/gpu_suite.py: every part runs (at a tiny size on CPU, --smoke) and lands in one JSON; a part
that fails or hangs is reported as such and does not stop the others; rows are skipped only when the
installed Mousse lacks their option."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PARTS = ("refresh_methods", "step", "overhead_gpt2", "overhead_qwen3", "gpu_pilot", "memory")




@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_suite")
    out = tmp / "suite.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--smoke", "--out", str(out),
                           "--work-dir", str(tmp / "work")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_smoke_runs_every_part_into_one_json(smoke):
    suite, stdout = smoke
    assert "limit" in stdout.split("===")[0]  # the plan is printed before the first part
    assert suite["finished"] and suite["smoke"]
    for key in ("device_name", "torch", "commit", "started", "total_limit_s"):
        assert suite["meta"][key], key
    assert list(suite["parts"]) == list(PARTS)
    for name in PARTS:
        part = suite["parts"][name]
        assert part["status"] == "ok", (name, part.get("reason"), part.get("stderr_tail"))
        assert part["results"], name
        assert part["wall_s"] >= 0
    assert sum(p["wall_s"] for p in suite["parts"].values()) <= suite["wall_s"]

    step = suite["parts"]["step"]["results"]
    rows = {r["key"]: r for r in step["sets"]["gpt2"]["results"]}
    assert {"torch_muon", "hf_muon", "mousse_both", "mousse_newton"} <= set(rows)
    assert all(len(r["times_ms"]) == step["meta"]["iters"] for r in rows.values())
    assert rows["mousse_both"]["refresh_steps_timed"] >= 1
    kernels = suite["parts"]["refresh_methods"]["results"]["kernels"]
    assert set(kernels) == {"32", "64"} and all(k["refresh_eigh_ms"] > 0 for k in kernels.values())
    for name in ("overhead_gpt2", "overhead_qwen3"):
        data = suite["parts"][name]["results"]
        assert data["complete"]
        keys = [r["key"] for r in data["results"]]
        assert keys[:2] == ["muon", "mousse"]
        mousse = data["results"][1]
        assert len(mousse["times_ms"]["step"]) == data["meta"]["warmup"] + data["meta"]["steps"]
        assert mousse["refresh_steps_timed"] >= 1 and mousse["state_bytes"]["total"] > 0
    pilot = suite["parts"]["gpu_pilot"]["results"]  # convergence.py --size gpu-pilot, shrunk
    assert pilot["config"]["size"] == "gpu-pilot-smoke" and "installed packages" in pilot["config"]["data"]
    assert {k: [r["lr"] for r in v] for k, v in pilot["sweeps"].items()} == {"mousse": [0.005, 0.01],
                                                                            "muon": [0.005, 0.01]}
    memory = suite["parts"]["memory"]["results"]["rows"]
    assert {(r["part"], r["key"]) for r in memory} >= {(p, k) for p in ("overhead_gpt2", "overhead_qwen3")
                                                       for k in ("muon", "mousse")}


def test_rows_are_skipped_only_for_an_option_mousse_lacks(smoke):
    """Every requested row is either timed or listed as skipped, and skipped only when the installed
    Mousse does not take one of its options (when it does, the row must run)."""
    import hf_mousse

    variants = load_benchmark("variants")
    suite_module = load_benchmark("gpu_suite")
    accepted = inspect.signature(hf_mousse.Mousse).parameters
    suite, _ = smoke
    step = suite["parts"]["step"]
    timed = {r["key"] for r in step["results"]["sets"]["gpt2"]["results"]}
    skipped = {r["key"]: r for r in step["skipped_rows"]}
    assert timed | set(skipped) == set(suite_module.STEP_ROWS.split(",")) and not timed & set(skipped)
    for key, options in variants.MOUSSE_VARIANTS.items():
        lacks = [k for k in options if k not in accepted]
        assert (key in skipped) == bool(lacks), key
        if lacks:
            assert all(k in skipped[key]["reason"] for k in lacks)
    best = "mousse_gpu"  # the overhead parts' third row
    lacks = bool(variants.unsupported(variants.MOUSSE_VARIANTS[best]))
    for name in ("overhead_gpt2", "overhead_qwen3"):
        part = suite["parts"][name]
        ran = {r["key"] for r in part["results"]["results"]}
        listed = {r["key"] for r in part["skipped_rows"]}
        assert (best in ran) != (best in listed) and (best in listed) == lacks


def test_render_prints_every_part(smoke, tmp_path):
    suite, _ = smoke
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--render", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in PARTS:
        assert f"| {name} | ok |" in proc.stdout
    assert "| optimizer | NS dtype |" in proc.stdout  # step_time's table
    assert "| tiny-qwen3 | hf_mousse.Mousse |" in proc.stdout  # the memory table
    # issue 19's goals, each computed from the smoke run's rows (all of them ran: no "not measured")
    render = load_benchmark("gpu_render")
    goals = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x | <= " in line]
    assert len(goals) == len(render.GOALS) + len(render.STEP_GOAL_ROWS), goals
    assert not any("not measured" in line for line in goals), goals


def test_a_failing_or_hanging_part_is_reported_and_the_results_it_wrote_kept(tmp_path, monkeypatch):
    suite = load_benchmark("gpu_suite")
    fail = tmp_path / "fail.py"
    fail.write_text("import sys\nprint('starting')\nsys.exit('broken on purpose')\n")
    hang = tmp_path / "hang.py"
    hang.write_text(textwrap.dedent("""
        import json, subprocess, sys, time
        out = sys.argv[sys.argv.index("--out") + 1]
        json.dump({"meta": {"skipped": []}, "results": [1]}, open(out, "w"))
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a child of its own
        time.sleep(60)
    """))
    monkeypatch.setitem(suite.PARTS, "fail", dict(title="fails", size="", smoke_size="", script=str(fail),
                                                  args=[], smoke=[]))
    monkeypatch.setitem(suite.PARTS, "hang", dict(title="hangs", size="", smoke_size="", script=str(hang),
                                                  args=[], smoke=[]))
    args = suite.parse_args(["--smoke"])
    failed = suite.run_part("fail", args, 30, 30, tmp_path)
    assert failed["status"] == "error" and "broken on purpose" in failed["stderr_tail"]
    assert failed["results"] is None
    hung = suite.run_part("hang", args, 2, 2, tmp_path)
    assert hung["status"] == "timeout" and hung["wall_s"] < 10  # its child stopped too (else: pipes open)
    assert hung["results"] == {"meta": {"skipped": []}, "results": [1]}


def test_refresh_steps_follow_the_period_and_the_delay():
    step_time = load_benchmark("step_time")
    steps = range(1, 23)
    plain = [t for t, r in zip(steps, step_time.refresh_steps(10, 0, steps)) if r]
    delayed = [t for t, r in zip(steps, step_time.refresh_steps(10, 1, steps)) if r]
    assert plain == [1, 11, 21] and delayed == [1, 2, 11, 12, 21, 22]
    assert not any(step_time.refresh_steps(None, 0, steps))


def test_unsupported_names_the_missing_options():
    variants = load_benchmark("variants")

    class WithDelay:
        def __init__(self, params, lr=0.01, *, refresh_delay=0, **shared):
            pass

    assert variants.unsupported({"refresh_delay": 1}, WithDelay) is None
    reason = variants.unsupported({"refresh_delay": 1, "matmul_dtype": "bfloat16"}, WithDelay)
    assert "matmul_dtype" in reason and "refresh_delay" not in reason


def test_a_plain_run_fits_one_device_call_and_the_pilot_another():
    """A device call lasts at most 10 minutes: the default parts' limits fit one, the pilot (its own
    call, --parts gpu_pilot) another, within the issue's 4-5 minutes."""
    suite = load_benchmark("gpu_suite")
    default, parts = suite.DEFAULT_PARTS, suite.PARTS
    assert "gpu_pilot" not in default and set(default) | {"gpu_pilot"} == set(parts)
    assert sum(parts[p]["budget"] for p in default) + suite.STARTUP_RESERVE_S <= 600
    assert parts["gpu_pilot"]["budget"] + suite.STARTUP_RESERVE_S <= 330
