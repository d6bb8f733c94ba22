#!/usr/bin/env python
"""Tokens per second that a recipe's streamed pipeline delivers (read, tokenize, pack, shuffle, collate),
with the model step taken out, for 0, 1, 2 and 4 DataLoader workers: can it keep a GPU fed?

The pipeline is the recipe's own: ``train.prepare_data`` (streamed local files, the recipe's shuffle
buffer and block size) and the DataLoader that ``transformers.Trainer`` builds from the recipe's
training arguments (``get_train_dataloader``: batch size, workers, collator), with only the number of
workers changed. The corpus is local (the interpreter's standard library source, cut into jsonl
shards, so that every worker has shards to read); the tokenizer is a byte-level BPE trained on it
(the recipes' GPT-2 tokenizer is the same kind, with a larger vocabulary). Each row: the time to the
first batch (workers start, shuffle buffer fills) and the steady rate over ``--seconds``.

    python benchmarks/data_pipeline.py                    # benchmarks/results/data_pipeline-cpu.json
    python benchmarks/data_pipeline.py --workers 0,2 --seconds 10 --out runs/pipe.json
    python benchmarks/data_pipeline.py --render benchmarks/results/data_pipeline-cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from environment import device_name, git_commit, loadavg, write_json  # noqa: E402

# What a GPU eats: transformers' whole training step (forward, backward, Muon) at GPT-2-124M on one
# H200, 262,144 tokens in ~1.8 s (../shared/GPU.md, overhead.py --preset gpt2-124m). The pipeline must
# deliver at least this per process to keep that GPU busy; a faster optimizer raises it.
GPU_APPETITE = dict(tokens_per_second=145_000,
                    source="one H200, GPT-2-124M whole training step with Muon: 262,144 tokens in ~1.8 s "
                           "(shared/GPU.md)")


def write_corpus(folder: Path, shards: int, megabytes: float, doc_chars: int) -> list[str]:
    """``shards`` jsonl files, ~``megabytes`` in all, of stdlib source cut into documents of about
    ``doc_chars`` characters (at line ends; the size of a web-text document, so that the recipe's
    shuffle buffer of rows holds what it would hold on its real corpus)."""
    from hf_mousse import data

    docs = []
    for text in data.read_documents(data.stdlib_files()):
        lines, chunk = text.splitlines(keepends=True), ""
        for line in lines:
            chunk += line
            if len(chunk) >= doc_chars:
                docs.append(chunk)
                chunk = ""
        if chunk.strip():
            docs.append(chunk)
    files = [open(folder / f"shard-{k:02d}.jsonl", "w") for k in range(shards)]
    size, i, budget = 0, 0, megabytes * 2**20
    while size < budget:
        line = json.dumps({"text": docs[i % len(docs)]}) + "\n"
        files[i % shards].write(line)
        size, i = size + len(line), i + 1
    for f in files:
        f.close()
    return [f.name for f in files]


def measure(recipe_name: str, workers: int, files: list[str], tokenizer_dir: str, seconds: float,
            out_dir: str) -> dict:
    from hf_mousse import data, train

    recipe = train.load_recipe(recipe_name)
    block = recipe["data"]["block_size"]
    recipe["data"] = dict(train_files=files, streaming=True, max_validation_rows=16, block_size=block,
                          shuffle_buffer=recipe["data"].get("shuffle_buffer", 10_000))
    recipe["tokenizer"] = {"name_or_path": tokenizer_dir}
    recipe["model"]["from_config"].update(n_layer=1, n_head=2, n_embd=32)  # built, never run
    recipe["training"].update(dataloader_num_workers=workers, use_cpu=True, bf16=False, report_to="none")
    datasets_, tokenizer = train.prepare_data(recipe)
    trainer = train.build_trainer(recipe, recipe["optimizer"], out_dir, datasets_, tokenizer)
    data.fork_safe_tokenizers(workers)  # as run_trainer does before training
    batch_tokens = trainer.args.per_device_train_batch_size * block
    start = time.perf_counter()
    it = iter(trainer.get_train_dataloader())
    next(it)
    first = time.perf_counter() - start
    tokens, batches, exhausted, t0 = 0, 0, False, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            batch = next(it)
        except StopIteration:  # the corpus ran out first: the rate is over what was delivered
            exhausted = True
            break
        assert batch["input_ids"].shape[1] == block
        tokens, batches = tokens + batch["input_ids"].numel(), batches + 1
    elapsed = time.perf_counter() - t0
    del it  # stops the workers
    return dict(workers=workers, first_batch_s=first, batches=batches, seconds=elapsed,
                batch_tokens=batch_tokens, tokens_per_second=tokens / elapsed, corpus_exhausted=exhausted)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="gpt2-124m-pretrain")
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument("--seconds", type=float, default=15.0, help="steady-state time per row")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--megabytes", type=float, default=200.0, help="corpus size (it must outlast every row)")
    ap.add_argument("--doc-chars", type=int, default=4000, help="characters per document")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", default=str(HERE / "results" / "data_pipeline-cpu.json"))
    ap.add_argument("--render", metavar="JSON", default=None)
    args = ap.parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())))
        return
    from hf_mousse import data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_corpus(tmp, args.shards, args.megabytes, args.doc_chars)
        with open(files[0]) as f:
            sample = [json.loads(line)["text"] for line in itertools.islice(f, 2000)]
        data.train_bpe_tokenizer(sample, vocab_size=args.vocab).save_pretrained(tmp / "tokenizer")
        rows = []
        for w in (int(x) for x in args.workers.split(",")):
            r = measure(args.recipe, w, files, str(tmp / "tokenizer"), args.seconds, str(tmp / "out"))
            rows.append(r)
            print(f"workers {w}: {r['tokens_per_second']:,.0f} tokens/s ({r['batches']} batches of "
                  f"{r['batch_tokens']} tokens in {r['seconds']:.1f} s; first batch "
                  f"{r['first_batch_s']:.1f} s)", flush=True)
    report = dict(benchmark="data_pipeline", recipe=args.recipe, device=device_name(torch.device("cpu")),
                  commit=git_commit(), load_average=loadavg(),
                  corpus=f"{args.megabytes:g} MB of stdlib source in {args.shards} jsonl shards, documents "
                         f"of ~{args.doc_chars} characters",
                  tokenizer=f"byte-level BPE, vocab {args.vocab}", gpu_appetite=GPU_APPETITE, rows=rows)
    write_json(Path(args.out), report)
    print(render_markdown(report))


def render_markdown(report: dict) -> str:
    need = report["gpu_appetite"]["tokens_per_second"]
    lines = [f"Recipe `{report['recipe']}`'s streamed pipeline without the model step, {report['corpus']}, "
             f"{report['tokenizer']}; {report['device']} (commit {report['commit']}). GPU appetite: "
             f"{need:,} tokens/s ({report['gpu_appetite']['source']}).", "",
             "| loader workers | tokens/s | vs the GPU's appetite | first batch |", "|---|---|---|---|"]
    for r in report["rows"]:
        rate = r["tokens_per_second"]
        ran_out = " (the corpus ran out: a lower bound)" if r["corpus_exhausted"] else ""
        first = f"{r['first_batch_s']:.1f} s"
        lines.append(f"| {r['workers']} | {rate:,.0f}{ran_out} | {rate / need:.2f}x | {first} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
