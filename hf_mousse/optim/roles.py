"""Which parameters take the matrix path, and how their storage maps to (out x in) matrices.

A matrix parameter is described by two param-group keys:

``layout``
    ``"linear"``: storage is (..., out, in) as in ``nn.Linear``; leading dims (stacked experts) are a batch.
    ``"in_out"``: storage is (..., in, out), as in GPT-2's ``Conv1D``; it is transposed on the fly.
    ``"conv"``:   storage is (out, in, *kernel); flattened to (out, in * prod(kernel)).
``split``
    number of equal row blocks of a fused projection (3 for GPT-2's ``c_attn`` = Q, K, V), each
    orthogonalised (and, for Mousse, preconditioned) as its own matrix.

"Left" is always the out side and "right" the in side, whatever the storage.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LAYOUTS = ("linear", "in_out", "conv")

# Model conventions read from parameter names, without importing the libraries that set them
# (this module is the one home for "which parameter plays which role"; plain-PyTorch users of a PEFT
# model get the same roles as the Trainer routes):
# - PEFT: full trainable copies (modules_to_save, usually heads or embeddings) and LoRA factors of
#   an embedding train like embeddings, on the scalar path;
PEFT_SCALAR_PARTS = frozenset({"lora_embedding_A", "lora_embedding_B", "modules_to_save"})
# - PEFT LoRA factors take the matrix path, A (r x in) and B (out x r) both, as in every measured
#   Muon-on-LoRA setup (README "PEFT"). Their groups record which side is the rank r
#   (``low_rank_side``); an algorithm may use it (Mousse whitens only that side).
LORA_RANK_SIDES = {"lora_A": "left", "lora_B": "right"}
# - fused projections whose output rows are equal, contiguous blocks. ``square`` demands
#   out == k * in (multi-head attention with equal Q, K, V); grouped-query fusions are left whole,
#   because their blocks differ in size.
DEFAULT_FUSED: dict[str, tuple[int, bool]] = {
    "c_attn": (3, True),  # GPT-2: split(n_embd, dim=2) -> q, k, v
    "qkv_proj": (3, True),  # Phi-3 (MHA variants)
    "Wqkv": (3, True),  # ModernBERT
    "gate_up_proj": (2, False),  # Phi-3 MLP, stacked MoE experts: chunk(2) -> gate, up
}


def matrix_dims(shape: torch.Size | tuple, layout: str, split: int = 1) -> tuple[int, int, int]:
    """(blocks, rows, cols) of the logical block stack for a parameter of ``shape``."""
    if layout == "conv":
        out, fan_in, batch = shape[0], math.prod(shape[1:]), 1
    elif layout == "in_out":
        fan_in, out, batch = shape[-2], shape[-1], math.prod(shape[:-2])
    else:
        out, fan_in, batch = shape[-2], shape[-1], math.prod(shape[:-2])
    return batch * split, out // split, fan_in


def to_blocks(t: torch.Tensor, layout: str, split: int = 1) -> torch.Tensor:
    """View (or, for transposed storage, copy) ``t`` as a (blocks, rows, cols) stack."""
    b, m, n = matrix_dims(t.shape, layout, split)
    if layout == "in_out":
        t = t.mT
    return t.reshape(b, m, n)


def from_blocks(u: torch.Tensor, layout: str, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: a (blocks, rows, cols) stack back in storage layout ``shape``."""
    if layout == "in_out":
        return u.reshape(*shape[:-2], shape[-1], shape[-2]).mT
    return u.reshape(shape)


def default_layout(p: torch.Tensor) -> str | None:
    """Layout for a parameter given without a role: matrices and stacks of matrices go to the
    matrix path, 4-D+ tensors are treated as conv filters, everything else (and any matrix with a
    side of length 1) goes to the scalar path (None)."""
    if p.ndim < 2:
        return None
    layout = "conv" if p.ndim >= 4 else "linear"
    _, m, n = matrix_dims(p.shape, layout)
    return layout if min(m, n) >= 2 else None


def _module_layout(module: nn.Module, p: torch.Tensor) -> str:
    if type(module).__name__ == "Conv1D" and getattr(module, "nf", None) == p.shape[-1]:
        return "in_out"  # transformers.pytorch_utils.Conv1D, matched by duck type (no transformers import)
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return "conv" if p.ndim >= 4 else "linear"


def _fused_split(leaf: str, shape, layout: str, fused: dict[str, tuple[int, bool]]) -> int:
    if leaf not in fused or layout == "conv":
        return 1
    k, square = fused[leaf]
    _, out, fan_in = matrix_dims(shape, layout)
    if out % k or (square and out != k * fan_in):
        return 1
    return k


