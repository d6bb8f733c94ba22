#!/usr/bin/env python
"""The GPU checks in one command, in at most 8 minutes on one GPU, imports included.

Each part runs the benchmark script it names in its own process, under its own time limit, so a
hang or a slow part cannot eat the others' time, and its results are written into ONE JSON file as
soon as it ends (rewritten atomically after every part):

  refresh_methods  refresh_methods.py --device cuda: eigh, QR, ... and both refresh methods, 768 / 3072
  step             step_time.py on the GPT-2 set: torch.optim.Muon, hf_mousse.Muon, Mousse at its
                   defaults and with each newer option (refresh_delay=1, matmul_dtype=bfloat16, both,
                   those two with refresh_schedule=staggered and refresh_delay=2, refresh=newton), the
                   authors' Mousse with --authors-src
  overhead_gpt2    overhead.py --preset gpt2-124m (262,144 tokens/step): Muon, Mousse, Mousse with
                   refresh_schedule=staggered + refresh_delay=2 + matmul_dtype=bfloat16
  overhead_qwen3   overhead.py --preset qwen3-0.6b at 32,768 tokens/step: the same three
  memory           from the two overhead parts: peak allocated memory and optimizer state per optimizer
  gpu_pilot        convergence.py --size gpu-pilot: GPT-2 d=512 x 8 layers, 400 steps of 32,768 tokens of
                   the installed packages' sources, Mousse and Muon at lr 0.005 and 0.01, seed 0, the four
                   runs at once (--jobs 4); its own device call: run it with --parts gpu_pilot

A row whose option this checkout's Mousse does not accept is skipped and listed with the reason.

    python benchmarks/gpu_suite.py              # on CUDA: benchmarks/results/gpu_suite-<gpu>.json
    python benchmarks/gpu_suite.py --parts gpu_pilot    # a second call: gpu_suite-<gpu>-gpu_pilot.json
    python benchmarks/gpu_suite.py --authors-src /tmp/authors_mousse
    python benchmarks/gpu_suite.py --smoke      # every part, the pilot too, tiny, on CPU (~2 minutes)
    python benchmarks/gpu_suite.py --budget step=120 --parts step,overhead_gpt2
    python benchmarks/gpu_suite.py --render benchmarks/results/gpu_suite-nvidia-h200.json
    hf-mousse bench gpu [the same arguments]
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the time limit counts from here, before torch is imported

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

TOTAL_S = 480  # 8 minutes, imports included
STARTUP_RESERVE_S = 30  # this process's imports and CUDA start, the JSON writes, the children's exits
OVERHEAD_ROWS = "muon,mousse,mousse_gpu"
PILOT_SWEEP = "mousse=0.005/0.01,muon=0.005/0.01"
STEP_ROWS = ("torch_muon,hf_muon,mousse_both,mousse_delay1,mousse_bf16,mousse_delay1_bf16,mousse_gpu,"
             "mousse_newton")

# Budgets (seconds) from the costs one H200 measured (shared/GPU.md), estimates in brackets; each part
# runs every Mousse row with 3 refreshes (t = 1, 11, 21) and times two of them:
# - refresh_methods [~15]: imports ~5, each kernel best of 3 (3072 eigh 50 ms, Newton 157 ms), the
#   float64 roots.
# - step [~55; ~80 with the authors' row]: 22 steps; a refresh is ~2.2 s per eigh row (4 rows) and
#   ~5 s for Newton (3072: 157 ms x 24 factors), ~14 s per refresh step for all rows, x 3 = 42 s; plain
#   steps ~0.26 s for all rows; the authors' row adds its compile (~17 s) and ~2.3 s per refresh.
# - overhead_gpt2 [~145]: model ~10; 22 whole steps of ~1.8 s per optimizer (40 s), Mousse rows
#   +36 ms per step and +2.25 s per refresh (47 s each).
# - overhead_qwen3 [~140]: model ~15; Muon 22 x 0.82 s = 18 s; Mousse rows 19 x 1.02 s + 3 x 11.2 s
#   = 53 s each.
# - gpu_pilot [~150 - 260]: imports and data ~30 (reading ~60 MB of sources, BPE on 20M characters,
#   tokenizing on 16 cores); per run 400 steps + 17 evals: Muon ~65 ms/step (26 s), Mousse ~244 ms
#   mean (98 s), x 2 lrs each: 250 s one after another, over 4 minutes. So the four runs share the GPU
#   (--jobs 4): one d=512 model leaves it mostly idle (Muon's 65 ms step is ~4x its matmul time and
#   the refresh's eigh is latency-bound), so they should overlap to about the longest run (~100 s)
#   plus contention; not yet measured. If the suite measures more, cut the pilot's steps (--steps)
#   rather than its learning rates.
PARTS = {
    "refresh_methods": dict(
        title="Refresh kernels (refresh_methods.py)", script="refresh_methods.py", budget=30,
        size="factors 768 and 3072", smoke_size="factors 32 and 64",
        args=["--device", "cuda", "--drift-steps", "0"],
        smoke=["--device", "cpu", "--drift-steps", "0", "--sizes", "32,64"]),
    "step": dict(
        title="Optimizer step (step_time.py)", script="step_time.py", budget=90,
        size="GPT-2-124M hidden matrices, 12 layers", smoke_size="GPT-2 set, 1 layer, dimensions x0.05",
        args=["--device", "cuda", "--set", "gpt2", "--warmup", "2", "--iters", "20", "--only", STEP_ROWS],
        smoke=["--device", "cpu", "--set", "gpt2", "--layers", "1", "--scale", "0.05", "--warmup", "1",
               "--iters", "10", "--only", STEP_ROWS]),
    "overhead_gpt2": dict(
        title="Whole training step (overhead.py)", script="overhead.py", budget=165,
        size="GPT-2-124M, 262,144 tokens/step", smoke_size="preset tiny",
        args=["--device", "cuda", "--preset", "gpt2-124m", "--warmup", "2", "--steps", "20",
              "--only", OVERHEAD_ROWS],
        smoke=["--device", "cpu", "--preset", "tiny", "--warmup", "1", "--steps", "10",
               "--only", OVERHEAD_ROWS]),
    "overhead_qwen3": dict(
        title="Whole training step (overhead.py)", script="overhead.py", budget=165,
        size="Qwen3-0.6B, 32,768 tokens/step", smoke_size="preset tiny-qwen3",
        args=["--device", "cuda", "--preset", "qwen3-0.6b", "--micro-batch", "8", "--accum", "4",
              "--warmup", "2", "--steps", "20", "--only", OVERHEAD_ROWS],
        smoke=["--device", "cpu", "--preset", "tiny-qwen3", "--warmup", "1", "--steps", "10",
               "--only", OVERHEAD_ROWS]),
    "gpu_pilot": dict(
        title="Convergence pilot (convergence.py)", script="convergence.py", budget=290, own_call=True,
        size="GPT-2 d=512 x 8, 400 steps x 32,768 tokens, Mousse and Muon at lr 0.005 / 0.01, seed 0",
        smoke_size="the gpu-pilot size shrunk (--smoke)",
        args=["--size", "gpu-pilot", "--optimizers", "mousse,muon", "--sweep", PILOT_SWEEP, "--seeds", "1",
              "--jobs", "4", "--device", "cuda"],
        smoke=["--size", "gpu-pilot", "--smoke", "--optimizers", "mousse,muon", "--sweep", PILOT_SWEEP,
               "--seeds", "1", "--jobs", "4", "--device", "cpu"]),
}
# a plain run (no --parts) fits one device call (at most 10 minutes); the parts marked own_call
# (the pilot) run in a call of their own; --smoke runs them all
DEFAULT_PARTS = [name for name, spec in PARTS.items() if not spec.get("own_call")]
SMOKE_BUDGET_S = 150  # per part: a guard only, each takes seconds on 2 CPU cores
MEMORY_FROM = ("overhead_gpt2", "overhead_qwen3")
TAIL_LINES = 40


# ---------------------------------------------------------------------------- running one part
def _pump(stream, prefix: str, tail: collections.deque, log) -> None:
    for line in stream:
        print(f"[{prefix}] {line}", end="", flush=True)
        tail.append(line)
        log.write(line)
    stream.close()


def run_process(cmd: list[str], timeout: float, prefix: str, log_path: Path) -> dict:
    """Run ``cmd`` in its own process group, echo its output, stop the group at ``timeout`` s."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)
        err_tail = collections.deque(maxlen=TAIL_LINES)
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, prefix, collections.deque(maxlen=1), log)),
                 threading.Thread(target=_pump, args=(proc.stderr, prefix, err_tail, log))]
        for t in pumps:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # timed out, or this process was interrupted
                _stop_group(proc)
        for t in pumps:
            t.join(timeout=10)
    return dict(returncode=proc.returncode, timed_out=timed_out, wall_s=time.monotonic() - start,
                stderr_tail="".join(err_tail))


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (it was started in its own session), SIGKILL if needed."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def title_of(name: str, smoke: bool) -> str:
    spec = PARTS[name]
    return f"{spec['title']}: {spec['smoke_size' if smoke else 'size']}"


