"""Pure-PyTorch optimizers: Muon, Mousse, MiMuon. Imports nothing from transformers."""

from . import state_keys
from .base import SpectralOptimizer
from .hyperparameters import HELP, constructor_defaults
from .mimuon import MiMuon
from .mousse import Mousse
from .muon import Muon
from .orthogonalize import NS_COEFFICIENTS, newton_schulz
from .roles import param_groups

__all__ = [
    "HELP", "MiMuon", "Mousse", "Muon", "NS_COEFFICIENTS", "SpectralOptimizer", "constructor_defaults",
    "newton_schulz", "param_groups", "state_keys",
]
