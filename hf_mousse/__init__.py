"""hf_mousse: Mousse, Muon and MiMuon optimizers for PyTorch and the Hugging Face stack."""

from .optim import MiMuon, Mousse, Muon, param_groups

__version__ = "0.1.0"
__all__ = ["MiMuon", "Mousse", "Muon", "__version__", "param_groups"]
