#!/usr/bin/env python
"""Render the README's result tables from the JSON files in benchmarks/results/.

Each table in README.md sits between two markers naming its JSON file:

    <!-- render: benchmarks/results/convergence-cpu/convergence.json -->
    ... (generated: do not edit by hand) ...
    <!-- /render -->

The renderer is the ``render_markdown(data)`` of the benchmark script that wrote the file, chosen by the
file name (``step_time-*.json`` -> step_time.py, ``convergence*.json`` -> convergence.py, ...). Two more
forms: a folder of raw result files renders as one block (its renderer receives
``{"path": ..., "files": {name: content}}``, JSON Lines as lists), and a pattern with ``*`` renders every
file it matches, one after the other (a fixed sentence when none does yet).

    python benchmarks/render_readme.py            # rewrite README.md
    python benchmarks/render_readme.py --check    # exit 1 if README.md is not what the JSON renders
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BLOCK = re.compile(r"(<!-- render: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)
# file-name prefix -> benchmark script (and function, if not render_markdown); the longest matching
# prefix wins
RENDERERS = {"step_time": "step_time", "overhead": "overhead", "refresh_overhead": "refresh_overhead",
             "refresh_methods": "refresh_methods", "convergence": "convergence", "demo": "demo_results",
             "dist_step_time": "dist_step_time", "gpu_suite": "gpu_render", "memory": "memory",
             "storage_fidelity": "storage_fidelity", "data_pipeline": "data_pipeline",
             "checkpoint_save": "checkpoint_save", "time_to_target": "time_to_target",
             "gpu-": "gpu_render:render_session"}


def renderer(path: Path):
    name = path.name if path.parent.name == "results" else path.parent.name
    prefix = max((p for p in RENDERERS if name.startswith(p)), key=len, default=None)
    if prefix is None:
        raise SystemExit(f"{path}: no renderer for this file name (known prefixes: {sorted(RENDERERS)})")
    module_name, _, function = RENDERERS[prefix].partition(":")
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(module_name, HERE / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function or "render_markdown")


def load(path: Path):
    """A result file's content; for a folder, its JSON and JSON Lines files by name."""
    if not path.is_dir():
        return json.loads(path.read_text())
    files = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".json":
            files[f.name] = json.loads(f.read_text())
        elif f.suffix == ".jsonl":
            files[f.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return {"path": path.relative_to(ROOT).as_posix(), "files": files}


def render(text: str) -> str:
    def one(path: Path) -> str:
        return renderer(path)(load(path)).rstrip("\n") + "\n"

    def block(match: re.Match) -> str:
        pattern = match["path"]
        if "*" in pattern:
            paths = sorted(ROOT.glob(pattern))
            body = ("\n".join(one(p) for p in paths) if paths
                    else f"No result yet: no file matches `{pattern}`.\n")
            return match.group(1) + body + match.group(4)
        path = ROOT / pattern
        if not path.exists():
            raise SystemExit(f"README.md renders {pattern}, which does not exist")
        return match.group(1) + one(path) + match.group(4)

    return BLOCK.sub(block, text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if README.md differs from the rendering")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args()
    readme = Path(args.readme)
    text = readme.read_text()
    rendered = render(text)
    if args.check:
        if rendered != text:
            raise SystemExit(f"{readme} is stale: run python benchmarks/render_readme.py")
        print(f"{readme}: {len(BLOCK.findall(text))} rendered blocks up to date")
        return
    readme.write_text(rendered)
    print(f"rendered {len(BLOCK.findall(text))} blocks into {readme}")


if __name__ == "__main__":
    main()
