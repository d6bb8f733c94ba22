"""One config dataclass per optimizer, shared by every Trainer route, and the Trainer's optimizer factory.

``--optim_args "alpha=0.1,refresh_every=5"`` (stock scripts) and the typed ``mousse_*`` fields of
:class:`MousseTrainingArguments` (your own scripts) both produce the same config; the config plus
the learning rate, weight decay and Adam settings of ``TrainingArguments`` build the optimizer.

The config fields are derived, not repeated: every keyword of the optimizer's constructor
(:func:`hf_mousse.optim.constructor_defaults`, with its default and type) except those that come from
``TrainingArguments`` (:data:`FROM_TRAINING_ARGS`: ``lr``, ``weight_decay``, ``betas`` and ``scalar_eps``
from ``--learning_rate``, ``--weight_decay``, ``--adam_beta1/2`` and ``--adam_epsilon``), then the role
options of :func:`hf_mousse.param_groups` (:data:`ROLE_KEYS`, with its defaults) and the logging
option ``log_diagnostics``. Help texts are :data:`hf_mousse.optim.HELP`'s, as field metadata.

The Trainer routes deviate from the constructors in one place, :data:`TRAINER_DEFAULTS`: their
learning-rate convention is ``adjust_lr="match_rms_adamw"`` (Moonlight's 0.2 * sqrt(max(m, n)) scale),
so a learning rate tuned for AdamW works for both paths out of the box. ``adjust_lr=spectral_norm``
gives the paper's sqrt(fan_out / fan_in) scaling (then pass a matrix lr like the paper's and
``scalar_lr`` for the AdamW path).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import typing
from dataclasses import dataclass, field, fields

from ..errors import InvalidHyperparameterError, UnsupportedSetupError
from ..optim import HELP, MiMuon, Mousse, Muon, constructor_defaults, param_groups
from ..optim.base import SpectralOptimizer

logger = logging.getLogger(__name__)

# Keys owned by TrainingArguments: setting them in optim_args would be ambiguous.
FROM_TRAINING_ARGS = {
    "lr": "--learning_rate",
    "weight_decay": "--weight_decay",
    "betas": "--adam_beta1 / --adam_beta2",
    "beta1": "--adam_beta1",
    "beta2": "--adam_beta2",
    "scalar_eps": "--adam_epsilon",
}
# Where the Trainer routes' defaults differ from the constructors' (module docstring).
TRAINER_DEFAULTS = {"adjust_lr": "match_rms_adamw"}
# Options of hf_mousse.param_groups a config carries (their defaults are param_groups' own).
ROLE_KEYS = ("split_fused", "embedding_lr", "head_lr")
# Config-only options: key -> (default, type, help). Not constructor keywords.
LOGGING_KEYS = {
    "log_diagnostics": (False, bool, "log optimizer diagnostics every logging step (costs one norm per "
                                     "bucket per step)"),
}
# The config type of constructor keywords without a type hint. ``ns`` also accepts (a, b, c) triples,
# which a key=value string cannot spell, so configs carry the schedule's name.
UNHINTED = {"ns": str}
TYPED_PREFIX = "mousse_"  # MousseTrainingArguments' field for key k is mousse_<k>


@dataclass
class SpectralConfig:
    """Base of :class:`MuonConfig`, :class:`MousseConfig` and :class:`MiMuonConfig` (module docstring).

    The fields of each config are its optimizer's constructor keywords; :meth:`keys` lists them.
    """

    optimizer_cls: typing.ClassVar[type[SpectralOptimizer]]
    name: typing.ClassVar[str]  # the --optim name

    def optimizer_kwargs(self) -> dict:
        """Constructor keyword arguments (everything but the role and logging options)."""
        skip = (*ROLE_KEYS, *LOGGING_KEYS)
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def build(self, model, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
              scalar_eps: float = 1e-8, no_decay: typing.Collection[str] = ()) -> SpectralOptimizer:
        """The optimizer for ``model``: roles from :func:`param_groups`; parameters named in
        ``no_decay`` get weight decay 0 whatever their path."""
        groups = param_groups(model, **{k: getattr(self, k) for k in ROLE_KEYS})
        opt = self.optimizer_cls(_exclude_from_decay(groups, set(no_decay)), lr=lr,
                                 weight_decay=weight_decay, betas=tuple(betas), scalar_eps=scalar_eps,
                                 **self.optimizer_kwargs())
        opt.diagnostics_enabled = self.log_diagnostics
        return opt

    def for_trainer(self, args) -> tuple[type, dict]:
        """``Trainer(optimizer_cls_and_kwargs=config.for_trainer(args))``: what ``--optim`` builds, with
        ``args``' learning rate, weight decay and Adam settings."""
        refuse_unsupported_engines(args)
        alone = warn_unjoined_ranks(args)
        config = self
        if self.distributed is None:
            # Split the work only when the Trainer's processes are one job (DDP, FSDP2): a process group
            # can exist around processes that each train their own model (torchrun without --use_cpu
            # on CPU), and splitting would then mix their updates.
            joined = not alone and int(getattr(args, "world_size", 1)) > 1
            config = dataclasses.replace(self, distributed=joined)
        return TrainerOptimizerFactory, {
            "config": config,
            "lr": args.learning_rate,
            "weight_decay": args.weight_decay,
            "betas": (args.adam_beta1, args.adam_beta2),
            "scalar_eps": args.adam_epsilon,
        }

    def validate(self, *, lr: float = 1e-3, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 scalar_eps: float = 1e-8) -> None:
        """Raise what building the optimizer would raise for these values, without a model: the constructor
        runs on a 2x2 weight and a bias (state is lazy, so this allocates nothing more), so the checks are
        the constructor's own and cannot drift from them."""
        import torch

        probe = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        self.build(probe, lr=lr, weight_decay=weight_decay, betas=betas, scalar_eps=scalar_eps)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def types(cls) -> dict[str, object]:
        """Each key's type, e.g. ``{"alpha": float, "ns_steps": int | None, ...}``."""
        return {f.name: f.type for f in fields(cls)}

    @classmethod
    def from_options(cls, options: dict[str, object]) -> SpectralConfig:
        """Config from already-typed values; unknown keys raise and list the valid ones."""
        unknown = sorted(set(options) - set(cls.keys()))
        if unknown:
            raise InvalidHyperparameterError(_unknown_message(cls, unknown))
        return cls(**options)

    @classmethod
    def from_string(cls, text: str | None) -> SpectralConfig:
        """Config from ``--optim_args``: ``key=value`` pairs separated by commas."""
        return cls.from_options(parse_optim_args(text, cls))


