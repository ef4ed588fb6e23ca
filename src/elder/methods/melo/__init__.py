"""MELO (Yu et al., AAAI 2024): LoRA blocks indexed by a vector database of edit keys with radii
(config.py, method.py)."""

from elder.methods.melo.config import MeloConfig
from elder.methods.melo.method import MeloMethod

METHOD = MeloMethod

__all__ = ["METHOD", "MeloConfig", "MeloMethod"]
