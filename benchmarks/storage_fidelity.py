#!/usr/bin/env python
"""Which parts of Mousse's state can be stored in bf16: the per-step update error and the final-weight
error against the float64 reference (tests/reference.py), on the square, wide and tall problems of
tests/test_ns_precision.py, for each refresh method.

Rows: fp32 state (the default); ``basis_dtype="bfloat16"`` (the option: eigenvectors or newton roots
in bf16); and bf16 *factors*, which no option offers: simulated here by rounding each factor to bf16
before and after its EMA update (what storing it in bf16 does). The bar is the bf16 Newton–Schulz one
of the tests: per-step error < 0.1, final error < 0.025.

    python benchmarks/storage_fidelity.py   # the table; benchmarks/results/storage_fidelity.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import reference as ref  # noqa: E402
from environment import device_name, git_commit, write_json  # noqa: E402
from test_ns_precision import FINAL_TOL, MOUSSE, SHAPES, STEP_TOL, errors, problem  # noqa: E402

from hf_mousse import Mousse  # noqa: E402

ROWS = ("fp32 state", "basis_dtype=bfloat16", "factors in bf16 (simulated)")


class MousseBf16Factors(Mousse):
    """Mousse whose factors are stored in bf16: each factor rounded before and after its EMA update."""

    def _update_side(self, bucket, g, side):
        gate = self._gate
        lerp = type(gate).lerp_.__get__(gate)

        def lerp_(factors, news, weight):  # only this side's factor EMA goes through here
            for f in factors:
                f.copy_(f.bfloat16())
            lerp(factors, news, weight)
            for f in factors:
                f.copy_(f.bfloat16())
        gate.lerp_ = lerp_
        try:
            return super()._update_side(bucket, g, side)
        finally:
            del gate.lerp_


def run(row: str, refresh: str, w0, grads, expected) -> tuple[float, float]:
    kw = {**MOUSSE, "refresh": refresh}
    if row == "basis_dtype=bfloat16":
        kw["basis_dtype"] = "bfloat16"
    cls = MousseBf16Factors if row.startswith("factors") else Mousse
    return errors(cls, kw, expected, w0, grads)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "storage_fidelity.json"))
    args = ap.parse_args()
    rows = []
    for shape_name, shape in SHAPES.items():
        w0, grads = problem(shape)
        expected = ref.mousse(w0, grads, lr=0.02, weight_decay=0.0, refresh_every=3, eps=1e-3)
        for refresh in ("eigh", "newton"):
            for row in ROWS:
                step_err, final_err = run(row, refresh, w0, grads, expected)
                rows.append(dict(row=row, shape=shape_name, refresh=refresh, step_error=step_err,
                                 final_error=final_err,
                                 within_bar=step_err < STEP_TOL and final_err < FINAL_TOL))
    report = dict(benchmark="storage_fidelity", device=device_name(torch.device("cpu")), commit=git_commit(),
                  bar=dict(step=STEP_TOL, final=FINAL_TOL), rows=rows)
    write_json(Path(args.out), report)
    print(render_markdown(report))


def render_markdown(report: dict) -> str:
    lines = [f"Error against the float64 reference, worst over square / wide / tall and eigh / newton "
             f"(bar: per step < {report['bar']['step']}, final < {report['bar']['final']}; "
             f"commit {report['commit']}).", "",
             "| stored | per-step error | final error | within the bar |", "|---|---|---|---|"]
    for row in ROWS:
        mine = [r for r in report["rows"] if r["row"] == row]
        lo_s, hi_s = min(r["step_error"] for r in mine), max(r["step_error"] for r in mine)
        lo_f, hi_f = min(r["final_error"] for r in mine), max(r["final_error"] for r in mine)
        ok = sum(r["within_bar"] for r in mine)
        lines.append(f"| {row} | {lo_s:.1e} - {hi_s:.1e} | {lo_f:.1e} - {hi_f:.1e} | {ok} of {len(mine)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
