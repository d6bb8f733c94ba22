"""The README's result tables are what the JSON in benchmarks/results/ renders (no number typed by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_are_rendered_from_the_results(tmp_path):
    script = ROOT / "benchmarks" / "render_readme.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rendered blocks up to date" in proc.stdout
    assert int(proc.stdout.split(": ")[1].split()[0]) >= 5  # demo, convergence and the speed tables

    # a table edited by hand is caught
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- render: ")
    body = readme.index("\n", start) + 1
    stale = tmp_path / "README.md"
    stale.write_text(readme[:body] + "| 1.23 |\n" + readme[body:])
    proc = subprocess.run([sys.executable, str(script), "--check", "--readme", str(stale)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "stale" in proc.stderr
