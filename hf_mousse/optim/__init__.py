"""Pure-PyTorch optimizers: Muon, Mousse, MiMuon. Imports nothing from transformers."""

from .base import SpectralOptimizer
from .mimuon import MiMuon
from .mousse import Mousse
from .muon import Muon
from .orthogonalize import NS_COEFFICIENTS, newton_schulz
from .roles import param_groups

__all__ = [
    "MiMuon", "Mousse", "Muon", "NS_COEFFICIENTS", "SpectralOptimizer", "newton_schulz", "param_groups",
]
