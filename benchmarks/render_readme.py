#!/usr/bin/env python
"""Render the README's result tables from the JSON files in benchmarks/results/.

Each table in README.md sits between two markers naming its JSON file:

    <!-- render: benchmarks/results/convergence-cpu/convergence.json -->
    ... (generated: do not edit by hand) ...
    <!-- /render -->

The renderer is the ``render_markdown(data)`` of the benchmark script that wrote the file, chosen by the
file name (``step_time-*.json`` -> step_time.py, ``convergence*.json`` -> convergence.py, ...).

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
# file-name prefix -> benchmark script; the longest matching prefix wins
RENDERERS = {"step_time": "step_time", "overhead": "overhead", "refresh_overhead": "refresh_overhead",
             "refresh_methods": "refresh_methods", "convergence": "convergence", "demo": "demo_results",
             "dist_step_time": "dist_step_time"}


def renderer(path: Path):
    name = path.name if path.parent.name == "results" else path.parent.name
    prefix = max((p for p in RENDERERS if name.startswith(p)), key=len, default=None)
    if prefix is None:
        raise SystemExit(f"{path}: no renderer for this file name (known prefixes: {sorted(RENDERERS)})")
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(RENDERERS[prefix], HERE / f"{RENDERERS[prefix]}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render_markdown


def render(text: str) -> str:
    def block(match: re.Match) -> str:
        path = ROOT / match["path"]
        if not path.is_file():
            raise SystemExit(f"README.md renders {match['path']}, which does not exist")
        body = renderer(path)(json.loads(path.read_text())).rstrip("\n") + "\n"
        return match.group(1) + body + match.group(4)

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
