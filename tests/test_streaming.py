"""The pretraining recipe streams its corpus: it runs shrunk from a streamed local dataset, and its peak
memory does not grow with the corpus (measured: two runs over a 20 MB and a 160 MB shard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mousse.data import pydoc_text, train_bpe_tokenizer

RUN = r"""
import json, resource, sys
from hf_mousse import train
recipe = train.load_recipe("gpt2-124m-pretrain")
recipe.update(output_dir=sys.argv[1])
recipe["model"]["from_config"].update(n_layer=1, n_head=2, n_embd=32, n_positions=64)
recipe["tokenizer"] = {"name_or_path": sys.argv[2]}
recipe["data"].update(dataset=sys.argv[3], shuffle_buffer=1000, max_validation_rows=20, block_size=32)
recipe["data"].pop("config")
recipe["training"].update(max_steps=3, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                          gradient_accumulation_steps=1, bf16=False, use_cpu=True, eval_steps=3, save_steps=3,
                          logging_steps=1, dataloader_num_workers=0, report_to="none", disable_tqdm=True)
seen = {}
build = train.build_trainer
def spy(*args, **kwargs):
    trainer = build(*args, **kwargs)
    seen["train_dataset"] = type(trainer.train_dataset).__name__
    return trainer
train.build_trainer = spy
result = train.run_recipe(recipe)[0]
print("RESULT " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "steps": result["steps"], "eval_loss": result["eval_loss"], **seen}))
"""


def _shard(folder: Path, megabytes: int) -> str:
    """A local jsonl dataset of ~``megabytes`` MB of ~1 kB English documents."""
    paragraphs = [p for p in pydoc_text().split("\n\n") if len(p) > 200]
    folder.mkdir()
    size, i = 0, 0
    with open(folder / "train.jsonl", "w") as f:
        while size < megabytes * 2**20:
            line = json.dumps({"text": f"{paragraphs[i % len(paragraphs)][:1000]} ({i})"}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer([pydoc_text()[:50_000]], vocab_size=300).save_pretrained(path)
    return str(path)


def _run(tmp_path: Path, tokenizer: str, dataset: str, name: str) -> dict:
    result = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / name), tokenizer, dataset],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "HF_DATASETS_CACHE": str(tmp_path / f"cache-{name}")})
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_pretraining_recipe_streams_in_bounded_memory(tmp_path, tokenizer_dir):
    small = _run(tmp_path, tokenizer_dir, _shard(tmp_path / "small", 20), "small")
    large = _run(tmp_path, tokenizer_dir, _shard(tmp_path / "large", 160), "large")
    print(f"peak RSS: {small['peak_rss_mb']:.0f} MB (20 MB shard), "
          f"{large['peak_rss_mb']:.0f} MB (160 MB shard)")
    for run in (small, large):
        assert run["train_dataset"] == "IterableDataset" and run["steps"] == 3
    # 140 MB more corpus; held in memory in any form (text, Arrow, token ids) it would add >= 140 MB.
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 40, (small, large)
