"""The ``hf-mousse`` command line.

    hf-mousse run SCRIPT.py [ARGS...]       run an unmodified script with --optim mousse|muon|mimuon valid
    hf-mousse run -m MODULE [ARGS...]       the same for a module (like python -m)
    hf-mousse train RECIPE [--resume] [--push_to_hub REPO] [--dotted.key value ...]   run a YAML recipe
    hf-mousse bench NAME [ARGS...]          run benchmarks/NAME.py of a source checkout (convergence,
                                            step_time, overhead, ...); ``bench gpu``: gpu_suite.py
    python -m hf_mousse SCRIPT.py [ARGS...] shorthand for ``run``; also under accelerate launch / torchrun
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from .integration.registry import register

USAGE = __doc__


def run(target: str, args: list[str], *, module: bool = False, register_names: bool = True) -> None:
    """Register our optimizer names, then execute ``target`` as ``__main__`` with ``sys.argv``
    set as ``python target args...`` would set it."""
    if register_names:
        register()
    if module:
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        if not os.path.isfile(target):
            raise SystemExit(f"hf-mousse run: no such script: {target!r}")
        sys.argv = [target, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(target))  # as `python SCRIPT` sets it
        runpy.run_path(target, run_name="__main__")
    _close_process_group()


def _close_process_group() -> None:
    """Destroy a process group the script left open (the Trainer does): torch asks for it, and
    leaving it to interpreter teardown can abort a finished gloo run ("terminate called without an
    active exception") or hang it. Only after the script succeeded: on an error, other ranks may
    still be inside a collective."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # local: no barrier, ranks that trained alone do not wait on each other


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BENCH_ALIASES = {"gpu": "gpu_suite"}
BENCH_HELPERS = {"environment", "variants", "gpu_render"}  # modules of the benchmarks, not benchmarks
# benchmarks that run every part in a child process: registering the Trainer names here (which
# imports transformers) would only cost time
BENCH_UNREGISTERED = {"gpu_suite"}


def bench(name: str, args: list[str]) -> None:
    """Run ``benchmarks/NAME.py`` (they ship with the source checkout, not with the wheel)."""
    name = BENCH_ALIASES.get(name, name)
    script = BENCHMARKS / f"{name}.py"
    if not script.is_file() or name in BENCH_HELPERS:
        found = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in BENCH_HELPERS)
        raise SystemExit(
            f"hf-mousse bench: no benchmark {name!r} in {BENCHMARKS}"
            + (f"; available: {', '.join(found)}" if found else
               " (benchmarks ship with the source checkout: clone the repository and pip install -e .)")
        )
    run(str(script), args, register_names=name not in BENCH_UNREGISTERED)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-mousse", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a training script with hf_mousse's optimizer names registered")
    p_run.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name")
    p_run.add_argument("target", help="script path (or module name with -m)")
    p_run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p_train = sub.add_parser("train", help="run a YAML recipe (a path or a name in recipes/)",
                             description="Extra --dotted.key value pairs override recipe entries, e.g. "
                             "--training.max_steps 20 --optimizer.args.alpha 0.25")
    p_train.add_argument("recipe")
    p_train.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    p_train.add_argument("--push_to_hub", metavar="REPO_ID", help="upload model, card and last checkpoint")
    p_bench = sub.add_parser("bench", help="run a benchmark script of the source checkout, e.g. convergence; "
                             "gpu: the GPU suite (gpu_suite.py)")
    p_bench.add_argument("name")
    p_bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ns, extra = _parser().parse_known_args(argv)
    if ns.command == "run":
        run(ns.target, [*ns.args, *extra], module=ns.module)
    elif ns.command == "bench":
        bench(ns.name, [*ns.args, *extra])
    elif ns.command == "train":
        train(ns.recipe, extra, resume=ns.resume, push_to_hub=ns.push_to_hub)


def train(name: str, overrides: list[str], *, resume: bool, push_to_hub: str | None) -> None:
    """Run a recipe and print one summary line per run."""
    import shlex

    from .train import load_recipe, output_dir, parse_overrides, run_recipe

    recipe = load_recipe(name, parse_overrides(overrides))
    command = "hf-mousse train " + shlex.join([name, *overrides])  # for the model card: what reproduces it
    results = run_recipe(recipe, resume=resume, push_to_hub=push_to_hub, command=command)
    print(f"\n{recipe['name']}: {len(results)} run(s)")
    for r in results:
        print(f"  {r['optimizer']:<12} eval loss {r['eval_loss']:.4f}  perplexity "
              f"{r['eval_perplexity']:8.2f}  {r['steps']} steps, {r['tokens']:,} tokens, "
              f"{r['train_seconds']:.0f} s  -> {r['output_dir']}")
    print("checkpoints, model cards (README.md) and loss_curve.png: in each run directory under "
          f"{output_dir(recipe)}")


def module_main(argv: list[str]) -> None:
    """``python -m hf_mousse``: a script path (or -m MODULE) first means ``run``."""
    if argv and (argv[0] == "-m" or argv[0].endswith(".py") or os.path.isfile(argv[0])):
        main(["run", *argv])
    else:
        main(argv)
