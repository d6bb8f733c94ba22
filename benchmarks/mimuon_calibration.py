"""MiMuon's default, side by side: Muon, MiMuon (default and other gap rules), and frozen matrices.

    .venv/bin/python benchmarks/mimuon_calibration.py [--steps 150] [--seeds 0,1,2] [--only NAME,...]

A tiny GPT-2 (d=128, 2 layers, byte vocabulary) trains on CPython's pydoc text (offline), every run
on the same batches from the same initialisation. Prints, per run and seed, the final train loss (mean
of the last 10 steps), the loss on held-out text (the last 10% of the corpus) and the share of matrix
steps on MiMuon's Muon branch; then the means over seeds. Nothing is asserted (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_mousse import MiMuon, Muon, param_groups
from hf_mousse.data import pydoc_text

LR, SCALAR_LR = 0.02, 3e-3
RUNS = {
    "muon": lambda m: Muon.for_model(m, lr=LR, scalar_lr=SCALAR_LR),
    "mimuon (defaults)": lambda m: MiMuon.for_model(m, lr=LR, scalar_lr=SCALAR_LR),
    "mimuon relative 1e-3": lambda m: MiMuon.for_model(m, lr=LR, scalar_lr=SCALAR_LR, gap_rule="relative",
                                                       gap_threshold=1e-3),
    "mimuon scaled 1e-3 match": lambda m: MiMuon.for_model(m, lr=LR, scalar_lr=SCALAR_LR, sgd_scale="match"),
    "frozen matrices": lambda m: Muon([dict(g, lr=0.0) if g["role"] == "matrix" else g
                                       for g in param_groups(m)], lr=LR, scalar_lr=SCALAR_LR),
}


def run(name: str, steps: int, seed: int) -> dict:
    text = torch.tensor(list(pydoc_text().encode("utf-8")))
    split = int(len(text) * 0.9)
    g = torch.Generator().manual_seed(seed)

    def batch(source, size):
        starts = torch.randint(0, len(source) - 64, (size,), generator=g)
        return torch.stack([source[i : i + 64] for i in starts])

    batches = [batch(text[:split], 16) for _ in range(steps)]
    held_out = [batch(text[split:], 32) for _ in range(8)]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    opt = RUNS[name](model)
    losses = []
    for x in batches:
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        held = statistics.mean(model(x, labels=x).loss.item() for x in held_out)
    fractions = opt.muon_branch_fraction() if isinstance(opt, MiMuon) else {}
    return {"train": statistics.mean(losses[-10:]), "eval": held,
            "muon_share": statistics.mean(fractions.values()) if fractions else None,
            "min_share": min(fractions.values()) if fractions else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"device: CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.steps} steps, seeds {seeds}")
    results: dict[str, list[dict]] = {}
    for name in args.only.split(","):
        for seed in seeds:
            r = run(name, args.steps, seed)
            results.setdefault(name, []).append(r)
            share = "-" if r["muon_share"] is None else f"{r['muon_share']:.3f} (min {r['min_share']:.2f})"
            print(f"{name:28s} seed {seed}: train {r['train']:.4f} eval {r['eval']:.4f} muon branch {share}",
                  flush=True)
    print("\nmeans over seeds")
    for name, rs in results.items():
        shares = [r["muon_share"] for r in rs if r["muon_share"] is not None]
        share = f"{statistics.mean(shares):.3f}" if shares else "-"
        print(f"{name:28s} train {statistics.mean(r['train'] for r in rs):.4f} "
              f"eval {statistics.mean(r['eval'] for r in rs):.4f} muon branch {share}")


if __name__ == "__main__":
    main()