# ---------------------------------------------------------------------------- the three configs
def _field(default, help_text: str) -> dataclasses.Field:
    return field(default=default, metadata={"help": help_text})


FieldSpec = tuple[str, object, dataclasses.Field]  # what dataclasses.make_dataclass takes


def _constructor_fields(optimizer_cls: type[SpectralOptimizer]) -> list[FieldSpec]:
    out = []
    for key, (default, hint) in constructor_defaults(optimizer_cls).items():
        if key in FROM_TRAINING_ARGS:
            continue
        if default is inspect.Parameter.empty:
            raise TypeError(f"{optimizer_cls.__name__}({key}=...) has no default; a config key needs one")
        if hint is None and key not in UNHINTED:
            raise TypeError(f"{optimizer_cls.__name__}({key}=...) has no type hint: add one, or add the key "
                            "to UNHINTED in hf_mousse/integration/config.py")
        out.append((key, UNHINTED.get(key, hint), _field(TRAINER_DEFAULTS.get(key, default), HELP[key])))
    return out


def _role_fields() -> list[FieldSpec]:
    signature, hints = inspect.signature(param_groups).parameters, typing.get_type_hints(param_groups)
    return [(k, hints[k], _field(signature[k].default, HELP[k])) for k in ROLE_KEYS]


def _logging_fields() -> list[FieldSpec]:
    return [(k, hint, _field(default, text)) for k, (default, hint, text) in LOGGING_KEYS.items()]


def _config_class(name: str, optimizer_cls: type[SpectralOptimizer]) -> type[SpectralConfig]:
    cls_name = f"{optimizer_cls.__name__}Config"
    doc = (f"Trainer-route options of :class:`~hf_mousse.{optimizer_cls.__name__}` (``--optim {name}``): its "
           "constructor's keywords and defaults (less those from TrainingArguments, with the Trainer-route "
           "adjust_lr), the param_groups role options and log_diagnostics. See hf_mousse.optim.HELP.")
    cls = dataclasses.make_dataclass(
        cls_name, _constructor_fields(optimizer_cls) + _role_fields() + _logging_fields(),
        bases=(SpectralConfig,), namespace={"optimizer_cls": optimizer_cls, "name": name, "__doc__": doc})
    cls.__module__ = __name__  # pickle finds it here
    return cls


MousseConfig = _config_class("mousse", Mousse)
MuonConfig = _config_class("muon", Muon)
MiMuonConfig = _config_class("mimuon", MiMuon)
CONFIGS: dict[str, type[SpectralConfig]] = {c.name: c for c in (MousseConfig, MuonConfig, MiMuonConfig)}
NAMES = tuple(CONFIGS)  # the --optim names of hf_mousse's optimizers


