"""elder: lifelong knowledge editing of causal language models, with ELDER (Li et al., AAAI 2025) and the field's
other lifelong editors behind one contract."""

from elder.data import DataError, EditRecord, LocalityProbe, read_edits, write_edits
from elder.errors import ElderError
from elder.methods import Answer, EditingMethod, EditResult, MethodError, get_method, method_of_folder, registered
from elder.methods.elder import (
                           ElderConfig,
                           ElderModel,
                           MemoryFormatError,
                           NonFiniteLossError,
                           apply_edits,
                           forget,
                           load_memory,
                           save_memory,
)
from elder.models import ModelLoadError, load_base
from elder.settings import ConfigError
from elder.tokens import InputError

__all__ = [
    "Answer", "ConfigError", "DataError", "EditRecord", "EditResult", "EditingMethod", "ElderConfig", "ElderError",
    "ElderModel", "InputError", "LocalityProbe", "MemoryFormatError", "MethodError", "ModelLoadError",
    "NonFiniteLossError", "apply_edits", "forget", "get_method", "load_base", "load_memory", "method_of_folder",
    "read_edits", "registered", "save_memory", "write_edits",
]
