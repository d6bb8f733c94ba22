#!/usr/bin/env python
"""Steps to the same loss: Mousse vs Muon vs AdamW (or any optimizer name the Trainer accepts),
each at its own best learning rate, over several seeds, on a token stream seen at most once.

    python benchmarks/convergence.py                                   # CPU size, stdlib source, ~20 min
    python benchmarks/convergence.py --data 'corpus/*.txt' --optimizers mousse,muon --seeds 3 \\
        --steps 400 --lrs mousse=0.01,muon=0.01 --out runs/conv        # your data, no sweep
    python benchmarks/convergence.py --variant a.25=mousse:alpha=0.25 --lrs a.25=0.01 ...   # a knob
    python benchmarks/convergence.py --knobs --optimizers mousse,muon --lrs mousse=0.01,muon=0.01 --seeds 2
    python benchmarks/convergence.py --render DIR/convergence.json     # markdown table

Protocol (the same for every optimizer):
- The model (GPT-2 family, built from a config) and the data order depend only on the seed.
- Each optimizer is built exactly as ``transformers.Trainer`` builds it for ``--optim NAME`` (decay and
  no-decay groups, the Trainer-route defaults, the Trainer's cosine schedule with warm-up and gradient
  clipping at 1.0); the loop itself is plain PyTorch, so nothing else differs between runs.
- Learning rate: the best final eval loss of a sweep (seed 0) unless ``--lrs`` gives it. The seed-0 run
  at the chosen rate is reused, the other seeds are run at that rate.
- Target: per seed, Muon's final eval loss with that seed. ``steps_to_target`` is the first step at
  which an optimizer's eval loss reaches it, linearly interpolated between eval points (null if never),
  and ``ratio_to_muon`` the mean over seeds of its steps over Muon's (null if a seed never reached it).
- Training reads each token at most once: the script refuses a budget larger than the corpus.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from environment import device_name, git_commit, loadavg  # noqa: E402

import hf_mousse  # noqa: E402

BASELINE = "muon"
# Sizes: model config, tokens per step, run length, default sweep. The CPU size finishes the default
# benchmark (3 optimizers x 3 learning rates, then 2 more seeds each) in about 20 minutes on 2 cores.
SIZES = {
    "cpu": dict(model=dict(n_embd=128, n_layer=4, n_head=4), seq_len=128, batch=16, steps=400,
                eval_every=25, eval_blocks=128, vocab=4096, warmup=20),
    # the CPU size at twice the width (4x the matrix parameters): the trend with model size on a CPU
    "cpu-wide": dict(model=dict(n_embd=256, n_layer=4, n_head=4), seq_len=128, batch=16, steps=400,
                     eval_every=25, eval_blocks=128, vocab=4096, warmup=20),
    # three times the CPU width, the widest of the CPU width trend (same depth, data and tokens)
    "cpu-wider": dict(model=dict(n_embd=384, n_layer=4, n_head=4), seq_len=128, batch=16, steps=400,
                      eval_every=25, eval_blocks=128, vocab=4096, warmup=20),
    # the one-GPU pilot (2 optimizers x 2 lrs; ~250 s one at a time by the H200's step times, so the
    # GPU suite runs them at once with --jobs 4): 13M tokens of the installed packages' Python sources,
    # each seen once; BPE trained on the first 20M characters of training text
    "gpu-pilot": dict(model=dict(n_embd=512, n_layer=8, n_head=8), seq_len=1024, batch=32, steps=400,
                      eval_every=25, eval_blocks=64, vocab=8192, warmup=40, data="site-packages",
                      tokenizer_chars=20_000_000),
    "50m": dict(model=dict(n_embd=512, n_layer=8, n_head=8), seq_len=1024, batch=64, steps=3000,
                eval_every=100, eval_blocks=256, vocab=None, warmup=150),
    "124m": dict(model=dict(n_embd=768, n_layer=12, n_head=12), seq_len=1024, batch=256, steps=4000,
                 eval_every=200, eval_blocks=256, vocab=None, warmup=200),
    "test": dict(model=dict(n_embd=32, n_layer=1, n_head=2), seq_len=32, batch=4, steps=6,  # the tests'
                 eval_every=2, eval_blocks=8, vocab=300, warmup=1),
}
# --smoke: any size shrunk to seconds on a CPU (its data source and protocol kept), for CI
SMOKE = dict(model=dict(n_embd=32, n_layer=1, n_head=2), seq_len=32, batch=2, steps=4, eval_every=2,
             eval_blocks=4, vocab=300, warmup=1, tokenizer_chars=200_000)
SWEEP = {"mousse": (3e-3, 1e-2, 3e-2), "muon": (3e-3, 1e-2, 3e-2), "mimuon": (3e-3, 1e-2, 3e-2),
         "adamw_torch": (1e-3, 3e-3, 1e-2)}
DEFAULT_SWEEP = (1e-3, 3e-3, 1e-2)
ALIASES = {"adamw": "adamw_torch"}
# --knobs: Mousse's settings that plausibly matter, each one change from the Trainer-route defaults, at
# Mousse's learning rate (give it with --lrs mousse=LR) unless a rate is listed here. "paper-*" is the
# paper's convention: spectral_norm scaling, matrix lr 0.02, scalar (AdamW) lr 0.01.
KNOBS = {
    "alpha=0.0625": ("mousse:alpha=0.0625", None), "alpha=0.25": ("mousse:alpha=0.25", None),
    "T=1": ("mousse:refresh_every=1", None), "T=50": ("mousse:refresh_every=50", None),
    "sides=left": ("mousse:sides=left", None),
    "beta=0.9": ("mousse:beta=0.9", None),
    # the scalar path (AdamW on embeddings, head, norms) at AdamW's own best rate from the CPU sweep,
    # instead of sharing Mousse's matrix rate as it does on the Trainer route
    "scalar_lr=3e-3": ("mousse:scalar_lr=0.003", None),
    "paper-mousse": ("mousse:adjust_lr=spectral_norm,scalar_lr=0.01", 0.02),
    "paper-muon": ("muon:adjust_lr=spectral_norm,scalar_lr=0.01", 0.02),
}
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)


# ------------------------------------------------------------------------------------------------ data
def load_documents(spec: str, chars: int) -> tuple[list[str], str]:
    """(documents, description) of at least ``chars`` characters, or all there are.

    ``stdlib`` (the interpreter's standard library source), ``site-packages`` (the installed packages'
    Python source), ``pydoc`` (CPython's help topics), a glob of local files (one document per file), or
    ``hub:NAME[:CONFIG]`` (a Hub dataset's ``text`` column, streamed). Files are read in a fixed shuffled
    order, so the held-out first documents are a sample of the whole."""
    from hf_mousse import data

    if spec == "pydoc":
        return data._pydoc_rows(), "pydoc help topics"
    if spec.startswith("hub:"):
        import datasets

        name, _, config = spec[4:].partition(":")
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
        docs, total = [], 0
        for row in stream:
            docs.append(row["text"])
            total += len(row["text"])
            if total >= chars:
                break
        return docs, f"Hub dataset {spec[4:]} (streamed, first {len(docs)} rows)"
    if spec == "stdlib":
        files = data.stdlib_files()
    elif spec == "site-packages":
        files = site_packages_files()
    else:
        files = sorted(glob.glob(spec, recursive=True))
    if not files:
        raise SystemExit(f"--data {spec!r} matches no file")
    random.Random(0).shuffle(files)  # a fixed mix of files, the same for every optimizer and seed
    docs, total = [], 0
    for path in files:
        new = data.read_documents([path])
        docs.extend(new)
        total += sum(map(len, new))
        if total >= chars:
            break
    what = {"stdlib": "Python standard library source", "site-packages": "installed packages' Python source"}
    return docs, f"{what.get(spec, f'files {spec}')} ({len(docs)} of {len(files)} files)"


def site_packages_files() -> list[str]:
    """The ``.py`` files under this interpreter's site-packages (sorted by path): a code corpus of a few
    hundred MB wherever torch and transformers are installed, with no network."""
    import site

    roots = sorted({Path(p) for p in site.getsitepackages() if Path(p).is_dir()})
    return sorted(str(f) for root in roots for f in root.rglob("*.py"))


def token_blocks(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """All documents, each ended by eos, concatenated and cut into (blocks, seq_len) token ids."""
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in (*doc, tokenizer.eos_token_id)], dtype=torch.long)
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def prepare_data(args, size: dict):
    """(train blocks, eval blocks, tokenizer, description). Eval blocks come from the first documents
    (held out whole), train blocks from the rest; the budget must fit in one pass over train."""
    from hf_mousse import data

    need_tokens = (args.steps * size["batch"] + size["eval_blocks"] * 2) * size["seq_len"]
    docs, what = load_documents(args.data, chars=int(need_tokens * 4.5) + 2_000_000)
    if args.tokenizer:
        tokenizer = data.load_tokenizer({"name_or_path": args.tokenizer})
    else:
        sample = docs[: max(1, len(docs) // 2)]
        if size.get("tokenizer_chars"):  # large sizes: a prefix is enough to learn the merges
            total, n = 0, 0
            while n < len(sample) and total < size["tokenizer_chars"]:
                total, n = total + len(sample[n]), n + 1
            sample = sample[: max(1, n)]
        tokenizer = data.load_tokenizer({"train_bpe": {"vocab_size": size["vocab"] or 8192}}, lambda: sample)
    blocks = token_blocks(docs, tokenizer, size["seq_len"])
    eval_blocks, train_blocks = blocks[: size["eval_blocks"]], blocks[size["eval_blocks"] :]
    needed = args.steps * size["batch"]
    if len(train_blocks) < needed:
        raise SystemExit(
            f"the corpus has {len(train_blocks)} training blocks of {size['seq_len']} tokens, fewer than the "
            f"{needed} that {args.steps} steps x batch {size['batch']} read: training would repeat tokens. "
            "Use more data or fewer steps."
        )
    return train_blocks, eval_blocks, tokenizer, what


# ------------------------------------------------------------------------------------------------ runs
def build_model(size: dict, vocab_size: int, seed: int, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=size["seq_len"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **size["model"])
    return GPT2LMHeadModel(cfg).to(device)


def trainer_optimizer(model, name: str, optim_args: str | None, lr: float, steps: int, warmup: int,
                      use_cpu: bool):
    """The optimizer and LR schedule ``transformers.Trainer`` builds for ``--optim name``."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, optim=name, optim_args=optim_args, learning_rate=lr,
                                  weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                                  lr_scheduler_type="cosine", warmup_steps=warmup, max_steps=steps,
                                  use_cpu=use_cpu, report_to="none", save_strategy="no")
        trainer = Trainer(model=model, args=targs)
        opt = trainer.create_optimizer()
        sched = trainer.create_scheduler(num_training_steps=steps, optimizer=opt)
    return opt, sched


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, device, batch: int) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch].to(device)
        total += model(input_ids=x, labels=x).loss.item() * len(x)
    model.train()
    return total / len(blocks)


