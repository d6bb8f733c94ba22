#!/usr/bin/env python
"""The numbers behind the choice of Mousse's refresh method, on this device.

Mousse needs L^-alpha and R^-alpha of each (damped, trace-normalised) Kronecker factor every T steps.
Two things decide whether something cheaper than ``torch.linalg.eigh`` can replace it faithfully:

1. **Cost and accuracy** at the factor sizes of GPT-2 (768, 3072), fp32: the building blocks of the
   candidates (eigh, eigvalsh, QR, Cholesky, one matmul), and Mousse's two refresh methods as the
   optimizer runs them, ``refresh="eigh"`` (``kronecker.refresh_eigenbasis``) and ``refresh="newton"``
   (``kronecker.refresh_root``: a coupled Newton iteration for the inverse p-th root, matmuls only,
   with the iteration count of ``kronecker.newton_plan``), each timed and each set against the
   float64 root of the same damped factor (relative Frobenius error of f^-alpha).
2. **Basis drift** in real training: at each refresh, how far the previous eigenbasis is from the
   new factor's. It is the starting error of any warm-started method (one subspace-iteration + QR step
   from the old basis, as SOAP does) and what a "skip the refresh while the basis is still accurate"
   rule would see. Measured as the relative Frobenius error of f^-alpha built from the old basis
   (with the old eigenvalues, or with the Rayleigh quotients diag(Q^T f Q)) against float64 eigh,
   while a GPT-2 (d=128, 4 layers) trains with Mousse on the standard library's source. The same
   refreshes also give the error of both methods on real factors.

    python benchmarks/refresh_methods.py [--device cuda] [--out benchmarks/results/refresh_methods-cpu.json]
    python benchmarks/refresh_methods.py --sizes 32,64 --drift-steps 0     # a dry run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from environment import device_name, git_commit, loadavg, sync, write_json  # noqa: E402


def _exact_root(factor: torch.Tensor, eps: float, alpha: float, bias_correction: float = 1.0) -> torch.Tensor:
    """f^-alpha in float64 for the damped, trace-normalised factor as the refresh sees it: the eigh
    refresh's cleaned eigenvalues are those of F_n + eps I plus eps (+2 eps in all for a PSD F_n)."""
    d = factor.size(-1)
    trace = factor.double().diagonal(dim1=-2, dim2=-1).sum(-1) / bias_correction
    f = factor.double() / bias_correction * (d / trace)[..., None, None]
    vals, vecs = torch.linalg.eigh(f)
    return vecs @ torch.diag_embed((vals.clamp_min(0) + 2 * eps).pow(-alpha)) @ vecs.mT


class Refreshes:
    """Both refresh methods as Mousse runs them, on a (B, d, d) factor stack, each into its own state
    (eigenvalues and eigenbasis; the inverse root), starting from the identity as Mousse's state does."""

    def __init__(self, factor: torch.Tensor, eps: float, alpha: float, bias_correction: float = 1.0):
        from hf_mousse.optim.kronecker import EighStats

        b, d, _ = factor.shape
        self.factor, self.alpha = factor, alpha
        self.vals = torch.ones(b, d, device=factor.device)
        self.vecs = torch.eye(d, device=factor.device).expand(b, d, d).clone()
        self.root = self.vecs.clone()
        self.kw = dict(bias_correction=bias_correction, eps=eps, stats=EighStats())

    def eigh(self) -> None:
        from hf_mousse.optim.kronecker import refresh_eigenbasis

        refresh_eigenbasis(self.factor, self.vals, self.vecs, **self.kw)

    def newton(self) -> None:
        from hf_mousse.optim.kronecker import refresh_root

        refresh_root(self.factor, self.root, alpha=self.alpha, **self.kw)

    def roots(self) -> dict:
        """f^-alpha from each method's state."""
        return {"eigh": self.vecs @ torch.diag_embed(self.vals.pow(-self.alpha)) @ self.vecs.mT,
                "newton": self.root}


def refresh_roots(factor: torch.Tensor, eps: float, alpha: float, bias_correction: float = 1.0) -> dict:
    """f^-alpha of a factor stack from each refresh method."""
    r = Refreshes(factor, eps, alpha, bias_correction)
    r.eigh()
    r.newton()
    return r.roots()


