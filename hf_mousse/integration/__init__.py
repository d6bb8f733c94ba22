"""Everything that knows about transformers, accelerate and peft (the ``optim`` package does not).

Modules import transformers lazily, so ``import hf_mousse`` stays fast; see :mod:`.registry`.
Imports point one way (tests/test_architecture.py):

    training_args -> registry -> trainer_hooks -> config -> hf_mousse.optim
    model_card    -> config, checkpoint             trainer_hooks -> checkpoint -> hf_mousse.version
    registry -> trainer_card -> model_card, trainer_hooks
"""

from .checkpoint import OPTIMIZER_FILE, load_optimizer, save_optimizer
from .config import CONFIGS, NAMES, MiMuonConfig, MousseConfig, MuonConfig, SpectralConfig, parse_optim_args
from .registry import register

__all__ = ["CONFIGS", "NAMES", "OPTIMIZER_FILE", "MiMuonConfig", "MousseConfig", "MuonConfig",
           "SpectralConfig", "load_optimizer", "parse_optim_args", "register", "save_optimizer"]
