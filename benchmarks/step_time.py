#!/usr/bin/env python
"""Optimizer-step time, side by side in one run: torch.optim.Muon, hf_mousse (Muon, Mousse, MiMuon)
and torch.optim.AdamW on the hidden matrices of GPT-2-124M and / or Qwen3-0.6B.

This is a benchmark, not a test: it asserts nothing about timings. Every optimizer gets its own
fresh copy of the same parameters and the same random gradients (fixed seed, set once; step() does
not zero them). No model, no forward/backward, no tokens: only ``opt.step()`` is timed.

    python benchmarks/step_time.py                      # CUDA if available, else small CPU run
    python benchmarks/step_time.py --device cpu --set gpt2 --layers 2 --scale 0.25
    python benchmarks/step_time.py --only torch_muon,hf_muon --iters 100
    python benchmarks/step_time.py --render benchmarks/results/step_time-cpu-gpt2.json   # markdown table
    python benchmarks/step_time.py --device cpu --authors-src /tmp/authors_mousse  # + the authors' Mousse

Ratios compare like with like: each row is divided by the Muon row that runs Newton-Schulz in the same
dtype (bf16 rows by torch.optim.Muon, fp32 rows by hf_mousse.Muon). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from environment import PhaseTimer, device_name, git_commit, loadavg, sync, write_json  # noqa: E402
from variants import MOUSSE_VARIANTS, unsupported  # noqa: E402
from variants import label as variant_label  # noqa: E402

import hf_mousse  # noqa: E402

# (out, in) nn.Linear layout, per layer.
PARAM_SETS = {
    "gpt2": dict(
        title="GPT-2-124M hidden matrices",
        layers=12,
        shapes={"attn.c_attn (fused qkv)": (2304, 768), "attn.c_proj": (768, 768),
                "mlp.c_fc": (3072, 768), "mlp.c_proj": (768, 3072)},
    ),
    # GPT-2 with the fused qkv projection split into three matrices, as hf_mousse.param_groups does
    # (split_fused=True) and as the authors' runs use separate q, k, v projections.
    "gpt2-split": dict(
        title="GPT-2-124M hidden matrices, q/k/v separate",
        layers=12,
        shapes={"attn.q": (768, 768), "attn.k": (768, 768), "attn.v": (768, 768), "attn.c_proj": (768, 768),
                "mlp.c_fc": (3072, 768), "mlp.c_proj": (768, 3072)},
    ),
    "qwen3": dict(
        title="Qwen3-0.6B hidden matrices",
        layers=28,
        shapes={"q_proj": (2048, 1024), "k_proj": (1024, 1024), "v_proj": (1024, 1024),
                "o_proj": (1024, 2048), "gate_proj": (3072, 1024), "up_proj": (3072, 1024),
                "down_proj": (1024, 3072)},
    ),
}

LR = 0.02
ADAMW_LR = 1e-3
TARGET_RATIO = 0.7  # hf_mousse.Muon step <= 0.7x torch.optim.Muon on GPT-2-124M shapes
# Baseline of a row = the first of these Muon rows present in the run whose NS dtype equals the row's:
# bf16 rows are set against torch.optim.Muon, fp32 rows against hf_mousse.Muon (fp32). A row without NS
# (AdamW, "-") is set against the Muon row of hf_mousse's default NS dtype on that device.
BASELINE_ORDER = ("torch_muon", "hf_muon", "hf_muon_bf16")


def auto_ns_dtype(device_type: str) -> str:
    """What hf_mousse's ns_dtype="auto" resolves to on this device type."""
    return "bf16" if device_type == "cuda" else "fp32"


# Mousse rows with an option on top of the defaults (variants.MOUSSE_VARIANTS). Rows in bf16 matmuls are
# left out of the default CPU set (bf16 is emulated there); --only still selects them.
VARIANT_ROWS = ("mousse_newton", "mousse_delay1", "mousse_bf16", "mousse_delay1_bf16", "mousse_gpu")
NOT_DEFAULT_ON_CPU = ("mousse_bf16", "mousse_delay1_bf16", "mousse_gpu")


