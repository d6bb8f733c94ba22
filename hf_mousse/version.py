"""The package version and the versions of the libraries a run depends on.

This module imports nothing from hf_mousse, so every other module (and pyproject.toml, which reads
``__version__`` from here) can use it without an import cycle.
"""

from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"

# Recorded in checkpoint headers and model cards, in this order, when installed.
LIBRARIES = ("transformers", "torch", "peft")


def library_versions() -> dict[str, str]:
    """Installed versions of hf_mousse, transformers, torch and peft (those that are installed)."""
    out = {"hf_mousse": __version__}
    for dist in LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # e.g. plain PyTorch use without transformers
            pass
    return out
