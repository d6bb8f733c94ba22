"""hf_mousse: Mousse, Muon and MiMuon optimizers for PyTorch and the Hugging Face stack.

``import hf_mousse`` does not import transformers; it arms a hook that registers
``optim="mousse" | "muon" | "mimuon"`` when transformers is imported (see ``register``).
"""

from .integration import (
    MiMuonConfig,
    MousseConfig,
    MuonConfig,
    load_optimizer,
    register,
    save_optimizer,
)
from .integration.registry import install_import_hook
from .optim import MiMuon, Mousse, Muon, param_groups
from .version import __version__

__all__ = ["MiMuon", "MiMuonConfig", "Mousse", "MousseConfig", "Muon", "MuonConfig",
           "MousseTrainingArguments", "__version__", "load_optimizer", "param_groups", "register",
           "save_optimizer"]

install_import_hook()


def __getattr__(name: str):
    if name == "MousseTrainingArguments":  # imports transformers, so only on first use
        from .integration.training_args import MousseTrainingArguments

        return MousseTrainingArguments
    raise AttributeError(f"module 'hf_mousse' has no attribute {name!r}")
