"""One config dataclass per optimizer, shared by every Trainer route.

``--optim_args "alpha=0.1,refresh_every=5"`` (stock scripts) and the typed ``mousse_*`` fields of
:class:`MousseTrainingArguments` (your own scripts) both produce the same config; the config plus
the learning rate, weight decay and Adam settings of ``TrainingArguments`` build the optimizer.
The keys are the optimizer constructors' keyword names; ``lr``, ``weight_decay``, ``betas`` and
``scalar_eps`` come from ``--learning_rate``, ``--weight_decay``, ``--adam_beta1/2`` and
``--adam_epsilon``.

Learning-rate convention of the Trainer routes: ``adjust_lr="match_rms_adamw"`` (Moonlight's
0.2 * sqrt(max(m, n)) scale), so a learning rate tuned for AdamW works for both paths out of the
box. ``adjust_lr=spectral_norm`` gives the paper's sqrt(fan_out / fan_in) scaling (then pass a
matrix lr like the paper's and ``scalar_lr`` for the AdamW path).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields

from ..errors import InvalidHyperparameterError
from ..optim import MiMuon, Mousse, Muon, param_groups
from ..optim.base import SpectralOptimizer

# Keys owned by TrainingArguments: setting them in optim_args would be ambiguous.
FROM_TRAINING_ARGS = {
    "lr": "--learning_rate",
    "weight_decay": "--weight_decay",
    "betas": "--adam_beta1 / --adam_beta2",
    "beta1": "--adam_beta1",
    "beta2": "--adam_beta2",
    "scalar_eps": "--adam_epsilon",
}


@dataclass
class SpectralConfig:
    """Options shared by Muon, Mousse and MiMuon on the Trainer routes (see the constructors)."""

    momentum: float = 0.95
    nesterov: bool = True
    ns: str = "keller_jordan"
    ns_steps: int | None = 5
    ns_eps: float = 1e-7
    ns_dtype: str = "auto"
    adjust_lr: str | None = "match_rms_adamw"  # the Trainer-route convention (module docstring)
    weight_decay_schedule: str = "decoupled"
    scalar_optimizer: str = "adamw"
    scalar_lr: float | None = None  # None: --learning_rate
    scalar_weight_decay: float = 0.0
    nonfinite: str = "raise"
    # Roles (hf_mousse.param_groups)
    split_fused: bool = True
    embedding_lr: float | None = None
    head_lr: float | None = None
    # Trainer logging: optimizer diagnostics every logging step (costs one norm per bucket per step)
    log_diagnostics: bool = False

    optimizer_cls: typing.ClassVar[type[SpectralOptimizer]]
    name: typing.ClassVar[str]
    _ROLE_KEYS: typing.ClassVar[tuple[str, ...]] = (
        "split_fused", "embedding_lr", "head_lr", "log_diagnostics")

    def optimizer_kwargs(self) -> dict:
        """Constructor keyword arguments (everything but the role and logging options)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._ROLE_KEYS}

    def build(self, model, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
              scalar_eps: float = 1e-8, no_decay: typing.Collection[str] = ()) -> SpectralOptimizer:
        """The optimizer for ``model``: roles from :func:`param_groups`; parameters named in
        ``no_decay`` get weight decay 0 whatever their path."""
        groups = param_groups(model, split_fused=self.split_fused, embedding_lr=self.embedding_lr,
                              head_lr=self.head_lr)
        opt = self.optimizer_cls(_exclude_from_decay(groups, set(no_decay)), lr=lr,
                                 weight_decay=weight_decay, betas=tuple(betas), scalar_eps=scalar_eps,
                                 **self.optimizer_kwargs())
        opt.diagnostics_enabled = self.log_diagnostics
        return opt

    def for_trainer(self, args) -> tuple[type, dict]:
        """``Trainer(optimizer_cls_and_kwargs=config.for_trainer(args))``: what ``--optim`` builds."""
        from .trainer_hooks import trainer_kwargs

        return trainer_kwargs(self, args)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

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


@dataclass
class MuonConfig(SpectralConfig):
    optimizer_cls: typing.ClassVar = Muon
    name: typing.ClassVar = "muon"


@dataclass
class MousseConfig(SpectralConfig):
    nesterov: bool = False
    ns: str = "dion"
    ns_eps: float = 1e-8
    alpha: float = 0.125
    beta: float = 0.95
    refresh_every: int = 10
    eps: float = 1e-5
    bias_correction: bool = True
    grafting: bool = True
    sides: str = "both"

    optimizer_cls: typing.ClassVar = Mousse
    name: typing.ClassVar = "mousse"


@dataclass
class MiMuonConfig(SpectralConfig):
    gap_threshold: float = 1e-3
    gap_every: int = 10
    sgd_scale: str = "paper"
    sgd_lr_ratio: float = 1.0

    optimizer_cls: typing.ClassVar = MiMuon
    name: typing.ClassVar = "mimuon"


CONFIGS: dict[str, type[SpectralConfig]] = {c.name: c for c in (MousseConfig, MuonConfig, MiMuonConfig)}


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
    hint = typing.get_type_hints(cls)[key]
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
                f"{typing.get_type_hints(cls)[key]}"
            ) from None
    return out


# ---------------------------------------------------------------------------- TrainingArguments
TYPED_PREFIX = "mousse_"


def typed_fields() -> list[tuple[str, object, dataclasses.Field]]:
    """``mousse_<key>`` fields for every config key (union over the three optimizers), None = unset."""
    seen: dict[str, object] = {}
    for cls in CONFIGS.values():
        for k, hint in typing.get_type_hints(cls).items():
            if k in cls.keys():
                seen.setdefault(k, hint)
    out = []
    for k, hint in seen.items():
        # None means "not set" here, so options whose value may be None take the string "none".
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        users = [c.name for c in CONFIGS.values() if k in c.keys()]
        help_text = f"hf_mousse option {k!r} ({'/'.join(users)}); see --optim_args"
        out.append((TYPED_PREFIX + k, typing.Optional[base],  # noqa: UP007, UP045 (HfArgumentParser)
                    field(default=None, metadata={"help": help_text})))
    return out


def config_from_training_args(args) -> SpectralConfig:
    """The config for ``args.optim``, from ``args.optim_args`` and any ``mousse_*`` typed fields."""
    name = str(getattr(args.optim, "value", args.optim))
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
