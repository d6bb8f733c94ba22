"""The recipe runner: ``hf-mousse train RECIPE.yaml [--dotted.key value ...]``.

A recipe is a YAML file a user copies and edits (see ``recipes/``):

    base: other.yaml          # optional: start from another recipe and override keys
    output_dir: runs/demo
    model: {from_config: {model_type: gpt2, n_layer: 2, ...}}   # or {name_or_path: Qwen/Qwen3-0.6B}
    tokenizer: {train_bpe: {vocab_size: 2048}}                  # or {name_or_path: ...}
    data: {builtin: pydoc, block_size: 128}                     # see hf_mousse.data
    optimizer: {name: mousse, args: {alpha: 0.125}}             # args -> --optim_args
    compare: [{name: muon}, {name: adamw_torch}]                # optional: more runs, same everything else
    lora: {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}   # optional
    training: {learning_rate: 3e-3, max_steps: 200, ...}        # TrainingArguments (SFTConfig for sft)
    trainer: sft              # optional: fine-tune through TRL's SFTTrainer (data.format: chat)
    hub: {repo_id: user/name, private: true}                    # optional: upload after training
    license: apache-2.0       # the model card's license

Every section's keys are checked when the recipe loads (a ``--training.max_stepz`` override fails
there, naming ``max_steps``), and the optimizer's ``args`` are checked as ``--optim_args`` are.

Each optimizer run goes to ``output_dir/<optimizer>`` (or ``output_dir`` when there is one) and
gets checkpoints with ``optimizer.safetensors``, ``loss_curve.png`` and a model card (README.md);
with ``compare`` a ``loss_curves.png`` overlays all runs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import platform
import time
from pathlib import Path

import yaml

from .errors import InvalidHyperparameterError
from .integration import model_card
from .integration.model_card import TrainingReport, write_model_card
from .integration.registry import register
from .integration.trainer_hooks import inner_optimizer
from .metrics import perplexity_from_loss

RECIPE_KEYS = {"base", "name", "description", "hardware", "output_dir", "seed", "model", "tokenizer", "data",
               "optimizer", "compare", "lora", "training", "hub", "trainer", "license"}
TRAINERS = ("trainer", "sft")  # transformers' Trainer on packed blocks; TRL's SFTTrainer on conversations
MODEL_KEYS = ("from_config", "name_or_path", "dtype")
OPTIMIZER_KEYS = ("name", "args", "training")
HUB_KEYS = ("repo_id", "private")
# TrainingArguments the runner sets itself (from output_dir, optimizer and seed).
RUNNER_SET_ARGS = ("output_dir", "optim", "optim_args", "seed")
TIME_FILE = "train_time.json"  # in each checkpoint: training seconds so far, over all resumed segments
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SUMMARY = "summary.json"  # in the recipe's output directory: every run's result
LOSS_CURVE = "loss_curve.png"  # in each run directory; with compare, loss_curves.png overlays all runs


# ---------------------------------------------------------------------------- recipe files
def _merge(base: dict, override: dict, replace: tuple[str, ...] = ()) -> dict:
    """Deep merge; keys in ``replace`` are taken whole from ``override``."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        deep = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in replace
        out[k] = _merge(out[k], v) if deep else copy.deepcopy(v)
    return out


def resolve_recipe_path(name: str) -> Path:
    """A path, or the name of a file in ``recipes/`` (with or without ``.yaml``)."""
    for candidate in (Path(name), RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise InvalidHyperparameterError(f"no recipe {name!r}; give a YAML path or one of {available}")


def load_recipe(name: str, overrides: dict | None = None) -> dict:
    path = resolve_recipe_path(name)
    recipe = yaml.safe_load(path.read_text()) or {}
    if "base" in recipe:
        base = load_recipe(str(path.parent / recipe.pop("base")))
        base.pop("name", None)
        # A twin that names another optimizer replaces the whole block (its args would not apply).
        base_name = base["optimizer"].get("name")
        swap = recipe.get("optimizer", {}).get("name", base_name) != base_name
        recipe = _merge(base, recipe, replace=("compare", "optimizer") if swap else ("compare",))
    recipe = _merge(recipe, overrides or {})
    _check_keys(path, "recipe", recipe, RECIPE_KEYS)
    for key in ("model", "tokenizer", "data", "optimizer", "training"):
        if key not in recipe:
            raise InvalidHyperparameterError(f"{path}: the recipe needs a {key!r} section")
    recipe.setdefault("name", path.stem)
    validate_recipe(recipe, path)
    return recipe


def _check_keys(path, section: str, given: dict, valid) -> None:
    """Unknown keys of ``section`` raise, each with the closest valid key when there is one."""
    if not isinstance(given, dict):
        raise InvalidHyperparameterError(f"{path}: {section} must be a mapping, got {given!r}")
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(valid), n=1)
        named.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    where = "" if section == "recipe" else f" (in the recipe or a --{section}.KEY override)"
    raise InvalidHyperparameterError(f"{path}: unknown {section} key(s) {', '.join(named)}{where}; valid "
                                     f"keys: {', '.join(sorted(valid))}")


