"""An unmodified stock-style script (tests/scripts/stock_clm.py) run through our launchers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).parent / "scripts" / "stock_clm.py")
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def result(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]


def script_args(text_file, out, *extra) -> list[str]:
    return [SCRIPT, "--train_file", text_file, "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1",
            "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", *extra]


@pytest.fixture(scope="module")
def mousse_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("mousse_run")
    proc = run([sys.executable, "-m", "hf_mousse",
                *script_args(text_file, out, "--optim", "mousse", "--optim_args",
                             "alpha=0.1, refresh_every=3", "--max_steps", "8", "--save_steps", "4")], cwd=out)
    return out, result(proc)[0]


def test_python_m_hf_mousse_runs_a_stock_script(mousse_run):
    out, res = mousse_run
    assert res["optimizer"] == "Mousse" and res["steps"] == 8
    assert all(g["alpha"] == 0.1 and g["refresh_every"] == 3 for g in res["groups"])
    losses = res["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2
    assert res["eval"]["eval_perplexity"] == pytest.approx(math.exp(res["eval"]["eval_loss"]))
    for step in (4, 8):
        assert (out / f"checkpoint-{step}" / "optimizer.safetensors").is_file()
        assert not (out / f"checkpoint-{step}" / "optimizer.pt").exists()


def test_training_args_bin_loads_after_importing_hf_mousse(mousse_run):
    out, _ = mousse_run
    load = ("import torch; a = torch.load('training_args.bin', weights_only=False); "
            "print('OPTIM', a.optim.value)")
    ok = run([sys.executable, "-c", "import hf_mousse; " + load], cwd=out)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "OPTIM mousse" in ok.stdout
    bare = run([sys.executable, "-c", load], cwd=out)
    assert bare.returncode != 0 and "mousse is not a valid OptimizerNames" in bare.stderr


def test_hf_mousse_run_and_resume_through_the_script(tmp_path, text_file, mousse_run):
    # The console script, Qwen3, --optim muon; then resume a finished 4-step run to 6 steps.
    qwen_muon = ["--optim", "muon", "--model_type", "qwen3", "--save_steps", "4"]
    proc = run([str(BIN / "hf-mousse"), "run",
                *script_args(text_file, tmp_path, *qwen_muon, "--max_steps", "4")], cwd=tmp_path)
    first = result(proc)[0]
    assert first["optimizer"] == "Muon" and first["steps"] == 4
    resume = ["--max_steps", "6", "--resume_from_checkpoint", str(tmp_path / "checkpoint-4")]
    proc = run([str(BIN / "hf-mousse"), "run", *script_args(text_file, tmp_path, *qwen_muon, *resume)],
               cwd=tmp_path)
    resumed = result(proc)[0]
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 6
    assert resumed["losses"][:4] == first["losses"]  # log history restored from the checkpoint


def test_unregistered_process_gets_a_clear_error(tmp_path, text_file):
    proc = run([sys.executable, *script_args(text_file, tmp_path, "--optim", "mousse", "--max_steps", "1")],
               cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'mousse'" in proc.stderr


def test_torchrun_ddp_two_processes(tmp_path, text_file):
    proc = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "hf_mousse",
                *script_args(text_file, tmp_path, "--optim", "mousse", "--optim_args", "refresh_every=2",
                             "--max_steps", "4", "--save_steps", "4")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result_rank{i}.json").read_text()) for i in (0, 1)]
    assert len(ranks) == 2 and all(r["optimizer"] == "Mousse" for r in ranks)
    assert ranks[0]["eval"]["eval_loss"] == ranks[1]["eval"]["eval_loss"]  # replicas stayed in sync
    assert (tmp_path / "checkpoint-4" / "optimizer.safetensors").is_file()


def test_run_gives_the_script_python_semantics(tmp_path, monkeypatch):
    from hf_mousse import cli

    probe = tmp_path / "probe.py"
    probe.write_text("import json, sys\n"
                     "json.dump({'name': __name__, 'argv': sys.argv, 'path0': sys.path[0]},"
                     " open(sys.argv[-1], 'w'))\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "seen.json"
    cli.module_main([str(probe), "--flag", "1", str(out)])
    seen = json.loads(out.read_text())
    assert seen == {"name": "__main__", "argv": [str(probe), "--flag", "1", str(out)], "path0": str(tmp_path)}
    monkeypatch.syspath_prepend(str(tmp_path))
    cli.module_main(["-m", "probe", "--module", str(out)])
    seen = json.loads(out.read_text())
    assert seen["name"] == "__main__" and seen["argv"][1:] == ["--module", str(out)]
    with pytest.raises(SystemExit, match="no such script"):
        cli.main(["run", str(tmp_path / "missing.py")])


def test_bench_runs_a_benchmark_script_and_names_the_available_ones(capsys):
    from hf_mousse import cli

    with pytest.raises(SystemExit, match="no benchmark 'nope'.*available: .*convergence"):
        cli.main(["bench", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "convergence", "--help"])
    assert exit_info.value.code == 0
    assert "--optimizers" in capsys.readouterr().out
