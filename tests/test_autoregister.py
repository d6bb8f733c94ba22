"""``HF_MOUSSE_AUTO_REGISTER=1``: the startup hook installed with the package (hf_mousse_autoregister.pth).

The tests build the package's wheel from this checkout (offline, with the running environment's
setuptools), install it with pip into a fresh virtual environment layered over the running one (which
provides torch, transformers, trl...), and run fresh interpreters of that environment, so what is
tested is what ``pip install`` gives a user: the .pth in site-packages, run by Python's ``site``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PTH = "hf_mousse_autoregister.pth"


def _source_copy(dest: Path) -> Path:
    """The checkout's tracked and new files (what a clone has), copied: builds write into the tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _build(source: Path, out: Path, hook: str) -> Path:
    """A wheel built by setuptools' PEP 517 ``hook`` (build_wheel or build_editable), in a subprocess."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    base = tmp_path_factory.mktemp("build")
    source = _source_copy(base / "src")
    return {"wheel": _build(source, base / "wheel", "build_wheel"),
            "editable": _build(source, base / "editable", "build_editable")}


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_wheels_carry_the_startup_hook(wheels, kind):
    """``pip install .`` and ``pip install -e .`` (make install) both put the .pth at the top of
    site-packages, where ``site`` runs it."""
    with zipfile.ZipFile(wheels[kind]) as wheel:
        names = wheel.namelist()
        assert PTH in names, names  # the wheel's root is installed into site-packages
        line = wheel.read(PTH).decode()
    assert line.startswith("import ") and "HF_MOUSSE_AUTO_REGISTER" in line


@pytest.fixture(scope="module")
def env(wheels, tmp_path_factory):
    """A fresh venv with the built wheel pip-installed (no dependencies), layered over this interpreter's
    site-packages; returns its python."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(subprocess.run([python, "-c", purelib], check=True, capture_output=True,
                                        text=True).stdout.strip())
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                              "--target", str(site_packages), str(wheels["wheel"])],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site_packages / PTH).is_file()
    # The running environment's packages after ours: a plain path line (not a site dir, so its own .pth
    # files, including the editable hf_mousse of the development checkout, are not run).
    (site_packages / "zz_parent_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run(python, code: str, *, enabled: bool, cwd=None) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MOUSSE_AUTO_REGISTER")}
    if enabled:
        environ["HF_MOUSSE_AUTO_REGISTER"] = "1"
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=environ, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LOADED = ("import json, sys; print(json.dumps({m: m in sys.modules for m in "
          "('_hf_mousse_autoregister', 'hf_mousse', 'torch', 'transformers')}))")


def test_unset_means_nothing_is_imported(env, tmp_path):
    assert _run(env, LOADED, enabled=False, cwd=tmp_path) == {
        "_hf_mousse_autoregister": False, "hf_mousse": False, "torch": False, "transformers": False}


def test_set_is_lazy_then_registers_with_transformers(env, tmp_path):
    # At startup: only the tiny hook module, never torch or transformers.
    assert _run(env, LOADED, enabled=True, cwd=tmp_path) == {
        "_hf_mousse_autoregister": True, "hf_mousse": False, "torch": False, "transformers": False}
    code = ("import json, sys, transformers; before = 'hf_mousse' in sys.modules\n"
            "from transformers import TrainingArguments\n"
            "args = TrainingArguments(output_dir='out', optim='mousse', optim_args='alpha=0.2',\n"
            "                         use_cpu=True)\n"
            "import hf_mousse\n"
            "print(json.dumps({'before': before, 'optim': str(args.optim.value), "
            "'from': hf_mousse.__file__}))")
    out = _run(env, code, enabled=True, cwd=tmp_path)
    assert out["before"] is False and out["optim"] == "mousse"
    assert str(env.parent.parent) in out["from"]  # the installed copy, not a checkout on sys.path


def _chat_data(path: Path) -> Path:
    from helpers import alpaca_rows

    path.mkdir()
    with open(path / "train.jsonl", "w") as f:
        for r in alpaca_rows(16):
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["instruction"]}],
                                "completion": [{"role": "assistant", "content": r["output"]}]}) + "\n")
    return path


def test_trl_sft_command_trains_with_mousse(env, tmp_path):
    """The real ``trl sft`` console script: it parses ``--optim`` itself and then re-executes TRL's sft.py in
    a fresh process through ``accelerate launch``; both processes must accept the name."""
    from helpers import tiny_qwen3_dir

    trl_script = shutil.which("trl") or str(Path(sys.executable).parent / "trl")
    assert os.path.isfile(trl_script), "the trl console script is not installed (pip install -e '.[test]')"
    model = tiny_qwen3_dir(tmp_path / "model")
    data = _chat_data(tmp_path / "data")
    out = tmp_path / "out"
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(HF_MOUSSE_AUTO_REGISTER="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="1",
                   HF_DATASETS_CACHE=str(tmp_path / "cache"))
    command = [str(env), trl_script, "sft", "--model_name_or_path", model, "--dataset_name", str(data),
               "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2",
               "--per_device_train_batch_size", "4", "--max_length", "64", "--learning_rate", "1e-3",
               "--optim", "mousse", "--optim_args", "refresh_every=1", "--bf16", "false",
               "--use_cpu", "true", "--report_to", "none", "--dataloader_num_workers", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert (out / "checkpoint-2" / "optimizer.safetensors").is_file()
    assert not (out / "checkpoint-2" / "optimizer.pt").exists()

