"""The pretraining recipe streams its corpus: it runs shrunk from a streamed local dataset, and its peak
memory does not grow with the corpus (measured: two runs over a 20 MB and a 160 MB shard)."""

from __future__ import annotations

import json
import os
import signal
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
                          logging_steps=1, dataloader_num_workers=int(sys.argv[4]), report_to="none",
                          disable_tqdm=True)
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


def _run(tmp_path: Path, tokenizer: str, dataset: str, name: str, workers: int = 0, timeout: float = 300,
         **env) -> dict:
    argv = [sys.executable, "-c", RUN, str(tmp_path / name), tokenizer, dataset, str(workers)]
    # its own process group: on a timeout the loader workers it forked are killed with it
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "HF_DATASETS_CACHE": str(tmp_path / f"cache-{name}"), **env})
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "stderr": stderr}


def test_pretraining_recipe_streams_in_bounded_memory(tmp_path, tokenizer_dir):
    small = _run(tmp_path, tokenizer_dir, _shard(tmp_path / "small", 20), "small")
    large = _run(tmp_path, tokenizer_dir, _shard(tmp_path / "large", 160), "large")
    print(f"peak RSS: {small['peak_rss_mb']:.0f} MB (20 MB shard), "
          f"{large['peak_rss_mb']:.0f} MB (160 MB shard)")
    for run in (small, large):
        assert run["train_dataset"] == "IterableDataset" and run["steps"] == 3
    # 140 MB more corpus; held in memory in any form (text, Arrow, token ids) it would add >= 140 MB.
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 40, (small, large)


def test_streaming_recipe_with_workers_never_hangs_on_a_forked_tokenizer(tmp_path, tokenizer_dir):
    """TOKENIZERS_PARALLELISM=true (users set it to silence the tokenizers warning) with loader workers:
    the tokenizer ran in the parent (validation split), the workers are forked and tokenize the stream.
    Before the fix this never reached its first step (0 steps in 120 s; 10 s without the variable);
    now the run finishes and says why it turned the variable off."""
    dataset = _shard(tmp_path / "data", 1)
    try:
        run = _run(tmp_path, tokenizer_dir, dataset, "workers", workers=2, timeout=150,
                   TOKENIZERS_PARALLELISM="true")
    except subprocess.TimeoutExpired:
        pytest.fail("the streaming recipe with 2 workers and TOKENIZERS_PARALLELISM=true hung (150 s)")
    assert run["steps"] == 3
    assert "TOKENIZERS_PARALLELISM='true' with dataloader_num_workers=2" in run["stderr"]