def train_run(args, size: dict, blocks: tuple, name: str, optim_args: str | None, lr: float,
              seed: int) -> dict:
    """One training run on ``blocks`` = (train blocks, eval blocks, vocab size); returns its eval curve
    [(step, loss)], final eval loss and time."""
    if args.threads:  # a --jobs worker starts with torch's default
        torch.set_num_threads(args.threads)
    train_blocks, eval_blocks, vocab_size = blocks
    device = torch.device(args.device)
    model = build_model(size, vocab_size, seed, device)
    opt, sched = trainer_optimizer(model, name, optim_args, lr, args.steps, size["warmup"],
                                   use_cpu=device.type == "cpu")
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    b, micro = size["batch"], args.micro_batch or size["batch"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    curve = [(0, eval_loss(model, eval_blocks, device, micro))]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = train_blocks[order[(step - 1) * b : step * b]]
        for i in range(0, b, micro):  # gradient accumulation: the mean loss over the whole batch
            x = batch[i : i + micro].to(device)
            with autocast:
                loss = model(input_ids=x, labels=x).loss
            (loss * len(x) / b).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's max_grad_norm
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % size["eval_every"] == 0 or step == args.steps:
            curve.append((step, eval_loss(model, eval_blocks, device, micro)))
            if not math.isfinite(curve[-1][1]):
                break
    return dict(lr=lr, seed=seed, curve=curve, final_eval_loss=curve[-1][1],
                train_seconds=time.perf_counter() - start)


def train_runs(args, size: dict, data, keys: list) -> dict:
    """{(name, optim_args, lr, seed): run} for ``keys``, ``args.jobs`` at a time. Concurrent runs share
    the device: on a GPU that one small model leaves mostly idle (Mousse's refresh is latency-bound)
    they overlap; each run's result is the same as alone (its own process, model, seed and order)."""
    blocks = (data[0], data[1], len(data[2]))
    done = {}

    def report(key, run):
        done[key] = run
        name, optim_args, lr, seed = key
        print(f"{name} ({optim_args or 'defaults'}) lr {lr:g} seed {seed}: final eval loss "
              f"{run['final_eval_loss']:.4f} ({_fmt(run['train_seconds'], '.0f')} s)", flush=True)

    if args.jobs <= 1 or len(keys) <= 1:
        for key in keys:
            report(key, train_run(args, size, blocks, *key))
        return done
    # spawn, not fork: CUDA and the tokenizers' thread pool do not survive a fork
    context = torch.multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(keys)), mp_context=context) as pool:
        futures = {pool.submit(train_run, args, size, blocks, *key): key for key in keys}
        for future in concurrent.futures.as_completed(futures):
            report(futures[future], future.result())
    return done


