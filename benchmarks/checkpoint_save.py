#!/usr/bin/env python
"""What one checkpoint of a recipe costs to write: the model (``save_pretrained``, safetensors) and the
optimizer (``optimizer.safetensors`` through ``hf_mousse.save_optimizer``: state gathered and copied
to CPU, SHA-256 digest of header and tensors, atomic write with fsync), timed on this machine, with
the digest's share and the speed of other hashes on the same bytes.

The model is the recipe's, built from its config; the optimizer is the recipe's with its state
allocated as its first step would allocate it (``_fresh_state``), filled with random values: the cost
of writing and hashing depends on the bytes, not on what they mean, so no (slow, on a CPU) step is
taken.

    python benchmarks/checkpoint_save.py          # benchmarks/results/checkpoint_save-cpu.json
    python benchmarks/checkpoint_save.py --recipe gpt2-124m-pretrain --dir /fast/disk
"""

from __future__ import annotations

import argparse
import hashlib
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

GB = 1e9


class GPT2_VOCAB:  # noqa: N801 - what build_model reads of a tokenizer: GPT-2's vocabulary size and ids
    bos_token_id = eos_token_id = pad_token_id = 50256

    def __len__(self) -> int:
        return 50257


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hash_rate(name: str, tensors: dict) -> float:
    """GB/s of hashlib ``name`` over the tensors' bytes (one pass, one core)."""
    h = hashlib.new(name)
    start = time.perf_counter()
    total = 0
    for t in tensors.values():
        b = t.reshape(-1).view(torch.uint8).numpy()
        h.update(b)
        total += b.nbytes
    return total / GB / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="gpt2-124m-pretrain")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--out", default=str(HERE / "results" / "checkpoint_save-cpu.json"))
    ap.add_argument("--render", metavar="JSON", default=None)
    args = ap.parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())))
        return
    import hf_mousse
    from hf_mousse import train
    from hf_mousse.integration import checkpoint

    recipe = train.load_recipe(args.recipe)
    torch.manual_seed(0)
    model = train.build_model(recipe["model"], GPT2_VOCAB())
    opt_spec = recipe["optimizer"]
    opt = getattr(hf_mousse, {"mousse": "Mousse", "muon": "Muon", "mimuon": "MiMuon"}[opt_spec["name"]]) \
        .for_model(model, **opt_spec.get("args", {}))  # the lr does not change what is stored
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = opt._fresh_state(p, group)
            for v in opt.state[p].values():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    v.uniform_()
    state_bytes = opt.stats()["state_bytes"]

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        model_s = timed(lambda: model.save_pretrained(Path(tmp) / "model"))
        model_bytes = sum(f.stat().st_size for f in (Path(tmp) / "model").glob("*.safetensors"))
        path = str(Path(tmp) / "optimizer.safetensors")
        optimizer_s = timed(lambda: hf_mousse.save_optimizer(opt, path, model))
        file_bytes = Path(path).stat().st_size
        # the parts of that save, again on the same state
        parts = {}
        sd = {}
        parts["state_dict_and_cpu_copies_s"] = timed(lambda: sd.update(
            tensors=checkpoint._split_state(opt.state_dict(), checkpoint.parameter_names(opt, model))[0]))
        tensors = sd["tensors"]
        parts["sha256_digest_s"] = timed(lambda: checkpoint._digest({}, tensors))
        rates = {name: hash_rate(name, tensors) for name in ("sha256", "blake2b", "sha1", "md5")}
    report = dict(benchmark="checkpoint_save", recipe=args.recipe, device=device_name(torch.device("cpu")),
                  commit=git_commit(), load_average=loadavg(), optimizer=opt_spec["name"],
                  parameters=sum(p.numel() for p in model.parameters()), model_bytes=model_bytes,
                  model_save_s=model_s, optimizer_file_bytes=file_bytes, optimizer_state_bytes=state_bytes,
                  optimizer_save_s=optimizer_s, **parts, hash_gb_per_s=rates)
    write_json(Path(args.out), report)
    print(render_markdown(report))


def render_markdown(r: dict) -> str:
    opt_gb, model_gb = r["optimizer_file_bytes"] / GB, r["model_bytes"] / GB
    digest = r["sha256_digest_s"]
    rates = ", ".join(f"{k} {v:.2f}" for k, v in r["hash_gb_per_s"].items())
    return "\n".join([
        f"Recipe `{r['recipe']}` ({r['parameters'] / 1e6:.0f}M parameters, {r['optimizer']}); {r['device']}; "
        f"commit {r['commit']}.", "",
        "| file | size | save | per GB |", "|---|---|---|---|",
        f"| model (`save_pretrained`) | {model_gb:.2f} GB | {r['model_save_s']:.1f} s | "
        f"{r['model_save_s'] / model_gb:.1f} s |",
        f"| `optimizer.safetensors` | {opt_gb:.2f} GB | {r['optimizer_save_s']:.1f} s | "
        f"{r['optimizer_save_s'] / opt_gb:.1f} s |",
        "",
        f"Of the optimizer's save: state dict and CPU copies {r['state_dict_and_cpu_copies_s']:.1f} s, the "
        f"SHA-256 digest {digest:.1f} s ({digest / r['optimizer_save_s']:.0%}), the rest the write with "
        f"fsync. One core hashes (GB/s): {rates}.",
    ])


if __name__ == "__main__":
    main()
