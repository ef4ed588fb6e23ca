"""The ELDER mechanism: mixture-of-LoRA layers, sequence-level routing, the code bank and deferral."""

from elder.mechanism.codebank import CodeBank
from elder.mechanism.inputs import InputError
from elder.mechanism.layer import MixtureOfLoRA
from elder.mechanism.model import Answer, ElderModel, Route

__all__ = ["Answer", "CodeBank", "ElderModel", "InputError", "MixtureOfLoRA", "Route"]