def steps_to(curve: list, target: float) -> float | None:
    """First step at which the eval loss reaches ``target``, interpolated linearly between eval points."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (l0 - target) / (l0 - l1) * (s1 - s0)
    return None


# ------------------------------------------------------------------------------------------------ main
def parse_map(text: str | None, cast=float) -> dict:
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=VALUE, got {item!r}")
        out[key.strip()] = cast(value)
    return out


def knob_subset(labels: str) -> dict:
    """The KNOBS named in ``labels`` (comma-separated; "all": every one)."""
    if labels == "all":
        return KNOBS
    chosen = labels.split(",")
    unknown = [label for label in chosen if label not in KNOBS]
    if unknown:
        raise SystemExit(f"--knobs: unknown {unknown}; known: {list(KNOBS)}")
    return {label: KNOBS[label] for label in chosen}


def run_specs(args) -> dict[str, tuple[str, str | None]]:
    """label -> (Trainer optim name, optim_args) for --optimizers and --variant entries; Muon is added
    when absent, since the target is its final loss."""
    specs = {}
    for name in filter(None, args.optimizers.split(",")):
        specs[name] = (ALIASES.get(name, name), None)
    variants = [v.partition("=")[::2] for v in args.variant]  # (label, "name:key=value,...")
    if args.knobs:
        variants += [(label, spec) for label, (spec, _) in knob_subset(args.knobs).items()]
    for label, spec in variants:
        name, _, optim_args = spec.partition(":")
        if not label or not name:
            raise SystemExit(f"--variant expects LABEL=NAME[:key=value,...], got {label}={spec}")
        specs[label] = (ALIASES.get(name, name), optim_args or None)
    if BASELINE not in specs:
        print(f"adding {BASELINE}: the target is its final eval loss")
        specs = {BASELINE: (BASELINE, None), **specs}
    return specs


def summarize(label: str, runs: list[dict], targets: dict[int, float], baseline_steps: dict) -> dict:
    finals = [r["final_eval_loss"] for r in runs]
    reached = [steps_to(r["curve"], targets[r["seed"]]) for r in runs]
    ratios = [s / baseline_steps[r["seed"]] if s is not None and baseline_steps.get(r["seed"]) else None
              for s, r in zip(reached, runs)]
    ok = [x for x in ratios if x is not None]
    return dict(
        seeds=[r["seed"] for r in runs],
        final_eval_loss=finals,
        final_eval_loss_mean=statistics.fmean(finals),
        final_eval_loss_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
        steps_to_target=reached,
        ratio_to_muon_per_seed=ratios,
        ratio_to_muon=statistics.fmean(ok) if ok and len(ok) == len(ratios) else None,
        ratio_to_muon_std=statistics.stdev(ok) if len(ok) > 1 else None,
        curves=[r["curve"] for r in runs],
        train_seconds=[r["train_seconds"] for r in runs],
    )


def run_config(args, size: dict, data) -> dict:
    """Everything a run's result depends on besides optimizer, lr and seed (JSON-ready)."""
    config = dict(size=args.size + ("-smoke" if args.smoke else ""), model=size["model"],
                  seq_len=size["seq_len"], batch=size["batch"],
                  tokens_per_step=size["batch"] * size["seq_len"], steps=args.steps,
                  eval_every=size["eval_every"], eval_tokens=len(data[1]) * size["seq_len"],
                  warmup=size["warmup"], schedule="cosine (Trainer)", weight_decay=WEIGHT_DECAY,
                  betas=BETAS, grad_clip=1.0, data=data[3], vocab_size=len(data[2]), seeds=args.seeds)
    return json.loads(json.dumps(config))