def command_of(name: str, args) -> list[str]:
    spec = PARTS[name]
    argv = list(spec["smoke"] if args.smoke else spec["args"])
    if name == "step" and args.authors_src:
        only = argv.index("--only") + 1
        argv[only] += ",authors"
        argv += ["--authors-src", args.authors_src]
        if args.authors_commit:
            argv += ["--authors-commit", args.authors_commit]
    return [sys.executable, str(HERE / spec["script"]), *argv]


def skipped_rows(results: dict | None) -> list[dict]:
    """The rows a part's script did not run because the installed Mousse lacks an option."""
    meta = (results or {}).get("meta") or {}
    return meta.get("skipped_rows") or meta.get("skipped") or []


def run_part(name: str, args, budget: float, timeout: float, work: Path) -> dict:
    out = work / f"{name}.json"
    out.unlink(missing_ok=True)  # never report a previous run's file
    cmd = [*command_of(name, args), "--out", str(out)]
    title = title_of(name, args.smoke)
    print(f"\n=== {name}: {title}; limit {timeout:.0f} s ===\n$ {shlex.join(cmd)}", flush=True)
    proc = run_process(cmd, timeout, name, work / f"{name}.log")
    results = read_results(out)
    record = dict(title=title, command=_display(cmd), budget_s=budget, timeout_s=round(timeout, 1),
                  wall_s=round(proc["wall_s"], 2), returncode=proc["returncode"], results=results,
                  skipped_rows=skipped_rows(results))
    if proc["timed_out"]:
        record.update(status="timeout", stderr_tail=proc["stderr_tail"],
                      reason=f"stopped at its {timeout:.0f} s limit"
                      + ("; results: what it wrote before" if results else ""))
    elif proc["returncode"] != 0:
        record.update(status="error", stderr_tail=proc["stderr_tail"],
                      reason=f"exit status {proc['returncode']}")
    elif results is None:
        record.update(status="error", stderr_tail=proc["stderr_tail"],
                      reason=f"exit status 0 but no {out.name}")
    else:
        record["status"] = "ok"
    print(f"=== {name}: {record['status']} in {record['wall_s']:.1f} s ===", flush=True)
    return record


