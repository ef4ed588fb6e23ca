"""Finding and hooking a model's modules by path: shared by every editing method (the role of ROME's nethook)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from elder.settings import ConfigError


def num_hidden_layers(model: nn.Module) -> int:
    """Depth of the decoder, read from the model's config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"cannot tell the number of layers of {type(model).__name__} from its config")


def decoder_layers_path(model: nn.Module) -> str:
    """Path of the ModuleList holding the decoder blocks (the one as long as the config's layer count)."""
    depth = num_hidden_layers(model)
    found = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == depth]
    if not found:
        raise ConfigError(f"no list of {depth} decoder layers found in {type(model).__name__}; give module_paths")
    return min(found, key=len)


def layer_of(model: nn.Module, path: str) -> int:
    """The decoder layer a module path lies in (`model.layers.7.mlp.down_proj` -> 7)."""
    layers = decoder_layers_path(model)
    if not path.startswith(layers + "."):
        raise ConfigError(f"module {path!r} is not inside a decoder layer of {layers!r}")
    return int(path[len(layers) + 1:].split(".")[0])


def linear_shape(module: nn.Module, path: str) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise ConfigError(f"module {path!r} is a {type(module).__name__}, not a linear layer a method can adapt")


def get_module(model: nn.Module, path: str) -> nn.Module:
    """model.get_submodule with an error that names the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"the model has no module {path!r}") from None


def device_of(module: nn.Module) -> torch.device:
    """Where a module's parameters live (the CPU for one with none)."""
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


class StopForward(Exception):
    """Raised from a hook once what it needed is captured: the rest of that forward is not needed."""


class Replay(nn.Module):
    """Stands in for frozen layers and returns their cached output."""

    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs) -> object:
        return self.output


def layers_below(model: nn.Module, layers_path: str, count: int, run: Callable[[], object]) -> object:
    """What decoder layer `count - 1` returns while `run()` (a forward of the model) runs; the forward stops there,
    so the layers above it never run. Training steps that change nothing below layer `count` run these layers once
    and `replaying` their output."""
    captured = {}

    def capture(module: nn.Module, args: tuple, output: object) -> None:
        captured["output"] = output
        raise StopForward

    handle = get_module(model, f"{layers_path}.{count - 1}").register_forward_hook(capture)
    try:
        with torch.no_grad():
            run()
    except StopForward:
        pass
    finally:
        handle.remove()
    if "output" not in captured:
        raise RuntimeError(f"decoder layer {count - 1} did not run")
    return captured["output"]


@contextmanager
def replaying(model: nn.Module, layers_path: str, count: int, output: object) -> Iterator[None]:
    """Within this block, decoder layers 0 .. count-1 return `output` (from `layers_below`) instead of running."""
    layers = get_module(model, layers_path)
    originals = [layers[i] for i in range(count)]
    replay = Replay(output)
    for i in range(count):
        layers[i] = replay
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def block_suffix(model: nn.Module, layers: str, candidates: tuple[str, ...], setting: str) -> str:
    """The first of `candidates` (paths inside a decoder block) that the model's first block has."""
    block = model.get_submodule(f"{layers}.0")
    for suffix in candidates:
        try:
            block.get_submodule(suffix)
            return suffix
        except AttributeError:
            continue
    raise ConfigError(f"no {' or '.join(candidates)} in {type(block).__name__}; set {setting}")


def block_module(model: nn.Module, layers: str, layer: int, suffix: str | None, candidates: tuple[str, ...],
                 setting: str = "module") -> str:
    """Path of a linear module inside decoder block `layer`: `suffix`, or the first of `candidates` there."""
    path = f"{layers}.{layer}.{suffix or block_suffix(model, layers, candidates, setting)}"
    linear_shape(get_module(model, path), path)
    return path


FFN_OUTPUTS = ("mlp.down_proj", "mlp.c_proj")  # the FFN's output linear in LLaMA-shaped and GPT-2-shaped blocks


def ffn_output_path(model: nn.Module, layer: int | None, suffix: str | None, band: float) -> str:
    """The FFN output linear of decoder block `layer` (None: the block at `band` of the depth, within range)."""
    depth = num_hidden_layers(model)
    layer = layer if layer is not None else min(depth - 1, round(band * depth))
    if layer >= depth:
        raise ConfigError(f"layer {layer} lies outside a model of {depth} layers")
    return block_module(model, decoder_layers_path(model), layer, suffix, FFN_OUTPUTS)
