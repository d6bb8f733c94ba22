#!/usr/bin/env python
"""Whole training step (forward, backward, optimizer step) of a real model, Mousse vs Muon vs AdamW
side by side in one run, each from the same initial weights and fed the same batches.

This is a benchmark, not a test: it asserts nothing about timings. Models are built from configs
(GPT-2 or Qwen3 shapes; nothing is downloaded) and fed random tokens (uniform over the vocabulary,
fixed seed). One "step" is the forward and backward pass of every micro-batch (gradient accumulation)
plus one ``opt.step()`` and ``zero_grad()``.

    python benchmarks/overhead.py --preset cpu                 # small GPT-2, a few minutes on 2 cores
    python benchmarks/overhead.py --preset gpt2-124m           # CUDA: 12 x 768, 262,144 tokens/step
    python benchmarks/overhead.py --preset qwen3-0.6b          # CUDA: Qwen3-0.6B config
    python benchmarks/overhead.py --preset cpu --only muon,mousse --steps 10
    python benchmarks/overhead.py --render benchmarks/results/overhead-cpu-cpu.json   # markdown table

Per optimizer it reports the median / max / mean whole-step time, the median / max ``opt.step()``
time and its share of the step, the ratio to Muon, the bytes held in ``opt.state``, and the FLOPs
of the optimizer's matrix work per step set against the device's measured matmul rate (a lower
bound on the optimizer's time). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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

from environment import PhaseTimer, device_name, git, loadavg, sync, write_json  # noqa: E402
from variants import MOUSSE_VARIANTS, unsupported  # noqa: E402
from variants import label as variant_label  # noqa: E402

import hf_mousse  # noqa: E402
from hf_mousse.optim.kronecker import newton_plan  # noqa: E402
from hf_mousse.optim.orthogonalize import resolve_schedule  # noqa: E402
from hf_mousse.optim.roles import matrix_dims  # noqa: E402

# ---------------------------------------------------------------------------- presets
# tokens per optimizer step = micro_batch * accum * seq_len
PRESETS = {
    # a dry run of the GPU presets (gpu_suite.py --smoke): seconds on CPU
    "tiny": dict(
        arch="gpt2", title="GPT-2 shape, tiny (dry run)",
        model=dict(n_layer=1, n_embd=64, n_head=2, vocab_size=256, n_positions=32),
        seq_len=32, micro_batch=2, accum=2, warmup=1, steps=10,
    ),
    "tiny-qwen3": dict(
        arch="qwen3", title="Qwen3 shape, tiny (dry run)",
        model=dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=32, intermediate_size=128, vocab_size=256, max_position_embeddings=32,
                   tie_word_embeddings=True),
        seq_len=32, micro_batch=2, accum=2, warmup=1, steps=10,
    ),
    "cpu": dict(
        arch="gpt2", title="GPT-2 shape, small (CPU)",
        model=dict(n_layer=2, n_embd=256, n_head=4, vocab_size=4096, n_positions=128),
        seq_len=128, micro_batch=16, accum=4, warmup=2, steps=20,
    ),
    "cpu-qwen3": dict(
        arch="qwen3", title="Qwen3 shape, small (CPU)",
        model=dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, intermediate_size=768, vocab_size=4096, max_position_embeddings=128,
                   tie_word_embeddings=True),
        seq_len=128, micro_batch=16, accum=4, warmup=2, steps=20,
    ),
    "gpt2-124m": dict(
        arch="gpt2", title="GPT-2-124M",
        model=dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
        seq_len=1024, micro_batch=16, accum=16, warmup=5, steps=20,
    ),
    "qwen3-0.6b": dict(
        arch="qwen3", title="Qwen3-0.6B",
        # Qwen/Qwen3-0.6B config.json
        model=dict(num_hidden_layers=28, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                   head_dim=128, intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True),
        seq_len=1024, micro_batch=8, accum=32, warmup=5, steps=20,
    ),
}

# Mousse with an option on top of its defaults (variants.MOUSSE_VARIANTS): chosen with --only
OPTIMIZERS = ("muon", "mousse", *MOUSSE_VARIANTS, "adamw")
DEFAULT_OPTIMIZERS = ("muon", "mousse", "adamw")
LABELS = {"muon": "hf_mousse.Muon", "mousse": "hf_mousse.Mousse", "adamw": "torch.optim.AdamW",
          **{k: variant_label(v) for k, v in MOUSSE_VARIANTS.items()}}
BASELINE = "muon"


def is_mousse(key: str) -> bool:
    return key == "mousse" or key in MOUSSE_VARIANTS


def build_model(preset: dict, seed: int):
    """The model on CPU in fp32, initialised from ``seed``; dropout off."""
    import transformers

    torch.manual_seed(seed)
    if preset["arch"] == "gpt2":
        eos = min(50256, preset["model"]["vocab_size"] - 1)  # GPT-2's <|endoftext|>, inside a small vocab
        cfg = transformers.GPT2Config(**preset["model"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=eos, eos_token_id=eos)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        model_kw = dict(preset["model"])
        rope_theta = model_kw.pop("rope_theta", None)
        cfg = transformers.Qwen3Config(**model_kw, attention_dropout=0.0)
        if rope_theta is not None:  # transformers 5 keeps it in rope_parameters, 4.x as rope_theta
            if isinstance(getattr(cfg, "rope_parameters", None), dict):
                cfg.rope_parameters["rope_theta"] = rope_theta
            else:
                cfg.rope_theta = rope_theta
        model = transformers.Qwen3ForCausalLM(cfg)
    return model, cfg


def model_facts(model, cfg, preset: dict, tokens: int) -> dict:
    """Parameter counts and a PaLM-style FLOP estimate of forward + backward per optimizer step:
    6 N B for the matmul weights (hidden matrices and the head) + 12 L s d_attn B for attention."""
    params = list(model.parameters())
    unique = {id(p): p for p in params}
    total = sum(p.numel() for p in unique.values())
    head = model.get_output_embeddings().weight
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    hidden = sum(p.numel() for p in unique.values() if p.ndim == 2 and id(p) not in embeddings
                 and p is not head)
    if preset["arch"] == "gpt2":
        layers, d_attn = cfg.n_layer, cfg.n_embd
    else:
        layers, d_attn = cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim
    matmul_params = hidden + head.numel()
    flops = 6 * matmul_params * tokens + 12 * layers * preset["seq_len"] * d_attn * tokens
    return dict(params_total=total, params_hidden_matrices=hidden, params_head=head.numel(),
                tied_head=any(head is p for p in unique.values() if id(p) in embeddings),
                layers=layers, d_attn=d_attn, fwd_bwd_flops_per_step=flops)


# ---------------------------------------------------------------------------- optimizers
def make_optimizer(key: str, model, args):
    if key == "muon":
        return hf_mousse.Muon.for_model(model, lr=args.lr, scalar_lr=args.scalar_lr)
    if is_mousse(key):
        return hf_mousse.Mousse.for_model(model, lr=args.lr, scalar_lr=args.scalar_lr,
                                          **MOUSSE_VARIANTS.get(key, {}))
    return torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, betas=(0.9, 0.95),
                             weight_decay=args.adamw_wd)


def ns_dtype_name(group: dict, device: torch.device) -> str:
    name = group.get("ns_dtype", "auto")
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def settings_of(key: str, opt, device) -> dict:
    """The hyperparameters the optimizer actually runs with (from its param groups)."""
    if key == "adamw":
        g = opt.param_groups[0]
        return dict(lr=g["lr"], betas=list(g["betas"]), weight_decay=g["weight_decay"], eps=g["eps"],
                    foreach=g.get("foreach"), fused=g.get("fused"))
    matrix = next(g for g in opt.param_groups if g["role"] == "matrix")
    scalar = next((g for g in opt.param_groups if g["role"] == "scalar"), None)
    keys = ["lr", "momentum", "nesterov", "weight_decay", "ns", "ns_steps", "adjust_lr",
            "weight_decay_schedule", "alpha", "beta", "refresh_every", "refresh_schedule", "refresh",
            "refresh_delay", "matmul_dtype", "eps", "bias_correction", "grafting", "sides"]
    out = {k: matrix[k] for k in keys if k in matrix}
    out["momentum_form"] = type(opt).momentum_form
    out["ns_dtype"] = ns_dtype_name(matrix, device)
    out["nonfinite"] = opt.nonfinite
    if scalar is not None:
        out["scalar_path"] = dict(optimizer=scalar["scalar_optimizer"], lr=scalar["lr"],
                                  betas=list(scalar["betas"]), weight_decay=scalar["weight_decay"])
    return out


def settings_text(key: str, s: dict) -> str:
    if key == "adamw":
        return f"lr {s['lr']:g}, betas ({s['betas'][0]:g}, {s['betas'][1]:g}), wd {s['weight_decay']:g}"
    steps = len(resolve_schedule(s["ns"], s["ns_steps"]))
    text = (f"lr {s['lr']:g}, momentum {s['momentum']:g} ({s['momentum_form']}"
            f"{', Nesterov' if s['nesterov'] else ''}), NS {s['ns']} x{steps} {s['ns_dtype']}, "
            f"adjust_lr {s['adjust_lr']}, wd {s['weight_decay']:g}")
    if "refresh_every" in s:
        text += (f", alpha {s['alpha']:g}, beta {s['beta']:g}, refresh every {s['refresh_every']}, "
                 f"sides {s['sides']}, eps {s['eps']:g}, grafting {s['grafting']}")
        for name in ("refresh", "refresh_delay", "matmul_dtype"):  # newer options, shown when not default
            if s.get(name) not in (None, "eigh", 0, "float32"):
                text += f", {name} {s[name]}"
    if "scalar_path" in s:
        sp = s["scalar_path"]
        text += f"; scalar path {sp['optimizer']} lr {sp['lr']:g}"
    return text


def state_bytes(opt) -> dict:
    """Bytes of all tensors in ``opt.state`` (each storage counted once), split by param-group role."""
    role_of = {id(p): g.get("role", "all") for g in opt.param_groups for p in g["params"]}
    seen, out = set(), {}
    for p, st in opt.state.items():
        role = role_of.get(id(p), "all")
        for v in st.values():
            if torch.is_tensor(v):
                s = v.untyped_storage()
                if s.data_ptr() in seen and s.nbytes():
                    continue
                seen.add(s.data_ptr())
                out[role] = out.get(role, 0) + s.nbytes()
    out["total"] = sum(out.values())
    return out


def optimizer_flops(key: str, opt) -> dict:
    """FLOPs of the optimizer's matrix work per step (ALGORITHMS.md a.2, b.10), per matrix block
    (k, m, n) of the matrix path, m = out side, n = in side, r = min(m, n), s = max(m, n):
      Newton-Schulz        steps x (4 r^2 s + 2 r^3)                           every step
      Mousse factor EMAs   2 m^2 n (left) + 2 m n^2 (right)                    every step
      Mousse rotations     4 m^2 n (left) + 4 m n^2 (right)                    every step
      Mousse eigh          9 m^3 (left) + 9 n^3 (right), textbook count        every refresh_every steps
        (refresh="newton": its matrix products, 2 d^3 each, instead; kept under the eigh_* keys)
    Elementwise work (momentum, scaling, weight decay, the scalar path, AdamW) is not counted."""
    out = dict(ns=0, factor_ema=0, rotations=0, eigh_per_refresh=0, eigh_amortised=0.0)
    if key == "adamw":
        out["total_per_step"] = 0.0
        return out
    for g in opt.param_groups:
        if g["role"] != "matrix":
            continue
        steps = len(resolve_schedule(g["ns"], g["ns_steps"]))
        sides = {"both": ("left", "right"), "left": ("left",), "right": ("right",)}.get(g.get("sides"), ())
        for p in g["params"]:
            k, m, n = matrix_dims(p.shape, g["layout"], g["split"])
            r, s = min(m, n), max(m, n)
            out["ns"] += k * steps * (4 * r * r * s + 2 * r ** 3)
            if not is_mousse(key):
                continue
            if g.get("refresh", "eigh") == "newton":
                refresh = lambda d: 2 * d ** 3 * newton_plan(d, g["alpha"], g["eps"])[2]  # noqa: E731
            else:
                refresh = lambda d: 9 * d ** 3  # noqa: E731
            eigh = 0
            if "left" in sides:
                out["factor_ema"] += k * 2 * m * m * n
                out["rotations"] += k * 4 * m * m * n
                eigh += k * refresh(m)
            if "right" in sides:
                out["factor_ema"] += k * 2 * m * n * n
                out["rotations"] += k * 4 * m * n * n
                eigh += k * refresh(n)
            out["eigh_per_refresh"] += eigh
            out["eigh_amortised"] += eigh / g["refresh_every"]
    out["total_per_step"] = out["ns"] + out["factor_ema"] + out["rotations"] + out["eigh_amortised"]
    return out


def flop_bound_ms(flops: dict, ns_dtype: str | None, rates: dict,
                  matmul_dtype: str | None = None) -> tuple[float | None, float | None]:
    """(dtype-aware bound, headline-rate bound) in ms. Dtype-aware: NS at the rate of its dtype, the
    factor EMAs and rotations at the rate of Mousse's ``matmul_dtype`` (fp32 unless set), the refresh at
    the fp32 rate; headline: everything at the device's headline rate (fp32 on CPU, bf16 on CUDA)."""
    if not flops["total_per_step"]:
        return 0.0, 0.0
    fp32 = rates["float32"]["flops_per_s"]
    ns_rate = rates.get(ns_dtype or "float32", rates["float32"])["flops_per_s"]
    matmul_rate = rates.get(matmul_dtype or "float32", rates["float32"])["flops_per_s"]
    aware = (flops["ns"] / ns_rate + (flops["factor_ema"] + flops["rotations"]) / matmul_rate
             + flops["eigh_amortised"] / fp32) * 1e3
    headline = flops["total_per_step"] / rates[rates["headline"]]["flops_per_s"] * 1e3
    return aware, headline