def rel_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest relative Frobenius error over the stack."""
    return ((x.double() - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))).max().item()


def kernel_times(device, sizes=(768, 3072), repeats=3, eps=1e-5, alpha=0.125) -> dict:
    out = {}
    for d in sizes:
        g = torch.randn(d, 2 * d, device=device)
        f = g @ g.T / (2 * d) + 1e-3 * torch.eye(d, device=device)
        half = g[:, : d // 2]
        stack = (half @ half.T)[None]  # a rank-deficient factor (rank d/2), as in training
        refresh = Refreshes(stack, eps, alpha)
        kernels = {"eigh": lambda: torch.linalg.eigh(f), "eigvalsh": lambda: torch.linalg.eigvalsh(f),
                   "qr": lambda: torch.linalg.qr(f), "cholesky": lambda: torch.linalg.cholesky(f),
                   "matmul": lambda: f @ f,
                   "refresh_eigh": refresh.eigh, "refresh_newton": refresh.newton,
                   # 8 same-size factors in one call, as a bucket's refresh makes it (time per factor
                   # below): torch loops cuSOLVER's syevd over the batch for d > 32 on CUDA
                   "eigh_batch8": lambda: torch.linalg.eigh(f.expand(8, d, d))}
        if device.type == "cuda":  # the other GPU eigh torch has: MAGMA's
            kernels["eigh_magma"] = lambda: with_linalg_library("magma", torch.linalg.eigh, f)
        row = {}
        for name, fn in kernels.items():
            fn()
            sync(device)
            times = []
            for _ in range(1 if name == "refresh_newton" else repeats):  # the warm-up call is one run too
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            row[name + "_ms"] = min(times) * 1e3
        exact = _exact_root(stack, eps, alpha)
        roots = refresh.roots()  # what the timed runs computed (each run recomputes the same result)
        row["eigh_batch8_per_factor_ms"] = row.pop("eigh_batch8_ms") / 8
        row.update(error_eigh=rel_error(roots["eigh"], exact), error_newton=rel_error(roots["newton"], exact))
        out[str(d)] = row
    return out


def with_linalg_library(name: str, fn, *args):
    """``fn(*args)`` with torch's preferred CUDA linear-algebra library set to ``name``, then restored."""
    before = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library(name)
    try:
        return fn(*args)
    finally:
        torch.backends.cuda.preferred_linalg_library(before)


def newton_matmuls(d: int, eps: float = 1e-5, alpha: float = 0.125) -> dict:
    """The products refresh="newton" runs per factor (the count Mousse uses for its cost model)."""
    from hf_mousse.optim.kronecker import newton_plan

    p, iterations, products = newton_plan(d, alpha, eps)
    return dict(p=p, iterations=iterations, matmuls=products)


