"""FT-L: fine-tuning one FFN layer on each edit, the classic baseline (config.py, method.py)."""

from elder.methods.ft.config import FTConfig
from elder.methods.ft.method import FTMethod

METHOD = FTMethod

__all__ = ["METHOD", "FTConfig", "FTMethod"]