def _variant_row(key: str, ns: str) -> dict:
    options = MOUSSE_VARIANTS[key]
    label = "hf_mousse.Mousse(refresh=newton)" if key == "mousse_newton" else variant_label(options)
    return dict(key=key, label=label, ns=ns, options=options, unsupported=unsupported(options),
                make=lambda ps: hf_mousse.Mousse(ps, lr=LR, **options))


def optimizers(device: torch.device, authors_src: str | None = None) -> list[dict]:
    """Rows of the table: key (for --only), label, factory(params) and the NS dtype it uses; a row with
    ``unsupported`` set (an option this checkout's Mousse does not take) is reported, not run. With
    ``authors_src`` (a directory the authors' repository was exported to) a row runs their Mousse."""
    auto = auto_ns_dtype(device.type)
    rows = [
        dict(key="torch_muon", label="torch.optim.Muon", ns="bf16",
             make=lambda ps: torch.optim.Muon(ps, lr=LR)),
        dict(key="hf_muon", label="hf_mousse.Muon", ns=auto,
             make=lambda ps: hf_mousse.Muon(ps, lr=LR)),
    ]
    if device.type != "cuda":  # on CUDA the row above is already bf16, like torch's
        rows.append(dict(key="hf_muon_bf16", label="hf_mousse.Muon(ns_dtype=bf16)", ns="bf16",
                         make=lambda ps: hf_mousse.Muon(ps, lr=LR, ns_dtype="bfloat16")))
    rows += [
        dict(key="mousse_both", label="hf_mousse.Mousse(sides=both)", ns=auto,
             make=lambda ps: hf_mousse.Mousse(ps, lr=LR, sides="both")),
        dict(key="mousse_left", label="hf_mousse.Mousse(sides=left)", ns=auto,
             make=lambda ps: hf_mousse.Mousse(ps, lr=LR, sides="left")),
        *(_variant_row(key, auto) for key in VARIANT_ROWS),
    ]
    if authors_src:
        import authors_mousse  # only with --authors-src: their code is loaded from that directory

        ns_dtype = torch.bfloat16 if auto == "bf16" else torch.float32
        authors_mousse.load(authors_src, handoff=ns_dtype)  # fail before any timing if it cannot load
        rows.append(dict(key="authors", label=f"authors' Mousse ({auto} NS)", ns=auto,
                         make=lambda ps: authors_mousse.make(ps, authors_src, lr=LR, ns_dtype=ns_dtype)))
    rows += [
        dict(key="mimuon", label="hf_mousse.MiMuon", ns=auto,
             make=lambda ps: hf_mousse.MiMuon(ps, lr=LR)),
        dict(key="adamw", label="torch.optim.AdamW", ns="-",
             make=lambda ps: torch.optim.AdamW(ps, lr=ADAMW_LR)),
    ]
    return rows


# ---------------------------------------------------------------------------- parameters
def build_shapes(name: str, layers: int, scale: float) -> list[tuple[str, tuple[int, int]]]:
    spec = PARAM_SETS[name]
    shrink = lambda d: max(2, round(d * scale))  # noqa: E731
    return [(f"layers.{i}.{n}", (shrink(o), shrink(k)))
            for i in range(layers) for n, (o, k) in spec["shapes"].items()]


def make_data(shapes, device, seed: int):
    """Master parameters and gradients (fp32), generated once with a fixed seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = [(torch.randn(s, generator=gen) * 0.02).to(device) for _, s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for _, s in shapes]
    return params, grads


def refresh_period(opt) -> tuple[int | None, int]:
    """Steps between Mousse eigenbasis refreshes / MiMuon gap tests (None: no periodic extra work), and
    Mousse's ``refresh_delay`` (steps between computing a refresh and applying it; 0 if absent)."""
    for g in opt.param_groups:
        period = g.get("refresh_every") or g.get("gap_every") or g.get("shampoo_update_freq")  # authors'
        if period:
            return period, int(g.get("refresh_delay") or 0)
    return None, 0


