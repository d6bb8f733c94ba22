"""Train a tiny GPT-2 on English text that ships with CPython, once per optimizer, and print
the losses side by side. Offline, CPU-friendly (about a minute on 2 cores).

    python -m hf_mousse.quickstart [--steps 60]
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_mousse import MiMuon, Mousse, Muon


def byte_corpus() -> torch.Tensor:
    """pydoc_data's help topics (~460k characters of English) as a stream of byte tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


OPTIMIZERS = {
    # Matrix LRs on each optimizer's own scale; the scalar path (embeddings, norms, biases) uses AdamW.
    "Mousse": lambda m: Mousse.for_model(m, lr=0.02, scalar_lr=3e-3),
    "Muon": lambda m: Muon.for_model(m, lr=0.02, weight_decay=0.01, scalar_lr=3e-3),
    "MiMuon": lambda m: MiMuon.for_model(m, lr=0.02, weight_decay=0.01, scalar_lr=3e-3, sgd_scale="match"),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01),
}


def train(model, opt, batches) -> list[float]:
    """One optimizer step per batch of token ids (labels = inputs); returns the losses."""
    losses = []
    for x in batches:
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    data = byte_corpus()
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - args.seq, (args.steps, args.batch), generator=g)
    batches = [torch.stack([data[s : s + args.seq] for s in row]) for row in starts]
    print(f"tiny GPT-2 (2 layers, d=128, byte vocab) on {len(data):,} bytes of pydoc text; "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens")
    curves = {}
    for name, make in OPTIMIZERS.items():
        model = tiny_gpt2(seed=0)
        opt = make(model)
        t0 = time.perf_counter()
        curves[name] = losses = train(model, opt, batches)
        print(f"{name:>7}: loss {losses[0]:.3f} -> {losses[-1]:.3f}  ({time.perf_counter() - t0:.1f}s)")
    marks = sorted({0, *range(9, args.steps, 10), args.steps - 1})
    print("\nstep  " + "  ".join(f"{n:>7}" for n in curves))
    for i in marks:
        print(f"{i + 1:>4}  " + "  ".join(f"{curves[n][i]:7.3f}" for n in curves))


if __name__ == "__main__":
    main()
