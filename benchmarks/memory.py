#!/usr/bin/env python
"""Optimizer state per model shape, Muon vs Mousse and its memory-relevant settings, exactly: each
optimizer is built on a model created on the meta device (no memory), and its
``state_bytes()`` — the code that allocates the state — sizes what one process keeps, and what the
largest rank keeps when the matrix work is split over N ranks (DDP: each rank holds only the state of
the matrices it owns, and the whole scalar-path state).

    python benchmarks/memory.py                     # benchmarks/results/memory.json + a markdown table
    python benchmarks/memory.py --ranks 8 --out runs/memory.json
    python benchmarks/memory.py --render benchmarks/results/memory.json

State size does not depend on the device, so this runs anywhere in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import git_commit, write_json  # noqa: E402
from overhead import PRESETS  # noqa: E402

import hf_mousse  # noqa: E402

MODELS = {
    "GPT-2-124M": ("gpt2", PRESETS["gpt2-124m"]["model"]),
    "Qwen3-0.6B": ("qwen3", PRESETS["qwen3-0.6b"]["model"]),
    # Qwen/Qwen3-8B config.json
    "Qwen3-8B": ("qwen3", dict(num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                               vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False)),
}
ROWS = {  # label -> (optimizer class name, options)
    "Muon": ("Muon", {}),
    "Mousse": ("Mousse", {}),
    "Mousse, sides=small": ("Mousse", {"sides": "small"}),
    "Mousse, basis_dtype=bfloat16": ("Mousse", {"basis_dtype": "bfloat16"}),
    "Mousse, sides=small, basis_dtype=bfloat16": ("Mousse", {"sides": "small", "basis_dtype": "bfloat16"}),
    "Mousse, max_factor_dim=1024": ("Mousse", {"max_factor_dim": 1024}),
    "Mousse, max_factor_dim=512": ("Mousse", {"max_factor_dim": 512}),
    "Mousse, max_factor_dim=512, basis_dtype=bfloat16": ("Mousse", {"max_factor_dim": 512,
                                                                    "basis_dtype": "bfloat16"}),
    "Mousse, refresh_delay=1": ("Mousse", {"refresh_delay": 1}),
    "Mousse, sides=small, refresh_delay=1": ("Mousse", {"sides": "small", "refresh_delay": 1}),
}


def meta_model(arch: str, config: dict):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        if arch == "gpt2":
            return GPT2LMHeadModel(GPT2Config(**config))
        return Qwen3ForCausalLM(Qwen3Config(**config))


def measure(ranks: int) -> list[dict]:
    out = []
    for model_name, (arch, config) in MODELS.items():
        model = meta_model(arch, config)
        params = sum(p.numel() for p in model.parameters())
        for label, (cls, options) in ROWS.items():
            opt = getattr(hf_mousse, cls).for_model(model, **options)
            one = opt.state_bytes()
            per_rank = [opt.state_bytes(world=ranks, rank=r) for r in range(ranks)]
            largest = max(per_rank, key=lambda b: b["matrix"] + b["scalar"])
            out.append(dict(model=model_name, parameters=params, row=label, optimizer=cls, options=options,
                            matrix_bytes=one["matrix"], scalar_bytes=one["scalar"],
                            ranks=ranks, largest_rank_bytes=largest["matrix"] + largest["scalar"]))
    return out


def render_markdown(data: dict) -> str:
    n = data["ranks"]
    lines = [f"Optimizer state in fp32, computed by `state_bytes()` on meta-device models (hf_mousse commit "
             f"{data['commit']}); the scalar path (embeddings, head, norms, biases) is AdamW, two moments. "
             f"Per rank: the largest rank of a DDP split over {n} ranks.", "",
             "| model | optimizer | matrix path GiB | scalar path GiB | total GiB | vs Muon "
             f"| per rank of {n}, GiB |",
             "|---|---|---|---|---|---|---|"]
    muon = {r["model"]: r["matrix_bytes"] + r["scalar_bytes"] for r in data["rows"] if r["row"] == "Muon"}
    for r in data["rows"]:
        total = r["matrix_bytes"] + r["scalar_bytes"]
        lines.append(f"| {r['model']} | {r['row']} | {r['matrix_bytes'] / 2**30:.2f} | "
                     f"{r['scalar_bytes'] / 2**30:.2f} | {total / 2**30:.2f} | "
                     f"{total / muon[r['model']]:.2f}x | {r['largest_rank_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    ap.add_argument("--render", metavar="JSON", default=None)
    args = ap.parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return
    data = dict(benchmark="memory", commit=git_commit(), ranks=args.ranks,
                torch=torch.__version__, rows=measure(args.ranks))
    write_json(Path(args.out), data, indent=1)
    print(render_markdown(data), end="")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