def basis_drift(steps: int, seed: int = 0) -> list[dict]:
    """Per refresh step t > 1: max over factors of the relative error of f^-alpha from the old basis."""
    import importlib.util

    from hf_mousse.optim import mousse as mousse_module

    spec = importlib.util.spec_from_file_location("convergence", Path(__file__).parent / "convergence.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    size = dict(conv.SIZES["cpu"])
    args = argparse.Namespace(steps=steps, data="stdlib", tokenizer=None)
    train_blocks, _, tokenizer, _ = conv.prepare_data(args, size)
    model = conv.build_model(size, len(tokenizer), seed, torch.device("cpu"))
    opt, sched = conv.trainer_optimizer(model, "mousse", None, 0.01, steps, size["warmup"], use_cpu=True)
    real = mousse_module.refresh_eigenbasis
    seen = []

    def measuring(factor, eigvals, eigvecs, *, bias_correction, eps, stats, apply=None, run=None):
        d = factor.size(-1)
        trace = factor.diagonal(dim1=-2, dim2=-1).sum(-1) / bias_correction
        f = (factor / bias_correction * (d / trace)[:, None, None]).double()
        f.diagonal(dim1=-2, dim2=-1).add_(eps)
        alpha = 0.125
        exact = _exact_root(factor, eps, alpha, bias_correction)
        q = eigvecs.double()
        rayleigh = (q.mT @ f @ q).diagonal(dim1=-2, dim2=-1) + eps
        with_rayleigh = q @ torch.diag_embed(rayleigh.clamp_min(eps).pow(-alpha)) @ q.mT
        with_old = q @ torch.diag_embed(eigvals.double().pow(-alpha)) @ q.mT
        methods = refresh_roots(factor, eps, alpha, bias_correction)
        seen.append((d, rel_error(with_old, exact), rel_error(with_rayleigh, exact),
                     rel_error(methods["eigh"], exact), rel_error(methods["newton"], exact)))
        return real(factor, eigvals, eigvecs, bias_correction=bias_correction, eps=eps, stats=stats,
                    apply=apply, run=run)

    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    rows = []
    mousse_module.refresh_eigenbasis = measuring
    try:
        for step in range(1, steps + 1):
            x = train_blocks[order[(step - 1) * size["batch"] : step * size["batch"]]]
            model(input_ids=x, labels=x).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if seen and step > 1:
                rows.append(dict(step=step, old_basis_old_eigenvalues=max(s[1] for s in seen),
                                 old_basis_rayleigh_eigenvalues=max(s[2] for s in seen),
                                 median_old_basis_old_eigenvalues=statistics.median(s[1] for s in seen),
                                 error_eigh=max(s[3] for s in seen), error_newton=max(s[4] for s in seen)))
            seen.clear()
    finally:
        mousse_module.refresh_eigenbasis = real
    return rows


def render_markdown(data: dict) -> str:
    lines = [f"{data['device']}, torch {data['torch']}, commit {data['commit']}.", "",
             "| factor size | eigh | eigvalsh | QR | Cholesky | matmul |", "|---|---|---|---|---|---|"]
    for d, r in data["kernels"].items():
        lines.append(f"| {d} | {r['eigh_ms']:.1f} ms | {r['eigvalsh_ms']:.1f} ms | {r['qr_ms']:.1f} ms | "
                     f"{r['cholesky_ms']:.1f} ms | {r['matmul_ms']:.2f} ms |")
    extra = [(d, r) for d, r in data["kernels"].items() if "eigh_batch8_per_factor_ms" in r]
    if extra:
        lines += ["", "Cheaper decompositions: eigh per factor in a batch of 8 (one call), and MAGMA's "
                  "eigh (CUDA):", "", "| factor size | eigh | eigh, batch of 8, per factor | eigh (MAGMA) |",
                  "|---|---|---|---|"]
        for d, r in extra:
            magma = f"{r['eigh_magma_ms']:.1f} ms" if "eigh_magma_ms" in r else "-"
            batch = r["eigh_batch8_per_factor_ms"]
            lines.append(f"| {d} | {r['eigh_ms']:.1f} ms | {batch:.1f} ms | {magma} |")
    lines += ["", "One factor's refresh as Mousse runs it (a rank-d/2 factor, eps 1e-5, alpha 1/8), and its "
              "error against the float64 root:", "",
              "| factor size | refresh=\"eigh\" | refresh=\"newton\" (products) | newton / eigh "
              "| error, eigh | error, newton |", "|---|---|---|---|---|---|"]
    for d, r in data["kernels"].items():
        if "refresh_newton_ms" not in r:
            continue
        n = data["newton"][d]
        lines.append(f"| {d} | {r['refresh_eigh_ms']:.1f} ms | {r['refresh_newton_ms']:.1f} ms "
                     f"({n['iterations']} x {n['matmuls'] // n['iterations']}) | "
                     f"{r['refresh_newton_ms'] / r['refresh_eigh_ms']:.2f}x | {r['error_eigh']:.1e} | "
                     f"{r['error_newton']:.1e} |")
    drift = data.get("drift") or []
    if drift:
        lines += ["", "Old eigenbasis vs the new factor at each refresh (relative error of f^-alpha, max "
                  "over factors; median with old eigenvalues in brackets):", "",
                  "| step | old basis, old eigenvalues | old basis, Rayleigh eigenvalues | eigh (fp32) "
                  "| newton (fp32) |", "|---|---|---|---|---|"]
        for r in drift:
            methods = (f"{r['error_eigh']:.1e} | {r['error_newton']:.1e}" if "error_newton" in r else "- | -")
            lines.append(f"| {r['step']} | {r['old_basis_old_eigenvalues']:.3f} "
                         f"({r['median_old_basis_old_eigenvalues']:.3f}) | "
                         f"{r['old_basis_rayleigh_eigenvalues']:.3f} | {methods} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--drift-steps", type=int, default=101,
                    help="training steps for the drift part (0: skip)")
    ap.add_argument("--sizes", default="768,3072",
                    help="factor sizes, comma-separated (default: GPT-2's 768,3072; small for a dry run)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", metavar="JSON", default=None)
    args = ap.parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return
    device = torch.device(args.device)
    sizes = tuple(int(d) for d in args.sizes.split(","))
    data = dict(device=device_name(device), torch=torch.__version__, commit=git_commit(),
                load_average=loadavg(), kernels=kernel_times(device, sizes),
                newton={str(d): newton_matmuls(d) for d in sizes},
                drift=basis_drift(args.drift_steps) if args.drift_steps else [])
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"refresh_methods-{device.type}.json")
    write_json(out, data, indent=1)
    print(render_markdown(data), end="")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
