"""Optimizer state <-> ``optimizer.safetensors``, keyed by parameter name (DESIGN.md).

Tensors are stored as ``state/<param name>/<key>`` in their own dtype (fp32 factors stay fp32).
The header holds the format name and version, the optimizer class, every param group's
hyperparameters with its parameter names, the non-tensor state (step counters), the optimizer's
counters, library versions and a SHA-256 digest of all of it: the header's other entries and every
tensor's name, dtype, shape and bytes. The digest is verified before anything in the file is
used, so a changed byte anywhere (a step counter, a hyperparameter, a tensor) is refused, never
resumed. Loading then matches by name and the optimizer checks the groups and every state entry
against its parameters (``SpectralOptimizer.load_state_dict``): another model, another optimizer, a
truncated or corrupted file all fail with :class:`~hf_mousse.errors.CheckpointError` naming the file.
Nothing here needs pickle, and files are written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable
from contextlib import contextmanager, suppress

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..optim.base import SpectralOptimizer
from ..version import library_versions

OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "hf_mousse.optimizer"
FORMAT_VERSION = "2"  # 1: a CRC32 of the tensor bytes only (header unprotected)
DIGEST = "sha256"  # the header entry holding the digest
STATE_PREFIX = "state"  # tensors are stored as state/<param name>/<state key>
_NOT_HYPERPARAMETERS = ("params", "param_names")


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Delete temporary files that :func:`atomic_path` left for ``name`` when a writer was killed
    mid-write (nothing else has their name: a dot, the file name, 32 hex digits, ``.tmp``)."""
    ours = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{32}}\.tmp")
    for entry in os.listdir(directory):
        if ours.fullmatch(entry):
            with suppress(FileNotFoundError):
                os.remove(os.path.join(directory, entry))


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``.
    Temporary files a killed writer left for ``path`` are deleted first."""
    directory, name = os.path.split(os.path.abspath(path))
    _remove_stale_temporaries(directory, name)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    # Created like open() would (0o666 minus umask), not mkstemp's private 0o600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(directory, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_save(save: Callable[[str], None], path: str) -> None:
    with atomic_path(path) as tmp:
        save(tmp)


def parameter_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
                    ) -> list[list[str]]:
    """Names of each group's parameters: the group's ``param_names``, else looked up in ``model``."""
    by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    out = []
    for i, g in enumerate(optimizer.param_groups):
        names = g.get("param_names")
        if names is None:
            names = [by_id.get(id(p)) for p in g["params"]]
        if any(n is None for n in names):
            raise CheckpointError(
                f"param group {i} has parameters without names, so their state cannot be saved by name; "
                "build the optimizer from hf_mousse.param_groups(model) (or Optimizer.for_model) or pass "
                "the model they belong to"
            )
        out.append(list(names))
    flat = [n for names in out for n in names]
    if len(set(flat)) != len(flat):
        raise CheckpointError("a parameter appears twice in the optimizer's param groups")
    return out


def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the header entries (canonical JSON, the digest itself left out) and of each tensor's
    name, dtype, shape and bytes."""
    header = {k: v for k, v in metadata.items() if k != DIGEST}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _tensor_key(name: str, key: str) -> str:
    return f"{STATE_PREFIX}/{name}/{key}"


def _split_state(sd: dict, names: list[list[str]]) -> tuple[dict[str, torch.Tensor], dict[str, dict], list]:
    """(tensors by file key, non-tensor state by parameter name, groups with names) of a state_dict."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    groups = []
    for saved, group_names in zip(sd["param_groups"], names):
        for idx, name in zip(saved["params"], group_names):
            for key, value in sd["state"].get(idx, {}).items():
                if isinstance(value, torch.Tensor):
                    # A copy: safetensors refuses shared or strided storage, and GPU tensors move to CPU.
                    tensors[_tensor_key(name, key)] = value.detach().to("cpu", copy=True).contiguous()
                else:
                    scalars.setdefault(name, {})[key] = value
        hyper = {k: v for k, v in saved.items() if k not in _NOT_HYPERPARAMETERS}
        groups.append({**hyper, "param_names": group_names})
    return tensors, scalars, groups


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_optimizer(optimizer: torch.optim.Optimizer, path: str, model: torch.nn.Module | None = None, *,
                   global_step: int | None = None, companions: tuple[str, ...] = (),
                   write: bool | None = None) -> None:
    """Write ``optimizer``'s full state to ``path`` (safetensors), atomically.

    ``global_step`` (the Trainer's) and the digests of ``companions`` (files of the same checkpoint
    written before this one, e.g. ``scheduler.pt``, by base name) are recorded, so that
    :func:`load_optimizer` refuses a file from another step or beside another save's files.

    An optimizer that splits its work over ranks (DDP, FSDP2) gathers its state with collectives:
    call this on every rank. ``write`` says whether this rank writes the file (default: rank 0 of a
    split optimizer, else True); the file is the same as one process would write, so it resumes at
    any world size."""
    sd = optimizer.state_dict()
    if write is None:
        write = split_rank(optimizer) in (None, 0)
    if not write:
        return
    tensors, scalars, groups = _split_state(sd, parameter_names(optimizer, model))
    try:
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "optimizer": type(optimizer).__name__,
            "param_groups": json.dumps(groups),
            "scalars": json.dumps(scalars),
            "stats": json.dumps(sd.get("hf_mousse_stats") or {}),
            "versions": json.dumps(library_versions()),
            "global_step": json.dumps(global_step),
            "companions": json.dumps({os.path.basename(c): file_digest(c) for c in companions}),
        }
    except TypeError as e:
        raise CheckpointError(f"optimizer state holds a value the file header cannot store: {e}") from None
    metadata[DIGEST] = _digest(metadata, tensors)
    atomic_save(lambda tmp: save_file(tensors, tmp, metadata=metadata), path)


def split_rank(optimizer: torch.optim.Optimizer) -> int | None:
    """This process's rank if ``optimizer`` splits its work over ranks (its state_dict() is then a
    collective), else None."""
    world = optimizer.split_world() if isinstance(optimizer, SpectralOptimizer) else None
    return None if world is None else torch.distributed.get_rank()


def saved_optimizer_name(path: str) -> str | None:
    """The optimizer class named in an optimizer file's header (unverified: for messages), or None."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("optimizer")
    except Exception:  # unreadable: the message goes without the name
        return None