def refresh_steps(period: int | None, delay: int, steps) -> list[bool]:
    """Per optimizer step t (1-based): does t carry refresh work (t = 1, T + 1, ... or, with a refresh
    delay d, up to d steps after one)?"""
    if period is None:
        return [False for _ in steps]
    return [period == 1 or any((t - j) % period == 1 for j in range(delay + 1)) for t in steps]


# ---------------------------------------------------------------------------- timing
def time_rows(rows: list[dict], master_params, master_grads, device, warmup: int, iters: int) -> list[dict]:
    """Every row's optimizer on its own copy of the same parameters and gradients, stepped in turn:
    step t of every row, then step t + 1 (the row that goes first rotates), so that a drift in the
    machine's speed (other load, clocks) falls on all rows alike instead of on whichever ran last.

    Each ``opt.step()`` is timed with environment.PhaseTimer: on CUDA, events on the current stream,
    read once per round (so work a row puts on a side stream is not charged to that step, and may
    overlap the next rows' steps as it would overlap the rest of a training step)."""
    runs = []
    for row in rows:
        params = [torch.nn.Parameter(p.clone()) for p in master_params]
        for p, g in zip(params, master_grads):
            p.grad = g.clone()
        runs.append((row, row["make"](params), []))
    timer = PhaseTimer(device)
    for step in range(warmup + iters):  # the warm-up includes step 1: lazy state (+ Mousse's first refresh)
        k = step % len(runs)
        order = runs[k:] + runs[:k]
        for _row, opt, _times in order:
            timer.mark()
            opt.step()
            timer.mark()
        if step >= warmup:
            for (_row, _opt, times), ms in zip(order, timer.elapsed_ms()[::2]):
                times.append(ms)
        else:
            timer.elapsed_ms()
        print(f"    step {step + 1}/{warmup + iters}" + (" (warm-up)" if step < warmup else ""), flush=True)
    sync(device)  # side-stream work of the last step, before the next set or the next benchmark
    results = []
    for row, opt, times in runs:
        period, delay = refresh_period(opt)
        steps = range(warmup + 1, warmup + iters + 1)  # optimizer step numbers, 1-based
        refresh = refresh_steps(period, delay, steps)
        plain = [t for t, r in zip(times, refresh) if not r] or times
        results.append(dict(
            key=row["key"], label=row["label"], ns_dtype=row["ns"],
            median_ms=statistics.median(times),
            median_no_refresh_ms=statistics.median(plain),
            mean_ms=statistics.fmean(times),
            refresh_every=period,
            refresh_delay=delay,
            refresh_steps_timed=sum(refresh),
            times_ms=times,
            stats=opt.stats() if hasattr(opt, "stats") else None,
        ))
    del runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def run_set(name: str, args, device, rows) -> dict:
    spec = PARAM_SETS[name]
    layers = args.layers if args.layers is not None else args.default_layers or spec["layers"]
    shapes = build_shapes(name, layers, args.scale)
    full = layers == spec["layers"] and args.scale == 1.0
    unique = {}
    for n, s in shapes[: len(spec["shapes"])]:
        unique[n.split(".", 2)[2]] = s
    print(f"\n=== {spec['title']}: {layers} layers x {len(spec['shapes'])} matrices "
          f"= {len(shapes)} matrices, {sum(o * k for _, (o, k) in shapes) / 1e6:.2f}M params ===")
    print("shapes per layer (out x in): " + ", ".join(f"{n} {o}x{k}" for n, (o, k) in unique.items()))
    if not full:
        print(f"NOTE: SHRUNK from the real model ({spec['layers']} layers, scale 1.0) to {layers} "
              f"layers, every dimension x{args.scale:g}. Absolute times are not the real model's.")

    master_params, master_grads = make_data(shapes, device, args.seed)
    t0 = time.perf_counter()
    print(f"  timing {', '.join(row['label'] for row in rows)}, interleaved ...", flush=True)
    results = time_rows(rows, master_params, master_grads, device, args.warmup, args.iters)
    for r in results:
        r["loadavg_1min_after"] = loadavg()
    print(f"  done in {time.perf_counter() - t0:.1f} s (load average {loadavg():.2f})", flush=True)
    del master_params, master_grads

    add_ratios(results, auto_ns_dtype(device.type))
    print_table(results)
    comparison = authors_comparison(results)
    if comparison:
        print(f"\n{comparison['text']}")
    return dict(title=spec["title"], layers=layers, scale=args.scale, full_size=full,
                shapes={n: list(s) for n, s in unique.items()}, num_matrices=len(shapes),
                num_params=sum(o * k for _, (o, k) in shapes), results=results,
                authors_comparison=comparison)


