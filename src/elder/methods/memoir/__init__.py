"""MEMOIR (Wang et al., NeurIPS 2025): a residual memory at one FFN output layer, written through sparse
sample-dependent masks and read when a prompt's mask overlaps a stored edit's (config.py, method.py)."""

from elder.methods.memoir.config import MemoirConfig
from elder.methods.memoir.method import MemoirMethod

METHOD = MemoirMethod

__all__ = ["METHOD", "MemoirConfig", "MemoirMethod"]
