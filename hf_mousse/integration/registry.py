"""Make ``optim="mousse" | "muon" | "mimuon"`` valid everywhere transformers checks the name.

transformers 5.x rejects an unknown name in three places (HF_INTEGRATION_FACTS.md §1): the
``OptimizerNames`` enum (argparse choices, ``TrainingArguments.__post_init__``, unpickling
``training_args.bin``), the handler table ``trainer_optimizer._OPTIMIZER_HANDLERS`` and
``Trainer.get_optimizer_cls_and_kwargs``. We add enum members and handlers, route
``get_optimizer_cls_and_kwargs`` to :mod:`.config` for our names, and install the Trainer's
save/load/log hooks (:mod:`.trainer_hooks`).

``import hf_mousse`` arms a post-import hook, so each transformers module is patched when it is
first imported, without importing transformers early (that takes seconds). ``register()`` does the
same eagerly and raises when this transformers version's internals are unknown; the import hook
only warns then.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

from ..errors import RegistrationError
from . import trainer_card, trainer_hooks
from .config import CONFIGS, NAMES, optim_name, optimizer_cls_and_kwargs, validate_training_args

# [low, high) of transformers versions. Internals read on 5.23.0 and spot-checked on 5.17.0
# (HF_INTEGRATION_FACTS.md). The tests run against whatever is installed: 5.24.0 in the development
# environment, and in CI (`make test`: pip install -e ".[test]") the newest 5.x that pyproject.toml's
# "transformers>=5.17,<6" allows.
SUPPORTED = ((5, 17), (6, 0))
_warned: set[str] = set()


def _version_tuple(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_version() -> None:
    import transformers

    v = _version_tuple(transformers.__version__)
    low, high = SUPPORTED
    if not low <= v < high:
        raise RegistrationError(
            f"hf_mousse.register() knows the internals of transformers {low[0]}.{low[1]} to "
            f"<{high[0]}.{high[1]} and found {transformers.__version__}. Install "
            f"'transformers>={low[0]}.{low[1]},<{high[0]}', or skip registration and pass the optimizer "
            "yourself: Trainer(optimizers=(hf_mousse.Mousse.for_model(model), None)) or "
            "Trainer(optimizer_cls_and_kwargs=hf_mousse.MousseConfig().for_trainer(args))"
        )


# ---------------------------------------------------------------------------- the three patches
def _ours(member) -> bool:
    return getattr(member, "_hf_mousse", False)


def _add_enum_members(training_args) -> None:
    enum = training_args.OptimizerNames
    for value in NAMES:
        existing = enum._value2member_map_.get(value)
        if existing is not None:
            if not _ours(existing) and value not in _warned:
                # transformers ships its own optimizer of this name: never replace it silently.
                _warned.add(value)
                warnings.warn(
                    f"transformers already defines optim={value!r}; hf_mousse leaves it alone. Use "
                    f"hf_mousse's through Trainer(optimizer_cls_and_kwargs="
                    f"hf_mousse.{CONFIGS[value].__name__}().for_trainer(args))",
                    stacklevel=2,
                )
            continue
        member = str.__new__(enum, value)
        member._name_, member._value_, member.__objclass__ = value.upper(), value, enum
        member._hf_mousse = True
        if hasattr(enum, "_add_member_"):  # Python >= 3.13
            enum._add_member_(value.upper(), member)
        else:
            enum._member_map_[value.upper()] = member
            enum._member_names_.append(value.upper())
        enum._value2member_map_[value] = member


def _validate_on_creation(training_args) -> None:
    """Check ``--optim_args`` (and ``mousse_*`` fields) of our names in ``TrainingArguments.__post_init__``,
    so a typo fails when the arguments are parsed, not after the model is loaded and the data tokenized
    (the Trainer builds the optimizer last). Subclasses (TRL's configs, MousseTrainingArguments) call
    ``super().__post_init__()`` and get the check too; unpickling ``training_args.bin`` does not run it."""
    cls = training_args.TrainingArguments
    if cls.__dict__.get("_hf_mousse_validates"):
        return
    original = cls.__post_init__

    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if optim_name(self) in registered_names():
            validate_training_args(self)

    cls.__post_init__ = __post_init__
    cls._hf_mousse_validates = True


def _patch_training_args(training_args) -> None:
    _add_enum_members(training_args)
    _validate_on_creation(training_args)


def registered_names() -> tuple[str, ...]:
    """The names that select hf_mousse's optimizers in this process."""
    training_args = sys.modules.get("transformers.training_args")
    if training_args is None:
        return ()
    members = training_args.OptimizerNames._value2member_map_
    return tuple(n for n in NAMES if n in members and _ours(members[n]))


def handler(ctx) -> tuple[type, dict]:
    """Entry for transformers' ``_OPTIMIZER_HANDLERS``; ``ctx.optim_args`` (leniently parsed
    strings) is ignored in favour of our parser."""
    return optimizer_cls_and_kwargs(ctx.args)


def _add_handlers(trainer_optimizer) -> None:
    for value in registered_names():
        trainer_optimizer._OPTIMIZER_HANDLERS[trainer_optimizer.OptimizerNames(value)] = handler


def _patch_trainer(trainer) -> None:
    """Our names build through :mod:`.config` (transformers' own ``--optim_args`` parser crashes on
    malformed strings with an unpacking error); save, load and log go through :mod:`.trainer_hooks`."""
    trainer_cls = trainer.Trainer
    if trainer_cls.__dict__.get("_hf_mousse_patched"):
        return
    original_get = trainer_cls.__dict__["get_optimizer_cls_and_kwargs"].__func__

    def get_optimizer_cls_and_kwargs(args, model=None):
        if optim_name(args) in registered_names():
            return optimizer_cls_and_kwargs(args)
        return original_get(args, model)

    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)
    create_optimizer = trainer_cls.create_optimizer

    def create_optimizer_and_adopt(self, *args, **kwargs):
        # Every route passes here (optimizers=, optimizer_cls_and_kwargs, --optim): tag and card hooks.
        opt = create_optimizer(self, *args, **kwargs)
        trainer_card.adopt(self)
        return opt

    trainer_cls.create_optimizer = create_optimizer_and_adopt
    trainer_hooks.patch(trainer_cls)
    trainer_cls._hf_mousse_patched = True