def training_fields(trainer: str) -> set[str]:
    """The keys a recipe's ``training`` section may set: the fields of TrainingArguments (SFTConfig for sft)
    that the runner does not set itself."""
    if trainer == "sft":
        from trl import SFTConfig as args_cls
    else:
        from transformers import TrainingArguments as args_cls
    return {f.name for f in dataclasses.fields(args_cls) if f.init} - set(RUNNER_SET_ARGS)


def validate_recipe(recipe: dict, path) -> None:
    """Check every section before anything is loaded: unknown keys (with the closest valid one), the data
    spec, the optimizer names and args (as ``--optim_args`` are checked), the LoRA and hub settings."""
    from . import data
    from .integration.config import CONFIGS

    trainer = recipe.get("trainer", "trainer")
    if trainer not in TRAINERS:
        raise InvalidHyperparameterError(f"{path}: trainer={trainer!r}; valid: {', '.join(TRAINERS)}")
    _check_keys(path, "model", recipe["model"], MODEL_KEYS)
    _check_keys(path, "tokenizer", recipe["tokenizer"], data.TOKENIZER_KEYS)
    spec = dict(recipe["data"])
    block = spec.pop("block_size", None)
    data.check_data_spec(spec)
    if trainer == "sft":
        if spec.get("format") != "chat":
            raise InvalidHyperparameterError(f"{path}: trainer: sft needs data.format: chat (instruction "
                                             "rows rendered with the model's chat template)")
        if block is not None:
            raise InvalidHyperparameterError(f"{path}: trainer: sft does not pack blocks; set the sequence "
                                             "length with training.max_length instead of data.block_size")
    elif block is None:
        raise InvalidHyperparameterError(f"{path}: data.block_size is missing (the packed sequence length)")
    valid_training = training_fields(trainer)
    _check_keys(path, "training", recipe["training"], valid_training)
    for i, optimizer in enumerate([recipe["optimizer"], *recipe.get("compare", [])]):
        section = "optimizer" if i == 0 else f"compare[{i - 1}]"
        _check_keys(path, section, optimizer, OPTIMIZER_KEYS)
        training = {**recipe["training"], **optimizer.get("training", {})}
        _check_keys(path, f"{section}.training", optimizer.get("training", {}), valid_training)
        name = optimizer.get("name")
        if name in CONFIGS:
            config = CONFIGS[name].from_string(optim_args_string(optimizer.get("args")))
            config.validate(lr=training.get("learning_rate", 5e-5),
                            weight_decay=training.get("weight_decay", 0.0),
                            betas=(training.get("adam_beta1", 0.9), training.get("adam_beta2", 0.999)),
                            scalar_eps=training.get("adam_epsilon", 1e-8))
    if recipe.get("lora"):
        from peft import LoraConfig

        lora_keys = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - {"task_type"}
        _check_keys(path, "lora", recipe["lora"], lora_keys)
    if "hub" in recipe:
        _check_keys(path, "hub", recipe["hub"], HUB_KEYS)
        if not isinstance(recipe["hub"].get("private", False), bool):
            raise InvalidHyperparameterError(f"{path}: hub.private must be true or false")


