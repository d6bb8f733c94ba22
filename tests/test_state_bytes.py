"""``stats()["state_bytes"]``: the optimizer state a rank keeps, computed by the code that allocates
it, equals the bytes actually held after a step, for every optimizer and the settings that change the
state's size; and a model built on the meta device is sized without allocating anything."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tiny_gpt2

from hf_mousse import MiMuon, Mousse, Muon

CASES = [
    (Muon, {}),
    (MiMuon, {}),
    (Mousse, {}),
    (Mousse, {"sides": "small"}),
    (Mousse, {"max_factor_dim": 16}),  # tiny GPT-2: 32 -> 2 blocks, c_attn's fused 96 -> 3 x 32 -> 2 blocks
    (Mousse, {"sides": "left", "refresh_delay": 1}),
    (Mousse, {"refresh": "newton", "refresh_schedule": "staggered"}),
    (Mousse, {"scalar_optimizer": "lion"}),
]


def held(opt) -> dict[str, int]:
    out = {"matrix": 0, "scalar": 0}
    for g in opt.param_groups:
        for p in g["params"]:
            out[g["role"]] += sum(v.numel() * v.element_size() for v in opt.state[p].values()
                                  if isinstance(v, torch.Tensor))
    return out


@pytest.mark.parametrize("cls, kw", CASES, ids=[f"{c.__name__}-{k}" for c, k in CASES])
def test_state_bytes_equal_the_bytes_held(cls, kw):
    model = tiny_gpt2()
    opt = cls.for_model(model, lr=0.01, **kw)
    before = opt.stats()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    stats, actual = opt.stats(), held(opt)
    assert actual["matrix"] > 0 and actual["scalar"] > 0
    assert (stats["state_bytes_matrix"], stats["state_bytes_scalar"]) == (actual["matrix"], actual["scalar"])
    assert stats["state_bytes"] == actual["matrix"] + actual["scalar"]
    assert before["state_bytes"] == stats["state_bytes"]  # known before the lazy state exists


def test_sides_small_keeps_less_than_both_and_a_meta_model_is_sized():
    """On the meta device (no memory): Mousse's state with sides="small" is below its default's, and
    Muon's matrix state is exactly the momentum (4 bytes per fp32 matrix entry)."""
    with torch.device("meta"):
        model = tiny_gpt2()
    both = Mousse.for_model(model).stats()["state_bytes_matrix"]
    small = Mousse.for_model(model, sides="small").stats()["state_bytes_matrix"]
    muon = Muon.for_model(model).stats()["state_bytes_matrix"]
    assert muon < small < both
    assert muon == 4 * sum(p.numel() for g in Muon.for_model(model).param_groups if g["role"] == "matrix"
                           for p in g["params"])


def test_memory_benchmark_sizes_each_row_and_rank(monkeypatch):
    """benchmarks/memory.py on a tiny config: one row per setting, each rank of the split keeps less than
    one process, and the largest rank's share is what state_bytes(world, rank) gives."""
    from helpers import load_benchmark

    memory = load_benchmark("memory")
    tiny = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    monkeypatch.setattr(memory, "MODELS", {"tiny": ("gpt2", tiny)})
    rows = {r["row"]: r for r in memory.measure(ranks=2)}
    assert rows.keys() == memory.ROWS.keys()
    for r in rows.values():
        assert 0 < r["largest_rank_bytes"] < r["matrix_bytes"] + r["scalar_bytes"]
    assert rows["Mousse, sides=small"]["matrix_bytes"] < rows["Mousse"]["matrix_bytes"]
    assert rows["Mousse, refresh_delay=1"]["matrix_bytes"] > rows["Mousse"]["matrix_bytes"]
    assert "| tiny | Mousse, sides=small |" in memory.render_markdown(
        dict(commit="x", ranks=2, rows=list(rows.values())))


@pytest.mark.parametrize("saved, resumed", [
    ({"sides": "small"}, {"sides": "both"}),
    ({"basis_dtype": "bfloat16"}, {"basis_dtype": "float32"}),
    ({"max_factor_dim": 16}, {"max_factor_dim": 0}),
    ({"basis_dtype": "bfloat16", "sides": "small"}, None),
])
def test_memory_options_resume_exactly_and_refuse_another_storage(saved, resumed, tmp_path):
    """A checkpoint (optimizer.safetensors) written with a memory option resumes bit for bit; resuming
    it with another storage option is refused, naming the option, and changes nothing."""
    from hf_mousse import load_optimizer, save_optimizer
    from hf_mousse.errors import CheckpointError

    def run(model, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()

    model = tiny_gpt2().eval()  # no dropout: the continued and the resumed run see the same computation
    opt = Mousse.for_model(model, refresh_every=3, **saved)
    run(model, opt, 4, seed=1)
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(opt, path, model)
    with open(path, "rb") as f:  # the checkpoint's tensor data is the state, byte for byte
        header = int.from_bytes(f.read(8), "little")
    assert os.path.getsize(path) - 8 - header == opt.stats()["state_bytes"]
    copy = tiny_gpt2().eval()
    copy.load_state_dict(model.state_dict())
    run(model, opt, 4, seed=2)
    if resumed is not None:
        other = Mousse.for_model(copy, refresh_every=3, **resumed)
        with pytest.raises(CheckpointError, match=next(iter(resumed))):
            load_optimizer(other, path, copy)
        assert not other.state
    opt2 = Mousse.for_model(copy, refresh_every=3, **saved)
    load_optimizer(opt2, path, copy)
    run(copy, opt2, 4, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))
