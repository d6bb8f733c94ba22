"""Model cards and Hub uploads for runs trained with hf_mousse.

    report = TrainingReport(model_name=..., optimizer="mousse", optimizer_hyperparameters={...}, ...)
    write_model_card(report, output_dir)          # README.md: YAML metadata (model-index) + the card
    push_to_hub(output_dir, "user/my-model", include_checkpoints=True)

The card is the Jinja2 template ``model_cards/mousse_model_card.md`` rendered by
``huggingface_hub.ModelCard.from_template``. The top-level ``model_cards/`` folder is installed as the
package ``hf_mousse.model_cards`` (pyproject.toml), so the template is found the same way from a wheel
and from an editable install; an editable install made before that mapping existed falls back to the
folder next to the ``hf_mousse`` source directory.

Nothing here touches the network except :func:`push_to_hub`.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HubUploadError, ModelCardError
from ..metrics import perplexity_from_loss
from ..optim import HELP
from ..version import library_versions
from .checkpoint import atomic_save
from .config import CONFIGS, NAMES

TEMPLATE_PACKAGE = "hf_mousse.model_cards"
TEMPLATE_NAME = "mousse_model_card.md"
CARD_FILE = "README.md"
CHECKPOINT_PREFIX = "checkpoint-"
LAST_CHECKPOINT = "last-checkpoint"  # the folder name transformers' hub_strategy="checkpoint" uses
DEFAULT_COMMIT_MESSAGE = "Upload model, model card and training files (hf_mousse)"

OPTIMIZER_TITLES = {"mousse": "Mousse", "muon": "Muon", "mimuon": "MiMuon", "adamw_torch": "AdamW",
                    "adamw_torch_fused": "AdamW (fused)", "adafactor": "Adafactor", "sgd": "SGD"}
OPTIMIZER_TAGS = {"mousse": ["mousse"], "muon": ["muon"], "mimuon": ["mimuon", "muon"]}

# What each hyperparameter means: hf_mousse's optimizers read hf_mousse.optim.HELP; these are the card's own.
CLASS_MEANING = {"optimizer_class": "optimizer class",
                 "optimizer_state": "optimizer state one process keeps (fp32; stats()['state_bytes'])"}
BASELINE_MEANINGS = {"lr": "learning rate (peak)", "betas": "Adam betas", "eps": "Adam epsilon",
                     "weight_decay": "decoupled weight decay", "momentum": "momentum coefficient"}

LR_CONVENTIONS = {
    "spectral_norm": "each matrix update is scaled by √(fan_out / fan_in), the convention of the Mousse "
                     "paper (from Dion), so the matrix learning rate is of the paper's order (0.06 for GPT-2 "
                     "small) rather than an AdamW learning rate.",
    "match_rms_adamw": "each matrix update is scaled by 0.2·√max(fan_out, fan_in) (Moonlight's convention), "
                       "which gives it the RMS of a typical AdamW step, so an AdamW learning rate and weight "
                       "decay carry over. This is the default of hf_mousse's Trainer routes.",
    "original": "each matrix update is scaled by √max(1, fan_out / fan_in), as in Keller Jordan's Muon.",
    "None": "no shape-dependent scaling; the step is the learning rate times the orthogonalised update.",
}
WEIGHT_DECAY_NOTES = {
    "decoupled": "applied as W ← W·(1 − η_t·λ) before each update, with η_t the scheduled learning rate.",
    "corrected": "the coefficient follows the learning-rate schedule (corrected decoupled weight decay, Chou "
                 "2025), λ_t = λ·η_t / η_peak, applied as W ← W·(1 − η_t·λ_t), so the per-step shrink falls "
                 "with η_t² and the steady-state weight norm stays fixed as the learning rate decays.",
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ---------------------------------------------------------------------------- the report
@dataclass
class TrainingReport:
    """Everything the model card says about one training run."""

    model_name: str  # repo id or directory name
    base_model: str | None  # None: trained from scratch from a config
    model_config_summary: str  # e.g. "GPT-2, 12 layers, d=768"
    datasets: list[str]
    dataset_description: str
    optimizer: str  # "mousse" | "muon" | "mimuon" | "adamw_torch" | ...
    optimizer_hyperparameters: dict[str, object]
    training_arguments: dict[str, object]
    tokens_seen: int
    train_steps: int
    final_eval_loss: float | None
    best_eval_loss: float | None
    loss_curve: str | None  # file name relative to the output directory, e.g. "loss_curve.png"
    hardware: str
    train_seconds: float
    recipe: str | None = None
    peft: dict | None = None  # e.g. {"type": "LoRA", "r": 8, "target_modules": [...]}
    versions: dict[str, str] = field(default_factory=library_versions)
    eval_split: str = "validation"
    license: str = "other"  # the card's license field (a Hub license id, or "other")
    reproduce_command: str | None = None  # the command line that made the run, overrides included
    resumed_from: str | None = None  # the checkpoint folder a resumed run started from
    total_train_seconds: float | None = None  # all segments of a resumed run (train_seconds: the last one)
    segments: int = 1  # training segments (1 + the number of resumes)
    sft: bool = False  # fine-tuned on conversations through TRL's SFTTrainer (completion-only loss)

    def __post_init__(self):
        if not self.model_name or not str(self.model_name).strip():
            raise ModelCardError("TrainingReport.model_name is empty: give the repo id or the run's folder")
        if not self.optimizer:
            raise ModelCardError("TrainingReport.optimizer is empty: give the --optim name, e.g. 'mousse'")
        if isinstance(self.datasets, str) or not all(isinstance(d, str) for d in self.datasets):
            raise ModelCardError(f"TrainingReport.datasets must be a list of names, got {self.datasets!r}")
        for name in ("tokens_seen", "train_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ModelCardError(f"TrainingReport.{name} must be a non-negative int, got {value!r}")
        curve = self.loss_curve
        if curve is not None and (os.path.isabs(curve) or ".." in Path(curve).parts):
            raise ModelCardError(
                f"TrainingReport.loss_curve={self.loss_curve!r} must be a file name relative to the output "
                "directory (e.g. 'loss_curve.png'), so that the image link works on the Hub")
        self.optimizer = str(self.optimizer).lower()

    @property
    def final_perplexity(self) -> float | None:
        return perplexity_from_loss(self.final_eval_loss)

    @property
    def best_perplexity(self) -> float | None:
        return perplexity_from_loss(self.best_eval_loss)


# ---------------------------------------------------------------------------- the optimizer as it runs
# Param-group entries that are bookkeeping, not hyperparameters.
_GROUP_BOOKKEEPING = ("params", "param_names", "lr", "initial_lr", "group_name", "role", "layout", "split")


def optimizer_hyperparameters(opt) -> dict:
    """The optimizer's class and effective settings, read from its matrix group (group 0 may be the
    embeddings), so the card shows what ran, defaults included; ``lr`` is the peak (``initial_lr``, which
    the scheduler records) when there is one, else the group's current value."""
    group = next((g for g in opt.param_groups if g.get("role") == "matrix"), opt.param_groups[0])
    out = {"optimizer_class": type(opt).__name__, "lr": group.get("initial_lr", group["lr"]),
           **{k: v for k, v in group.items() if k not in _GROUP_BOOKKEEPING}}
    if hasattr(opt, "state_bytes"):  # ours: what the state costs, where users choose settings
        size = opt.state_bytes()
        out["optimizer_state"] = (f"{(size['matrix'] + size['scalar']) / 2**20:,.1f} MiB (matrices "
                                  f"{size['matrix'] / 2**20:,.1f}, the rest {size['scalar'] / 2**20:,.1f})")
    return out


