"""Roles and storage layouts (issue 2, section 6) on tiny GPT-2 and Qwen3 models built offline."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

from hf_mousse import Mousse, Muon, param_groups
from hf_mousse.optim.base import lr_ratio
from hf_mousse.optim.roles import from_blocks, matrix_dims, to_blocks


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_qwen3(tied: bool):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         tie_word_embeddings=tied, max_position_embeddings=32)
    return Qwen3ForCausalLM(config)


def by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_gpt2_roles_and_layouts():
    model = tiny_gpt2()
    groups = param_groups(model)
    roles = by_name(groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(roles) == trainable  # every parameter once (the tied head is the embedding)
    for n, g in roles.items():
        if n in ("transformer.wte.weight", "transformer.wpe.weight"):
            assert g["role"] == "scalar" and g["group_name"] == "embedding"
        elif n.endswith("c_attn.weight"):
            assert (g["role"], g["layout"], g["split"]) == ("matrix", "in_out", 3)
        elif n.endswith(("c_proj.weight", "c_fc.weight")):
            assert (g["role"], g["layout"], g["split"]) == ("matrix", "in_out", 1)
        else:  # layer norms and biases
            assert g["role"] == "scalar" and model.get_parameter(n).ndim == 1, n
    assert not any(g["group_name"] == "head" for g in groups)  # tied to wte
    # "left" is the output side: Conv1D c_fc stores (in=32, out=128) but is a 128 x 32 matrix.
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert fc.shape == (32, 128)
    assert matrix_dims(fc.shape, "in_out") == (1, 128, 32)
    assert lr_ratio("spectral_norm", *matrix_dims(fc.shape, "in_out")[1:]) == 2.0
    # Fused QKV: three 32 x 32 blocks.
    assert matrix_dims(model.transformer.h[0].attn.c_attn.weight.shape, "in_out", 3) == (3, 32, 32)
    assert by_name(param_groups(model, split_fused=False))["transformer.h.0.attn.c_attn.weight"]["split"] == 1


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_roles(tied):
    model = tiny_qwen3(tied)
    roles = by_name(param_groups(model, head_lr=1e-4, embedding_lr=2e-4))
    assert roles["model.embed_tokens.weight"]["group_name"] == "embedding"
    assert roles["model.embed_tokens.weight"]["lr"] == 2e-4
    if tied:
        assert "lm_head.weight" not in roles
    else:
        assert roles["lm_head.weight"]["group_name"] == "head" and roles["lm_head.weight"]["lr"] == 1e-4
    for n, g in roles.items():
        if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            assert (g["role"], g["layout"], g["split"]) == ("matrix", "linear", 1), n
        elif "norm" in n:
            assert g["role"] == "scalar", n


def test_frozen_parameters_are_left_out():
    model = tiny_qwen3(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    assert "model.layers.0.self_attn.q_proj.weight" not in by_name(param_groups(model))


@pytest.mark.parametrize("layout, shape, split", [
    ("linear", (12, 5), 1), ("linear", (12, 5), 3), ("in_out", (5, 12), 3), ("linear", (4, 6, 5), 2),
    ("conv", (6, 3, 2, 2), 1), ("in_out", (2, 5, 12), 1),
])
def test_blocks_round_trip(layout, shape, split):
    t = torch.randn(shape)
    blocks = to_blocks(t, layout, split)
    assert blocks.shape == matrix_dims(shape, layout, split)
    assert torch.equal(from_blocks(blocks, layout, t.shape), t)


def _one_step(cls, groups, grads, **kw):
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    opt = cls(groups, lr=0.1, weight_decay=0.0, **kw)
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr
    opt.step()


@pytest.mark.parametrize("cls", [Muon, Mousse])
def test_conv1d_layout_is_the_transposed_linear_update(cls):
    g = torch.Generator().manual_seed(0)
    w, grad = torch.randn(24, 10, generator=g), torch.randn(24, 10, generator=g)  # out=24, in=10
    lin = torch.nn.Parameter(w.clone())
    conv = torch.nn.Parameter(w.T.clone())  # GPT-2 Conv1D storage (in, out)
    _one_step(cls, [{"params": [lin], "role": "matrix", "layout": "linear"}], [grad])
    _one_step(cls, [{"params": [conv], "role": "matrix", "layout": "in_out"}], [grad.T.clone()])
    torch.testing.assert_close(conv.detach().T, lin.detach())
    # Conv1D with layout "linear" would be a different (transposed-side) update for Mousse/adjust_lr.
    wrong = torch.nn.Parameter(w.T.clone())
    _one_step(cls, [{"params": [wrong], "role": "matrix", "layout": "linear"}], [grad.T.clone()])
    assert not torch.allclose(wrong.detach().T, lin.detach(), atol=1e-4)


@pytest.mark.parametrize("cls", [Muon, Mousse])
def test_fused_split_equals_separate_blocks(cls):
    g = torch.Generator().manual_seed(1)
    w, grad = torch.randn(30, 10, generator=g), torch.randn(30, 10, generator=g)
    fused = torch.nn.Parameter(w.clone())
    parts = [torch.nn.Parameter(w[i * 10 : (i + 1) * 10].clone()) for i in range(3)]
    _one_step(cls, [{"params": [fused], "role": "matrix", "split": 3}], [grad])
    _one_step(cls, [{"params": parts, "role": "matrix"}], list(grad.split(10)))
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in parts]))
    whole = torch.nn.Parameter(w.clone())
    _one_step(cls, [{"params": [whole], "role": "matrix"}], [grad])
    assert not torch.allclose(whole.detach(), fused.detach(), atol=1e-4)


@pytest.mark.parametrize("cls", [Muon, Mousse])
def test_stacked_experts_are_a_batch_of_matrices(cls):
    g = torch.Generator().manual_seed(2)
    w, grad = torch.randn(4, 12, 8, generator=g), torch.randn(4, 12, 8, generator=g)
    stacked = torch.nn.Parameter(w.clone())
    experts = [torch.nn.Parameter(w[i].clone()) for i in range(4)]
    _one_step(cls, [stacked], [grad])  # no role: rank 3 -> matrix path, batch of 4
    _one_step(cls, experts, list(grad.unbind(0)))
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in experts]))


def test_conv_filters_are_flattened():
    g = torch.Generator().manual_seed(3)
    w, grad = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g)
    conv = torch.nn.Parameter(w.clone())
    flat = torch.nn.Parameter(w.reshape(6, 12).clone())
    _one_step(Mousse, [conv], [grad])
    _one_step(Mousse, [flat], [grad.reshape(6, 12)])
    torch.testing.assert_close(conv.detach().reshape(6, 12), flat.detach())


def test_ungrouped_params_split_by_rank():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    opt = Mousse(model.named_parameters(), lr=0.02, scalar_lr=1e-3)
    roles = {n: g["role"] for g in opt.param_groups for n in g["param_names"]}
    assert roles == {"0.weight": "matrix", "0.bias": "scalar", "1.weight": "scalar", "1.bias": "scalar",
                     "2.weight": "scalar", "2.bias": "scalar"}  # 2.weight is 1 x 8: a vector
    scalar = next(g for g in opt.param_groups if g["role"] == "scalar")
    assert scalar["lr"] == 1e-3 and scalar["weight_decay"] == 0.0


def test_scalar_path_adamw_matches_torch():
    g = torch.Generator().manual_seed(4)
    init = [torch.randn(7, generator=g), torch.randn(5, 3, generator=g)]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    opt_a = Muon([{"params": ours, "role": "scalar", "lr": 1e-2, "weight_decay": 0.1}], betas=(0.8, 0.9),
                 scalar_eps=1e-6)
    opt_b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    for _ in range(5):
        grads = [torch.randn(w.shape, generator=g) for w in init]
        for a, b, gr in zip(ours, theirs, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_scalar_path_lion_matches_formula():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(6, generator=g)
    p = torch.nn.Parameter(w0.clone())
    opt = Mousse([{"params": [p], "role": "scalar"}], scalar_optimizer="lion", scalar_lr=0.01,
                 scalar_weight_decay=0.1, betas=(0.9, 0.99))
    w, m = w0.clone(), torch.zeros(6)
    for _ in range(4):
        grad = torch.randn(6, generator=g)
        p.grad = grad.clone()
        opt.step()
        u = torch.sign(0.9 * m + 0.1 * grad)
        m = 0.99 * m + 0.01 * grad
        w = w * (1 - 0.01 * 0.1) - 0.01 * u
    torch.testing.assert_close(p.detach(), w)


@pytest.mark.parametrize("schedule", ["decoupled", "corrected"])
def test_weight_decay_schedules(schedule):
    """Zero gradients: only decay acts. Corrected decay shrinks by lr_t^2 * wd / peak_lr."""
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([p], lr=0.1, weight_decay=0.5, weight_decay_schedule=schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    expected = 1.0
    for t in range(4):
        lr = 0.1 / (1 + t)
        wd = 0.5 * (lr / 0.1 if schedule == "corrected" else 1.0)
        expected *= 1 - lr * wd
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    torch.testing.assert_close(p.detach(), torch.full((4, 4), expected))


def test_optim_package_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, hf_mousse.optim; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