def read_results(path: Path) -> dict | None:
    """The part's own JSON (None if it wrote none, or none that parses)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _display(cmd: list[str]) -> str:
    """The command as one would type it in the checkout (python benchmarks/NAME.py ...)."""
    shown = ["python", *(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd[1:])]
    return shlex.join(shown)


def memory_part(parts: dict) -> dict:
    """Peak allocated memory and optimizer state per optimizer, from the overhead parts' results."""
    rows, sources = [], []
    for name in MEMORY_FROM:
        data = (parts.get(name) or {}).get("results")
        if not data:
            continue
        sources.append(name)
        for r in data["results"]:
            rows.append(dict(part=name, preset=data["meta"]["preset"], key=r["key"], label=r["label"],
                             peak_memory_allocated_bytes=r.get("peak_memory_allocated_bytes"),
                             state_bytes=r["state_bytes"]))
    if not rows:
        return dict(title="Memory (from the overhead parts)", status="skipped", wall_s=0.0, results=None,
                    reason="no overhead part produced results")
    return dict(title="Memory (from the overhead parts)", status="ok", wall_s=0.0, results=dict(rows=rows),
                sources=sources)


# ---------------------------------------------------------------------------- the suite
def device_facts(smoke: bool) -> dict:
    import torch
    from environment import device_name, git_commit

    import hf_mousse

    device = torch.device("cpu" if smoke else "cuda")
    return dict(device=device.type, device_name=device_name(device), torch=torch.__version__,
                cuda=torch.version.cuda, hf_mousse=hf_mousse.__version__, commit=git_commit(),
                python=platform.python_version())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def parse_budgets(items: list[str], smoke: bool) -> dict:
    budgets = {name: SMOKE_BUDGET_S if smoke else spec["budget"] for name, spec in PARTS.items()}
    for item in items:
        name, _, value = item.partition("=")
        if name not in PARTS or not value:
            raise SystemExit(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(value)
    return budgets


def print_plan(budgets: dict, selected: list[str], args, total: float) -> None:
    print(f"GPU suite{' (SMOKE: tiny sizes on CPU)' if args.smoke else ''}: {len(selected)} parts, "
          f"at most {total:.0f} s in all (the parts' limits, {STARTUP_RESERVE_S} s for start-up and writes)")
    for name in PARTS:
        state = f"limit {budgets[name]:>5.0f} s" if name in selected else "not selected (--parts)"
        print(f"  {name:<16} {state}   {title_of(name, args.smoke)}")
    print(f"  {'memory':<16} {'':>13}   peak allocated memory and optimizer state, from the overhead parts")
    print(f"results: {args.out} (rewritten after every part)\nlogs and each part's own JSON: {args.work_dir}",
          flush=True)


def write(out: Path, suite: dict) -> None:
    from environment import write_json

    suite["wall_s"] = round(time.monotonic() - T0, 2)
    write_json(out, suite)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every part at a tiny size on CPU (a dry run)")
    ap.add_argument("--parts", default=None, help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                    help="override one part's time limit (repeatable)")
    ap.add_argument("--authors-src", metavar="DIR", default=None,
                    help="the authors' Mousse, exported outside this checkout: one more row in 'step'")
    ap.add_argument("--authors-commit", metavar="SHA", default=None)
    ap.add_argument("--out", default=None,
                    help="the JSON (default: benchmarks/results/gpu_suite-<gpu>.json; with --smoke "
                         "runs/gpu_suite-smoke/gpu_suite-cpu.json)")
    ap.add_argument("--work-dir", default=None,
                    help="each part's own JSON and log (default: runs/<the JSON's name>/)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="print the markdown tables of a suite JSON and exit")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        from gpu_render import render_markdown

        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return
    default = list(PARTS) if args.smoke else DEFAULT_PARTS
    selected = default if not args.parts else [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(selected) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown --parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    budgets = parse_budgets(args.budget, args.smoke)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite.py: no CUDA device (--smoke runs every part at a tiny size on CPU)")
    facts = device_facts(args.smoke)
    name = "cpu" if args.smoke else slug(facts["device_name"])
    subset = "" if selected == default else "-" + "-".join(selected)  # a second call keeps the first's file
    default_out = (ROOT / "runs" / "gpu_suite-smoke" / "gpu_suite-cpu.json" if args.smoke
                   else ROOT / "benchmarks" / "results" / f"gpu_suite-{name}{subset}.json")
    args.out = Path(args.out) if args.out else default_out
    args.work_dir = Path(args.work_dir) if args.work_dir else ROOT / "runs" / args.out.stem
    args.work_dir.mkdir(parents=True, exist_ok=True)
    total = sum(budgets[p] for p in selected) + STARTUP_RESERVE_S
    deadline = T0 + total
    print_plan(budgets, selected, args, total)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    suite = dict(suite="gpu_suite", smoke=args.smoke, finished=False,
                 meta=dict(**facts, started=started, argv=sys.argv[1:], total_limit_s=total,
                           startup_reserve_s=STARTUP_RESERVE_S, authors_src=args.authors_src),
                 parts={p: dict(title=title_of(p, args.smoke), status="pending", budget_s=budgets[p])
                        for p in PARTS})
    suite["parts"]["memory"] = dict(title="Memory (from the overhead parts)", status="pending")
    for p in set(PARTS) - set(selected):
        suite["parts"][p].update(status="skipped", reason="not selected (--parts)", wall_s=0.0, results=None)
    write(args.out, suite)
    for p in selected:
        left = deadline - STARTUP_RESERVE_S / 2 - time.monotonic()  # keep a little for the last writes
        if left < 5:
            suite["parts"][p].update(status="skipped", wall_s=0.0, results=None,
                                     reason=f"no time left within the {total:.0f} s limit")
        else:
            suite["parts"][p] = run_part(p, args, budgets[p], min(budgets[p], left), args.work_dir)
        write(args.out, suite)
    suite["parts"]["memory"] = memory_part(suite["parts"])
    suite["finished"] = True
    write(args.out, suite)
    print("\n" + "  ".join(f"{p}: {r['status']}" for p, r in suite["parts"].items()))
    print(f"wrote {args.out} after {time.monotonic() - T0:.1f} s (limit {total:.0f} s)")


if __name__ == "__main__":
    main()