def parse_overrides(argv: list[str]) -> dict:
    """``--training.max_steps 10 --optimizer.args.alpha 0.2`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    it = iter(argv)
    for flag in it:
        if not flag.startswith("--") or len(flag) < 3:
            raise InvalidHyperparameterError(f"expected --dotted.key value, got {flag!r}")
        key, eq, value = flag[2:].partition("=")
        if not eq:
            value = next(it, None)
            if value is None:
                raise InvalidHyperparameterError(f"{flag} needs a value")
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return out


# ---------------------------------------------------------------------------- building blocks
def optim_args_string(args: dict | None) -> str | None:
    """``{alpha: 0.1, nesterov: true, adjust_lr: null}`` -> ``"alpha=0.1,nesterov=true,adjust_lr=none"``."""
    if not args:
        return None
    def text(v):
        return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return ",".join(f"{k}={text(v)}" for k, v in args.items())


def build_model(spec: dict, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    dtype = getattr(torch, spec.pop("dtype", "float32"))
    if "from_config" in spec:
        cfg = dict(spec.pop("from_config"))
        cfg.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            cfg.setdefault(key, getattr(tokenizer, key))
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif "name_or_path" in spec:
        model = AutoModelForCausalLM.from_pretrained(spec.pop("name_or_path"), dtype=dtype)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        raise InvalidHyperparameterError(
            "model: give from_config (pretraining) or name_or_path (fine-tuning)")
    if spec:
        raise InvalidHyperparameterError(f"model: unknown key(s) {sorted(spec)}; valid: from_config, "
                                         "name_or_path, dtype")
    return model


def apply_lora(model, spec: dict | None):
    if not spec:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **spec))


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def plot_losses(curves: dict[str, tuple[list, list, list, list]], path: str, title: str) -> str:
    """One PNG: training loss (lines) and eval loss (markers) per run, against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (steps, losses, eval_steps, eval_losses) in curves.items():
        (line,) = ax.plot(steps, losses, label=f"{label} (train)", linewidth=1.2)
        if eval_steps:
            ax.plot(eval_steps, eval_losses, "o--", color=line.get_color(), label=f"{label} (eval)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve(log_history: list[dict]):
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return ([s for s, _ in train], [v for _, v in train], [s for s, _ in evals], [v for _, v in evals])


# ---------------------------------------------------------------------------- one run
_REPORTED_ARGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "max_steps", "weight_decay", "bf16", "fp16", "seed")


def build_trainer(recipe: dict, optimizer: dict, output_dir: str, datasets_, tokenizer, callbacks=()):
    """The trainer of one optimizer run of ``recipe``: transformers' ``Trainer`` on packed blocks, or TRL's
    ``SFTTrainer`` on conversations (``trainer: sft``). The tokenizer is the trainer's processing class,
    so every checkpoint carries it and ``last-checkpoint/`` loads on its own."""
    from transformers import set_seed

    seed = recipe.get("seed", 0)
    set_seed(seed)
    training = {**recipe["training"], **optimizer.get("training", {})}
    common = dict(output_dir=output_dir, optim=optimizer["name"],
                  optim_args=optim_args_string(optimizer.get("args")), seed=seed)
    if recipe.get("trainer") == "sft":
        return _build_sft_trainer(recipe, {**common, **training}, datasets_, tokenizer, callbacks)
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = apply_lora(build_model(recipe["model"], tokenizer), recipe.get("lora"))
    args = TrainingArguments(**common, **training)
    # Packed blocks need no padding: the plain collator (with a processing class the Trainer would
    # otherwise pad every batch through the tokenizer, for nothing).
    return Trainer(model=model, args=args, train_dataset=datasets_["train"],
                   eval_dataset=datasets_["validation"], processing_class=tokenizer,
                   data_collator=default_data_collator, callbacks=list(callbacks))


def _build_sft_trainer(recipe: dict, training: dict, datasets_, tokenizer, callbacks):
    """TRL's SFTTrainer: the model's chat template renders each prompt/completion pair, the loss covers the
    completion only, LoRA goes through ``peft_config``, the optimizer is selected by name."""
    from trl import SFTConfig, SFTTrainer

    if not getattr(tokenizer, "chat_template", None):
        raise InvalidHyperparameterError(
            f"trainer: sft renders conversations with the tokenizer's chat template, and "
            f"{recipe['tokenizer']} has none; use an instruct/chat tokenizer (e.g. Qwen/Qwen3-0.6B)")
    training.setdefault("completion_only_loss", True)
    training.setdefault("include_num_input_tokens_seen", "non_padding")
    peft_config = None
    if recipe.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **recipe["lora"])
    return SFTTrainer(model=build_model(recipe["model"], tokenizer), args=SFTConfig(**training),
                      train_dataset=datasets_["train"], eval_dataset=datasets_["validation"],
                      processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))


class TrainTime:
    """A TrainerCallback that writes the training seconds so far (this segment plus the resumed ones) and
    the number of segments into every checkpoint, so a resumed run can report its total time."""

    def __init__(self, prior_seconds: float = 0.0, prior_segments: int = 0):
        self.prior_seconds, self.segments = prior_seconds, prior_segments + 1
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.start

    # TrainerCallback's protocol, without subclassing it (this module imports transformers lazily).
    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            with open(os.path.join(folder, TIME_FILE), "w") as f:
                json.dump({"seconds": self.seconds(), "segments": self.segments,
                           "step": state.global_step}, f)

    @classmethod
    def resumed_from(cls, output_dir: str) -> tuple[str | None, float, int]:
        """(checkpoint a resume starts from or None, its recorded seconds, its segments)."""
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            return None, 0.0, 0
        try:
            with open(os.path.join(last, TIME_FILE)) as f:
                recorded = json.load(f)
            return last, float(recorded["seconds"]), int(recorded["segments"])
        except (OSError, ValueError, KeyError):
            return last, float("nan"), 1  # written before this file existed: the total is unknown