def hyperparameter_table(optimizer: str, hyperparameters: dict) -> str:
    """A Markdown table (Hyperparameter | Value | Meaning) of ``hyperparameters``, in the card's order."""
    rows = _hyperparameter_rows(optimizer, hyperparameters)
    lines = ["| Hyperparameter | Value | Meaning |", "| --- | --- | --- |"]
    lines += [f"| `{r['name']}` | {r['value']} | {r['meaning']} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- rendering
def template_text(name: str = TEMPLATE_NAME) -> str:
    """The template's text: from the source checkout hf_mousse runs from, else from the installed package
    ``hf_mousse.model_cards`` (a wheel), else from ``model_cards/`` next to the package."""
    from importlib import resources

    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "model_cards" / name).is_file():
        # Running from a source checkout: its own template, even when another checkout's editable
        # install provides the package hf_mousse.model_cards (PYTHONPATH=checkout over such an install).
        return (checkout / "model_cards" / name).read_text(encoding="utf-8")
    try:
        resource = resources.files(TEMPLATE_PACKAGE).joinpath(name)
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        pass
    source = Path(__file__).resolve().parents[2] / "model_cards" / name
    if source.is_file():
        return source.read_text(encoding="utf-8")
    raise ModelCardError(
        f"model-card template {name!r} not found: neither the package {TEMPLATE_PACKAGE!r} nor {source} "
        "has it. Reinstall hf_mousse from its source (pip install -e . in a clone of its repository)")