def authors_comparison(results: list[dict]) -> dict | None:
    """hf_mousse.Mousse(sides=both) over the authors' Mousse, same parameters, gradients and NS dtype:
    the median step without refresh, and the mean (refresh amortised). Below 1: ours is faster."""
    by_key = {r["key"]: r for r in results}
    ours, theirs = by_key.get("mousse_both"), by_key.get("authors")
    if not ours or not theirs:
        return None
    out = {k: ours[k] / theirs[k] for k in ("median_no_refresh_ms", "mean_ms", "median_ms")}
    out["text"] = (f"{ours['label']} / {theirs['label']} (same NS dtype, {ours['ns_dtype']}): "
                   f"{out['median_no_refresh_ms']:.3f}x at the median step without refresh, "
                   f"{out['mean_ms']:.3f}x on the mean (refresh amortised); below 1 = hf_mousse faster")
    return out


def baseline_for(row: dict, results: list[dict], auto: str) -> dict | None:
    """The Muon row this row is compared with: same NS dtype (see BASELINE_ORDER)."""
    dtype = auto if row["ns_dtype"] == "-" else row["ns_dtype"]
    by_key = {r["key"]: r for r in results}
    return next((by_key[k] for k in BASELINE_ORDER if k in by_key and by_key[k]["ns_dtype"] == dtype), None)


def add_ratios(results: list[dict], auto: str) -> None:
    """Set baseline, ratio_median and ratio_mean of every row (recomputed from the step times)."""
    for r in results:
        ref = baseline_for(r, results, auto)
        r["baseline"] = ref["key"] if ref else None
        r["ratio_median"] = r["median_ms"] / ref["median_ms"] if ref else None
        r["ratio_mean"] = r["mean_ms"] / ref["mean_ms"] if ref else None


def _baseline_label(r: dict, results: list[dict]) -> str:
    ref = next((x for x in results if x["key"] == r.get("baseline")), None)
    return f"{ref['label']} ({ref['ns_dtype']})" if ref else "n/a"


def print_table(results: list[dict]) -> None:
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}x"  # noqa: E731
    head = ["optimizer", "NS dtype", "median ms", "median ms", "mean ms", "ratio", "ratio", "baseline"]
    sub = ["", "", "(all)", "(no refresh)", "(all)", "median", "mean", "(same NS dtype)"]
    lines = [[r["label"], r["ns_dtype"], f"{r['median_ms']:.2f}", f"{r['median_no_refresh_ms']:.2f}",
              f"{r['mean_ms']:.2f}", fmt(r["ratio_median"]), fmt(r["ratio_mean"]),
              _baseline_label(r, results)] for r in results]
    widths = [max(len(x[i]) for x in [head, sub, *lines]) for i in range(len(head))]
    show = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print()
    print(show(head))
    print(show(sub))
    print("-" * max(len(show(x)) for x in [head, *lines]))
    for line in lines:
        print(show(line))
    print("ratio = time / time of the baseline row in this run (median over median, mean over mean); the "
          "baseline\n  runs Newton-Schulz in the same dtype (bf16: torch.optim.Muon; fp32: hf_mousse.Muon)")


