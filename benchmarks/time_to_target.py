#!/usr/bin/env python
"""Time to Muon's final loss, the number a user acts on: the steps each run needs to reach Muon's final
eval loss (from convergence.py results, per seed) times the step time of that optimizer on a GPU,
over Muon's steps times Muon's step time.

The convergence results come from CPU widths (d = 128, 256, 384); no GPU step time exists at those
widths, so each row is priced at two GPU scales that were measured on one H200
(``benchmarks/results/gpu-2026-12-04/``):

- ``pilot``: GPT-2 d=512 x 8 layers, 32,768 tokens per step, the mean training step of the one-seed
  pilot (``convergence-pilot-h200.jsonl``), refreshes included;
- ``qwen3``: Qwen3-0.6B at 32,768 tokens per step, the mean whole training step of ``overhead.py``
  (``overhead-cuda-qwen3-0.6b.json``), refreshes included.

Muon and Mousse's defaults are measured at both. The options were not run on a GPU; their step time
is a cost model, named in each row: Mousse's measured step without a refresh (the median of its
non-refresh steps, or the pilot's median step) plus its measured refresh share (mean - that median)
scaled by the option's eigendecomposition cost over the default's, from the measured eigh kernels
(768: 7.7 ms, 3072: 50.4 ms on the H200; other sizes by the power law through those two), summed over
the factors the option keeps for that scale's matrix shapes. ``refresh_delay`` is priced as if the side
stream hid the whole refresh (a lower bound); ``matmul_dtype`` / ``basis_dtype`` at the default's cost
(their effect on the plain step is not measured).

    python benchmarks/time_to_target.py        # benchmarks/results/time_to_target.json + tables
    python benchmarks/time_to_target.py --render benchmarks/results/time_to_target.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from environment import git_commit, write_json  # noqa: E402

GPU = HERE / "results" / "gpu-2026-12-04"
RESULTS = HERE / "results"
# (width, convergence result) of the width trend; each at its tuned learning rates, 3 seeds
WIDTHS = [(128, "convergence-cpu"), (256, "convergence-width-256-cpu"), (384, "convergence-width-384-cpu")]
# (width, convergence result) of the speed and memory options, 3 seeds each, at that width's rate
OPTIONS = [(256, "convergence-options-wide-cpu"), (384, "convergence-options-wider-cpu")]
# the GPU scales: label, model shape for the cost model (GPT-2 d x layers, or a Qwen3 preset)
SCALES = {"pilot": "GPT-2 d=512 x 8 (H200 pilot, 32,768 tokens/step)",
          "qwen3": "Qwen3-0.6B (H200, 32,768 tokens/step)"}
SCALE_WIDTH = {"pilot": 512, "qwen3": 1024}  # hidden size of each GPU scale


def measured_steps() -> dict:
    """{scale: {"muon": mean ms, "mousse": mean ms, "mousse_plain": ms}} from the H200 files."""
    pilot = {}
    for line in (GPU / "convergence-pilot-h200.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["opt"] in ("muon", "mousse"):
            pilot[r["opt"]] = r
    qwen3 = json.loads((GPU / "overhead-cuda-qwen3-0.6b.json").read_text())["results"]
    overhead = {r["key"]: r for r in qwen3}
    return {
        "pilot": dict(muon=pilot["muon"]["mean_step_ms"], mousse=pilot["mousse"]["mean_step_ms"],
                      mousse_plain=pilot["mousse"]["median_step_ms"],
                      source="measured: convergence-pilot-h200.jsonl (mean training step)"),
        "qwen3": dict(muon=overhead["muon"]["step_mean_ms"], mousse=overhead["mousse"]["step_mean_ms"],
                      mousse_plain=overhead["mousse"]["step_median_no_refresh_ms"],
                      source="measured: overhead-cuda-qwen3-0.6b.json (mean whole step)"),
    }


def eigh_ms(d: int) -> float:
    """The H200's fp32 eigh time at size d: the power law through the two measured sizes."""
    kernels = json.loads((GPU / "refresh_methods-cuda.json").read_text())["kernels"]
    (d0, k0), (d1, k1) = sorted((int(k), v["eigh_ms"]) for k, v in kernels.items())
    power = math.log(k1 / k0) / math.log(d1 / d0)
    return k0 * (d / d0) ** power