def _fmt(value) -> str:
    """A table cell: exact numbers (repr), enum values, lists joined; '|' escaped for Markdown."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (list, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        text = ", ".join(_fmt(v) for v in items)
    elif isinstance(value, tuple):
        text = "(" + ", ".join(_fmt(v) for v in value) + ")"
    elif isinstance(value, dict):
        text = json.dumps(value, default=str, sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt_loss(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def _fmt_ppl(ppl: float | None) -> str:
    if ppl is None:
        return "n/a"
    return f"{ppl:.2f}" if math.isfinite(ppl) else str(ppl)


def _fmt_count(n: int) -> str | None:
    """2621440000 -> '2.62B'; None below a thousand."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return None


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 60:
        return f"{seconds:.1f} s"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    text = f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"
    return f"{text} ({seconds:,.0f} s)"


def _describe_data(text: str) -> str:
    """Free text as it is; a JSON object (the recipe's data section) as a code span."""
    try:
        is_json = isinstance(json.loads(text), dict)
    except (TypeError, ValueError):
        is_json = False
    return f"Data settings: `{text}`" if is_json else text


def _own_keys(optimizer: str) -> list[str]:
    """The keys only ``optimizer``'s config has (e.g. Mousse's alpha), not shared by all of ours."""
    shared = set.intersection(*(set(c.keys()) for c in CONFIGS.values()))
    return [k for k in CONFIGS[optimizer].keys() if k not in shared]


def _meanings(optimizer: str) -> dict[str, str]:
    """Key -> meaning, in the order the card lists them: for ours the class and lr first, then the
    algorithm's own keys, then the shared ones (HELP's order); unknown keys follow, sorted."""
    if optimizer not in NAMES:
        return {**CLASS_MEANING, **BASELINE_MEANINGS}
    first = ["lr", *_own_keys(optimizer)]
    rest = {k: text for k, text in HELP.items() if k not in first}
    return {**CLASS_MEANING, **{k: HELP[k] for k in first}, **rest}


def _hyperparameter_rows(optimizer: str, hyper: dict) -> list[dict[str, str]]:
    meanings = _meanings(optimizer)
    order = [k for k in meanings if k in hyper] + sorted(k for k in hyper if k not in meanings)
    return [{"name": k, "value": _fmt(hyper[k]), "meaning": meanings.get(k, "")} for k in order]


def _training_rows(report: TrainingReport) -> list[dict[str, str]]:
    args = dict(report.training_arguments)
    if "precision" not in args and ("bf16" in args or "fp16" in args):
        args["precision"] = ("bf16 mixed precision" if args.get("bf16") else
                             "fp16 mixed precision" if args.get("fp16") else "fp32")
    return [{"name": k, "value": _fmt(v)} for k, v in args.items()]


def _peft_rows(peft: dict | None) -> list[dict[str, str]] | None:
    if not peft:
        return None
    return [{"name": k, "value": _fmt(v)} for k, v in peft.items() if k != "type"]


def _tags(report: TrainingReport) -> list[str]:
    tags = ["hf_mousse", *OPTIMIZER_TAGS.get(report.optimizer, [report.optimizer]), "text-generation"]
    if report.peft:
        tags.append("peft")
        kind = str(report.peft.get("type", "")).lower()
        if kind:
            tags.append(kind)
    return list(dict.fromkeys(tags))


def _eval_results(report: TrainingReport, dataset_type: str, dataset_name: str) -> list:
    from huggingface_hub import EvalResult

    loss = report.final_eval_loss if report.final_eval_loss is not None else report.best_eval_loss
    if loss is None or not math.isfinite(loss):
        return []  # nothing to report, or a value the Hub's YAML validation would reject
    values = [("loss", "Eval loss", float(loss)), ("perplexity", "Perplexity", perplexity_from_loss(loss))]
    return [
        EvalResult(task_type="text-generation", task_name="Causal language modelling",
                   dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=report.eval_split,
                   metric_type=metric, metric_name=name, metric_value=value)
        for metric, name, value in values if math.isfinite(value)
    ]


def _is_repo_id(name: str | None) -> bool:
    return bool(name) and bool(_REPO_ID.match(name)) and not os.path.exists(name)


def _hub_base(report: TrainingReport) -> str | None:
    """The base model if it is a Hub repo id (a local path is only named in the text)."""
    return report.base_model if _is_repo_id(report.base_model) else None


