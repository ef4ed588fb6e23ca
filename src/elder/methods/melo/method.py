"""MELO: dynamic LoRA. Each batch of edits trains a LoRA block of its own (rank `rank`) on a few FFN input linears;
a vector database keeps each edit's key (the input of the same linear one block below, at the last prompt token)
with a radius and the block its batch trained. A prompt whose key falls within the nearest stored key's radius runs
with that block; any other runs the base model unchanged. Keys are placed by GRACE's rules, as the authors' code
does: a key near another block's key splits the distance between their radii."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from elder.data import EditRecord
from elder.errors import NonFiniteLossError
from elder.forward import input_device, train_targets
from elder.methods.base import EditResult, Forgets, MethodError, TunesThreshold
from elder.methods.hooked import HookedMethod, StateFormatError, Use
from elder.methods.melo.config import MeloConfig
from elder.modules import block_module, decoder_layers_path, get_module, layer_of, linear_shape, num_hidden_layers
from elder.settings import ConfigError
from elder.tokens import context_limit, encode_prompt, teacher_forced

BAND = 36 / 48  # the authors' GPT2-XL blocks 36 and 37 of 48
FFN_INPUTS = ("mlp.up_proj", "mlp.c_fc")  # the FFN's input linear in LLaMA-shaped and GPT-2-shaped blocks
SCALES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # radius_scale values --tune tries, strictest first


class MeloMethod(HookedMethod, TunesThreshold, Forgets):
    """MELO: LoRA blocks found through a database of edit keys with radii."""

    name = "melo"
    config_class = MeloConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: MeloConfig) -> None:
        depth, layers = num_hidden_layers(base), decoder_layers_path(base)
        first = config.first_layer if config.first_layer is not None else \
            min(depth - config.num_layers, max(1, round(BAND * depth)))
        if first < 1 or first + config.num_layers > depth:
            raise ConfigError(f"layers {first}..{first + config.num_layers - 1} (and the key layer below) lie "
                              f"outside a model of {depth} layers")
        self.paths = [block_module(base, layers, i, config.module, FFN_INPUTS)
                      for i in range(first, first + config.num_layers)]
        self.key_path = block_module(base, layers, first - 1, config.module, FFN_INPUTS)
        super().__init__(base, tokenizer, base_name, config)
        self._handles = []
        try:
            self.shapes = [linear_shape(get_module(base, p), p) for p in self.paths]
            self.devices = [get_module(base, p).weight.device for p in self.paths]
            key_module = get_module(base, self.key_path)
            self.key_size = linear_shape(key_module, self.key_path)[0]
            self.key_device = key_module.weight.device
            self._handles.append(key_module.register_forward_hook(self._read_key))
            for index, path in enumerate(self.paths):
                self._handles.append(get_module(base, path).register_forward_hook(self._adapter(index)))
        except BaseException:
            self.close()
            raise
        self.A: list[list[torch.Tensor]] = [[] for _ in self.paths]  # per module, per block: (rank, d_in)
        self.B: list[list[torch.Tensor]] = [[] for _ in self.paths]  # per module, per block: (d_out, rank)
        self.keys = torch.zeros(0, self.key_size, device=self.key_device)  # (n, d_key) fp32
        self.radii = torch.zeros(0, device=self.key_device)
        self.key_blocks: list[int] = []  # the block each key opens
        self.key_edits: list[str] = []  # the edit that made each key
        self._call: dict | None = None

    # --- the hooks ----------------------------------------------------------------------------------

    def _read_key(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        call = self._call
        if call is None or "blocks" in call:  # decided on the call's first forward, kept for every generated token
            return
        x = args[0]
        lengths = call["lengths"].to(x.device)
        positions = torch.full_like(lengths, x.shape[1] - 1) if call["generating"] else lengths - 1
        query = x[torch.arange(x.shape[0], device=x.device), positions].float()
        call["queries"] = query.detach()
        rows = x.shape[0]
        if call["train_block"] is not None:
            call["blocks"] = torch.full((rows,), call["train_block"], dtype=torch.long)
            return
        call["blocks"] = torch.full((rows,), -1, dtype=torch.long)
        if not call["on"] or len(self.keys) == 0:
            return
        distance, nearest = torch.cdist(query, self.keys.to(query.device)).min(1)
        ratio = distance / self.radii.to(query.device)[nearest]
        hit = torch.ones_like(ratio, dtype=torch.bool) if call["forced"] else ratio <= self.cfg.radius_scale
        blocks = torch.tensor(self.key_blocks, dtype=torch.long)[nearest.cpu()]
        call["blocks"] = torch.where(hit.cpu(), blocks, -1)
        call.update(used=hit.tolist(), distance=distance.tolist(), nearest=nearest.tolist(), ratio=ratio.tolist())

    def _adapter(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            call = self._call
            if call is None or "blocks" not in call or not bool((call["blocks"] >= 0).any()):
                return None
            rows = (call["blocks"] >= 0).nonzero()[:, 0]
            picked = call["blocks"][rows].tolist()
            a = torch.stack([self.A[index][b] for b in picked])  # (m, rank, d_in)
            b = torch.stack([self.B[index][b] for b in picked])  # (m, d_out, rank)
            x = args[0][rows.to(output.device)].float()
            delta = torch.einsum("mtr,mor->mto", torch.einsum("mtd,mrd->mtr", x, a), b) * self.scale
            out = output.clone()
            out[rows.to(output.device)] += delta.to(output.dtype)
            return out
        return hook

    @property
    def scale(self) -> float:
        return self.cfg.alpha / self.cfg.rank

    @contextmanager
    def _edits(self, prompts: Sequence[str], use_edits: bool, training: bool = False, generating: bool = False,
               forced: bool = False, train_block: int | None = None) -> Iterator[Use]:
        use = Use(len(prompts), False)
        use.score = [float("inf")] * len(prompts)  # distance over the nearest key's radius
        limit = context_limit(self.base)
        lengths = torch.tensor([len(encode_prompt(self.tokenizer, p, limit)) for p in prompts])
        self._call = {"on": use_edits, "forced": forced, "lengths": lengths, "generating": generating,
                      "train_block": train_block}
        try:
            yield use
        finally:
            call, self._call = self._call, None
        use.queries = call.get("queries")
        if "used" in call:
            use.used, use.distance, use.score = call["used"], call["distance"], call["ratio"]
            use.edit_ids = [self.key_edits[i] if u else None for u, i in zip(call["used"], call["nearest"])]

    # --- editing ------------------------------------------------------------------------------------

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Each batch of `batch_size` edits trains a fresh block; then their keys are placed."""
        return self._in_batches(records, self.cfg.batch_size, self._edit_batch)

    def _edit_batch(self, records: list[EditRecord]) -> list[EditResult]:
        start = time.perf_counter()
        prompts = [p for r in records for p in (r.prompt, *r.rephrases)]
        targets = [r.target for r in records for _ in (r.prompt, *r.rephrases)]
        own_rows, row = [], 0
        for r in records:
            own_rows.append(row)
            row += 1 + len(r.rephrases)
        batch = teacher_forced(self.tokenizer, prompts, targets, context_limit(self.base), self.cfg.max_target_tokens,
                               input_device(self.base))
        block = len(self.A[0])
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + block)
        params = []
        for index, ((d_in, d_out), device) in enumerate(zip(self.shapes, self.devices)):
            bound = 1 / math.sqrt(d_in)  # LoRA's A init: kaiming-uniform with a = sqrt(5)
            a = nn.Parameter((torch.rand(self.cfg.rank, d_in, generator=generator) * 2 - 1).mul_(bound).to(device))
            b = nn.Parameter(torch.zeros(d_out, self.cfg.rank, device=device))
            self.A[index].append(a), self.B[index].append(b)
            params += [a, b]
        try:
            with self._edits(prompts, True, train_block=block) as use, torch.enable_grad():
                steps, learned = train_targets(self.base, batch, params, self.cfg.lr, self.cfg.steps,
                                               self.cfg.stop_loss, first_layer=layer_of(self.base, self.paths[0]))
        except NonFiniteLossError:
            for index in range(len(self.paths)):
                self.A[index].pop(), self.B[index].pop()
            raise
        for index in range(len(self.paths)):
            self.A[index][block] = self.A[index][block].detach()
            self.B[index][block] = self.B[index][block].detach()
        for record, row in zip(records, own_rows):
            self._place(use.queries[row].to(self.key_device), block, record.id)
            self.records[record.id] = record.to_dict()
        seconds = (time.perf_counter() - start) / len(records)
        return [EditResult(r.id, seconds, steps, learned) for r in records]

    def _place(self, query: torch.Tensor, block: int, edit_id: str) -> None:
        """A new key with the initial radius; when it lies within reach of another block's key, both radii split
        the distance between them (GRACE's rule for keys of different values)."""
        radius = self.cfg.radius
        if len(self.keys):
            distance, nearest = torch.cdist(query[None], self.keys)[0].min(0)
            d, i = distance.item(), nearest.item()
            if d <= radius + self.radii[i].item() and self.key_blocks[i] != block:
                self.radii[i] = min(self.radii[i].item(), d / 2 - 1e-5)
                radius = max(d / 2, 1e-5)
        self.keys = torch.cat([self.keys, query[None].float()])
        self.radii = torch.cat([self.radii, torch.tensor([radius], device=self.key_device)])
        self.key_blocks.append(block)
        self.key_edits.append(edit_id)

    def forget(self, edit_id: str) -> None:
        """Remove an edit's key, so that no prompt reaches its block through it (the block stays: the other edits
        of its batch still use it)."""
        if edit_id not in self.records:
            raise MethodError(f"no edit with id {edit_id!r} is held")
        keep = [i for i, e in enumerate(self.key_edits) if e != edit_id]
        self.keys, self.radii = self.keys[keep], self.radii[keep]
        self.key_blocks = [self.key_blocks[i] for i in keep]
        self.key_edits = [self.key_edits[i] for i in keep]
        del self.records[edit_id]

    # --- tuning -------------------------------------------------------------------------------------

    @property
    def threshold_name(self) -> str:
        """The setting --tune sets."""
        return "radius_scale"

    def threshold_sweep(self):
        """(radius_scale, predict) for each of SCALES, strictest first, from one pass with every row sent to its
        nearest key's block and one with none."""
        return self._sweep(SCALES, lambda ratio, scale: ratio <= scale)

    # --- state --------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"keys": self.keys, "radii": self.radii,
                   "key_blocks": torch.tensor(self.key_blocks, dtype=torch.long)}
        for index, ((d_in, d_out), device) in enumerate(zip(self.shapes, self.devices)):
            empty_a, empty_b = torch.zeros(0, self.cfg.rank, d_in), torch.zeros(0, d_out, self.cfg.rank)
            tensors[f"A.{index}"] = torch.stack(self.A[index]) if self.A[index] else empty_a
            tensors[f"B.{index}"] = torch.stack(self.B[index]) if self.B[index] else empty_b
        return tensors

    def _fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        names = {"keys", "radii", "key_blocks"} | {f"{m}.{i}" for m in "AB" for i in range(len(self.paths))}
        if set(tensors) != names:
            return False
        n, blocks = len(tensors["radii"]), len(tensors["A.0"])
        shapes_fit = all(tensors[f"A.{i}"].shape == (blocks, self.cfg.rank, d_in) and
                         tensors[f"B.{i}"].shape == (blocks, d_out, self.cfg.rank)
                         for i, (d_in, d_out) in enumerate(self.shapes))
        key_blocks = tensors["key_blocks"]
        return shapes_fit and tensors["keys"].shape == (n, self.key_size) and key_blocks.shape == (n,) and \
            not key_blocks.is_floating_point() and bool(((key_blocks >= 0) & (key_blocks < blocks)).all())

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.keys = tensors["keys"].float().to(self.key_device)
        self.radii = tensors["radii"].float().to(self.key_device)
        self.key_blocks = tensors["key_blocks"].tolist()
        for index, device in enumerate(self.devices):
            self.A[index] = list(tensors[f"A.{index}"].float().to(device).unbind())
            self.B[index] = list(tensors[f"B.{index}"].float().to(device).unbind())

    def _extra_state(self) -> dict:
        return {"key_edits": self.key_edits}

    def _load_extra(self, extra: dict) -> None:
        key_edits = extra.get("key_edits")
        if not isinstance(key_edits, list) or len(key_edits) != len(self.keys):
            raise StateFormatError("the MELO keys do not match their edit ids")
        self.key_edits = [str(e) for e in key_edits]

    def _check_loaded(self) -> None:
        if set(self.key_edits) != set(self.records):
            raise StateFormatError("the MELO keys and the edit log name different edits")

    def close(self) -> nn.Module:
        """Take the hooks out and give back the base model."""
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
        return self._release()
