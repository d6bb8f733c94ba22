"""Errors before the expensive part: bad ``--optim_args`` fail when ``TrainingArguments`` is created (before
any model is loaded), and a recipe with a typo or an unread section fails when it loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import HfArgumentParser, TrainingArguments

import hf_mousse
from hf_mousse.errors import InvalidHyperparameterError
from hf_mousse.train import RECIPES_DIR, load_recipe, parse_overrides, run_recipe

hf_mousse.register()
SCRIPT = Path(__file__).parent / "scripts" / "stock_clm.py"


@pytest.mark.parametrize("optim_args, message", [
    ("alpah=0.1", "unknown mousse option.*'alpah'"),         # a name
    ("alpha", "malformed --optim_args item 'alpha'"),          # a key=value shape
    ("refresh_every=0", "invalid refresh_every=0"),            # a value only the constructor checks
])
def test_bad_optim_args_fail_while_parsing_the_command_line(optim_args, message, tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    argv = ["--output_dir", str(tmp_path), "--optim", "mousse", "--optim_args", optim_args,
            "--use_cpu", "true"]
    with pytest.raises(InvalidHyperparameterError, match=message):
        parser.parse_args_into_dataclasses(argv)


def test_trl_config_is_checked_too(tmp_path):
    from trl import SFTConfig

    with pytest.raises(InvalidHyperparameterError, match="unknown mimuon option.*'gap_evry'"):
        SFTConfig(output_dir=str(tmp_path), optim="mimuon", optim_args="gap_evry=2", use_cpu=True)


def test_unmodified_script_fails_before_loading_its_model(tmp_path):
    """The stock run_clm-style script under the launcher: the error is raised by its argument parsing line,
    which runs before it builds the model (the traceback shows where it stopped)."""
    train = tmp_path / "train.txt"
    train.write_text("hello world\n" * 50)
    result = subprocess.run(
        [sys.executable, "-m", "hf_mousse", str(SCRIPT), "--output_dir", str(tmp_path / "out"),
         "--train_file", str(train), "--optim", "mousse", "--optim_args", "beta=2.0", "--use_cpu", "true",
         "--report_to", "none", "--max_steps", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "invalid beta=2.0" in result.stderr
    assert "parse_args_into_dataclasses" in result.stderr
    assert "build_model" not in result.stderr and "trainer.train" not in result.stderr


# ---------------------------------------------------------------------------- recipes
def test_override_typo_fails_at_load_naming_the_key():
    with pytest.raises(InvalidHyperparameterError, match="unknown training key.*'max_stepz'.*did you mean "
                                                         "'max_steps'"):
        load_recipe("demo-cpu", parse_overrides(["--training.max_stepz", "10"]))
    with pytest.raises(InvalidHyperparameterError, match="unknown mousse option.*'alpah'"):
        load_recipe("gpt2-124m-pretrain", parse_overrides(["--optimizer.args.alpah", "0.2"]))
    with pytest.raises(InvalidHyperparameterError, match="invalid refresh_every=0"):
        load_recipe("gpt2-124m-pretrain", parse_overrides(["--optimizer.args.refresh_every", "0"]))
    with pytest.raises(InvalidHyperparameterError, match="unknown lora key.*'lora_alpa'.*'lora_alpha'"):
        load_recipe("qwen3-0.6b-lora", parse_overrides(["--lora.lora_alpa", "4"]))
    with pytest.raises(InvalidHyperparameterError, match="unknown model key.*'name_or_pth'"):
        load_recipe("demo-cpu", parse_overrides(["--model.name_or_pth", "x"]))
    with pytest.raises(Exception, match="data.*unknown key.*'max_train_row'"):
        load_recipe("demo-cpu", parse_overrides(["--data.max_train_row", "3"]))
    # SFTConfig's own fields are valid training keys of the SFT recipes, not of the others.
    assert load_recipe("qwen3-0.6b-lora", {"training": {"max_length": 64}})["training"]["max_length"] == 64
    with pytest.raises(InvalidHyperparameterError, match="'max_length'"):
        load_recipe("demo-cpu", {"training": {"max_length": 64}})


def test_hub_section_is_checked_and_used(tmp_path, monkeypatch):
    with pytest.raises(InvalidHyperparameterError, match="unknown hub key.*'privat'.*did you mean 'private'"):
        load_recipe("demo-cpu", {"hub": {"repo_id": "me/demo", "privat": True}})
    with pytest.raises(InvalidHyperparameterError, match="hub.private must be true or false"):
        load_recipe("demo-cpu", {"hub": {"repo_id": "me/demo", "private": "yes"}})
    # Used: run_recipe uploads to hub.repo_id with hub.private (the upload itself is recorded, not made).
    from hf_mousse import train as train_module

    calls = []
    monkeypatch.setattr(train_module.model_card, "push_to_hub",
                        lambda output_dir, repo, **kw: calls.append((repo, kw)))
    recipe = yaml.safe_load((RECIPES_DIR / "demo-cpu.yaml").read_text())
    recipe.update(output_dir=str(tmp_path), compare=[], hub={"repo_id": "me/demo", "private": True})
    recipe["model"]["from_config"].update(n_layer=1, n_embd=32, n_head=2)
    recipe["data"].update(builtin="pydoc", max_train_rows=40, max_validation_rows=4, block_size=32)
    recipe["tokenizer"]["train_bpe"]["vocab_size"] = 300
    recipe["training"].update(max_steps=1, per_device_train_batch_size=2, eval_steps=1, save_steps=1,
                              logging_steps=1, disable_tqdm=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(str(path)))
    assert calls == [("me/demo", {"include_checkpoints": True, "private": True})]


def test_unknown_top_level_section_still_refused():
    with pytest.raises(InvalidHyperparameterError, match="unknown recipe key.*'trainig'.*'training'"):
        load_recipe("demo-cpu", {"trainig": {}})
