"""ELDER (Li et al., AAAI 2025): mixture-of-LoRA experts chosen by a sequence-level router, a guided loss that
gives each edit its own experts, and deferral to the base model for inputs no edit covers.

config.py (settings and presets), layer.py (the mixture-of-LoRA layer), codebank.py (codes and subject keys of
stored edits), keys.py (subject keys), targets.py (which modules are adapted), model.py (the hooked model: routing,
deferral, generation), editing.py (the edit loop), persistence.py (save and load), method.py (the contract).
"""

from elder.methods.elder.config import PRESETS, ElderConfig
from elder.methods.elder.editing import NonFiniteLossError, apply_edits, forget
from elder.methods.elder.method import ElderMethod
from elder.methods.elder.model import ElderModel, Route
from elder.methods.elder.persistence import MemoryFormatError, load_memory, memory_lock, read_manifest, save_memory

METHOD = ElderMethod

__all__ = ["METHOD", "PRESETS", "ElderConfig", "ElderMethod", "ElderModel", "MemoryFormatError", "NonFiniteLossError",
           "Route", "apply_edits", "forget", "load_memory", "memory_lock", "read_manifest", "save_memory"]
