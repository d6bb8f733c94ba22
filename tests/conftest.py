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


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny tensor ops on one thread: on a loaded 2-core machine, intra-op threads
    for matrices this small cost 5-15x in wall time. Restores the thread count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
