"""Startup hook of ``HF_MOUSSE_AUTO_REGISTER=1``: registers hf_mousse's optimizer names in every Python
process of the environment, when (and only when) transformers' training arguments are imported.

``trl sft``, ``accelerate launch`` and other launchers start fresh Python processes that never import
hf_mousse, so ``--optim mousse`` would be rejected there. The package installs ``hf_mousse_autoregister.pth``
into site-packages; Python's ``site`` module runs its single line at startup. That line only reads the
environment variable (``os`` is already imported by then), and imports this module when it is set.

This module is deliberately outside the ``hf_mousse`` package: importing ``hf_mousse`` imports torch,
and a startup hook must not. :func:`install` puts a finder at the front of ``sys.meta_path`` that does
nothing until one of transformers' modules that hf_mousse patches is about to be imported; then it
removes itself, imports hf_mousse (whose own post-import hook patches that module as soon as it has
run, see ``hf_mousse/integration/registry.py``) and lets the import proceed.
"""

from __future__ import annotations

import os
import sys

ENV = "HF_MOUSSE_AUTO_REGISTER"
# The transformers modules hf_mousse patches (registry._PATCHES); the first one imported wakes us.
WATCHED = ("transformers.training_args", "transformers.trainer_optimizer", "transformers.trainer")


def enabled(environ=os.environ) -> bool:
    return environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class _Waker:
    """A meta-path finder that never finds anything: it arms hf_mousse's hook before a watched import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED:
            return None
        _remove()
        from hf_mousse.integration.registry import post_import_spec

        # hf_mousse's hook is now first on sys.meta_path, but this lookup has already passed it: ask it
        # for the spec directly, so this very module gets patched after it executes.
        return post_import_spec(fullname, path, target)


def _remove() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Waker)]


def install() -> None:
    """Arm the lazy registration (idempotent); imports nothing heavy."""
    if any(isinstance(f, _Waker) for f in sys.meta_path):
        return
    if any(name in sys.modules for name in WATCHED):  # transformers already loaded: register now
        import hf_mousse  # noqa: F401 (its import hook patches the loaded modules)
        return
    sys.meta_path.insert(0, _Waker())