_PATCHES = {
    "transformers.training_args": _patch_training_args,
    "transformers.trainer_optimizer": _add_handlers,
    "transformers.trainer": _patch_trainer,
}
_done: set[str] = set()


def _apply(module_name: str, module, *, strict: bool) -> None:
    if module_name in _done:
        return
    try:
        check_version()
        _PATCHES[module_name](module)
    except Exception as e:
        if strict:
            raise
        warnings.warn(f"hf_mousse could not patch {module_name}: {e}", stacklevel=2)
        return
    _done.add(module_name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs our patch right after a watched transformers module finishes executing."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES or fullname in _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _apply(fullname, module, strict=False)

        spec.loader.exec_module = exec_and_patch  # per-module loader instance
        return spec


def post_import_spec(fullname: str, path=None, target=None):
    """The spec of ``fullname`` with our patch attached (None if it is not watched or already patched),
    after arming the hook for the other watched modules. For ``_hf_mousse_autoregister``, which wakes up
    inside the import machinery's lookup of ``fullname``, after the point where our hook was consulted."""
    install_import_hook()
    hook = next(f for f in sys.meta_path if isinstance(f, _PostImportHook))
    return hook.find_spec(fullname, path, target)


def install_import_hook() -> None:
    """Patch already-imported transformers modules now and the others when they are imported."""
    if not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())
    for name in _PATCHES:
        if name in sys.modules:
            _apply(name, sys.modules[name], strict=False)


def register() -> None:
    """Make ``optim="mousse" | "muon" | "mimuon"`` valid in transformers (idempotent).

    Raises :class:`~hf_mousse.errors.RegistrationError` on a transformers version whose internals
    hf_mousse does not know.
    """
    check_version()
    for name in _PATCHES:  # order matters: the enum before the handler table
        module = importlib.import_module(name)
        _apply(name, module, strict=True)


