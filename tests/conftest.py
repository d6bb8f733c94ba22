"""Shared fixtures: a small local text file and tiny models built from configs (all offline)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> str:
    """~40 kB of English (CPython's pydoc topics) in a local file."""
    from hf_mousse.data import pydoc_text

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(pydoc_text()[:40_000], encoding="utf-8")
    return str(path)