def param_groups(
    model: nn.Module,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    scalar_lr: float | None = None,
    embedding_lr: float | None = None,
    head_lr: float | None = None,
    scalar_weight_decay: float | None = None,
    split_fused: bool = True,
    fused: dict[str, tuple[int, bool]] | None = None,
    trainable_only: bool = True,
) -> list[dict]:
    """Split ``model``'s parameters into param groups with roles.

    * Matrix path (Muon/Mousse/MiMuon): every parameter of rank >= 2 with both sides >= 2 that is
      not a token/position embedding or the output head, one group per (layout, split).
    * Scalar path (AdamW or Lion): embeddings (``nn.Embedding`` and ``get_input_embeddings()``),
      the output head (``get_output_embeddings()``, tied or not; a tied head is the embedding
      itself and appears once), every 1-D / 0-D parameter (norm gains, biases), and PEFT's
      ``modules_to_save`` copies and LoRA factors of embeddings.

    Each group carries ``param_names`` so that state can be checkpointed by name. Options left at
    None are filled by the optimizer's defaults (``lr``/``weight_decay`` for matrices,
    ``scalar_lr``/``scalar_weight_decay`` for the scalar path).
    """
    fused = (DEFAULT_FUSED if fused is None else fused) if split_fused else {}
    modules = dict(model.named_modules())
    embedding_ids, head_ids = _embedding_and_head_ids(model, modules)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        group = _classify(name, p, modules, model, embedding_ids, head_ids, fused)
        g = groups.setdefault(group["group_name"], {"params": [], "param_names": [], **group})
        g["params"].append(p)
        g["param_names"].append(name)
    overrides = {
        "matrix": {"lr": lr, "weight_decay": weight_decay},
        "scalar": {"lr": scalar_lr, "weight_decay": scalar_weight_decay},
        "embedding": {"lr": scalar_lr if embedding_lr is None else embedding_lr,
                      "weight_decay": scalar_weight_decay},
        "head": {"lr": scalar_lr if head_lr is None else head_lr, "weight_decay": scalar_weight_decay},
    }
    for g in groups.values():
        kind = g["role"] if g["role"] == "matrix" else g["group_name"]
        g.update({k: v for k, v in overrides[kind].items() if v is not None})
    return list(groups.values())


def _embedding_and_head_ids(model: nn.Module, modules: dict) -> tuple[set[int], set[int]]:
    """ids of the embedding weights (every nn.Embedding and the input embeddings) and of an untied head."""
    embedding_ids = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    head_ids: set[int] = set()
    for getter, ids in (("get_input_embeddings", embedding_ids), ("get_output_embeddings", head_ids)):
        fn = getattr(model, getter, None)
        weight = getattr(fn() if callable(fn) else None, "weight", None)
        if isinstance(weight, torch.Tensor):
            ids.add(id(weight))
    return embedding_ids, head_ids - embedding_ids  # a tied head is the embedding


def _classify(name: str, p: torch.Tensor, modules: dict, model: nn.Module, embedding_ids: set[int],
              head_ids: set[int], fused: dict) -> dict:
    """The group keys of one parameter: its role, group name and, for matrices, layout and split."""
    parts = set(name.split("."))
    if id(p) in head_ids:  # before the PEFT check: a modules_to_save head is still the head
        return {"role": "scalar", "group_name": "head"}
    if id(p) in embedding_ids or not PEFT_SCALAR_PARTS.isdisjoint(parts):
        return {"role": "scalar", "group_name": "embedding"}
    module_name = name.rpartition(".")[0]
    layout = default_layout(p) and _module_layout(modules.get(module_name, model), p)
    if layout is None or min(matrix_dims(p.shape, layout)[1:]) < 2:
        return {"role": "scalar", "group_name": "scalar"}
    lora = sorted(LORA_RANK_SIDES.keys() & parts)
    if lora:
        return {"role": "matrix", "layout": layout, "split": 1, "low_rank_side": LORA_RANK_SIDES[lora[0]],
                "group_name": f"matrix.{lora[0]}" + ("" if layout == "linear" else f".{layout}")}
    split = _fused_split(module_name.rpartition(".")[2], p.shape, layout, fused)
    suffix = "" if (layout, split) == ("linear", 1) else f".{layout}.split{split}"
    return {"role": "matrix", "layout": layout, "split": split, "group_name": "matrix" + suffix}