def render_markdown(data: dict) -> str:
    """Markdown table(s) of a result JSON written by this script. Ratios are recomputed from the stored
    step times with the same-NS-dtype baselines (older files stored ratios against torch.optim.Muon)."""
    meta = data["meta"]
    auto = meta.get("ns_dtype_auto") or auto_ns_dtype(meta["device"].split(":")[0])
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}x"  # noqa: E731
    out = []
    for s in data["sets"].values():
        results = [dict(r) for r in s["results"]]
        add_ratios(results, auto)
        shapes = ", ".join(f"{o}x{k}" for o, k in s["shapes"].values())
        out.append(f"{s['title']}: {s['layers']} layers, dimensions x{s['scale']:g} ({shapes}); "
                   f"{meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
                   f"commit {meta['commit']}; "
                   f"median / mean of {meta['iters']} steps after {meta['warmup']} warm-up steps; "
                   f"1-min load average {meta['loadavg_1min_at_start']:.2f} at start.")
        out.append("")
        out.append("| optimizer | NS dtype | median ms | mean ms (incl. refresh) | vs (same NS dtype) "
                   "| ratio (median) | ratio (mean) |")
        out.append("|---|---|---|---|---|---|---|")
        for r in results:
            out.append(f"| {r['label']} | {r['ns_dtype']} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | "
                       f"{_baseline_label(r, results)} | {fmt(r['ratio_median'])} | {fmt(r['ratio_mean'])} |")
        comparison = authors_comparison(results)
        if comparison:
            authors = meta.get("authors") or {}
            out.append("")
            out.append(f"{comparison['text']}. Authors' code: {authors.get('repo', '?')} at commit "
                       f"{authors.get('commit', '?')}, patched in memory to run in one CPU process "
                       f"({', '.join(authors.get('patches', []))}; benchmarks/authors_mousse.py).")
        out.append("")
    for skip in meta.get("skipped_rows") or []:
        out.append(f"Not run: {skip['label']}: {skip['reason']}.")
    return "\n".join(out).rstrip() + "\n"


def target_check(device, sets: dict) -> dict | None:
    """hf_mousse.Muon step <= 0.7x torch.optim.Muon on GPT-2-124M shapes, NS dtypes matched."""
    if "gpt2" not in sets:
        return None
    res = {r["key"]: r for r in sets["gpt2"]["results"]}
    key = "hf_muon" if device.type == "cuda" else "hf_muon_bf16"  # the row whose NS dtype is bf16
    if "torch_muon" not in res or key not in res:
        print("\nTarget check skipped: needs rows torch_muon and " + key)
        return None
    ratio = res[key]["median_ms"] / res["torch_muon"]["median_ms"]
    met = ratio <= TARGET_RATIO
    full = sets["gpt2"]["full_size"]
    print(f"\nTarget: hf_mousse.Muon step <= {TARGET_RATIO}x torch.optim.Muon on GPT-2-124M shapes, "
          f"same device, both with bf16 NS ({res[key]['label']} vs torch.optim.Muon):")
    print(f"  median ratio {ratio:.3f} -> {'MET' if met else 'NOT MET'}"
          + ("" if full else "  [NOT MEANINGFUL: shapes shrunk; the target is defined at full size, "
                            "scale 1.0, 12 layers]"))
    if device.type != "cuda":
        print("  (on CPU, bf16 NS is emulated and ~60x slower than fp32; the target is meant for CUDA)")
    return dict(row=key, ratio_median=ratio, target=TARGET_RATIO, met=met, meaningful=full)


