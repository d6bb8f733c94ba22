"""benchmarks/data_pipeline.py and benchmarks/checkpoint_save.py at a tiny size: they measure what they
say (batches of the recipe's block size, delivered; a checkpoint written and timed) and render the
README's tables."""

from __future__ import annotations

import json
import sys

from helpers import load_benchmark


def test_data_pipeline_delivers_the_recipes_blocks(tmp_path, monkeypatch):
    bench = load_benchmark("data_pipeline")
    out = tmp_path / "pipe.json"
    monkeypatch.setattr(sys, "argv", ["data_pipeline.py", "--workers", "0,2", "--seconds", "1", "--megabytes",
                                      "3", "--vocab", "300", "--out", str(out)])
    bench.main()
    report = json.loads(out.read_text())
    assert [r["workers"] for r in report["rows"]] == [0, 2]
    for r in report["rows"]:
        assert r["batches"] > 0 and r["tokens_per_second"] > 0
        assert r["batch_tokens"] == 16 * 1024  # the recipe's per-device batch of 1024-token blocks
    assert "| 2 |" in bench.render_markdown(report)


def test_checkpoint_save_times_the_recipes_files(tmp_path, monkeypatch):
    bench = load_benchmark("checkpoint_save")
    out = tmp_path / "ckpt.json"
    monkeypatch.setattr(sys, "argv", ["checkpoint_save.py", "--recipe", "demo-cpu", "--dir", str(tmp_path),
                                      "--out", str(out)])
    bench.main()
    r = json.loads(out.read_text())
    # the file is the state plus a header; every part was timed
    assert r["optimizer_state_bytes"] < r["optimizer_file_bytes"] < r["optimizer_state_bytes"] + 2**20
    assert r["model_save_s"] > 0 and r["optimizer_save_s"] > r["sha256_digest_s"] > 0
    assert "`optimizer.safetensors`" in bench.render_markdown(r)


def test_time_to_target_is_steps_times_the_gpu_step_time_ratio():
    """benchmarks/time_to_target.py: a row's time ratio is its steps ratio times its step time over
    Muon's, with Muon and Mousse's defaults at the measured H200 times and an option at a named model."""
    from pathlib import Path

    bench = load_benchmark("time_to_target")
    measured = bench.measured_steps()
    path = Path(bench.RESULTS) / "convergence-width-256-cpu" / "convergence.json"
    rows = {r["label"]: r for r in bench.rows_of(path, 256, measured)}
    mousse = rows["mousse"]
    for scale, m in measured.items():
        s = mousse["scales"][scale]
        assert (s["step_ms"], s["muon_step_ms"]) == (m["mousse"], m["muon"])
        assert s["source"].startswith("measured")
        for steps, time in zip(mousse["step_ratio_per_seed"], s["time_ratio_per_seed"]):
            assert time == steps * m["mousse"] / m["muon"]
    ms, source = bench.step_time("mousse", "sides=small", "qwen3", measured, 256)
    assert source.startswith("model") and measured["qwen3"]["mousse_plain"] < ms < measured["qwen3"]["mousse"]
    # max_factor_dim keeps its fraction of the width: d/2 on any CPU width is 512 at Qwen3-0.6B (1024)
    for width in (256, 384):
        assert bench.gpu_options(f"max_factor_dim={width // 2}", "qwen3", width) == {"max_factor_dim": 512}
    assert bench.gpu_options("max_factor_dim=96", "pilot", 384) == {"max_factor_dim": 128}