def scale_model(scale: str):
    import torch
    from overhead import PRESETS
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        if scale == "pilot":
            return GPT2LMHeadModel(GPT2Config(n_embd=512, n_layer=8, n_head=8, vocab_size=8192,
                                              n_positions=1024, bos_token_id=0, eos_token_id=0))
        return Qwen3ForCausalLM(Qwen3Config(**PRESETS["qwen3-0.6b"]["model"]))


def refresh_cost(scale: str, options: dict) -> float:
    """Modelled ms of one refresh of every factor Mousse keeps with ``options`` at ``scale``'s shapes."""
    from hf_mousse import Mousse
    from hf_mousse.optim.roles import matrix_dims

    opt = Mousse.for_model(scale_model(scale), **options)
    total = 0.0
    for g in opt.param_groups:
        if g["role"] != "matrix":
            continue
        for p in g["params"]:
            k, m, n = matrix_dims(p.shape, g["layout"], g["split"])
            total += k * sum(blocks * eigh_ms(d) for blocks, d in opt._factor_blocks(g, m, n))
    return total


def gpu_options(optim_args: str | None, scale: str, width: int) -> dict:
    """The option's settings at a GPU scale: max_factor_dim keeps its fraction of the hidden size (a cut
    at d/2 on the CPU model of width ``width`` -> 256 for the pilot's 512, 512 for Qwen3-0.6B's 1024)."""
    options = {}
    for item in filter(None, (optim_args or "").split(",")):
        key, _, value = item.partition("=")
        options[key] = value
    if "max_factor_dim" in options:
        options["max_factor_dim"] = int(options["max_factor_dim"]) * SCALE_WIDTH[scale] // width
    return options


def step_time(name: str, optim_args: str | None, scale: str, measured: dict,
              width: int) -> tuple[float, str]:
    """(ms per step, source) of one run's optimizer, trained at CPU width ``width``, at ``scale``."""
    m = measured[scale]
    options = gpu_options(optim_args, scale, width)
    if name == "muon" and not options:
        return m["muon"], m["source"]
    if name != "mousse":
        raise SystemExit(f"no GPU step time for {name} ({optim_args})")
    if options.get("refresh_delay") == "0":  # the default, spelled out
        del options["refresh_delay"]
    if not options:
        return m["mousse"], m["source"]
    refresh_share = m["mousse"] - m["mousse_plain"]
    if int(options.get("refresh_delay", 0)):
        return m["mousse_plain"], "model: the refresh fully hidden by the side stream (a lower bound)"
    if set(options) <= {"matmul_dtype", "basis_dtype"}:
        return m["mousse"], "model: the default's measured step (the option's effect is not measured)"
    numeric = {k: (int(v) if k == "max_factor_dim" else v) for k, v in options.items()}
    ratio = refresh_cost(scale, numeric) / refresh_cost(scale, {})
    return (m["mousse_plain"] + refresh_share * ratio,
            f"model: measured plain step + refresh x {ratio:.2f} (eigh cost of its factors, "
            + ", ".join(f"{k}={v}" for k, v in numeric.items()) + ")")