# ---------------------------------------------------------------------------- environment
def matmul_rates(device: torch.device) -> dict:
    """Measured rate of one large square matmul: fp32 everywhere, bf16 too on CUDA (with the current
    TF32 setting, torch's default being off). Median of several repetitions after a warm-up."""
    rates = {}
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    for dtype in dtypes:
        n = (8192 if dtype == torch.bfloat16 else 4096) if device.type == "cuda" else 2048
        reps = 20 if device.type == "cuda" else 3
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        name = str(dtype).removeprefix("torch.")
        rates[name] = dict(n=n, median_s=t, flops_per_s=2 * n ** 3 / t)
        del a, b
    rates["headline"] = "bfloat16" if device.type == "cuda" else "float32"
    if device.type == "cuda":
        rates["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return rates


# ---------------------------------------------------------------------------- timing
def make_batches(total_steps: int, accum: int, micro: int, seq: int, vocab: int, seed: int, device):
    """Random token ids (uniform, fixed seed), shape (steps, accum, micro, seq); the labels are the
    inputs (the model shifts them)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (total_steps, accum, micro, seq), generator=gen).to(device)


def eigh_count(opt) -> int:
    """Eigenbasis refreshes so far (Mousse; 0 for the others): a step that raises it is a refresh step."""
    return opt.stats()["eigh_refreshes"] if hasattr(opt, "stats") else 0


def run_one(key: str, template, batches, args, device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = copy.deepcopy(template).to(device)  # same initial weights for every optimizer
    model.train()
    opt = make_optimizer(key, model, args)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    accum = batches.shape[1]
    whole, fwd_bwd, opt_ms, losses, refreshed, state_peak = [], [], [], [], [], {}
    timer = PhaseTimer(device)  # CUDA: events on the current stream, read after the step
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for t in range(batches.shape[0]):
        before = eigh_count(opt)  # a host read, before the timed phases
        timer.mark()
        total = torch.zeros((), device=device)
        for i in range(accum):
            x = batches[t, i]
            with autocast:
                loss = model(input_ids=x, labels=x).loss / accum
            loss.backward()
            total += loss.detach()
        timer.mark()
        opt.step()
        timer.mark()
        opt.zero_grad(set_to_none=True)
        timer.mark()
        fb, st, zg = timer.elapsed_ms()  # waits for the last event (current stream) only
        whole.append(fb + st + zg)
        fwd_bwd.append(fb)
        opt_ms.append(st)
        losses.append(total.item())
        refreshed.append(eigh_count(opt) > before)
        sb = state_bytes(opt)
        if sb["total"] >= state_peak.get("total", -1):
            state_peak = sb
    sync(device)  # work the last step left on side streams, before the next optimizer's run
    # this process's CPU time over wall time: ~ the cores it got (torch threads if nothing competed)
    cpu_per_wall = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    w = args.warmup
    timed = slice(w, None)
    tw, tf, to, rf = whole[timed], fwd_bwd[timed], opt_ms[timed], refreshed[timed]
    plain = [x for x, r in zip(tw, rf) if not r] or tw
    plain_opt = [x for x, r in zip(to, rf) if not r] or to
    flops = optimizer_flops(key, opt)
    settings = settings_of(key, opt, device)
    ns_dtype = settings.get("ns_dtype")
    result = dict(
        key=key, label=LABELS[key], settings=settings, settings_text=settings_text(key, settings),
        step_median_ms=statistics.median(tw), step_max_ms=max(tw), step_mean_ms=statistics.fmean(tw),
        step_median_no_refresh_ms=statistics.median(plain),
        fwd_bwd_median_ms=statistics.median(tf),
        opt_median_ms=statistics.median(to), opt_max_ms=max(to), opt_mean_ms=statistics.fmean(to),
        opt_median_no_refresh_ms=statistics.median(plain_opt),
        opt_share_median=statistics.median(to) / statistics.median(tw),
        refresh_steps_timed=sum(rf),
        step_of_max=w + 1 + max(range(len(tw)), key=tw.__getitem__),
        state_bytes=state_peak, optimizer_flops=flops,
        peak_memory_allocated_bytes=(torch.cuda.max_memory_allocated(device)
                                     if device.type == "cuda" else None),
        stats=opt.stats() if hasattr(opt, "stats") else None,
        times_ms=dict(step=whole, fwd_bwd=fwd_bwd, opt=opt_ms), refreshed=refreshed, losses=losses,
        ns_dtype=ns_dtype, process_cpu_per_wall=cpu_per_wall,
    )
    del opt, model
    gc.collect()
    return result


def add_derived(results: list[dict], meta: dict) -> None:
    """Ratios to Muon (whole step) and FLOP bounds, recomputed from the stored numbers."""
    base = next((r for r in results if r["key"] == BASELINE), None)
    for r in results:
        r["ratio_median_vs_muon"] = r["step_median_ms"] / base["step_median_ms"] if base else None
        r["ratio_mean_vs_muon"] = r["step_mean_ms"] / base["step_mean_ms"] if base else None
        matmul_dtype = r["settings"].get("matmul_dtype")
        aware, headline = flop_bound_ms(r["optimizer_flops"], r.get("ns_dtype"), meta["matmul_rates"],
                                        matmul_dtype)
        r["flop_bound_ms"], r["flop_bound_headline_ms"] = aware, headline
        # the same bound for a step without refresh (eigh left out): compare with the median
        f = r["optimizer_flops"]
        no_eigh = {**f, "eigh_amortised": 0.0, "total_per_step": f["total_per_step"] - f["eigh_amortised"]}
        r["flop_bound_no_eigh_ms"] = flop_bound_ms(no_eigh, r.get("ns_dtype"), meta["matmul_rates"],
                                                   matmul_dtype)[0]
        r["optimizer_flops_vs_fwd_bwd"] = (r["optimizer_flops"]["total_per_step"]
                                           / meta["model"]["fwd_bwd_flops_per_step"])


# ---------------------------------------------------------------------------- output
def _fmt_ratio(x):
    return "n/a" if x is None else f"{x:.3f}x"


def _mib(n):
    return f"{n / 2**20:.1f}"


def table_rows(results: list[dict], cuda: bool) -> tuple[list[str], list[list[str]]]:
    head = ["optimizer", "step ms median", "step ms max", "step ms mean", "fwd+bwd ms median",
            "vs Muon (median)", "vs Muon (mean)", "opt.step ms median", "opt.step ms max", "opt.step share",
            "opt state MiB", "opt matrix GFLOP/step", "FLOPs / matmul rate, ms"]
    if cuda:
        head += ["(all at bf16 rate), ms", "peak allocated GiB"]
    rows = []
    for r in results:
        row = [r["label"], f"{r['step_median_ms']:.1f}", f"{r['step_max_ms']:.1f}",
               f"{r['step_mean_ms']:.1f}", f"{r['fwd_bwd_median_ms']:.1f}",
               _fmt_ratio(r["ratio_median_vs_muon"]), _fmt_ratio(r["ratio_mean_vs_muon"]),
               f"{r['opt_median_ms']:.1f}", f"{r['opt_max_ms']:.1f}", f"{100 * r['opt_share_median']:.1f}%",
               _mib(r["state_bytes"]["total"]), f"{r['optimizer_flops']['total_per_step'] / 1e9:.2f}",
               f"{r['flop_bound_ms']:.1f}"]
        if cuda:
            peak = r["peak_memory_allocated_bytes"]
            row += [f"{r['flop_bound_headline_ms']:.1f}", "n/a" if peak is None else f"{peak / 2**30:.2f}"]
        rows.append(row)
    return head, rows


def describe(data: dict) -> list[str]:
    meta = data["meta"]
    m, rates = meta["model"], meta["matmul_rates"]
    rate_text = ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s ({v['n']}^3)"
                          for k, v in rates.items() if isinstance(v, dict))
    load = meta.get("loadavg_1min_at_start")
    dirty = meta.get("dirty_files") or []
    return [
        f"{meta['preset_title']} (`--preset {meta['preset']}`): {m['layers']} layers, "
        f"{m['params_total'] / 1e6:.2f}M parameters ({m['params_hidden_matrices'] / 1e6:.2f}M in hidden "
        f"matrices), vocab {meta['config']['vocab_size']}, sequence {meta['seq_len']}, "
        f"{meta['micro_batch']} x {meta['accum']} micro-batches = {meta['tokens_per_step']:,} tokens per "
        f"step; random tokens; {meta['precision']}.",
        f"{meta['device']} ({meta['device_name']}), torch {meta['torch']}, transformers "
        f"{meta['transformers']}, commit {meta['commit']}"
        + (f" (working tree had local changes in {', '.join(dirty)})" if dirty else "")
        + f"; median / max / mean of {meta['steps']} timed steps after {meta['warmup']} warm-up steps"
        + (f", timed with {meta['timer']}" if meta["device"].startswith("cuda") and meta.get("timer") else "")
        + (f"; 1-min load average {load:.2f} at start" if load is not None else "")
        + (f", {meta['loadavg_1min_at_end']:.2f} at end" if meta.get("loadavg_1min_at_end") is not None
           else "") + ".",
        f"Measured matmul rate: {rate_text}. Model forward + backward ~ "
        f"{m['fwd_bwd_flops_per_step'] / 1e12:.3f} TFLOP per step (6 N B + 12 L s d B estimate).",
    ]


def render_markdown(data: dict) -> str:
    results = [dict(r) for r in data["results"]]
    add_derived(results, data["meta"])
    cuda = data["meta"]["device"].startswith("cuda")
    head, rows = table_rows(results, cuda)
    out = [" ".join(describe(data)), ""]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out.append("")
    for r in results:
        f = r["optimizer_flops"]
        extra = ""
        if is_mousse(r["key"]):
            extra = (f"; FLOPs / matmul rate without eigh (a step without refresh) "
                     f"{r['flop_bound_no_eigh_ms']:.1f} ms"
                     f"; matrix GFLOP/step = NS {f['ns'] / 1e9:.2f} "
                     f"+ factor EMAs {f['factor_ema'] / 1e9:.2f} "
                     f"+ rotations {f['rotations'] / 1e9:.2f} + {r['settings'].get('refresh', 'eigh')} "
                     f"{f['eigh_per_refresh'] / 1e9:.2f} "
                     f"per refresh / {r['settings']['refresh_every']}; {r['refresh_steps_timed']} refresh "
                     f"step(s) timed, the max is step {r['step_of_max']}"
                     + (" (a refresh step)" if r["refreshed"][r["step_of_max"] - 1] else ""))
        if not is_mousse(r["key"]):
            extra = f"; max at step {r['step_of_max']}"
        if not cuda and r.get("process_cpu_per_wall") is not None:
            extra += (f"; {r['process_cpu_per_wall']:.2f} cores used on average (process CPU time / "
                      f"wall time), load average {r['loadavg_1min_after']:.2f} after")
        out.append(f"- {r['label']}: {r['settings_text']}{extra}.")
    for skip in data["meta"].get("skipped") or []:
        out.append(f"- Not run: {skip['label']}: {skip['reason']}.")
    if data.get("complete") is False:
        out.append("- Partial result: the run stopped before every optimizer had run.")
    return "\n".join(out).rstrip() + "\n"


def print_table(data: dict) -> None:
    cuda = data["meta"]["device"].startswith("cuda")
    head, rows = table_rows(data["results"], cuda)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    show = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print()
    print(show(head))
    print("-" * len(show(head)))
    for row in rows:
        print(show(row))


# ---------------------------------------------------------------------------- main
def parse_args():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model and batch (default: gpt2-124m on CUDA, cpu elsewhere)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch")
    ap.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (step 1 allocates state)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per optimizer; a multiple of Mousse's refresh_every (10)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of {', '.join(OPTIMIZERS)} (default: "
                         f"{','.join(DEFAULT_OPTIMIZERS)}); a Mousse option this checkout lacks is skipped "
                         "and listed in the JSON")
    ap.add_argument("--lr", type=float, default=0.02, help="matrix lr of Muon and Mousse")
    ap.add_argument("--scalar-lr", type=float, default=3e-4,
                    help="lr of Muon's and Mousse's scalar path (AdamW: embeddings, head, norms, biases)")
    ap.add_argument("--adamw-lr", type=float, default=3e-4)
    ap.add_argument("--adamw-wd", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="JSON path (default: benchmarks/results/overhead-<device>-<preset>.json)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="print the markdown table of a result file written by this script and exit")
    args = ap.parse_args()
    if args.render:
        return args, None, None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.preset = args.preset or ("gpt2-124m" if device.type == "cuda" else "cpu")
    preset = copy.deepcopy(PRESETS[args.preset])
    for name in ("micro_batch", "accum", "seq_len", "warmup", "steps"):
        value = getattr(args, name)
        if value is not None:
            preset[name] = value
        setattr(args, name, preset[name])
    if args.layers is not None:
        preset["model"]["n_layer" if preset["arch"] == "gpt2" else "num_hidden_layers"] = args.layers
    pos = "n_positions" if preset["arch"] == "gpt2" else "max_position_embeddings"
    preset["model"][pos] = max(preset["model"][pos], args.seq_len)
    if min(args.micro_batch, args.accum, args.seq_len, args.steps) < 1 or args.warmup < 1:
        ap.error("--micro-batch, --accum, --seq-len, --steps and --warmup must be >= 1")
    keys = DEFAULT_OPTIMIZERS
    if args.only:
        keys = tuple(k.strip() for k in args.only.split(",") if k.strip())
        unknown = set(keys) - set(OPTIMIZERS)
        if unknown:
            ap.error(f"unknown --only names {sorted(unknown)}; choose from {list(OPTIMIZERS)}")
    args.keys = keys
    return args, device, preset


def main():
    args, device, preset = parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return
    import transformers

    tokens = args.micro_batch * args.accum * args.seq_len
    template, cfg = build_model(preset, args.seed)
    vocab = cfg.vocab_size
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "hf_mousse").splitlines()]
    meta = dict(
        preset=args.preset, preset_title=preset["title"], arch=preset["arch"],
        config={k: v for k, v in cfg.to_dict().items()
                if isinstance(v, (int, float, str, bool)) or v is None},
        device=str(device), device_name=device_name(device), torch=torch.__version__,
        transformers=transformers.__version__, hf_mousse=hf_mousse.__version__,
        commit=git("rev-parse", "--short", "HEAD") or "unknown", dirty_files=dirty,
        python=platform.python_version(), threads=torch.get_num_threads(),
        attn_implementation=getattr(cfg, "_attn_implementation", None),
        seq_len=args.seq_len, micro_batch=args.micro_batch, accum=args.accum, tokens_per_step=tokens,
        warmup=args.warmup, steps=args.steps, seed=args.seed,
        precision=("bf16 autocast, fp32 parameters and gradients" if device.type == "cuda"
                   else "fp32 (no autocast)"),
        data="random token ids, uniform over the vocabulary, fixed seed; labels = inputs",
        step_definition=("forward + backward of every micro-batch, then opt.step() and "
                         "zero_grad(set_to_none=True); opt.step() timed separately"),
        timer=PhaseTimer.describe(device),
        loadavg_1min_at_start=loadavg(),
        model=model_facts(template, cfg, preset, tokens),
    )
    print("Whole training step: forward + backward of every micro-batch, then one optimizer step")
    print(f"device: {meta['device']} ({meta['device_name']})")
    print(f"torch {meta['torch']}, transformers {meta['transformers']}, hf_mousse {meta['hf_mousse']}, "
          f"commit {meta['commit']}" + (f" + local changes in {', '.join(dirty)}" if dirty else ""))
    print(f"model: {preset['title']} (preset {args.preset}), {meta['model']['params_total'] / 1e6:.2f}M "
          f"parameters, {meta['model']['layers']} layers, vocab {vocab}; {meta['precision']}")
    print(f"batch: {args.micro_batch} x {args.seq_len} tokens x {args.accum} accumulation steps = "
          f"{tokens:,} tokens per optimizer step;\n  RANDOM token ids (fixed seed), "
          "the same for every optimizer")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per optimizer; every optimizer starts from the "
          "same initial weights")
    if device.type != "cuda":
        print(f"1-min load average at start: {meta['loadavg_1min_at_start']:.2f} "
              f"(torch threads {torch.get_num_threads()})")
    if args.steps % 10:
        print(f"NOTE: --steps {args.steps} is not a multiple of 10: the mean over-/under-weights Mousse's "
              "eigenbasis refresh (every 10 steps)")
    skipped = [dict(key=k, label=LABELS[k], reason=unsupported(MOUSSE_VARIANTS[k]))
               for k in args.keys if k in MOUSSE_VARIANTS and unsupported(MOUSSE_VARIANTS[k])]
    meta["skipped"] = skipped
    for skip in skipped:
        print(f"SKIPPED {skip['label']}: {skip['reason']}")
    keys = [k for k in args.keys if k not in {skip["key"] for skip in skipped}]
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"overhead-{device.type}-{args.preset}.json"

    meta["matmul_rates"] = matmul_rates(device)
    for k, v in meta["matmul_rates"].items():
        if isinstance(v, dict):
            print(f"matmul rate {k}: {v['flops_per_s'] / 1e9:.1f} GFLOP/s ({v['n']}^3, median)")

    batches = make_batches(args.warmup + args.steps, args.accum, args.micro_batch, args.seq_len, vocab,
                           args.seed, device)
    results = []
    for key in keys:
        t0 = time.perf_counter()
        print(f"  running {LABELS[key]} ...", end="", flush=True)
        r = run_one(key, template, batches, args, device)
        r["loadavg_1min_after"] = loadavg()
        results.append(r)
        print(f" done in {time.perf_counter() - t0:.1f} s"
              + (f" (load average {r['loadavg_1min_after']:.2f}, cores used "
                 f"{r['process_cpu_per_wall']:.2f})" if device.type != "cuda" else ""),
              flush=True)
        add_derived(results, meta)
        write_json(out, dict(meta=meta, results=results, complete=False))  # what a time limit leaves
    meta["loadavg_1min_at_end"] = loadavg()
    first = {r["key"]: r["losses"][0] for r in results}
    meta["first_step_losses"] = first
    meta["same_first_loss"] = len(set(first.values())) <= 1
    add_derived(results, meta)
    data = dict(meta=meta, results=results, complete=True)
    print_table(data)
    print()
    print(render_markdown(data), end="")
    if not meta["same_first_loss"]:
        print(f"WARNING: first-step losses differ between optimizers: {first}")

    write_json(out, data)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
