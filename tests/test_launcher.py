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


TORCHRUN_2 = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "hf_mousse"]


def test_torchrun_ddp_two_processes_split_the_work_and_resume_on_one(tmp_path, text_file):
    args = ("--optim", "mousse", "--optim_args", "alpha=0.1, refresh_every=3")
    steps = ("--max_steps", "4", "--save_steps", "4")
    proc = run([*TORCHRUN_2, *script_args(text_file, tmp_path, *args, *steps)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result_rank{i}.json").read_text()) for i in (0, 1)]
    assert len(ranks) == 2 and all(r["optimizer"] == "Mousse" for r in ranks)
    assert ranks[0]["eval"]["eval_loss"] == ranks[1]["eval"]["eval_loss"]  # replicas stayed in sync
    updates = [r["stats"]["matrix_updates"] for r in ranks]
    assert sum(updates) == 12 * 4 and min(updates) > 0  # 12 blocks per step (c_attn is 3), each by one rank
    assert (tmp_path / "checkpoint-4" / "optimizer.safetensors").is_file()
    # The checkpoint of two ranks resumes in one process.
    out = tmp_path / "one"
    resume = ["--max_steps", "6", "--resume_from_checkpoint", str(tmp_path / "checkpoint-4")]
    resumed = result(run([sys.executable, "-m", "hf_mousse", *script_args(text_file, out, *args, *resume)],
                         cwd=tmp_path))[0]
    assert resumed["steps"] == 6 and resumed["stats"]["matrix_updates"] == 12 * 2


def test_accelerate_launch_two_processes_split_the_work(tmp_path, text_file):
    # accelerate's multi-process launcher, on CPU: --multi_gpu starts the processes, --use_cpu makes
    # the Trainer run them as one DDP job (gloo). (accelerate launch --cpu runs a single process.)
    proc = run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "-m", "hf_mousse",
                *script_args(text_file, tmp_path, "--optim", "mousse", "--max_steps", "2")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result_rank{i}.json").read_text()) for i in (0, 1)]
    updates = [r["stats"]["matrix_updates"] for r in ranks]
    assert sum(updates) == 12 * 2 and min(updates) > 0


def test_torchrun_without_use_cpu_warns_and_does_not_split(tmp_path, text_file):
    # On CPU without --use_cpu, the Trainer of each process trains alone: no DDP, no shared gradients.
    # Splitting the optimizer's work then would mix two models' updates; it must not happen.
    # Both processes are "process 0" of their own run, so both would write the same checkpoint
    # directory and race (a misconfigured run's problem, which the warning names): no checkpoints.
    args = script_args(text_file, tmp_path, "--optim", "mousse", "--max_steps", "2", "--save_strategy", "no")
    args.remove("--use_cpu")
    proc = run([*TORCHRUN_2, *args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("WORLD_SIZE=2: a launcher started 2 processes") == 2
    ranks = result(proc)  # one RESULT line per process (both are "process 0": one result file)
    assert [r["stats"]["matrix_updates"] for r in ranks] == [12 * 2, 12 * 2]  # each computed everything


def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path, text_file, mousse_run):
    first, _ = mousse_run
    args = ("--optim", "mousse", "--optim_args", "alpha=0.1, refresh_every=3")
    resume = ["--max_steps", "6", "--resume_from_checkpoint", str(first / "checkpoint-4")]
    proc = run([*TORCHRUN_2, *script_args(text_file, tmp_path, *args, *resume)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result_rank{i}.json").read_text()) for i in (0, 1)]
    assert all(r["steps"] == 6 for r in ranks)
    assert sum(r["stats"]["matrix_updates"] for r in ranks) == 12 * 2


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
    with pytest.raises(SystemExit) as exit_info:  # "gpu" names the GPU suite
        cli.main(["bench", "gpu", "--help"])
    assert exit_info.value.code == 0
    assert "--smoke" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no benchmark 'variants'"):  # a helper module is no benchmark
        cli.main(["bench", "variants"])
