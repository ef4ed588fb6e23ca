"""elder: lifelong knowledge editing of causal language models with ELDER (Li et al., AAAI 2025)."""

from elder.config import ConfigError, ElderConfig
from elder.data import DataError, EditRecord, LocalityProbe, read_edits, write_edits
from elder.editing import EditResult, NonFiniteLossError, apply_edits, forget
from elder.mechanism import Answer, ElderModel, InputError
from elder.models import ModelLoadError, load_base
from elder.persistence import MemoryFormatError, load_memory, save_memory

__all__ = [
    "Answer", "ConfigError", "DataError", "EditRecord", "EditResult", "ElderConfig", "ElderModel", "InputError",
    "LocalityProbe", "MemoryFormatError", "ModelLoadError", "NonFiniteLossError", "apply_edits", "forget",
    "load_base", "load_memory", "read_edits", "save_memory", "write_edits",
]
