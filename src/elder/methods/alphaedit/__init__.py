"""AlphaEdit (Fang et al., ICLR 2025): locate-then-edit (MEMIT's closed-form update over a band of FFN output
layers) with each update projected onto the null space of preserved knowledge's keys (config.py, method.py)."""

from elder.methods.alphaedit.config import AlphaEditConfig
from elder.methods.alphaedit.method import AlphaEditMethod

METHOD = AlphaEditMethod

__all__ = ["METHOD", "AlphaEditConfig", "AlphaEditMethod"]