def read_optimizer_file(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) of an optimizer file, after format and checksum checks."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no optimizer state file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
            "corrupted. Resume from an earlier checkpoint"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an hf_mousse optimizer state "
                              f"(format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {metadata.get('format_version')!r}; this "
                              f"hf_mousse reads version {FORMAT_VERSION} (version 1, written by earlier "
                              "hf_mousse code, did not checksum its header). Resume with the hf_mousse "
                              "that wrote it, or upgrade hf_mousse")
    if _digest(metadata, tensors) != metadata.get(DIGEST):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted (its header or its tensor "
                              "data changed after it was written). Resume from an earlier checkpoint")
    return metadata, tensors


def _check_step_and_companions(path: str, metadata: dict[str, str], global_step: int | None) -> None:
    saved_step = json.loads(metadata["global_step"])
    if global_step is not None and saved_step != global_step:
        raise CheckpointError(
            f"{path} was written at global step {saved_step} but the checkpoint is at step {global_step} "
            "(its trainer_state.json): the file comes from another step (copied, or left by an "
            "interrupted save). Resume from a checkpoint whose files were saved together"
        )
    directory = os.path.dirname(path)
    for name, digest in json.loads(metadata["companions"]).items():
        other = os.path.join(directory, name)
        if not os.path.isfile(other):
            raise CheckpointError(f"{path} was saved together with {name}, which is missing from {directory}")
        if file_digest(other) != digest:
            raise CheckpointError(
                f"{other} is not the file saved together with {path} (checksum differs): it comes from "
                "another save (copied from another step, or left by an interrupted save) or is "
                "corrupted. Resume from a checkpoint whose files were saved together"
            )


def _differences(expected: list[str], found: list[str]) -> str:
    missing = [n for n in expected if n not in set(found)]
    unexpected = [n for n in found if n not in set(expected)]
    parts = []
    if missing:
        parts.append(f"missing from the file: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"not in this model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return "; ".join(parts) or "same names in another grouping or order"


def _check_same_parameters(path: str, names: list[list[str]], saved_groups: list[dict]) -> None:
    saved_names = [g["param_names"] for g in saved_groups]
    if saved_names != names:
        raise CheckpointError(
            f"{path} was written for different parameters (another model, other trainable parameters "
            f"or another grouping): {_differences(sum(names, []), sum(saved_names, []))}"
        )


def _join_state(path: str, index: dict[str, int], tensors: dict[str, torch.Tensor],
                scalars: dict[str, dict]) -> dict[int, dict]:
    """The file's tensors and non-tensor state as a state_dict ``state`` (by parameter index)."""
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        prefix, _, rest = key.partition("/")
        name, _, field = rest.rpartition("/")
        if prefix != STATE_PREFIX or name not in index:
            raise CheckpointError(f"{path} has an entry {key!r} for no parameter of this optimizer")
        state.setdefault(index[name], {})[field] = t
    for name, values in scalars.items():
        if name not in index:
            raise CheckpointError(f"{path} has step counters for {name!r}, which is not in this optimizer")
        state.setdefault(index[name], {}).update(values)
    return state


def _state_dict_groups(saved_groups: list[dict]) -> list[dict]:
    """The header's groups as state_dict ``param_groups`` (parameters numbered in order)."""
    groups, start = [], 0
    for g in saved_groups:
        n = len(g["param_names"])
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k not in _NOT_HYPERPARAMETERS}
        groups.append({**hyper, "params": list(range(start, start + n))})
        start += n
    return groups


def load_optimizer(optimizer: torch.optim.Optimizer, path: str, model: torch.nn.Module | None = None, *,
                   global_step: int | None = None) -> None:
    """Restore ``optimizer`` from ``path`` written by :func:`save_optimizer`.

    Raises :class:`~hf_mousse.errors.CheckpointError` naming ``path`` (and leaves the optimizer
    untouched) when the file is unreadable or corrupted, from another optimizer class, or from a model
    whose trainable parameters, grouping, shapes or dtypes differ; when ``global_step`` is given and
    the file records another; when a companion file it records (``scheduler.pt``) is missing or not
    the one written with it. Changed settings follow the resume rule (README "Checkpoints").
    """
    metadata, tensors = read_optimizer_file(path)
    _check_step_and_companions(path, metadata, global_step)
    if metadata["optimizer"] != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds {metadata['optimizer']} state but the optimizer is "
                              f"{type(optimizer).__name__}; resume with the optimizer that wrote it")
    names = parameter_names(optimizer, model)
    saved_groups = json.loads(metadata["param_groups"])
    _check_same_parameters(path, names, saved_groups)
    index = {n: i for i, n in enumerate(sum(names, []))}
    state = _join_state(path, index, tensors, json.loads(metadata["scalars"]))
    try:
        optimizer.load_state_dict({"state": state, "param_groups": _state_dict_groups(saved_groups),
                                   "hf_mousse_stats": json.loads(metadata["stats"]) or None})
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
