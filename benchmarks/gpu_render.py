"""Markdown of GPU results: a ``gpu_suite.py`` JSON (``render_markdown``), and the raw files of the first
GPU session, made before the suite existed (``render_session``, a folder such as
``benchmarks/results/gpu-2026-12-04/``). Every figure comes from the files; the parts' tables are drawn
by the scripts that measured them (step_time.py, overhead.py, refresh_methods.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _renderers() -> dict:
    import convergence
    import overhead
    import refresh_methods
    import step_time

    return {"step_time.py": step_time.render_markdown, "overhead.py": overhead.render_markdown,
            "refresh_methods.py": refresh_methods.render_markdown,
            "convergence.py": convergence.render_markdown}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


# ---------------------------------------------------------------------------- gpu_suite.py JSON
def render_markdown(suite: dict) -> str:
    m = suite["meta"]
    cuda = f", CUDA {m['cuda']}" if m.get("cuda") else ""
    out = []
    if suite.get("smoke"):
        out.append("**Smoke run** (`--smoke`: every part at a tiny size on CPU; it checks the suite runs, "
                   "it measures nothing).")
    out.append(f"`benchmarks/gpu_suite.py` on {m['device_name']}, torch {m['torch']}{cuda}, hf_mousse commit "
               f"{m['commit']}, started {m['started']}: {suite.get('wall_s', 0):.0f} s of its "
               f"{m['total_limit_s']:.0f} s limit" + ("" if suite.get("finished") else " (did not finish)")
               + ".")
    out += ["", "| part | status | wall s | limit s | note |", "|---|---|---|---|---|"]
    for name, part in suite["parts"].items():
        note = part.get("reason") or ""
        if part.get("stderr_tail"):
            last = [line for line in part["stderr_tail"].splitlines() if line.strip()]
            note += (": " if note else "") + (last[-1] if last else "")
        if part.get("skipped_rows"):
            rows = ", ".join(r["label"] for r in part["skipped_rows"])
            note += ("; " if note else "") + f"rows not run: {rows}"
        limit = part.get("timeout_s", part.get("budget_s"))
        out.append(f"| {name} | {part['status']} | {part.get('wall_s', 0):.1f} | "
                   f"{'' if limit is None else f'{limit:.0f}'} | {_cell(note)} |")
    goals = render_goals(suite)
    if goals:
        out += ["", "**Goals** (issue 19; each ratio from rows measured side by side in one part)", "", goals]
    renderers = _renderers()
    for name, part in suite["parts"].items():
        results = part.get("results")
        if not results:
            continue
        out += ["", f"**{part['title']}** (`{name}`, {part['status']})", ""]
        if name == "memory":
            out.append(render_memory(results["rows"]))
            continue
        script = next((s for s in renderers if s in part.get("command", "")), None)
        if script:
            out.append(renderers[script](results).rstrip("\n"))
    return "\n".join(out).rstrip() + "\n"


# (part, row key, what, the figure from a row and Muon's row of that part, bound)
GOALS = [
    ("overhead_gpt2", "mousse", "GPT-2-124M whole step, mean vs Muon, defaults",
     lambda r, m: r["step_mean_ms"] / m["step_mean_ms"], 1.03),
    ("overhead_gpt2", "mousse_gpu", "GPT-2-124M whole step, mean vs Muon, GPU options",
     lambda r, m: r["step_mean_ms"] / m["step_mean_ms"], 1.03),
    ("overhead_qwen3", "mousse", "Qwen3-0.6B whole step, mean vs Muon, defaults",
     lambda r, m: r["step_mean_ms"] / m["step_mean_ms"], 1.15),
    ("overhead_qwen3", "mousse_gpu", "Qwen3-0.6B whole step, mean vs Muon, GPU options",
     lambda r, m: r["step_mean_ms"] / m["step_mean_ms"], 1.05),
    ("overhead_qwen3", "mousse", "Qwen3-0.6B whole step, max vs its own median, defaults",
     lambda r, m: r["step_max_ms"] / r["step_median_ms"], 1.5),
    ("overhead_qwen3", "mousse_gpu", "Qwen3-0.6B whole step, max vs its own median, GPU options",
     lambda r, m: r["step_max_ms"] / r["step_median_ms"], 1.5),
]
STEP_GOAL_ROWS = ("mousse_both", "mousse_bf16", "mousse_gpu")  # plain opt.step on the GPT-2 set <= 2x Muon


def render_goals(suite: dict) -> str:
    """Issue 19's targets against what this run measured; a goal whose rows did not run says so."""
    lines = ["| goal | measured | bound | met |", "|---|---|---|---|"]

    def row(what, value, bound):
        if value is None:
            lines.append(f"| {what} | not measured | <= {bound:g}x | - |")
        else:
            lines.append(f"| {what} | {value:.3f}x | <= {bound:g}x | {'yes' if value <= bound else 'no'} |")

    for part, key, what, figure, bound in GOALS:
        results = (suite["parts"].get(part, {}).get("results") or {}).get("results") or []
        rows = {r["key"]: r for r in results}
        value = figure(rows[key], rows["muon"]) if key in rows and "muon" in rows else None
        row(what, value, bound)
    step = (suite["parts"].get("step", {}).get("results") or {}).get("sets", {}).get("gpt2", {})
    rows = {r["key"]: r for r in step.get("results", [])}
    for key in STEP_GOAL_ROWS:
        value = (rows[key]["median_no_refresh_ms"] / rows["hf_muon"]["median_ms"]
                 if key in rows and "hf_muon" in rows else None)
        label = rows[key]["label"] if key in rows else key
        row(f"plain optimizer step, GPT-2 set, {label} vs hf_mousse.Muon", value, 2.0)
    return "\n".join(lines)


