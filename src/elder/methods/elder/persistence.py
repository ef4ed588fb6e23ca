"""Saving and loading the whole edit memory as safetensors plus JSON, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from elder.errors import ElderError
from elder.files import FolderBusyError, folder_lock, fsync_file, write_text
from elder.methods.elder.config import ElderConfig
from elder.methods.elder.model import ElderModel
from elder.modules import get_module, num_hidden_layers
from elder.settings import ConfigError

FORMAT = "elder-memory"
# 6: frozen blocks of experts (block_edits); 5: the manifest carries its own checksum; 4: subject keys of key_span tokens, read spaced; 3: subject keys
# (bank.keys); 2: int8 stored queries plus a scale per row; 1: fp16 queries
FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
MANIFEST = "memory.json"
_FINGERPRINT_VALUES = 256  # leading weights of each adapted module: enough to tell checkpoints apart


class MemoryFormatError(ElderError, ValueError):
    """A saved memory is missing, corrupt, of another format version, or made for another base model."""


def save_memory(model: ElderModel, directory: str | os.PathLike) -> Path:
    """Write the memory to a folder; a crash at any point leaves the previous save intact."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"adapters.{k}": v.detach().float().cpu().contiguous() for k, v in model.adapters.state_dict().items()}
    tensors["bank.codes"] = model.bank.codes.to(torch.uint8).contiguous()
    if model.bank.quantized_queries is not None:
        values, scales = model.bank.quantized_queries
        tensors["bank.query_values"], tensors["bank.query_scales"] = values.contiguous(), scales.contiguous()
    if model.bank.keys is not None:
        tensors["bank.keys"] = model.bank.keys.contiguous()
    preset_ids = list(model.presets)
    if preset_ids:
        tensors["presets"] = torch.stack([model.presets[i] for i in preset_ids]).contiguous()
    tensors.update({f"fingerprint.{i}": v for i, v in enumerate(_fingerprints(model))})
    handle, tmp = tempfile.mkstemp(prefix=".adapters-", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        save_file(tensors, tmp)
        fsync_file(tmp)
        digest = _sha256(Path(tmp))
        tensor_file = f"adapters-{digest[:16]}.safetensors"
        os.replace(tmp, directory / tensor_file)  # content-addressed: never overwrites what the manifest names
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "training": {"paraphrase_split": model.config.paraphrase_split, "variant": _variant(model)},
        "base": _base_identity(model),
        "tensors": {"file": tensor_file, "sha256": digest},
        "bank_ids": model.bank.ids,
        "preset_ids": preset_ids,
        "edits": model.edit_log,
    }
    manifest["checksum"] = _manifest_checksum(manifest)
    write_text(directory / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
    for stale in directory.glob("adapters-*.safetensors"):
        if stale.name != tensor_file:
            stale.unlink(missing_ok=True)
    return directory


MemoryBusyError = FolderBusyError  # another process holds the memory folder's write lock


@contextmanager
def memory_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of a memory folder (created if missing) for the block; a second writer is refused at
    once, so two runs can never both load, extend and save one memory. A folder holding memory tensors but no
    manifest (damaged, or copied in part) is refused rather than overwritten."""
    with folder_lock(directory) as folder:
        check_memory_folder(folder)
        yield folder


def check_memory_folder(directory: str | os.PathLike) -> None:
    """Refuse a folder holding memory tensors but no manifest (damaged, or copied in part)."""
    folder = Path(directory)
    if folder.is_dir() and not (folder / MANIFEST).exists() and any(folder.glob("adapters-*.safetensors")):
        raise MemoryFormatError(f"{folder} holds memory tensors but no {MANIFEST} (a damaged or partly copied "
                                "memory); it is left as it is: restore its manifest or choose another folder")


def read_manifest(directory: str | os.PathLike) -> dict:
    """The saved memory's JSON manifest, checked for format and version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MemoryFormatError(f"no saved ELDER memory in {directory} ({MANIFEST} is missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MemoryFormatError(f"{path} is corrupt: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MemoryFormatError(f"{path} is not an ELDER memory")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise MemoryFormatError(f"{path} has format version {manifest.get('format_version')}; "
                                f"this elder reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if manifest["format_version"] >= 5 and manifest.get("checksum") != _manifest_checksum(manifest):
        raise MemoryFormatError(f"{path} was changed after it was saved (its checksum does not match): a hand edit "
                                "of a setting or of the edit log would silently change or repeat edits")
    return manifest


def _manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest without its checksum, in one canonical JSON spelling."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def load_memory(directory: str | os.PathLike, base, tokenizer, base_name: str | None = None) -> ElderModel:
    """Attach a saved memory to a fresh base model; refuses a different base or a damaged file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        settings = manifest["config"]
        if manifest["format_version"] <= 3 and isinstance(settings, dict) and "key_span" not in settings:
            settings = {**settings, "key_span": 1, "key_spaced": False}  # its keys: the last token, read as it was
        config = ElderConfig.from_dict(settings)
        tensor_path = directory / manifest["tensors"]["file"]
        expected = manifest["tensors"]["sha256"]
        bank_ids, preset_ids, edits = manifest["bank_ids"], manifest["preset_ids"], manifest["edits"]
        saved_base = manifest["base"]
    except (KeyError, TypeError, ConfigError) as error:
        raise MemoryFormatError(f"{directory / MANIFEST} is incomplete or invalid: {error}") from None
    if not tensor_path.is_file():
        raise MemoryFormatError(f"{tensor_path} is missing")
    if _sha256(tensor_path) != expected:
        raise MemoryFormatError(f"{tensor_path} is corrupt or truncated (checksum mismatch)")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as error:
        raise MemoryFormatError(f"{tensor_path} cannot be read: {error}") from None
    try:
        model = ElderModel(base, tokenizer, config, base_name)
    except ConfigError as error:
        raise MemoryFormatError(f"this memory was made for base model {saved_base.get('name')!r} and does not "
                                f"fit this one: {error}") from None
    try:
        _check_base(model, saved_base, tensors)
        _check_shapes(model, tensors)
        state = {k.removeprefix("adapters."): v for k, v in tensors.items() if k.startswith("adapters.")}
        for index, adapter in enumerate(model.adapters):
            frozen = state.setdefault(f"{index}.frozen_A", adapter.frozen_A)  # before version 6: none frozen
            state.setdefault(f"{index}.frozen_B", adapter.frozen_B)
            adapter.resize_frozen(frozen.shape[0])
        model.adapters.load_state_dict(state, strict=True)
        if bank_ids:
            if "bank.query_values" in tensors:
                queries, scales = tensors["bank.query_values"], tensors["bank.query_scales"]
            else:  # format version 1: fp16 queries, quantized now
                queries, scales = tensors.get("bank.queries"), None
            keys = tensors["bank.keys"] if model.config.deferral == "subject_key" else None
            model.bank.add(bank_ids, tensors["bank.codes"].bool(), queries, scales, keys=keys)
        for i, fact_id in enumerate(preset_ids):
            model.set_preset(fact_id, tensors["presets"][i])
        model.edit_log = dict(edits)
    except MemoryFormatError:
        model.detach()  # leave the base model as it was handed in
        raise
    except (KeyError, IndexError, ValueError, RuntimeError) as error:  # a tensor missing or of the wrong shape
        model.detach()
        raise MemoryFormatError(f"{tensor_path} does not hold a consistent memory: {error!r}") from None
    except BaseException:
        model.detach()
        raise
    return model


def _check_shapes(model: ElderModel, tensors: dict) -> None:
    """The manifest's settings against what the tensors hold, naming the setting that disagrees."""
    config = model.config
    saved_layers = len({k.split(".")[1] for k in tensors if k.startswith("adapters.") and k.endswith(".lora_A")})
    checks = [("num_layers", len(model.adapters), saved_layers, "{} adapted layers")]
    if "adapters.0.lora_A" in tensors:
        experts, rank = tensors["adapters.0.lora_A"].shape[:2]
        checks += [("num_experts", config.num_experts, experts, "{} experts per layer"),
                   ("rank", config.rank, rank, "experts of rank {}")]
    if "presets" in tensors:
        checks.append(("top_k", config.top_k, tensors["presets"].shape[-1], "presets of {} experts per layer"))
    if "adapters.0.frozen_A" in tensors:
        frozen = tensors["adapters.0.frozen_A"].shape[0]
        if frozen % config.num_experts:
            raise MemoryFormatError(f"its tensors hold {frozen} frozen experts per layer, not whole blocks of "
                                    f"num_experts={config.num_experts}")
        if frozen and not config.block_edits:
            raise MemoryFormatError(f"its tensors hold {frozen // config.num_experts} frozen blocks of experts, but "
                                    "the manifest says block_edits=0")
    for name, said, held, what in checks:
        if said != held:
            raise MemoryFormatError(f"the manifest says {name}={said}, but its tensors hold {what.format(held)}")


def _variant(model: ElderModel) -> str:
    """Whether any held edit was trained on rephrases as well as on its prompt."""
    trained = model.config.paraphrase_split > 0 and any(e["record"].get("rephrases") for e in model.edit_log.values())
    return "edit+paraphrases" if trained else "edit-prompt-only"


def _base_identity(model: ElderModel) -> dict:
    cfg = model.base.config
    return {
        "name": model.base_name,
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": num_hidden_layers(model.base),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "module_paths": list(model.targets.module_paths),
        "query_path": model.targets.query_path,
        "shapes": {p: list(get_module(model.base, p).weight.shape)
                   for p in (model.targets.query_path, *model.targets.module_paths)},
    }


def _check_base(model: ElderModel, saved: dict, tensors: dict) -> None:
    current = _base_identity(model)
    for key in ("model_type", "num_hidden_layers", "vocab_size", "module_paths", "query_path", "shapes"):
        if current[key] != saved.get(key):
            raise MemoryFormatError(f"this memory was made for base model {saved.get('name')!r}, which differs "
                                    f"from {model.base_name!r} in {key}: {saved.get(key)} vs {current[key]}")
    for i, values in enumerate(_fingerprints(model)):
        stored = tensors.get(f"fingerprint.{i}")
        # loose enough for the same weights in bf16/fp16, far too tight for another checkpoint
        if stored is None or stored.shape != values.shape or not torch.allclose(stored, values, rtol=2e-2, atol=2e-3):
            raise MemoryFormatError(f"this memory was made for base model {saved.get('name')!r}; the weights of "
                                    f"{model.base_name!r} differ from it")


def _fingerprints(model: ElderModel) -> list[torch.Tensor]:
    paths = (model.targets.query_path, *model.targets.module_paths)
    return [get_module(model.base, p).weight.detach().flatten()[:_FINGERPRINT_VALUES].float().cpu() for p in paths]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
