"""WISE (Wang et al., NeurIPS 2024): side memories beside one FFN output layer, routed by activation score,
written in knowledge shards and TIES-merged (config.py, method.py)."""

from elder.methods.wise.config import WiseConfig
from elder.methods.wise.method import WiseMethod

METHOD = WiseMethod

__all__ = ["METHOD", "WiseConfig", "WiseMethod"]