def optim_name(args) -> str:
    """The optimizer name of a ``TrainingArguments`` (``args.optim`` is an enum member or a string)."""
    return str(getattr(args.optim, "value", args.optim))


def _unknown_message(cls: type[SpectralConfig], unknown: list[str]) -> str:
    hints = [f"{k!r} comes from {FROM_TRAINING_ARGS[k]}" for k in unknown if k in FROM_TRAINING_ARGS]
    return (
        f"unknown {cls.name} option(s) {', '.join(map(repr, unknown))}"
        + (f" ({'; '.join(hints)})" if hints else "")
        + f"; valid keys: {', '.join(cls.keys())}"
    )


def _exclude_from_decay(groups: list[dict], no_decay: set[str]) -> list[dict]:
    if not no_decay:
        return groups
    out = []
    for g in groups:
        pairs = list(zip(g["param_names"], g["params"]))
        keep = [(n, p) for n, p in pairs if n not in no_decay]
        drop = [(n, p) for n, p in pairs if n in no_decay]
        for members, extra in ((keep, {}), (drop, {"weight_decay": 0.0})):
            if members:
                name = g["group_name"] + (".no_decay" if extra else "")
                out.append({**g, **extra, "group_name": name, "param_names": [n for n, _ in members],
                            "params": [p for _, p in members]})
    return out


# ---------------------------------------------------------------------------- string parsing
def _cast(cls: type[SpectralConfig], key: str, raw: str):
    hint = cls.types()[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint)
    if optional and raw.lower() == "none":
        return None
    if base is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    return base(raw)


def parse_optim_args(text: str | None, cls: type[SpectralConfig]) -> dict[str, object]:
    """Parse ``"key=value,key=value"`` into typed values for ``cls``; every error lists the keys."""
    if not text or not text.strip():
        return {}
    out: dict[str, object] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key or "=" in raw:
            raise InvalidHyperparameterError(
                f"malformed --optim_args item {item!r} in {text!r}: write key=value pairs separated by "
                f"commas, e.g. \"alpha=0.125,refresh_every=10\"; valid keys for {cls.name}: "
                f"{', '.join(cls.keys())}"
            )
        if key not in cls.keys():
            raise InvalidHyperparameterError(_unknown_message(cls, [key]) + " (from --optim_args)")
        if key in out:
            raise InvalidHyperparameterError(f"--optim_args sets {key!r} twice: {text!r}")
        try:
            out[key] = _cast(cls, key, raw)
        except ValueError as e:
            raise InvalidHyperparameterError(
                f"bad value for {cls.name} option {key!r} in --optim_args: {raw!r} ({e}); expected "
                f"{cls.types()[key]}"
            ) from None
    return out


# ---------------------------------------------------------------------------- TrainingArguments
def typed_fields() -> list[FieldSpec]:
    """``mousse_<key>`` fields for every config key (union over the three optimizers), None = unset;
    their ``--help`` is the config field's help text."""
    seen: dict[str, dataclasses.Field] = {}
    for cls in CONFIGS.values():
        for f in fields(cls):
            seen.setdefault(f.name, f)
    out = []
    for k, f in seen.items():
        # None means "not set" here, so options whose value may be None take the string "none".
        base = next((a for a in typing.get_args(f.type) if a is not type(None)), f.type)
        users = "/".join(c.name for c in CONFIGS.values() if k in c.keys())
        help_text = f"{f.metadata['help']} ({users}; same as --optim_args {k}=...)"
        out.append((TYPED_PREFIX + k, typing.Optional[base],  # noqa: UP007, UP045 (HfArgumentParser)
                    field(default=None, metadata={"help": help_text})))
    return out


def config_from_training_args(args) -> SpectralConfig:
    """The config for ``args.optim``, from ``args.optim_args`` and any ``mousse_*`` typed fields."""
    name = optim_name(args)
    if name not in CONFIGS:
        raise InvalidHyperparameterError(
            f"optim={name!r} is not an hf_mousse optimizer; use one of {sorted(CONFIGS)}"
        )
    cls = CONFIGS[name]
    options = parse_optim_args(args.optim_args, cls)
    for key in cls.keys():
        value = getattr(args, TYPED_PREFIX + key, None)
        if value is None:
            continue
        if key in options:
            raise InvalidHyperparameterError(
                f"{key!r} is set both by --{TYPED_PREFIX}{key} and by --optim_args; keep one"
            )
        options[key] = _cast(cls, key, value) if isinstance(value, str) else value
    stray = [f.name for f in dataclasses.fields(args) if f.name.startswith(TYPED_PREFIX)
             and getattr(args, f.name) is not None and f.name[len(TYPED_PREFIX):] not in cls.keys()]
    if stray:
        raise InvalidHyperparameterError(
            f"{', '.join('--' + s for s in stray)} do(es) not apply to optim={name!r}; valid keys: "
            f"{', '.join(cls.keys())}"
        )
    return cls.from_options(options)


