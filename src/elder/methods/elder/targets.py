"""Which modules ELDER adapts and where it reads its query, resolved from the model's config and module tree."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from elder.methods.elder.config import ElderConfig
from elder.modules import block_suffix, decoder_layers_path, get_module, linear_shape, num_hidden_layers
from elder.settings import ConfigError

# Tried in order inside a decoder block when no target_module is given: the paper's choices for
# LLaMA-shaped (down_proj) and GPT-2-shaped (c_fc) blocks.
DEFAULT_TARGETS = ("mlp.down_proj", "mlp.c_fc")
# The paper's LLaMA2-7B band starts at layer 21 of 32: the upper middle of the network.
BAND_START_FRACTION = 21 / 32


@dataclass(frozen=True)
class Targets:
    """Resolved module paths: the adapted linear layers (in forward order) and the query module."""

    module_paths: tuple[str, ...]
    query_path: str
    layers_path: str  # the decoder's ModuleList
    prefix_length: int  # decoder layers before the first adapted module: frozen, so their output can be cached


def resolve_targets(model: nn.Module, config: ElderConfig) -> Targets:
    """Resolve the adapted module paths and the query module for this model and config."""
    layers = decoder_layers_path(model)
    depth = num_hidden_layers(model)
    if config.module_paths is not None:
        paths = tuple(config.module_paths)
        for path in paths:
            linear_shape(get_module(model, path), path)
        query = config.query_module or _previous_layer_path(paths[0], layers)
    else:
        suffix = config.target_module or _default_target(model, layers)
        first, count = _band(depth, config)
        paths = tuple(f"{layers}.{i}.{suffix}" for i in range(first, first + count))
        for path in paths:
            linear_shape(get_module(model, path), path)
        query = config.query_module or f"{layers}.{first - 1}.{suffix}"
    linear_shape(get_module(model, query), query)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    if len(set(paths)) != len(paths):
        raise ConfigError("module_paths lists a module twice")
    if query in paths or order[query] > min(order[p] for p in paths):
        raise ConfigError(f"query module {query!r} must come before every adapted module")
    paths = tuple(sorted(paths, key=order.__getitem__))
    return Targets(paths, query, layers, _layer_index(paths[0], layers))


def _band(depth: int, config: ElderConfig) -> tuple[int, int]:
    if config.first_layer is not None:
        first, count = config.first_layer, config.num_layers
        if first + count > depth:
            raise ConfigError(f"layers {first}..{first + count - 1} lie outside a model of {depth} layers")
        return first, count
    if depth < 2:
        raise ConfigError("ELDER needs at least 2 layers: one to read the query from and one to adapt")
    count = min(config.num_layers, depth - 1)
    first = min(max(1, round(depth * BAND_START_FRACTION)), depth - count)
    return first, count


def _default_target(model: nn.Module, layers: str) -> str:
    return block_suffix(model, layers, DEFAULT_TARGETS, "target_module")


def _layer_index(path: str, layers: str) -> int:
    head, _, rest = path.partition(f"{layers}.")
    index = rest.partition(".")[0]
    return int(index) if not head and index.isdigit() else 0  # outside the decoder list: nothing to cache


def _previous_layer_path(path: str, layers: str) -> str:
    head, _, rest = path.partition(f"{layers}.")
    index, _, suffix = rest.partition(".")
    if head or not index.isdigit() or int(index) == 0:
        raise ConfigError(f"cannot derive a query module for {path!r}; set query_module")
    return f"{layers}.{int(index) - 1}.{suffix}"
