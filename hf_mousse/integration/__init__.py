"""Everything that knows about transformers, accelerate and peft (the ``optim`` package does not).

Modules import transformers lazily, so ``import hf_mousse`` stays fast; see :mod:`.registry`.
"""

from .checkpoint import OPTIMIZER_FILE, load_optimizer, save_optimizer
from .config import CONFIGS, MiMuonConfig, MousseConfig, MuonConfig, SpectralConfig, parse_optim_args
from .registry import register

__all__ = ["CONFIGS", "OPTIMIZER_FILE", "MiMuonConfig", "MousseConfig", "MuonConfig", "SpectralConfig",
           "load_optimizer", "parse_optim_args", "register", "save_optimizer"]