# ---------------------------------------------------------------------------- main
def parse_args():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--set", choices=["gpt2", "gpt2-split", "qwen3", "both"], default=None,
                    help="parameter set (default: both on CUDA, gpt2 on CPU)")
    ap.add_argument("--layers", type=int, default=None,
                    help="layer count override (default: the model's on CUDA, 2 on CPU)")
    ap.add_argument("--scale", type=float, default=None,
                    help="shrink every dimension by this factor (default: 1.0 on CUDA, 0.25 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 10 CUDA, 2 CPU)")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed steps, ideally a multiple of 10 (default: 50 CUDA, 10 CPU)")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: torch_muon, hf_muon, hf_muon_bf16 (CPU only), "
                         "mousse_both, mousse_left, mousse_newton, mousse_delay1, mousse_bf16, "
                         "mousse_delay1_bf16, mousse_gpu (the bf16 rows not by default on CPU), authors "
                         "(with "
                         "--authors-src), mimuon, adamw (a row whose same-NS-dtype Muon baseline is left "
                         "out gets ratio n/a; a row whose option this Mousse lacks is skipped and listed)")
    ap.add_argument("--authors-src", metavar="DIR", default=None,
                    help="directory the authors' Mousse repository was exported to (outside this "
                         "checkout): adds the row 'authors' (see benchmarks/README.md)")
    ap.add_argument("--authors-commit", metavar="SHA", default=None,
                    help="the authors' commit that was exported, for the result file (default: the "
                         "file DIR/COMMIT, else git rev-parse HEAD in DIR)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) (default: torch's choice); on a shared CPU, fewer "
                         "threads than cores avoids OpenMP slowdowns under contention")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="JSON path (default: benchmarks/results/step_time-<device>-<set>.json)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="print the markdown table of a result file written by this script and exit "
                         "(nothing is timed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.set = args.set or ("both" if on_cuda else "gpt2")
    args.default_layers = None if on_cuda else 2  # CPU: keep the whole run to a few minutes
    args.scale = args.scale if args.scale is not None else (1.0 if on_cuda else 0.25)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    args.iters = args.iters if args.iters is not None else (50 if on_cuda else 10)
    if args.warmup < 1 or args.iters < 1 or args.scale <= 0 or (args.layers is not None and args.layers < 1):
        ap.error("--warmup, --iters and --layers must be >= 1 and --scale > 0")
    return args, device


