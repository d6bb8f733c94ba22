"""benchmarks/convergence.py: the steps-to-target measure and the JSON other tools read."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "convergence.py"


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("convergence_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_to_target_interpolates_between_eval_points():
    steps_to = load_script().steps_to
    curve = [(0, 5.0), (10, 3.0), (20, 2.0), (30, 2.2)]
    assert steps_to(curve, 2.5) == pytest.approx(15.0)
    assert steps_to(curve, 3.0) == pytest.approx(10.0)
    assert steps_to(curve, 2.0) == pytest.approx(20.0)  # the first crossing, not the last point
    assert steps_to(curve, 1.9) is None


def run(tmp_path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), "--size", "test", "--device", "cpu",
                           "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=600)


def test_json_holds_each_optimizers_lr_losses_steps_and_ratio(tmp_path):
    proc = run(tmp_path, "--optimizers", "mousse,adamw", "--seeds", "2", "--lrs", "mousse=0.01,muon=0.01",
               "--sweep", "adamw=0.001/0.003/0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "convergence.json").read_text())
    assert (tmp_path / "convergence.png").stat().st_size > 0
    opts = report["optimizers"]
    assert set(opts) == {"muon", "mousse", "adamw"}  # muon added: the target is its final loss
    assert [r["lr"] for r in report["sweeps"]["adamw"]] == [0.001, 0.003, 0.01]
    best = min(report["sweeps"]["adamw"], key=lambda r: r["final_eval_loss"])
    assert opts["adamw"]["lr"] == best["lr"] and opts["adamw"]["lr_source"] == "sweep"
    assert opts["mousse"]["lr"] == 0.01 and opts["mousse"]["lr_source"] == "given"
    for label, r in opts.items():
        assert len(r["final_eval_loss"]) == len(r["steps_to_target"]) == len(r["curves"]) == 2, label
        assert [c[-1][1] for c in r["curves"]] == r["final_eval_loss"]
    muon = opts["muon"]
    assert muon["ratio_to_muon_per_seed"] == [1.0, 1.0] and muon["ratio_to_muon"] == 1.0
    for r in opts.values():  # the ratio is steps over Muon's steps, per seed, or null where never reached
        for s, ratio, m in zip(r["steps_to_target"], r["ratio_to_muon_per_seed"], muon["steps_to_target"]):
            assert (s is None and ratio is None) or ratio == pytest.approx(s / m)
    assert report["config"]["steps"] == 6 and report["versions"]["torch"]


def test_refuses_a_budget_that_would_repeat_tokens(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 20)
    proc = run(tmp_path, "--data", str(corpus), "--optimizers", "muon", "--lrs", "muon=0.01", "--seeds", "1")
    assert proc.returncode != 0
    assert "training would repeat tokens" in proc.stderr


def test_reuse_takes_runs_with_the_same_settings_and_refuses_others(tmp_path):
    first = tmp_path / "first"
    proc = run(first, "--optimizers", "mousse", "--seeds", "2", "--lrs", "mousse=0.01,muon=0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = json.loads((first / "convergence.json").read_text())["optimizers"]
    again = tmp_path / "again"
    proc = run(again, "--optimizers", "mousse", "--variant", "a.25=mousse:alpha=0.25", "--seeds", "2",
               "--lrs", "mousse=0.01,muon=0.01", "--reuse", str(first / "convergence.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reused from") == 4  # muon and mousse, 2 seeds each; the variant is new
    new = json.loads((again / "convergence.json").read_text())["optimizers"]
    for label in ("muon", "mousse"):
        assert new[label]["final_eval_loss"] == old[label]["final_eval_loss"]
    assert len(new["a.25"]["final_eval_loss"]) == 2
    proc = run(tmp_path / "other", "--optimizers", "mousse", "--seeds", "2", "--steps", "4",
               "--lrs", "mousse=0.01,muon=0.01", "--reuse", str(first / "convergence.json"))
    assert proc.returncode != 0 and "made with other settings (['steps'" in proc.stderr


def test_jobs_train_runs_concurrently_with_the_results_of_one_at_a_time(tmp_path):
    """--jobs N: the sweep, then the seeds at the chosen rate, in N processes; every run's curve and the
    chosen rates equal those of a sequential run (each run is its own model, seed and data order)."""
    reports = {}
    for jobs in (1, 3):
        out = tmp_path / f"jobs{jobs}"
        proc = run(out, "--optimizers", "mousse", "--sweep", "mousse=0.003/0.01/0.03", "--lrs", "muon=0.01",
                   "--seeds", "2", "--threads", "1", "--jobs", str(jobs))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("final eval loss") >= 5  # 3 sweep runs, 1 more mousse seed, 2 muon seeds
        reports[jobs] = json.loads((out / "convergence.json").read_text())
    one, many = reports[1], reports[3]
    assert _without_seconds(many["sweeps"]) == _without_seconds(one["sweeps"])
    for label in ("muon", "mousse"):
        assert many["optimizers"][label]["lr"] == one["optimizers"][label]["lr"]
        assert many["optimizers"][label]["curves"] == one["optimizers"][label]["curves"], label
        assert len(one["optimizers"][label]["curves"]) == 2


def _without_seconds(sweeps: dict) -> dict:
    return {label: [{k: v for k, v in r.items() if k != "train_seconds"} for r in runs]
            for label, runs in sweeps.items()}


def test_knobs_and_variants_become_runs_with_their_optim_args():
    import argparse

    bench = load_script()
    specs = bench.run_specs(argparse.Namespace(optimizers="mousse", variant=["a.25=mousse:alpha=0.25"],
                                               knobs="all"))
    assert specs["muon"] == ("muon", None)  # the target's optimizer is always there
    assert specs["a.25"] == ("mousse", "alpha=0.25")
    for label, (spec, _) in bench.KNOBS.items():  # labels such as "alpha=0.25" keep their '='
        name, _, optim_args = spec.partition(":")
        assert specs[label] == (name, optim_args)
    some = bench.run_specs(argparse.Namespace(optimizers="mousse", variant=[], knobs="T=1,paper-muon"))
    assert list(some) == ["muon", "mousse", "T=1", "paper-muon"]
    with pytest.raises(SystemExit, match="unknown.*'T=2'"):
        bench.run_specs(argparse.Namespace(optimizers="mousse", variant=[], knobs="T=2"))