def reusable_runs(path: str, config: dict) -> dict:
    """(name, optim_args, lr) -> {seed: run} from an earlier result with the same config (not seeds)."""
    old = json.loads(Path(path).read_text())
    differ = [k for k in config if k != "seeds" and old["config"].get(k) != config[k]]
    if differ:
        raise SystemExit(f"--reuse {path}: its runs were made with other settings ({differ}); run them again")
    out: dict = {}
    for r in old["optimizers"].values():
        runs = zip(r["seeds"], r["curves"], r["final_eval_loss"], r["train_seconds"])
        for seed, curve, final, secs in runs:
            out.setdefault((r["name"], r["optim_args"], r["lr"]), {})[seed] = dict(
                lr=r["lr"], seed=seed, curve=curve, final_eval_loss=final, train_seconds=secs)
    for label, runs in old.get("sweeps", {}).items():  # the sweep's other rates, all seed 0
        r = old["optimizers"][label]
        for run in runs:
            out.setdefault((r["name"], r["optim_args"], run["lr"]), {}).setdefault(0, dict(
                lr=run["lr"], seed=0, curve=run["curve"], final_eval_loss=run["final_eval_loss"],
                train_seconds=run.get("train_seconds")))
    return out


def main():
    args = parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dict(SIZES[args.size])
    if args.smoke:
        size.update(SMOKE)
    args.data = args.data or size.get("data", "stdlib")
    args.steps = args.steps or size["steps"]
    if args.eval_every:
        size["eval_every"] = args.eval_every
    commit = git_commit()  # the code this run starts from (HEAD may move while it runs)
    # --out: a folder (convergence.json and .png in it), or the JSON's own path (the GPU suite's)
    out_json = Path(args.out) if args.out.endswith(".json") else Path(args.out) / "convergence.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    specs = run_specs(args)
    given = parse_map(args.lrs)
    if args.knobs:
        knob_lrs = {label: lr for label, (_, lr) in knob_subset(args.knobs).items() if lr is not None}
        given = {**knob_lrs, **given}
    data = prepare_data(args, size)
    print(f"data: {data[3]}; {len(data[0])} train blocks, {len(data[1])} eval blocks of {size['seq_len']} "
          f"tokens; {args.steps} steps x {size['batch'] * size['seq_len']} tokens", flush=True)

    config = run_config(args, size, data)
    reuse: dict = {}
    for path in (args.reuse or "").split(","):
        if path:
            for key, seeds in reusable_runs(path, config).items():
                reuse.setdefault(key, {}).update(seeds)

    done: dict = {}  # (name, optim_args, lr, seed) -> run

    def run_all(keys):
        """Train the runs of ``keys`` not reused or done already (each once, args.jobs at a time)."""
        fresh = []
        for key in dict.fromkeys(keys):
            if key in done:
                continue
            cached = reuse.get(key[:3], {}).get(key[3])
            if cached is not None:
                name, optim_args, lr, seed = key
                print(f"{name} ({optim_args or 'defaults'}) lr {lr:g} seed {seed}: reused from {args.reuse}")
                done[key] = cached
            else:
                fresh.append(key)
        done.update(train_runs(args, size, data, fresh))

    def seeds_at(label, lr, swept):
        name, optim_args = specs[label]  # a swept label's seed 0 is its best sweep run
        return [(name, optim_args, lr, seed) for seed in range(args.seeds)
                if not (swept and seed == 0) and seed not in args.skip_seeds]

    # the sweeps and the given-rate runs first (all known up front), then the seeds at the chosen rates
    given_lr = {label: given.get(label, given.get(name)) for label, (name, _) in specs.items()}
    grid_of = parse_map(args.sweep, lambda v: tuple(float(x) for x in v.split("/")))
    grids = {label: grid_of.get(label) or SWEEP.get(name, DEFAULT_SWEEP)
             for label, (name, _) in specs.items() if given_lr[label] is None}
    run_all([(*specs[label], lr, 0) for label, grid in grids.items() for lr in grid]
            + [key for label in specs if label not in grids
               for key in seeds_at(label, given_lr[label], swept=False)])
    sweeps, chosen = {}, {}
    for label in specs:
        if label not in grids:
            chosen[label] = (given_lr[label], "given", None)
            continue
        runs = sweeps[label] = [done[(*specs[label], lr, 0)] for lr in grids[label]]
        for r in runs:
            print(f"sweep {label:<14} lr {r['lr']:<8g} final eval loss {r['final_eval_loss']:.4f}")
        best = min(runs, key=lambda r: r["final_eval_loss"] if math.isfinite(r["final_eval_loss"]) else 1e9)
        chosen[label] = (best["lr"], "sweep", best)
        if best["lr"] in (min(grids[label]), max(grids[label])):
            print(f"  note: {label}'s best lr {best['lr']:g} is at the edge of its sweep {grids[label]}")
    run_all([key for label in grids for key in seeds_at(label, chosen[label][0], swept=True)])

    runs_by_label = {}
    for label in specs:
        lr, _, seed0 = chosen[label]
        runs = [seed0] if seed0 is not None else []
        runs += [done[key] for key in seeds_at(label, lr, seed0 is not None)]
        runs_by_label[label] = sorted(runs, key=lambda r: r["seed"])

    targets = {r["seed"]: r["final_eval_loss"] for r in runs_by_label[BASELINE]}
    baseline_steps = {r["seed"]: steps_to(r["curve"], targets[r["seed"]]) for r in runs_by_label[BASELINE]}
    results = {}
    for label, (name, optim_args) in specs.items():
        lr, source, _ = chosen[label]
        grid = [r["lr"] for r in sweeps.get(label, [])]
        results[label] = dict(name=name, optim_args=optim_args, lr=lr, lr_source=source,
                              lr_at_sweep_edge=bool(grid) and lr in (min(grid), max(grid)),
                              **summarize(label, runs_by_label[label], targets, baseline_steps))
    device = torch.device(args.device)
    report = dict(
        benchmark="convergence", device=device_name(device), commit=commit, load_average=loadavg(),
        jobs=args.jobs,  # runs trained at once: train_seconds are shared-device times when > 1
        versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__,
                      hf_mousse=hf_mousse.__version__, python=sys.version.split()[0]),
        config=config,
        target=f"per seed, {BASELINE}'s final eval loss with that seed",
        sweeps={k: [dict(lr=r["lr"], final_eval_loss=r["final_eval_loss"], curve=r["curve"],
                         train_seconds=r["train_seconds"]) for r in v]
                for k, v in sweeps.items()},
        optimizers=results,
    )
    out_json.write_text(json.dumps(report, indent=1))
    plot(report, out_json.with_suffix(".png"))
    print(render_markdown(report))
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in report["optimizers"].items():
        steps = [s for s, _ in r["curves"][0]][1:]
        per_step = [[c[i][1] for c in r["curves"] if len(c) > i] for i in range(1, len(steps) + 1)]
        mean = [statistics.fmean(v) for v in per_step]
        (line,) = ax.plot(steps, mean, label=f"{label} (lr {r['lr']:g})")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step],
                        color=line.get_color(), alpha=0.2)
    base = report["optimizers"][BASELINE]["final_eval_loss_mean"]
    ax.axhline(base, color="gray", linestyle="--", linewidth=0.8, label=f"{BASELINE} final (mean)")
    finals = [r["final_eval_loss_mean"] for r in report["optimizers"].values()]
    ax.set_ylim(min(finals) - 0.15, min(finals) + 1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (nats/token)")
    cfg = report["config"]
    ax.set_title(f"{cfg['size']} size, {cfg['tokens_per_step']} tokens/step, {len(r['seeds'])} seeds "
                 "(band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"{cfg['size']} size: GPT-2 {cfg['model']}, {cfg['steps']} steps x {cfg['tokens_per_step']} tokens, "
        f"{cfg['data']}; {report['device']}; hf_mousse {report['versions']['hf_mousse']} "
        f"(commit {report['commit']}).",
        "",
        "| optimizer | lr | final eval loss (mean ± sd) | steps to Muon's final loss, per seed | "
        "ratio to Muon (mean ± sd) |",
        "|---|---|---|---|---|",
    ]
    for label, r in report["optimizers"].items():
        lr = f"{r['lr']:g}" + (" (sweep edge)" if r["lr_at_sweep_edge"] else "")
        steps = ", ".join("not reached" if s is None else f"{s:.0f}" for s in r["steps_to_target"])
        ratio = _fmt(r["ratio_to_muon"], ".2f")
        if r["ratio_to_muon"] is not None and r["ratio_to_muon_std"] is not None:
            ratio += f" ± {r['ratio_to_muon_std']:.2f}"
        elif r["ratio_to_muon"] is None:
            per = [_fmt(x, ".2f") for x in r["ratio_to_muon_per_seed"]]
            ratio = f"- (per seed: {', '.join(per)})"
        label_args = f"{label} ({r['optim_args']})" if r["optim_args"] else label
        final = f"{r['final_eval_loss_mean']:.3f} ± {r['final_eval_loss_std']:.3f}"
        lines.append(f"| {label_args} | {lr} | {final} | {steps} | {ratio} |")
    if report.get("sweeps"):
        lines += ["", "Learning-rate sweeps (seed 0, final eval loss): " + "; ".join(
            f"{label}: " + ", ".join(f"{r['lr']:g} → {r['final_eval_loss']:.3f}" for r in runs)
            for label, runs in report["sweeps"].items())]
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of runs, 1 or more")
    return int(text)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None,
                    help="stdlib | site-packages | pydoc | a glob of local text/code files | hub:NAME[:CONF] "
                         "(default: the size's, else stdlib)")
    ap.add_argument("--tokenizer", default=None,
                    help="a tokenizer name or directory (default: byte-level BPE trained on the data)")
    ap.add_argument("--optimizers", default="mousse,muon,adamw",
                    help="comma-separated --optim names (mousse, muon, mimuon, adamw, adamw_torch, ...)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=NAME:key=value,...",
                    help="an extra run with --optim_args, e.g. a.25=mousse:alpha=0.25 (repeatable)")
    ap.add_argument("--knobs", nargs="?", const="all", default=None, metavar="LABEL,...",
                    help="add the runs of KNOBS (Mousse's settings, one change each; all of them, or the "
                         "labels given); pair with --lrs")
    ap.add_argument("--lrs", default=None, help="LABEL=LR,... skips the sweep for those runs")
    ap.add_argument("--sweep", default=None, help="LABEL=lr1/lr2/lr3,... overrides a sweep grid")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-seeds", type=lambda t: {int(x) for x in t.split(",") if x}, default=set(),
                    metavar="N,...", help="seeds to leave out (to split one table's runs over processes; "
                                          "join them with --reuse)")
    ap.add_argument("--reuse", metavar="JSON[,JSON...]", default=None,
                    help="take runs (same optimizer, optim_args, lr, seed, settings) from earlier results "
                         "(comma-separated files; a run in several: the last file's)")
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="the size's data and protocol, a tiny model, 4 steps (a CI check, not a result)")
    ap.add_argument("--steps", type=int, default=None, help="default: the size's")
    ap.add_argument("--eval-every", type=int, default=None, help="default: the size's")
    ap.add_argument("--micro-batch", type=int, default=None, help="gradient accumulation micro-batch size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: torch's); 1 lets two benchmarks share 2 cores")
    ap.add_argument("--jobs", type=_positive_int, default=1,
                    help="runs trained at once, each in its own process (on one GPU they overlap its idle "
                         "time); results are the same as one at a time")
    ap.add_argument("--out", default="runs/convergence", help="a folder, or a path ending in .json")
    ap.add_argument("--render", metavar="JSON", default=None, help="print the markdown table of a result")
    return ap.parse_args()


if __name__ == "__main__":
    main()