def run_trainer(trainer, tokenizer, *, resume=None) -> tuple[dict, float]:
    """Train, evaluate, save the model and tokenizer; returns (eval metrics, training seconds)."""
    from . import data

    data.fork_safe_tokenizers(trainer.args.dataloader_num_workers)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    trainer.save_model()
    tokenizer.save_pretrained(trainer.args.output_dir)
    return metrics, seconds


def _sft(trainer) -> bool:
    return hasattr(trainer.args, "completion_only_loss")


def _block_size(trainer) -> int:
    """The packed block length (the validation split is always in memory), or SFT's max_length."""
    if _sft(trainer):
        return trainer.args.max_length
    return len(trainer.eval_dataset[0]["input_ids"])


def tokens_seen(trainer) -> int:
    """Tokens the run trained on: optimizer steps x global batch x block length (packed blocks), or the
    non-padding input tokens the Trainer counted (SFT, variable-length conversations)."""
    if _sft(trainer):
        return int(trainer.state.num_input_tokens_seen)
    args = trainer.args
    return (trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
            * args.world_size * _block_size(trainer))


def optimizer_hyperparameters(trainer) -> dict:
    """The optimizer's class and settings as they ran (the learning rate is a training argument)."""
    hyper = model_card.optimizer_hyperparameters(inner_optimizer(trainer))
    hyper.pop("lr")
    return hyper


def training_report(recipe: dict, name: str, trainer, metrics: dict, seconds: float, curve, *,
                    command: str | None = None, resumed_from: str | None = None,
                    total_seconds: float | None = None, segments: int = 1):
    """The model card's :class:`TrainingReport` of a finished run."""
    args = trainer.args
    extra = {"max_length": args.max_length} if _sft(trainer) else {"block_size": _block_size(trainer)}
    return TrainingReport(
        model_name=f"{recipe['name']}-{name}",
        base_model=recipe["model"].get("name_or_path"),
        model_config_summary=_model_summary(trainer.model),
        datasets=_dataset_names(recipe["data"]),
        dataset_description=json.dumps(recipe["data"]),
        optimizer=name,
        optimizer_hyperparameters=optimizer_hyperparameters(trainer),
        training_arguments={k: getattr(args, k) for k in _REPORTED_ARGS} | extra,
        tokens_seen=tokens_seen(trainer),
        train_steps=trainer.state.global_step,
        final_eval_loss=metrics["eval_loss"],
        best_eval_loss=min(curve[3] or [metrics["eval_loss"]]),
        loss_curve=LOSS_CURVE,
        hardware=hardware(),
        train_seconds=seconds,
        recipe=recipe["name"],
        peft=dict(recipe["lora"], type="LoRA") if recipe.get("lora") else None,
        license=recipe.get("license", "other"),
        reproduce_command=command,
        resumed_from=os.path.basename(resumed_from) if resumed_from else None,
        total_train_seconds=total_seconds,
        segments=segments,
        sft=recipe.get("trainer") == "sft",
    )


def train_one(recipe: dict, optimizer: dict, output_dir: str, datasets_, tokenizer, *, resume=None,
              command: str | None = None) -> dict:
    """One optimizer run: train, plot its loss curve, write its model card; returns its summary."""
    name = optimizer["name"]
    checkpoint, prior_seconds, prior_segments = (TrainTime.resumed_from(output_dir) if resume
                                                 else (None, 0.0, 0))
    clock = TrainTime(prior_seconds, prior_segments)
    trainer = build_trainer(recipe, optimizer, output_dir, datasets_, tokenizer, callbacks=[clock])
    metrics, seconds = run_trainer(trainer, tokenizer, resume=resume)
    curve = _curve(trainer.state.log_history)
    plot_losses({name: curve}, os.path.join(output_dir, LOSS_CURVE), f"{recipe['name']}: {name}")
    report = training_report(recipe, name, trainer, metrics, seconds, curve, command=command,
                             resumed_from=checkpoint, total_seconds=prior_seconds + seconds,
                             segments=clock.segments)
    write_model_card(report, output_dir)
    return {"optimizer": name, "learning_rate": trainer.args.learning_rate,
            "optim_args": optimizer.get("args"), "output_dir": output_dir, "eval_loss": metrics["eval_loss"],
            "eval_perplexity": perplexity_from_loss(metrics["eval_loss"]), "train_seconds": seconds,
            "steps": report.train_steps, "tokens": report.tokens_seen, "curve": curve}