def render_memory(rows: list[dict]) -> str:
    """Peak allocated memory and optimizer state per optimizer, set against Muon's in the same part."""
    out = ["| model (preset) | optimizer | peak allocated GiB | optimizer state MiB | matrix / scalar MiB "
           "| state vs Muon |", "|---|---|---|---|---|---|"]
    muon = {r["part"]: r["state_bytes"]["total"] for r in rows if r["key"] == "muon"}
    for r in rows:
        peak = r.get("peak_memory_allocated_bytes")
        peak = "n/a" if peak is None else f"{peak / 2**30:.2f}"
        st = r["state_bytes"]
        base = muon.get(r["part"])
        vs = f"{st['total'] / base:.2f}x" if base else "n/a"
        out.append(f"| {r['preset']} | {r['label']} | {peak} | {st['total'] / 2**20:.1f} | "
                   f"{st.get('matrix', 0) / 2**20:.1f} / {st.get('scalar', 0) / 2**20:.1f} | {vs} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------- the first session's files
# The step benchmark of that session was a one-off script (not step_time.py); its rows, as its README says.
STEP_BENCH_ROWS = {
    "torch_muon": ("torch.optim.Muon (lr 0.02, its defaults)", False),
    "hf_muon": ("hf_mousse.Muon (lr 0.02, defaults, bf16 NS)", False),
    "hf_mousse": ("hf_mousse.Mousse (lr 0.02, defaults, refresh=\"eigh\")", True),
    "authors_triton": ("the authors' Mousse (Anti-Entrophic/Mousse d00c1bf, triton NS, one-device patch)",
                       True),
}


def render_session(data: dict) -> str:
    """The raw files of one GPU session: {"path": folder, "files": {name: content}}."""
    files = data["files"]
    date = re.search(r"\d{4}-\d{2}-\d{2}", data["path"])
    kernels = files.get("refresh_methods-cuda.json")
    step = files.get("step_bench-h200.json")
    whole = next((v for k, v in files.items() if k.startswith("overhead-")), None)
    pilot = files.get("convergence-pilot-h200.jsonl")
    first = kernels or (whole or {}).get("meta") or {}
    out = [f"One {first.get('device') or first.get('device_name')}, torch {first.get('torch')}, hf_mousse "
           f"commit {first.get('commit')}" + (f", {date.group(0)}" if date else "")
           + f"; raw files in `{data['path']}/` (made before `gpu_suite.py`; see its README.md)."]
    renderers = _renderers()
    if kernels:
        out += ["", "**Refresh kernels** (`refresh_methods.py --device cuda --drift-steps 0`)", "",
                renderers["refresh_methods.py"](kernels).rstrip("\n")]
    if step:
        out += ["", render_step_bench(step)]
    if whole:
        m = whole["meta"]
        out += ["", f"**Whole training step** (`overhead.py --preset {m['preset']} --micro-batch "
                f"{m['micro_batch']} --accum {m['accum']} --warmup {m['warmup']} --steps {m['steps']} "
                f"--only {','.join(r['key'] for r in whole['results'])}`)", "",
                renderers["overhead.py"](whole).rstrip("\n")]
    if pilot:
        out += ["", render_pilot(pilot)]
    return "\n".join(out).rstrip() + "\n"


def render_step_bench(step: dict) -> str:
    rows = step["rows"]
    ref = rows.get("hf_muon")
    authors = rows.get("authors_triton")
    out = [f"**Optimizer step** (a one-off script of that session): GPT-2-124M hidden matrices, "
           f"{step['layers']} layers of d = {step['d']} with q, k, v separate, the same parameters and "
           f"gradients for every row, stepped interleaved in rotating order, {step['steps']} steps, refresh "
           f"at t = 1, 11, 21, 31; {step['device']}, torch {step['torch']}, peak allocated "
           f"{step['max_memory_allocated_gib']:.1f} GiB. Plain: median of the steps without refresh after "
           "t = 1; amortised: mean of t = 2..31 (the first step is apart: state allocation, a refresh, "
           "kernel compilation or autotuning).", "",
           "| optimizer | plain step ms | refresh step ms | amortised ms | first step ms "
           "| amortised vs hf_mousse.Muon | amortised vs the authors' |", "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        label, refreshes = STEP_BENCH_ROWS.get(key, (key, True))
        refresh = f"{r['median_refresh_ms']:.0f}" if refreshes else "–"
        vs = lambda base: "n/a" if not base else f"{r['amortised_ms'] / base['amortised_ms']:.2f}x"  # noqa: E731
        out.append(f"| {label} | {r['median_plain_ms']:.1f} | {refresh} | {r['amortised_ms']:.1f} | "
                   f"{r['first_ms']:.0f} | {vs(ref)} | {vs(authors)} |")
    if step.get("errors"):
        out += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in step["errors"].items())]
    return "\n".join(out)


