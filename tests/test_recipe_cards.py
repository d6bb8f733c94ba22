"""Recipe model cards a Hub user would accept: the command with its overrides, a true install line, no local
dataset in the metadata, a license and a usage snippet, resumed runs with their total time, and
checkpoints that load on their own (the tokenizer is in them)."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_mousse import cli
from hf_mousse.train import RECIPES_DIR, TIME_FILE


@pytest.fixture
def tiny_recipe(tmp_path, text_file):
    """demo-cpu, shrunk, with local text files as its data (a local dataset)."""
    recipe = yaml.safe_load((RECIPES_DIR / "demo-cpu.yaml").read_text())
    recipe.update(output_dir=str(tmp_path / "run"), compare=[], license="apache-2.0")
    recipe["model"]["from_config"].update(n_layer=1, n_embd=32, n_head=2, n_positions=64)
    recipe["data"] = {"train_files": [text_file], "max_train_rows": 60, "max_validation_rows": 6,
                      "block_size": 32}
    recipe["tokenizer"]["train_bpe"]["vocab_size"] = 300
    recipe["training"].update(max_steps=2, per_device_train_batch_size=2, eval_steps=2, save_steps=1,
                              logging_steps=1, disable_tqdm=True, save_total_limit=None)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_card_reproduces_installs_and_loads(tiny_recipe, tmp_path):
    cli.main(["train", str(tiny_recipe), "--training.learning_rate", "0.02", "--seed", "3"])
    run = tmp_path / "run"
    card = ModelCard.load(run / "README.md")
    text = card.text
    # The exact command, overrides included.
    assert f"hf-mousse train {tiny_recipe} --training.learning_rate 0.02 --seed 3" in text
    # No claim that a package index has it; how to install it instead.
    assert "PyPI" not in text and "pip install hf-mousse" not in text and "pip install hf_mousse" not in text
    assert "not on a public package index" in text and "pip install -e ." in text
    # The local files are named in the text, never as Hub dataset ids in the metadata.
    assert card.data.datasets is None and "local:" not in str(card.data.to_dict())
    assert {(r.dataset_type, r.dataset_name) for r in card.data.eval_results} == {
        ("custom", "corpus.txt (local data)")}
    assert "local:corpus.txt" in text
    assert card.data.license == "apache-2.0"
    assert "AutoModelForCausalLM.from_pretrained" in text and "## Usage" in text
    assert "Resumed run" not in text
    # A checkpoint loads on its own: weights and tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (run / "checkpoint-2" / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoint-2")
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoint-2")
    assert model(**tokenizer("def f(x):", return_tensors="pt")).logits.shape[-1] == len(tokenizer)


def test_resumed_run_says_so_with_total_time(tiny_recipe, tmp_path):
    cli.main(["train", str(tiny_recipe), "--training.max_steps", "1"])
    first = json.loads((tmp_path / "run" / "checkpoint-1" / TIME_FILE).read_text())
    assert first["segments"] == 1 and first["seconds"] > 0
    cli.main(["train", str(tiny_recipe), "--resume"])
    text = ModelCard.load(tmp_path / "run" / "README.md").text
    assert "resumed from `checkpoint-1`" in text and "2 segments" in text
    assert "Total training wall time:" in text and "all\n  segments together" in text
    second = json.loads((tmp_path / "run" / "checkpoint-2" / TIME_FILE).read_text())
    assert second["segments"] == 2 and second["seconds"] > first["seconds"]
