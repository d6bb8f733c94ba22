"""Train a tiny model for a few steps, in one process or under torchrun (DDP or FSDP2), on a global batch
that is the same for every world size; write the losses, the final weights and per-rank counters.

    python dist_train.py --optim mousse --out DIR                       # one process: the reference
    torchrun --nproc_per_node 2 dist_train.py --engine ddp --out DIR    # the same global batches, split
    ... --save-at 5                                                     # also write DIR/optimizer.safetensors
    ... --resume DIR2                                                   # continue from DIR2's step
    ... --nan-at 2 --nonfinite skip                                     # a NaN in rank 0's part of a gradient

Used by tests/test_distributed.py (CPU, gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import tiny_gpt2  # noqa: E402

import hf_mousse  # noqa: E402
from hf_mousse.errors import NonFiniteGradientError  # noqa: E402
from hf_mousse.integration.checkpoint import load_optimizer, save_optimizer  # noqa: E402
from hf_mousse.optim.distributed import local  # noqa: E402

OPTIMIZERS = {"muon": (hf_mousse.Muon, {}), "mimuon": (hf_mousse.MiMuon, {"gap_every": 3}),
              "mousse": (hf_mousse.Mousse, {"refresh_every": 3}),
              "mousse_newton": (hf_mousse.Mousse, {"refresh_every": 3, "refresh": "newton"}),
              "mousse_delay": (hf_mousse.Mousse, {"refresh_every": 3, "refresh_delay": 2,
                                                  "refresh_schedule": "staggered"})}
GLOBAL_BATCH, SEQ = 4, 16


def tiny_qwen3_odd():
    """Qwen3 with odd dimensions (35 wide, 37 MLP): no dimension divides over two ranks."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=256, hidden_size=35, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, max_position_embeddings=64, tie_word_embeddings=False))


def build_model(args):
    model = tiny_gpt2() if args.model == "gpt2" else tiny_qwen3_odd()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        # q_proj's rank-1 A (1 x 35) leaves one of two ranks an empty FSDP2 shard (scalar path);
        # v_proj's rank-2 adapters are matrices (matrix path).
        config = LoraConfig(r=1, lora_alpha=2, lora_dropout=0.0, rank_pattern={"v_proj": 2},
                            target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, config)
    return model.eval()  # no dropout: the runs must see the same computation at every world size


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=g)
    return tokens[rank::world]


def shard(model, args, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    inner = model.get_base_model() if args.lora else model
    blocks = inner.transformer.h if args.model == "gpt2" else inner.model.layers
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def swap_parameters(opt, model):
    """What accelerate does after sharding a model whose optimizer exists: the param groups get the
    new (DTensor) parameters, found here by name."""
    by_name = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [by_name[n] for n in group["param_names"]]


def full_weights(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optim", choices=sorted(OPTIMIZERS), default="mousse")
    ap.add_argument("--model", choices=["gpt2", "qwen3"], default="gpt2")
    ap.add_argument("--engine", choices=["ddp", "fsdp2"], default="ddp")
    ap.add_argument("--build", choices=["after", "before"], default="after",
                    help="FSDP2: build the optimizer after sharding, or before (then swap, as accelerate)")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--no-split", action="store_true", help="distributed=False: no split")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--nonfinite", choices=["raise", "skip", "ignore"], default="raise")
    ap.add_argument("--nan-at", type=int, default=None,
                    help="at this step, a NaN in --nan-in's gradient on rank 0 only (FSDP2: in its shard); "
                         "result.json records per rank which parameters the step changed and what "
                         "check_finite() raised right after it")
    ap.add_argument("--nan-in", default="transformer.h.0.mlp.c_fc.weight")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a collective may wait (gloo): a rank left waiting fails instead of hanging")
    ap.add_argument("--save-at", type=int, default=None)
    ap.add_argument("--resume", default=None, help="a DIR written with --save-at: continue from its step")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        timeout = {"timeout": timedelta(seconds=args.timeout)} if args.timeout else {}
        dist.init_process_group("gloo", **timeout)
    rank = dist.get_rank() if world > 1 else 0

    model = build_model(args)
    start = 0
    if args.resume:
        saved = torch.load(os.path.join(args.resume, "weights.pt"), weights_only=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved["weights"][n])
        start = saved["step"]
    cls, kwargs = OPTIMIZERS[args.optim]
    opt_kwargs = dict(lr=args.lr, weight_decay=args.weight_decay, nonfinite=args.nonfinite, **kwargs)
    if args.no_split:
        opt_kwargs["distributed"] = False
    wrapped = model
    if world > 1 and args.engine == "fsdp2":
        if args.build == "before":
            opt = cls.for_model(model, **opt_kwargs)
            shard(model, args, world)
            swap_parameters(opt, model)
        else:
            shard(model, args, world)
            opt = cls.for_model(model, **opt_kwargs)
    else:
        opt = cls.for_model(model, **opt_kwargs)
        if world > 1:
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
    if args.resume:
        load_optimizer(opt, os.path.join(args.resume, "optimizer.safetensors"), model)

    losses, nan_step = [], None
    for step in range(start, args.steps):
        x = batch(step, rank, world)
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        bad = args.nan_at == step + 1
        if bad:
            before = {n: local(p).detach().clone() for n, p in model.named_parameters()}
            grad = local(dict(model.named_parameters())[args.nan_in].grad)
            if rank == 0:
                grad[(0,) * grad.ndim] = float("nan")
        opt.step()
        if bad:
            changed = [n for n, p in model.named_parameters() if not torch.equal(local(p), before[n])]
            nan_step = {"changed": changed}
            try:
                opt.check_finite()
                nan_step["error"] = None
            except NonFiniteGradientError as e:
                nan_step["error"] = str(e)
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
        if args.save_at == step + 1:
            save_optimizer(opt, os.path.join(args.out, "optimizer.safetensors"), model)  # every rank
            weights = full_weights(model)
            if rank == 0:
                torch.save({"weights": weights, "step": step + 1}, os.path.join(args.out, "weights.pt"))
    opt.check_finite()
    stats = opt.stats()
    weights = full_weights(model)
    all_stats, all_nan_steps = [stats] * world, [nan_step] * world
    if world > 1:
        dist.all_gather_object(all_stats, stats)
        dist.all_gather_object(all_nan_steps, nan_step)
    if rank == 0:
        torch.save(weights, os.path.join(args.out, "final.pt"))
        matrices = sum(1 for g in opt.param_groups if g["role"] == "matrix" for _ in g["params"])
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"losses": losses, "stats": all_stats, "world": world, "matrix_params": matrices,
                       "nan_step": all_nan_steps}, f)
    if world > 1:
        # Interpreter teardown of a gloo group can hang or abort a finished run (a torch race in
        # ~ProcessGroupGloo and DDP's Reducer): every output is written, so leave without it.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