def render_pilot(runs: list[dict]) -> str:
    cfg = runs[0]["config"]
    points = sorted({s for r in runs for s, _ in r["curve"] if s > 0})
    out = [f"**Convergence pilot** (one seed; not evidence): GPT-2 d = {cfg['d']}, {cfg['layers']} layers, "
           f"vocab {cfg['vocab']}, {cfg['steps']} steps x {cfg['batch']} x {cfg['seq']} tokens "
           f"({cfg['tokens'] / 1e6:.1f}M tokens, each seen once), warm-up {cfg['warmup']} steps, "
           "bf16 autocast.", "",
           "| run | settings | eval loss at " + " / ".join(str(s) for s in points) + " steps "
           "| median step ms | mean step ms | peak allocated GiB |", "|---|---|---|---|---|---|"]
    for r in runs:
        curve = dict(r["curve"])
        settings = ", ".join(f"{k} {v}" for k, v in r["kw"].items()) or "defaults"
        losses = " / ".join(f"{curve[s]:.2f}" if s in curve else "–" for s in points)
        out.append(f"| {r['label']} | {_cell(settings)} | {losses} | {r['median_step_ms']:.0f} | "
                   f"{r['mean_step_ms']:.0f} | {r['peak_gib']:.1f} |")
    return "\n".join(out)
