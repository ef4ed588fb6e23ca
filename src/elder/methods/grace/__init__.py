"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook of keys, values and radii at one layer (config.py,
method.py)."""

from elder.methods.grace.config import GraceConfig
from elder.methods.grace.method import GraceMethod

METHOD = GraceMethod

__all__ = ["METHOD", "GraceConfig", "GraceMethod"]