def main():
    args, device = parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return
    if args.authors_commit and not args.authors_src:
        sys.exit("--authors-commit needs --authors-src")
    wanted = [k.strip() for k in args.only.split(",") if k.strip()] if args.only else None
    if wanted and "authors" in wanted and not args.authors_src:
        sys.exit("--only authors needs --authors-src DIR (the authors' repository, exported; see "
                 "benchmarks/README.md)")
    rows = optimizers(device, args.authors_src)
    if wanted:
        unknown = set(wanted) - {r["key"] for r in rows}
        if unknown:
            sys.exit(f"unknown --only names {sorted(unknown)}; choose from {[r['key'] for r in rows]}")
        rows = [r for r in rows if r["key"] in wanted]
    elif device.type != "cuda":
        rows = [r for r in rows if r["key"] not in NOT_DEFAULT_ON_CPU]
    skipped = [dict(key=r["key"], label=r["label"], reason=r["unsupported"])
               for r in rows if r.get("unsupported")]
    rows = [r for r in rows if not r.get("unsupported")]
    for skip in skipped:
        print(f"SKIPPED {skip['label']}: {skip['reason']}")
    if not rows:
        sys.exit("no row left to time")
    names = ["gpt2", "qwen3"] if args.set == "both" else [args.set]

    meta = dict(
        device=str(device), device_name=device_name(device), torch=torch.__version__,
        hf_mousse=hf_mousse.__version__, commit=git_commit(), python=platform.python_version(),
        param_dtype="float32", ns_dtype_auto=auto_ns_dtype(device.type), set=args.set,
        warmup=args.warmup, iters=args.iters, seed=args.seed,
        settings={"lr": LR, "adamw_lr": ADAMW_LR,
                  "torch.optim.Muon": "lr=0.02, torch defaults (bf16 NS, Keller Jordan coeffs, 5 steps)",
                  "hf_mousse": "lr=0.02, class defaults (ns_dtype='auto': bf16 on CUDA, fp32 elsewhere)",
                  "torch.optim.AdamW": "lr=1e-3, foreach=None (torch's default choice)"},
        loadavg_1min_at_start=loadavg(),
        rows={r["key"]: dict(label=r["label"], ns_dtype=r["ns"], options=r.get("options")) for r in rows},
        skipped_rows=skipped,
        timer=PhaseTimer.describe(device),
    )
    if any(r["key"] == "authors" for r in rows):
        import authors_mousse

        ns_dtype = torch.bfloat16 if meta["ns_dtype_auto"] == "bf16" else torch.float32
        meta["authors"] = authors_mousse.describe(args.authors_src, args.authors_commit, ns_dtype)
        meta["settings"]["authors' Mousse"] = (
            "lr=0.02 and hf_mousse.Mousse's defaults (both sides), NS through their newton_schulz_func "
            "hook (hf_mousse's, Dion schedule) in the NS dtype, momentum handed over in the NS dtype")
    print("Optimizer step time (only opt.step() is timed; no model, no tokens)")
    print(f"device: {meta['device']} ({meta['device_name']})")
    print(f"torch {meta['torch']}, hf_mousse {meta['hf_mousse']}, commit {meta['commit']}, "
          f"params and grads float32")
    print(f"warmup {args.warmup} steps, then {args.iters} timed steps per optimizer; "
          f"timer: {meta['timer']}")
    print("Only 2-D hidden matrices (no embeddings, head, norms or biases): torch.optim.Muon rejects "
          "anything else. Random gradients, fixed seed, set once; each optimizer gets fresh params.")
    if device.type != "cuda":
        load = meta["loadavg_1min_at_start"]
        if load > 0.5:
            print(f"WARNING: 1-min load average is {load:.2f} before starting: other processes may be using "
                  "the CPU,\n  and CPU timings (eigh especially) degrade badly under contention.")
        print("FAIRNESS (CPU): torch.optim.Muon hard-codes bf16 Newton-Schulz, which is ~60x slower "
              "than fp32 on\n  CPUs without bf16 units; hf_mousse defaults to fp32 NS on CPU. "
              "Ratios therefore compare like with like:\n  bf16 rows against torch.optim.Muon, fp32 rows "
              "against hf_mousse.Muon (fp32).")
    else:
        print("NS dtype: hf_mousse's ns_dtype='auto' is bf16 on CUDA, as in torch.optim.Muon.")
    if args.iters % 10:
        print(f"NOTE: --iters {args.iters} is not a multiple of 10, so the mean over-/under-weights "
              "Mousse's eigenbasis refresh and MiMuon's gap test (every 10 steps).")
    print("Mousse refreshes its eigenbasis, and MiMuon tests its gap, every 10 steps: 'mean' includes "
          "those steps, 'median (no refresh)' excludes them.")
    if "authors" in meta:
        a = meta["authors"]
        print(f"authors' Mousse: {a['repo']} commit {a['commit']}, loaded from {a['src']} and patched in "
              f"memory ({', '.join(a['patches'])});\n  its first (warm-up) step includes torch.compile "
              "of their momentum / update kernels.")

    sets = {name: run_set(name, args, device, rows) for name in names}
    target = target_check(device, sets)

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"step_time-{device.type}-{args.set}.json"
    write_json(out, dict(meta=meta, sets=sets, target=target))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
