"""A tiny GPT-2 trained for 100 steps on fixed text lowers its loss with each optimizer."""

from __future__ import annotations

import pytest
import torch
from helpers import train
from transformers import GPT2Config, GPT2LMHeadModel

from hf_mousse import MiMuon, Mousse, Muon
from hf_mousse.data import pydoc_text

OPTIMIZERS = {
    "muon": lambda m: Muon.for_model(m, lr=0.02, scalar_lr=3e-3),
    "mousse": lambda m: Mousse.for_model(m, lr=0.02, scalar_lr=3e-3),
    "mousse-left": lambda m: Mousse.for_model(m, lr=0.02, scalar_lr=3e-3, sides="left"),
    "mousse-right-lion": lambda m: Mousse.for_model(m, lr=0.02, scalar_lr=1e-3, sides="right",
                                                    scalar_optimizer="lion"),
    "mimuon": lambda m: MiMuon.for_model(m, lr=0.02, scalar_lr=3e-3, sgd_scale="match"),
    "mousse-corrected-wd": lambda m: Mousse.for_model(m, lr=0.02, scalar_lr=3e-3, weight_decay=0.1,
                                                      weight_decay_schedule="corrected"),
}


@pytest.fixture(scope="module")
def batches():
    data = torch.tensor(list(pydoc_text().encode("utf-8"))[:200_000])
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - 32, (100, 8), generator=g)
    return [torch.stack([data[s : s + 32] for s in row]) for row in starts]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tiny_gpt2_loss_decreases(name, batches):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    losses = train(model, OPTIMIZERS[name](model), batches)
    first, last = losses[0], sum(losses[-10:]) / 10
    print(f"{name}: {first:.3f} -> {last:.3f}")
    assert first > 5.0  # ~ln(256) at initialisation
    assert last < first - 1.5, f"{name}: loss {first:.3f} -> mean of last 10 {last:.3f}"
