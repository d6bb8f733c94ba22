"""Every recipe in recipes/ runs through the real runner, shrunk: tiny model, a few steps, local data."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from helpers import tiny_qwen3, tiny_qwen3_dir

from hf_mousse.errors import InvalidHyperparameterError
from hf_mousse.train import RECIPES_DIR, load_recipe, optim_args_string, parse_overrides, run_recipe

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
TINY = {"gpt2": dict(n_layer=1, n_head=2, n_embd=32, n_positions=64)}


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory, text_file):
    """A local tokenizer, a tiny Qwen3 checkpoint and a local dataset standing in for Hub names."""
    from hf_mousse import data

    root = tmp_path_factory.mktemp("assets")
    text = Path(text_file).read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    tokenizer = data.train_bpe_tokenizer(paragraphs, vocab_size=300)
    tokenizer.save_pretrained(root / "tokenizer")
    model = tiny_qwen3()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(root / "qwen3")
    dataset = root / "dataset"
    dataset.mkdir()
    with open(dataset / "data.jsonl", "w") as f:
        for i, p in enumerate(paragraphs[:300]):
            row = {"text": p, "instruction": f"Explain topic {i}.", "input": "" if i % 2 else p[:40],
                   "output": p[:200]}
            f.write(json.dumps(row) + "\n")
    return {"tokenizer": str(root / "tokenizer"), "qwen3": str(root / "qwen3"), "dataset": str(dataset),
            "qwen3_chat": tiny_qwen3_dir(root / "qwen3-chat")}


def shrink(recipe: dict, out: Path, assets: dict) -> dict:
    r = copy.deepcopy(recipe)
    r["output_dir"] = str(out)
    model = r["model"]
    sft = r.get("trainer") == "sft"  # a chat model and tokenizer: the SFT recipes use the chat template
    if "from_config" in model:
        model["from_config"].update(TINY[model["from_config"]["model_type"]])
    else:
        model["name_or_path"] = assets["qwen3_chat" if sft else "qwen3"]
    model["dtype"] = "float32"
    if "name_or_path" in r["tokenizer"]:
        r["tokenizer"]["name_or_path"] = assets["qwen3_chat" if sft else "tokenizer"]
    else:
        r["tokenizer"]["train_bpe"]["vocab_size"] = 300
    d = r["data"]
    if "dataset" in d:  # keep every other data key (format, columns, fractions, streaming) as written
        d["dataset"] = assets["dataset"]
        d.pop("config", None)
    # Builtin stdlib documents are whole source files (20 of them make ~8k eval blocks): fewer of those.
    builtin = "builtin" in d
    d.update(max_train_rows=40 if builtin else 200, max_validation_rows=2 if builtin else 20,
             **({} if sft else {"block_size": 32}))
    if sft:
        r["training"]["max_length"] = 64
    small = dict(max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                 gradient_accumulation_steps=1, bf16=False, use_cpu=True, logging_steps=1, eval_steps=1,
                 save_steps=2, dataloader_num_workers=0, report_to="none", disable_tqdm=True)
    r["training"].update(small)
    for opt in [r["optimizer"], *r.get("compare", [])]:
        if "training" in opt:
            opt["training"].update({k: v for k, v in small.items() if k in opt["training"]})
    return r


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_shrunk(name, tmp_path, local_assets):
    recipe = load_recipe(name)
    assert recipe["hardware"] and recipe["description"]  # every recipe states what it needs
    results = run_recipe(shrink(recipe, tmp_path, local_assets))
    runs = [recipe["optimizer"], *recipe.get("compare", [])]
    assert [r["optimizer"] for r in results] == [o["name"] for o in runs]
    for r in results:
        out = Path(r["output_dir"])
        assert r["steps"] == 2 and math.isfinite(r["eval_loss"])
        assert (out / "README.md").is_file() and (out / "loss_curve.png").is_file()
        ours = r["optimizer"] in ("mousse", "muon", "mimuon")
        assert (out / "checkpoint-2" / ("optimizer.safetensors" if ours else "optimizer.pt")).is_file()
        if recipe.get("lora"):
            assert (out / "adapter_model.safetensors").is_file()
    if len(runs) > 1:
        assert (tmp_path / "loss_curves.png").is_file()


def test_twins_replace_the_whole_optimizer():
    base, muon, adamw = (load_recipe(n) for n in ("gpt2-124m-pretrain", "gpt2-124m-pretrain-muon",
                                                     "gpt2-124m-pretrain-adamw"))
    assert base["optimizer"]["args"]["alpha"] == 0.125
    assert muon["optimizer"]["name"] == "muon" and "alpha" not in muon["optimizer"]["args"]
    assert adamw["optimizer"] == {"name": "adamw_torch", "training": {
        "learning_rate": 6e-4, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95}}
    own = ("optimizer", "output_dir", "description", "name")
    for twin in (muon, adamw):  # everything but the optimizer is shared
        shared = {k: v for k, v in twin.items() if k not in own}
        assert shared == {k: v for k, v in base.items() if k not in own}


def test_overrides_and_errors(tmp_path):
    assert parse_overrides(["--training.max_steps", "10", "--optimizer.args.alpha=0.25", "--seed", "3"]) == {
        "training": {"max_steps": 10}, "optimizer": {"args": {"alpha": 0.25}}, "seed": 3}
    assert load_recipe("demo-cpu", {"training": {"max_steps": 7}})["training"]["max_steps"] == 7
    assert optim_args_string({"alpha": 0.1, "nesterov": True, "adjust_lr": None}) == \
        "alpha=0.1,nesterov=true,adjust_lr=none"
    with pytest.raises(InvalidHyperparameterError, match="needs a value"):
        parse_overrides(["--training.max_steps"])
    with pytest.raises(InvalidHyperparameterError, match="no recipe 'nope'.*demo-cpu"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(RECIPES_DIR / "demo-cpu.yaml") + "\ntrainig: {max_steps: 1}\n")
    with pytest.raises(InvalidHyperparameterError, match="unknown recipe key.*trainig"):
        load_recipe(str(bad))
