"""LoRA: one ordinary low-rank adapter trained on the whole stream of edits (config.py, method.py)."""

from elder.methods.lora.config import LoRAConfig
from elder.methods.lora.method import LoRAMethod

METHOD = LoRAMethod

__all__ = ["METHOD", "LoRAConfig", "LoRAMethod"]