def _model_summary(model) -> str:
    cfg = getattr(model, "config", None)
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = getattr(cfg, "model_type", type(model).__name__)
    return f"{kind}, {n / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)"


def _dataset_names(spec: dict) -> list[str]:
    """Hub dataset ids as they are; local data as ``local:<name>`` (kept out of the card's metadata)."""
    if "dataset" in spec:
        name = spec["dataset"]
        return [f"local:{Path(name).name}" if os.path.exists(name) else name]
    if "builtin" in spec:
        return [f"local:{spec['builtin']}"]
    return [f"local:{Path(f).name}" for f in spec.get("train_files", [])]


# ---------------------------------------------------------------------------- the job
def output_dir(recipe: dict) -> str:
    """Where the recipe's runs go: ``output_dir``, or ``runs/<name>``."""
    return recipe.get("output_dir") or os.path.join("runs", recipe["name"])


# Rows a streamed corpus gives to train a BPE tokenizer (a stream has no end to wait for).
STREAMED_TOKENIZER_ROWS = 10_000


def prepare_data(recipe: dict):
    """(train/validation datasets, tokenizer) of the recipe's ``data`` and ``tokenizer`` sections: packed
    blocks (streamed with ``data.streaming``), or prompt/completion conversations for ``trainer: sft``."""
    from . import data

    data_spec = dict(recipe["data"])
    block = data_spec.pop("block_size", None)
    texts = data.load_text_datasets(data_spec)
    if data_spec.get("streaming"):
        def corpus():
            return [r["text"] for r in texts["train"].take(STREAMED_TOKENIZER_ROWS)]
    else:
        def corpus():
            return list(texts["train"]["text"])
    tokenizer = data.load_tokenizer(recipe["tokenizer"], corpus)
    if recipe.get("trainer") == "sft":
        return texts, tokenizer
    pack_train = data.pack_stream if data_spec.get("streaming") else data.pack
    return {"train": pack_train(texts["train"], tokenizer, block),
            "validation": data.pack(texts["validation"], tokenizer, block)}, tokenizer


def run_recipe(recipe: dict, *, resume: bool = False, push_to_hub: str | None = None,
               command: str | None = None) -> list[dict]:
    """Run every optimizer of ``recipe``; returns one summary per run (printed by the CLI). ``command`` is
    the command line that reproduces the run (recipe and overrides), for the model card; uploads go to
    ``push_to_hub`` or the recipe's ``hub.repo_id``."""
    register()
    out = output_dir(recipe)
    datasets_, tokenizer = prepare_data(recipe)
    runs = [recipe["optimizer"], *recipe.get("compare", [])]
    results = []
    for optimizer in runs:
        run_dir = out if len(runs) == 1 else os.path.join(out, optimizer["name"])
        results.append(train_one(recipe, optimizer, run_dir, datasets_, tokenizer, resume=resume or None,
                                 command=command))
    if len(runs) > 1:
        plot_losses({r["optimizer"]: r["curve"] for r in results}, os.path.join(out, "loss_curves.png"),
                    recipe["name"])
    write_summary(recipe, results, os.path.join(out, SUMMARY))
    hub = recipe.get("hub", {})
    repo_id = push_to_hub or hub.get("repo_id")
    if repo_id:
        push_results(results, repo_id, private=hub.get("private", False))
    return results


def write_summary(recipe: dict, results: list[dict], path: str) -> None:
    """``summary.json``: every run's result with the settings and machine it came from (the README's demo
    table is rendered from it by benchmarks/render_readme.py)."""
    import torch
    import transformers

    from .version import __version__

    runs = [{k: v for k, v in r.items() if k not in ("curve", "output_dir")}
            | {"eval_curve": list(zip(r["curve"][2], r["curve"][3]))} for r in results]
    summary = {"recipe": recipe["name"], "hardware": hardware(),
               "versions": {"hf_mousse": __version__, "torch": torch.__version__,
                            "transformers": transformers.__version__},
               "model": recipe["model"], "data": recipe["data"], "training": recipe["training"], "runs": runs}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)


def push_results(results: list[dict], repo_id: str, *, private: bool = False) -> None:
    """Upload each run with its newest checkpoint: to ``repo_id``, or ``repo_id-<optimizer>`` for several."""
    for r in results:
        repo = repo_id if len(results) == 1 else f"{repo_id}-{r['optimizer']}"
        model_card.push_to_hub(r["output_dir"], repo, include_checkpoints=True, private=private)
