"""retrieve: the edits kept as text; the nearest stored edit is put before a prompt that is close enough to it
(config.py, method.py)."""

from elder.methods.retrieve.config import RetrieveConfig
from elder.methods.retrieve.method import RetrieveMethod

METHOD = RetrieveMethod

__all__ = ["METHOD", "RetrieveConfig", "RetrieveMethod"]
