#!/usr/bin/env python
"""Run the Mousse authors' own implementation (github.com/Anti-Entrophic/Mousse) next to ours.

Their code is not part of this repository and is never copied into it: the user exports their
repository to a directory outside this checkout, and this module loads ``dion/dion/mousse.py`` from
there at run time, patched in memory so that it runs in one CPU process:

1. ``single-device-state``: in ``mousse_update_batch_async``'s single-device branch the unbound name
   ``state`` becomes ``states[0]`` (as released, a one-process run raises UnboundLocalError there).
2. ``handoff-dtype`` (only when the NS dtype is not bf16, i.e. on CPU): their
   ``muon_update_pre_orthogonalize`` rounds the momentum to bf16 before preconditioning ("Convert to
   bfloat16 before communication"); the patch hands it over in the NS dtype instead, as hf_mousse does
   (bf16 on CUDA, fp32 on CPU), so that on CPU the whole step runs in fp32 on both sides.
3. Their ``newton_schulz_triton`` module (it imports triton at import time, and triton is not
   installed on CPU machines) is replaced, through ``sys.modules``, by a stub whose function raises;
   it is never called, because of 4. The global ``triton`` module is left alone.
4. Newton-Schulz goes in through their ``newton_schulz_func`` hook: hf_mousse's ``newton_schulz``
   with the Dion 5-step schedule (the coefficients of their ``zeropower_via_newtonschulz5``), their
   ``epsilon`` (1e-8) and the NS dtype (fp32 on CPU), so both implementations run the same NS.

Everything else is their code as released, including its ``torch.compile`` of the momentum and
update kernels (on CPU the first step compiles them with the system C++ compiler: ~20 s).

    # after exporting their repository outside this checkout (benchmarks/README.md):
    python benchmarks/authors_mousse.py --check --authors-src /tmp/authors_mousse

``--check`` runs both implementations on the same parameters and gradients and reports how far
apart the trajectories are. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

import hf_mousse  # noqa: E402
from hf_mousse.optim.orthogonalize import newton_schulz, resolve_schedule  # noqa: E402

AUTHORS_REPO = "https://github.com/Anti-Entrophic/Mousse"
PACKAGE = "_authors_mousse_dion"  # private name: their package is never importable as "dion" here

# hf_mousse.Mousse's defaults, under their constructor's names (lr is set by the caller). Their remaining
# defaults already equal ours: weight_decay 0.01, epsilon (NS) 1e-8, nesterov False,
# adjust_lr "spectral_norm", LR_correction (bias correction) True, apply_norm (grafting) True.
SETTINGS = dict(mu=0.95, shampoo_alpha=0.125, shampoo_beta=0.95, shampoo_update_freq=10,
                shampoo_epsilon=1e-5)
USE_LORR = {"both": 0, "left": 1, "right": 2}  # hf_mousse sides -> their use_LorR

_SINGLE_DEVICE_OLD = """\
        U[0] = apply_soap_and_ns(
            U[0],
            G[0],
            state,
"""
_HANDOFF_OLD = "    U = [u.to(dtype=torch.bfloat16) for u in U]\n"


def _patches(handoff: torch.dtype) -> list[tuple[str, str, str]]:
    """(name, exact old text, new text); each old text must occur exactly once."""
    out = [("single-device-state", _SINGLE_DEVICE_OLD, _SINGLE_DEVICE_OLD.replace("state,", "states[0],"))]
    if handoff != torch.bfloat16:
        out.append(("handoff-dtype", _HANDOFF_OLD, _HANDOFF_OLD.replace("torch.bfloat16", f"{handoff}")))
    return out


# ---------------------------------------------------------------------------- locating their code
def package_dir(src: str | Path) -> Path:
    """Their ``dion`` package directory (the one holding mousse.py) under an exported repository
    (``DIR/dion/dion``), or DIR itself if it is that directory."""
    src = Path(src).expanduser().resolve()
    for cand in (src / "dion" / "dion", src / "dion", src):
        if (cand / "mousse.py").is_file() and (cand / "opt_utils.py").is_file():
            if cand.is_relative_to(ROOT):
                raise SystemExit(f"{cand} is inside this checkout ({ROOT}); export the authors' code "
                                 "outside it (it must not become part of this repository)")
            return cand
    raise SystemExit(f"no mousse.py + opt_utils.py under {src} (tried dion/dion, dion and the directory "
                     f"itself); export their repository first, see benchmarks/README.md")


def authors_commit(src: str | Path, given: str | None = None) -> str:
    """The commit the export came from: ``given``, else the file COMMIT written next to the export,
    else ``git rev-parse HEAD`` if DIR is a git checkout, else "unknown"."""
    if given:
        return given
    src = Path(src).expanduser().resolve()
    for d in (src, *src.parents[:2]):
        f = d / "COMMIT"
        if f.is_file():
            return f.read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ---------------------------------------------------------------------------- loading
_LOADED: dict[tuple[str, str], types.ModuleType] = {}


def _stub_triton_module() -> None:
    name = f"{PACKAGE}.newton_schulz_triton"
    if name in sys.modules:
        return
    stub = types.ModuleType(name)

    def newton_schulz_triton(*args, **kwargs):
        raise RuntimeError("authors' triton Newton-Schulz is stubbed out (benchmarks/authors_mousse.py); "
                           "pass newton_schulz_func")

    stub.newton_schulz_triton = newton_schulz_triton
    sys.modules[name] = stub


def load(src: str | Path, handoff: torch.dtype = torch.float32) -> types.ModuleType:
    """Their mousse.py as a module, patched in memory (see the module docstring). Cached per
    (directory, hand-off dtype)."""
    pkg_dir = package_dir(src)
    key = (str(pkg_dir), str(handoff))
    if key in _LOADED:
        return _LOADED[key]
    pkg = sys.modules.get(PACKAGE)
    if pkg is None:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(pkg_dir)]  # their opt_utils / scalar_opts are imported unmodified from here
        sys.modules[PACKAGE] = pkg
    elif pkg.__path__ != [str(pkg_dir)]:
        raise RuntimeError(f"authors' code already loaded from {pkg.__path__[0]}, not {pkg_dir}")
    _stub_triton_module()

    path = pkg_dir / "mousse.py"
    raw = path.read_text()
    text = raw
    for name, old, new in _patches(handoff):
        n = text.count(old)
        if n != 1:
            raise RuntimeError(f"patch {name!r}: expected the text below exactly once in {path}, found it "
                               f"{n} times (their code changed; update benchmarks/authors_mousse.py):\n{old}")
        text = text.replace(old, new)
    mod = types.ModuleType(f"{PACKAGE}.mousse_{str(handoff).removeprefix('torch.')}")
    mod.__file__ = str(path)
    mod.__package__ = PACKAGE
    sys.modules[mod.__name__] = mod
    exec(compile(text, str(path), "exec"), mod.__dict__)  # same line numbers as the file on disk
    mod.PATCHES = [name for name, _, _ in _patches(handoff)] + ["triton-module-stub", "newton_schulz_func"]
    mod.SOURCE_SHA256 = hashlib.sha256(raw.encode()).hexdigest()
    _LOADED[key] = mod
    return mod


def ns_hook(dtype: torch.dtype):
    """Their ``newton_schulz_func(X, epsilon=...)``: hf_mousse's Newton-Schulz, Dion schedule."""
    schedule = resolve_schedule("dion", None)

    def ns(X: torch.Tensor, epsilon) -> torch.Tensor:
        x = X.unsqueeze(0) if X.ndim == 2 else X
        return newton_schulz(x, schedule, float(epsilon), dtype).reshape(X.shape)

    return ns


def make(params, src: str | Path, *, lr: float, ns_dtype: torch.dtype = torch.float32,
         sides: str = "both", handoff: torch.dtype | None = None, **overrides):
    """Their ``Mousse`` over ``params`` with hf_mousse.Mousse's default settings and NS in ``ns_dtype``.
    The momentum is handed to the preconditioner in ``handoff`` (default: ``ns_dtype``, as in
    hf_mousse; bf16 is their code as released). ``overrides`` go to their constructor."""
    mod = load(src, handoff=ns_dtype if handoff is None else handoff)
    kwargs = dict(SETTINGS, lr=lr, use_LorR=USE_LORR[sides], newton_schulz_func=ns_hook(ns_dtype))
    kwargs.update(overrides)
    return mod.Mousse(params, None, **kwargs)  # model=None: only used with optimizer_debug=True


def describe(src: str | Path, commit: str | None = None, ns_dtype: torch.dtype = torch.float32) -> dict:
    """What a result file records about the authors' code that was run."""
    mod = load(src, handoff=ns_dtype)
    return dict(repo=AUTHORS_REPO, commit=authors_commit(src, commit), file="dion/dion/mousse.py",
                source_sha256=mod.SOURCE_SHA256, src=str(package_dir(src)), patches=mod.PATCHES,
                ns=f"hf_mousse newton_schulz, Dion 5-step schedule, {str(ns_dtype).removeprefix('torch.')}",
                settings={**SETTINGS, "use_LorR": "0 (both) / 1 (left)",
                          "other": "their defaults (wd 0.01, epsilon 1e-8, nesterov off, spectral_norm, "
                                   "LR_correction on, apply_norm on)"})


# ---------------------------------------------------------------------------- --check
def _trajectory(make_opt, p0: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    p = torch.nn.Parameter(p0.clone())
    opt = make_opt([p])
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


def _compare(a: list[torch.Tensor], b: list[torch.Tensor], p0: torch.Tensor) -> list[float]:
    """Per step: ||a_t - b_t|| / ||a_t - p0|| (difference relative to the distance travelled)."""
    return [((x - y).norm() / (x - p0).norm()).item() for x, y in zip(a, b)]


def check(src: str | Path, *, steps: int = 12, lr: float = 0.02, seed: int = 0, factor: float = 4.0,
          eps_values=(1e-5, 1e-3), shapes=((64, 48), (48, 64))) -> bool:
    """Ours vs theirs, fp32 everywhere, on the same parameters and gradients. True if, in every case,
    they are no further apart than ``factor`` x the noise floor: how far our own trajectory moves when
    the gradients are perturbed at fp32 rounding level (relative 1e-7)."""
    print(f"authors' code: {package_dir(src)} (commit {authors_commit(src)})")
    print(f"{steps} steps, lr {lr}, a fresh random gradient every step (the same for both), refreshes at "
          f"t = {', '.join(str(t) for t in range(1, steps + 1) if t % 10 == 1)}; fp32 parameters, state, "
          "hand-off and NS on both sides; all other settings hf_mousse.Mousse's defaults (= theirs)")
    print("metric per step t: ||p_ours(t) - p_other(t)|| / ||p_ours(t) - p(0)|| (relative to the distance "
          "travelled)")
    print("noise floor: ours vs ours with every gradient multiplied by (1 + 1e-7 N(0, 1)), i.e. perturbed "
          "at fp32 rounding level (the larger of two draws)")
    ok = True
    for eps in eps_values:
        for m, n in shapes:
            gen = torch.Generator().manual_seed(seed)
            p0 = torch.randn(m, n, generator=gen) * 0.02
            grads = [torch.randn(m, n, generator=gen) for _ in range(steps)]
            perturbed = [[g * (1 + 1e-7 * torch.randn(m, n, generator=gen)) for g in grads] for _ in range(2)]
            for sides in ("both", "left"):
                def ours_opt(ps, alpha=0.125):
                    return hf_mousse.Mousse(ps, lr=lr, sides=sides, eps=eps, alpha=alpha, ns_dtype="float32")

                ours = _trajectory(ours_opt, p0, grads)
                theirs = _trajectory(lambda ps: make(ps, src, lr=lr, sides=sides, shampoo_epsilon=eps),
                                     p0, grads)
                err = _compare(ours, theirs, p0)
                floors = [_compare(ours, _trajectory(ours_opt, p0, gs), p0) for gs in perturbed]
                floor = [max(f) for f in zip(*floors)]
                # Context: their code as released (momentum rounded to bf16 before preconditioning),
                # and ours without whitening (alpha = 0), i.e. what a real difference looks like.
                as_is = _trajectory(lambda ps: make(ps, src, lr=lr, sides=sides, shampoo_epsilon=eps,
                                                    handoff=torch.bfloat16), p0, grads)
                alpha0 = _trajectory(lambda ps: ours_opt(ps, alpha=0.0), p0, grads)
                worst, bound = max(err), factor * max(floor)
                ok &= worst <= bound
                print(f"\neps {eps:g}, {m}x{n}, sides={sides} (their use_LorR={USE_LORR[sides]}): ours vs "
                      f"theirs at most {worst:.1e}, noise floor at most {max(floor):.1e} -> "
                      f"{'AGREE' if worst <= bound else 'DIFFER'} (bound {factor:g} x floor)")
                rows = [("step", None), ("ours vs theirs", err), ("noise floor", floor),
                        ("ours vs theirs as released", _compare(ours, as_is, p0)),
                        ("ours alpha=0 vs theirs", _compare(alpha0, theirs, p0))]
                for label, vals in rows:
                    cells = [f"{t:>7d}" for t in range(1, steps + 1)] if vals is None else \
                        [f"{v:7.1e}" for v in vals]
                    print(f"  {label:<27} " + " ".join(cells))
    print("\n'as released': their bf16 momentum hand-off kept (patch handoff-dtype not applied); 'alpha=0':"
          " ours without whitening.")
    print("ours and theirs " + ("AGREE to within the noise floor in every case" if ok else
                                "DIFFER beyond the noise floor in at least one case"))
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors-src", required=True, metavar="DIR",
                    help="directory their repository was exported to (outside this checkout)")
    ap.add_argument("--check", action="store_true",
                    help="compare ours and theirs on a small case (fp32 everywhere)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--factor", type=float, default=4.0,
                    help="--check passes if ours vs theirs <= FACTOR x the noise floor in every case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.check:
        info = describe(args.authors_src)
        print("\n".join(f"{k}: {v}" for k, v in info.items()))
        return
    sys.exit(0 if check(args.authors_src, steps=args.steps, factor=args.factor, seed=args.seed) else 1)


if __name__ == "__main__":
    main()