def _card_data(report: TrainingReport):
    """The card's YAML metadata, with a ``model-index`` of the final eval loss and perplexity."""
    from huggingface_hub import ModelCardData

    # Only Hub dataset ids go into the metadata (the Hub links them); local data is named in the text only.
    hub_datasets = [d for d in report.datasets if _is_repo_id(d)]
    dataset_type = hub_datasets[0] if hub_datasets else "custom"
    dataset_name = (", ".join(f"{d[len('local:'):]} (local data)" if d.startswith("local:") else d
                              for d in report.datasets) or "custom")
    hub_base = _hub_base(report)
    extra = {"base_model_relation": "adapter" if report.peft else "finetune"} if hub_base else {}
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=report.model_name,
        base_model=hub_base,
        datasets=hub_datasets or None,
        license=report.license,
        tags=_tags(report),
        eval_results=_eval_results(report, dataset_type, dataset_name) or None,
        **extra,
    )


def _optimizer_context(report: TrainingReport) -> dict:
    """Template variables of the optimizer section: table, conventions explained, citations."""
    hyper = report.optimizer_hyperparameters
    ours = report.optimizer in NAMES
    adjust_lr = str(hyper["adjust_lr"]) if "adjust_lr" in hyper else None
    wd_schedule = hyper.get("weight_decay_schedule")
    cite_mimuon, cite_wd = report.optimizer == "mimuon", wd_schedule == "corrected"
    cited = ["Mousse", "Muon"] + ["MiMuon"] * cite_mimuon + ["corrected decoupled weight decay"] * cite_wd
    return {
        "optimizer": report.optimizer,
        "optimizer_title": OPTIMIZER_TITLES.get(report.optimizer, report.optimizer),
        "spectral": ours,
        "hyperparameters": _hyperparameter_rows(report.optimizer, hyper),
        "adjust_lr": adjust_lr,
        "lr_convention": LR_CONVENTIONS.get(adjust_lr) if ours else None,
        "weight_decay_schedule": wd_schedule,
        "weight_decay_note": WEIGHT_DECAY_NOTES.get(wd_schedule) if ours else None,
        "cite_mimuon": cite_mimuon,
        "cite_corrected_wd": cite_wd,
        "cited": ", ".join(cited[:-1]) + " and " + cited[-1],
    }


def _results_context(report: TrainingReport) -> dict:
    """Template variables of the training and results sections."""
    tokens_per_step = (report.tokens_seen // report.train_steps
                       if report.train_steps and report.tokens_seen % report.train_steps == 0 else None)
    return {
        "training_arguments": _training_rows(report),
        "peft": _peft_rows(report.peft),
        "peft_type": (report.peft or {}).get("type", "PEFT"),
        "train_steps": f"{report.train_steps:,}",
        "tokens_seen": f"{report.tokens_seen:,}",
        "tokens_approx": _fmt_count(report.tokens_seen),
        "tokens_per_step": f"{tokens_per_step:,}" if tokens_per_step else None,
        "final_eval_loss": _fmt_loss(report.final_eval_loss),
        "final_perplexity": _fmt_ppl(report.final_perplexity),
        "best_eval_loss": _fmt_loss(report.best_eval_loss),
        "best_perplexity": _fmt_ppl(report.best_perplexity),
        "loss_curve": Path(report.loss_curve).as_posix() if report.loss_curve else None,
        "hardware": report.hardware,
        "wall_time": _fmt_seconds(report.train_seconds),
        "resumed_from": report.resumed_from,
        "segments": report.segments,
        "total_wall_time": (_fmt_seconds(report.total_train_seconds)
                            if report.total_train_seconds is not None else None),
        "reproduce_command": report.reproduce_command or (f"hf-mousse train {report.recipe}"
                                                          if report.recipe else None),
        "command_recorded": report.reproduce_command is not None,
        "sft": report.sft,
        "versions": [{"name": k, "version": v} for k, v in report.versions.items()],
        "hf_mousse_version": report.versions.get("hf_mousse", ""),
        "recipe": report.recipe,
    }


def render_model_card(report: TrainingReport):
    """The model card (``huggingface_hub.ModelCard``) of ``report``: YAML metadata with a ``model-index``
    (final eval loss and perplexity) and the text of ``model_cards/mousse_model_card.md``."""
    from huggingface_hub import ModelCard

    hub_base = _hub_base(report)
    context = {
        "model_name": report.model_name,
        "base_model": report.base_model,
        "base_model_url": f"https://huggingface.co/{hub_base}" if hub_base else None,
        "model_config_summary": report.model_config_summary,
        "datasets": list(report.datasets),
        "dataset_description": _describe_data(report.dataset_description),
        "eval_split": report.eval_split,
        **_optimizer_context(report),
        **_results_context(report),
    }
    card = ModelCard.from_template(_card_data(report), template_str=template_text(), **context)
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)).rstrip("\n") + "\n")