# ---------------------------------------------------------------------------- the Trainer's factory
def validate_training_args(args) -> SpectralConfig:
    """Names, keys and values of ``args``' optimizer settings checked now (``TrainingArguments`` creation),
    with its learning rate, weight decay and Adam settings; returns the config."""
    config = config_from_training_args(args)
    config.validate(lr=args.learning_rate, weight_decay=args.weight_decay,
                    betas=(args.adam_beta1, args.adam_beta2), scalar_eps=args.adam_epsilon)
    return config


def optimizer_cls_and_kwargs(args) -> tuple[type, dict]:
    """What ``--optim mousse|muon|mimuon`` builds: the config from ``args``, then ``for_trainer``."""
    return config_from_training_args(args).for_trainer(args)


def _is_true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def refuse_unsupported_engines(args) -> None:
    """DeepSpeed ZeRO and FSDP1 hand the optimizer flat 1-D shards: no matrices are left to orthogonalise."""
    optim = optim_name(args)
    if getattr(args, "deepspeed", None) or _is_true(os.environ.get("ACCELERATE_USE_DEEPSPEED")):
        raise UnsupportedSetupError(
            f"optim={optim!r} cannot run under DeepSpeed: ZeRO gives the optimizer flattened 1-D partitions, "
            "so there are no weight matrices to orthogonalise. Use FSDP2 (--fsdp full_shard with "
            "fsdp_config version 2, or accelerate's FSDP2 plugin) or DDP; for Muon under DeepSpeed use "
            "DeepSpeed's native Muon (\"optimizer\": {\"type\": \"Muon\"} in the DeepSpeed config)"
        )
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    fsdp1 = bool(getattr(args, "fsdp", None)) and int(fsdp_config.get("version", 2)) == 1
    fsdp1 |= _is_true(os.environ.get("ACCELERATE_USE_FSDP")) and os.environ.get("FSDP_VERSION", "2") == "1"
    if fsdp1:
        raise UnsupportedSetupError(
            f"optim={optim!r} cannot run under FSDP1: it flattens parameters into 1-D FlatParameters. "
            "Use FSDP2 (fsdp_config={'version': 2}, the default in transformers 5) or DDP"
        )


def warn_unjoined_ranks(args) -> bool:
    """Warn (and return True) when a launcher started several processes (``WORLD_SIZE`` > 1) but the
    Trainer runs alone in this one: on CPU, ``torchrun`` without ``--use_cpu`` starts N independent
    trainings that write the same output directory, each with the whole batch and its own optimizer."""
    started = int(os.environ.get("WORLD_SIZE", "1") or 1)
    joined = int(getattr(args, "world_size", 1) or 1)
    if started <= 1 or joined > 1:
        return False
    logger.warning(
        "WORLD_SIZE=%d: a launcher started %d processes, but this Trainer does not train with them as "
        "one job (its world size is 1), so each process trains its own copy of the model and all of them "
        "write %s. On CPU pass --use_cpu (torchrun) to train them as one DDP job; accelerate launch "
        "on CPU runs one process (--cpu) unless configured for multi-CPU. README \"Multi-GPU\" has the "
        "launch lines", started, started, getattr(args, "output_dir", "the output directory"))
    return True


def hf_no_decay_names(model) -> set[str]:
    """Trainable parameters the Trainer would not decay (biases, norms): they stay undecayed."""
    from transformers import Trainer

    # get_decay_parameter_names reads nothing from self in transformers 5.x (checked on 5.23).
    decay = set(Trainer.get_decay_parameter_names(None, model))
    return {n for n, p in model.named_parameters() if p.requires_grad and n not in decay}


class TrainerOptimizerFactory:
    """Trainer's factory protocol: instantiated without arguments, then called with (model, **kwargs)."""

    def __call__(self, model, *, config: SpectralConfig, **kwargs) -> SpectralOptimizer:
        flat = [n for n, _ in model.named_parameters() if "_fsdp_wrapped_module" in n or "flat_param" in n]
        if flat:
            raise UnsupportedSetupError(
                f"the model's parameters are FSDP1 FlatParameters ({flat[0]!r}); {config.name} needs the "
                "original weight matrices. Use FSDP2 (fsdp_config={'version': 2}) or DDP"
            )
        return config.build(model, no_decay=hf_no_decay_names(model), **kwargs)