def rows_of(path: Path, width: int, measured: dict) -> list[dict]:
    report = json.loads(path.read_text())
    out = []
    for label, r in report["optimizers"].items():
        if r["name"] not in ("muon", "mousse"):  # no GPU step time at both scales (AdamW)
            continue
        row = dict(width=width, label=label, name=r["name"], optim_args=r["optim_args"], lr=r["lr"],
                   lr_at_sweep_edge=r["lr_at_sweep_edge"], seeds=r["seeds"],
                   final=r["final_eval_loss_mean"], final_sd=r["final_eval_loss_std"],
                   steps=r["steps_to_target"], step_ratio_per_seed=r["ratio_to_muon_per_seed"],
                   device=report["device"], commit=report["commit"], scales={})
        for scale in SCALES:
            ms, source = step_time(r["name"], r["optim_args"], scale, measured, width)
            muon_ms, _ = step_time("muon", None, scale, measured, width)
            per_seed = [None if x is None else x * ms / muon_ms for x in r["ratio_to_muon_per_seed"]]
            row["scales"][scale] = dict(step_ms=ms, muon_step_ms=muon_ms, source=source,
                                        time_ratio_per_seed=per_seed)
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "time_to_target.json"))
    ap.add_argument("--render", metavar="JSON", default=None)
    args = ap.parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())))
        return
    measured = measured_steps()
    def rows_at(results):  # every row of the (width, result) pairs whose file exists
        return [row for w, name in results if (RESULTS / name / "convergence.json").exists()
                for row in rows_of(RESULTS / name / "convergence.json", w, measured)]

    widths, options = rows_at(WIDTHS), rows_at(OPTIONS)
    report = dict(benchmark="time_to_target", commit=git_commit(), scales=SCALES, measured=measured,
                  eigh_model_ms={str(d): eigh_ms(d) for d in (128, 256, 384, 512, 768, 1024, 3072)},
                  widths=widths, options=options)
    write_json(Path(args.out), report)
    print(render_markdown(report))


def _ratio(values: list) -> str:
    if not values:
        return "-"
    if any(v is None for v in values):
        reached = [f"{v:.2f}" for v in values if v is not None]
        return f"{len(reached)} of {len(values)} seeds" + (f" ({', '.join(reached)})" if reached else "")
    sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{sd}"


def _table(rows: list[dict], first: str) -> list[str]:
    lines = [f"| {first} | optimizer | lr | final eval loss | steps to Muon's loss (ratio) | "
             + " | ".join(f"time to it vs Muon, {s}" for s in SCALES) + " |",
             "|---|---|---|---|---|" + "---|" * len(SCALES)]
    for r in rows:
        default = r["optim_args"] in (None, "refresh_delay=0")  # refresh_delay=0 is the default
        what = f"{r['name']}{' (defaults)' if r['name'] == 'mousse' else ''}" if default else \
            f"{r['name']} ({r['optim_args']})"
        lr = f"{r['lr']:g}" + (" (edge)" if r["lr_at_sweep_edge"] else "")
        times = " | ".join(_ratio(r["scales"][s]["time_ratio_per_seed"]) for s in SCALES)
        final = f"{r['final']:.3f} ± {r['final_sd']:.3f}"
        lines.append(f"| {r['width'] if first == 'width' else r['label']} | {what} | {lr} | {final} | "
                     f"{_ratio(r['step_ratio_per_seed'])} | {times} |")
    return lines


def render_markdown(report: dict) -> str:
    m = report["measured"]
    lines = ["Step times (ms): " + "; ".join(
        f"{report['scales'][s]}: Muon {m[s]['muon']:.1f}, Mousse {m[s]['mousse']:.1f} ({m[s]['source']})"
        for s in report["scales"]) + ".", ""]
    if report["widths"]:
        lines += ["**Width trend** (each optimizer at its own tuned rate, 3 seeds):", ""]
        lines += _table(report["widths"], "width")
        lines.append("")
    for width in sorted({r["width"] for r in report["options"]}):
        rows = [r for r in report["options"] if r["width"] == width]
        lrs = "/".join(sorted({f"{r['lr']:g}" for r in rows}))
        lines += [f"**Options at d={width}** (3 seeds, lr {lrs}):", ""] + _table(rows, "run") + [""]
    lines.append("The step time of each option at each scale:")
    lines.append("")
    seen = set()
    for r in report["options"]:
        for s, v in r["scales"].items():
            key = (r["optim_args"], s, v["step_ms"])
            if key not in seen and v["source"].startswith("model"):
                seen.add(key)
                lines.append(f"- {r['optim_args']} at {s}: {v['step_ms']:.1f} ms ({v['source']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