def write_model_card(report: TrainingReport, output_dir: str) -> str:
    """Render the card of ``report`` and write it atomically to ``output_dir/README.md``; returns the path."""
    card = render_model_card(report)
    os.makedirs(output_dir, exist_ok=True)
    if report.loss_curve and not os.path.isfile(os.path.join(output_dir, report.loss_curve)):
        warnings.warn(f"the model card links {report.loss_curve!r}, which is not in {output_dir}",
                      stacklevel=2)
    path = os.path.join(output_dir, CARD_FILE)
    text = str(card)
    atomic_save(lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""), path)
    return path


# ---------------------------------------------------------------------------- Hub upload
def _skipped(name: str) -> bool:
    """Hidden files (including our ``.*.tmp`` temporaries) and temporary files are never uploaded."""
    return name.startswith(".") or name.endswith(".tmp")


def _newest_checkpoint(output_dir: str) -> str | None:
    steps = []
    for entry in os.scandir(output_dir):
        match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", entry.name)
        if match and entry.is_dir():
            steps.append((int(match.group(1)), entry.path))
    return max(steps)[1] if steps else None


def prepare_hub_upload(output_dir: str, *, include_checkpoints: bool) -> list:
    """The ``CommitOperationAdd`` list that uploads a run: the files at the top of ``output_dir`` (weights,
    config, tokenizer, README.md, loss_curve.png, training_args.bin, ...) and, with ``include_checkpoints``,
    the newest ``checkpoint-*`` folder as ``last-checkpoint/`` (optimizer.safetensors, scheduler.pt, ...),
    as transformers' ``hub_strategy="checkpoint"`` does. Sub-folders (``runs/``, older checkpoints),
    hidden and ``*.tmp`` files are left out."""
    from huggingface_hub import CommitOperationAdd

    files = _top_files(output_dir) + (_last_checkpoint_files(output_dir) if include_checkpoints else [])
    return [CommitOperationAdd(path_in_repo=repo_path, path_or_fileobj=path) for repo_path, path in files]


def _top_files(output_dir: str) -> list[tuple[str, str]]:
    """(path in the repo, local path) of the files at the top of ``output_dir``; it must hold weights."""
    if not os.path.isdir(output_dir):
        raise HubUploadError(f"cannot upload {output_dir!r}: no such directory")
    files = [(entry.name, entry.path) for entry in sorted(os.scandir(output_dir), key=lambda e: e.name)
             if entry.is_file() and not _skipped(entry.name)]
    weights = [n for n, _ in files if n.endswith((".safetensors", ".bin")) and n != "training_args.bin"]
    if not weights:
        raise HubUploadError(
            f"{output_dir!r} holds no model weights (*.safetensors or *.bin) at its top level: point to a "
            "run directory after trainer.save_model(), not to a parent folder of several runs")
    if CARD_FILE not in {n for n, _ in files}:
        warnings.warn(f"{output_dir} has no {CARD_FILE}: the repo will have no model card "
                      "(write one with hf_mousse.integration.model_card.write_model_card)", stacklevel=3)
    return files


def _last_checkpoint_files(output_dir: str) -> list[tuple[str, str]]:
    """(``last-checkpoint/...``, local path) of every file of the newest ``checkpoint-*`` folder."""
    checkpoint = _newest_checkpoint(output_dir)
    if checkpoint is None:
        warnings.warn(f"include_checkpoints=True but {output_dir} has no {CHECKPOINT_PREFIX}* folder; "
                      "uploading the model without a checkpoint", stacklevel=3)
        return []
    files = []
    for root, dirs, names in os.walk(checkpoint):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        for name in sorted(n for n in names if not _skipped(n)):
            path = os.path.join(root, name)
            files.append((f"{LAST_CHECKPOINT}/{Path(os.path.relpath(path, checkpoint)).as_posix()}", path))
    return files


def push_to_hub(output_dir: str, repo_id: str, *, include_checkpoints: bool = False, private: bool = False,
                token: str | None = None, commit_message: str = DEFAULT_COMMIT_MESSAGE):
    """Create ``repo_id`` if needed and upload :func:`prepare_hub_upload`'s files in one commit; returns
    the ``CommitInfo``. The file list is built (and checked) before anything is created on the Hub."""
    from huggingface_hub import HfApi

    operations = prepare_hub_upload(output_dir, include_checkpoints=include_checkpoints)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True, private=private)
    repo_id = getattr(url, "repo_id", None) or repo_id  # create_repo resolves a bare name to user/name
    return api.create_commit(repo_id, operations=operations, commit_message=commit_message)
