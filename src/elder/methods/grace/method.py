"""GRACE: a codebook at one layer. Each edit stores the layer's input at the last prompt token as a key, a trained
vector that replaces the layer's output at that token as the value, and a radius; an input within the nearest
key's radius gets that value, any other input runs the base model unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from elder.data import EditRecord
from elder.errors import NonFiniteLossError
from elder.forward import input_device, train_targets
from elder.methods.base import EditResult, Forgets, MethodError, TunesThreshold
from elder.methods.grace.config import GraceConfig
from elder.methods.hooked import HookedMethod, StateFormatError, Use
from elder.modules import ffn_output_path, get_module, layer_of, linear_shape
from elder.tokens import context_limit, encode_prompt, teacher_forced

BAND = 27 / 32  # EasyEdit edits layer 27 of LLaMA-7B's 32
SCALES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # radius_scale values --tune tries, strictest first: a
# radius of 1.0 was set for LLaMA-7B's activations, whose distances differ from a smaller model's


class GraceMethod(HookedMethod, TunesThreshold, Forgets):
    """GRACE: a codebook of keys, values and radii at one layer, deferring outside every radius."""

    name = "grace"
    config_class = GraceConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: GraceConfig) -> None:
        path = ffn_output_path(base, config.layer, config.module, BAND)
        super().__init__(base, tokenizer, base_name, config)
        try:
            self.path = path
            module = get_module(base, self.path)
            self.key_size, self.value_size = linear_shape(module, self.path)
            self.device = module.weight.device
            self._handle = module.register_forward_hook(self._hook)
        except BaseException:
            self._release()
            raise
        self.keys = torch.zeros(0, self.key_size, device=self.device)  # (n, d_in) fp32
        self.values = torch.zeros(0, self.value_size, device=self.device)  # (n, d_out) fp32
        self.radii = torch.zeros(0, device=self.device)  # (n,)
        self.labels: list[str] = []  # each key's target: keys of one target may share a region
        self.key_edits: list[str] = []  # the edit that made each key
        self._generator = torch.Generator().manual_seed(config.seed)
        self._call: dict | None = None  # the call the hook serves: its positions, switches and what it saw

    # --- the hook ----------------------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        call = self._call
        if call is None:
            return None
        x = args[0]
        if call["positions"] is not None:  # teacher-forced rows: each row's last prompt token
            positions = call["positions"].to(x.device)
        else:  # generation, left-padded: the prompt's last token, then each new token
            positions = torch.full((x.shape[0],), x.shape[1] - 1, device=x.device)
        rows = torch.arange(x.shape[0], device=x.device)
        query = x[rows, positions].float()
        if call.get("capture"):
            call["queries"] = query.detach()
            return None
        if "value" in call:  # training: the value replaces the key token's output on every row
            hit = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            value = call["value"].expand(x.shape[0], -1)
        elif "hit" in call and self.cfg.replacement == "all":  # a generated token of a matched input
            hit, value = call["hit"], self.values[call["index"]]
        else:
            if not call["on"] or len(self.keys) == 0:
                return None
            nearest, index = torch.cdist(query, self.keys).min(1)
            ratio = nearest / self.radii[index]
            hit = ratio <= call["scale"] if not call["forced"] else torch.ones_like(nearest, dtype=torch.bool)
            if call["first"]:  # the prompt's own forward decides what the call reports
                call.update(first=False, used=hit.tolist(), distance=nearest.tolist(), nearest=index.tolist(),
                            ratio=ratio.tolist(), hit=hit, index=index)
            value = self.values[index]
        out = output.clone()
        if self.cfg.replacement == "all":  # every position from the first on (padding included: it is masked)
            out = torch.where(hit[:, None, None], value[:, None, :].to(output.dtype), output)
        else:
            out[rows, positions] = torch.where(hit[:, None], value.to(output.dtype), output[rows, positions])
        return out

    @contextmanager
    def _edits(self, prompts: Sequence[str], use_edits: bool, training: bool = False, generating: bool = False,
               forced: bool = False) -> Iterator[Use]:
        use = Use(len(prompts), False)
        use.score = [float("inf")] * len(prompts)  # distance over the nearest key's radius
        limit = context_limit(self.base)
        positions = None if generating else torch.tensor(
            [len(encode_prompt(self.tokenizer, p, limit)) - 1 for p in prompts])
        self._call = {"on": use_edits, "positions": positions, "first": True, "scale": self.cfg.radius_scale,
                      "forced": forced}
        try:
            yield use
        finally:
            call, self._call = self._call, None
        if "used" in call:
            use.used, use.distance = call["used"], call["distance"]
            use.edit_ids = [self.key_edits[i][-1] if u else None for u, i in zip(call["used"], call["nearest"])]
            use.score = call["ratio"]

    # --- editing ------------------------------------------------------------------------------------

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Each edit in turn: place its key by the codebook rules, then train the value it maps to."""
        self._check_new(records)
        return [self._edit_one(record) for record in records]

    def _edit_one(self, record: EditRecord) -> EditResult:
        start = time.perf_counter()
        prompts = [record.prompt, *record.rephrases]
        batch = teacher_forced(self.tokenizer, prompts, [record.target] * len(prompts), context_limit(self.base),
                               self.cfg.max_target_tokens, input_device(self.base))
        with self._edits(prompts, True):
            self._call["capture"] = True
            with torch.no_grad():
                self.base(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1], use_cache=False)
            query = self._call["queries"][0]
        index = self._place(query, record)
        value = nn.Parameter(self.values[index].clone())
        with self._edits(prompts, True), torch.enable_grad():
            self._call["value"] = value
            try:
                steps, learned = train_targets(self.base, batch, [value], self.cfg.lr, self.cfg.steps,
                                               self.cfg.stop_loss, first_layer=layer_of(self.base, self.path))
            except NonFiniteLossError:
                self._unplace(index, record.id)
                raise
        with torch.no_grad():
            self.values[index] = value.detach()
        self.records[record.id] = record.to_dict()
        return EditResult(record.id, time.perf_counter() - start, steps, learned)

    def _place(self, query: torch.Tensor, record: EditRecord) -> int:
        """The codebook rules of the paper: a new key when no key is near, or when the near key's target differs
        (both radii then split the distance); the near key's radius grown to cover the query when it is the
        same target."""
        if len(self.keys):
            distance, nearest = torch.cdist(query[None], self.keys)[0].min(0)
            d, i = distance.item(), nearest.item()
            if d <= self.cfg.radius + self.radii[i].item():
                if self.labels[i] == record.target:
                    if d > self.radii[i].item():
                        if self.cfg.expansion == "moving_average":
                            self.keys[i] = (self.keys[i] + query) / 2
                        self.radii[i] = d
                    self.key_edits[i].append(record.id)
                    return i
                self.radii[i] = d / 2 - 1e-5
                return self._add(query, record, d / 2)
        return self._add(query, record, self.cfg.radius)

    def _add(self, query: torch.Tensor, record: EditRecord, radius: float) -> int:
        value = torch.rand(1, self.value_size, generator=self._generator).to(self.device)  # the paper's cold init
        self.keys = torch.cat([self.keys, query[None].float()])
        self.values = torch.cat([self.values, value])
        self.radii = torch.cat([self.radii, torch.tensor([radius], device=self.device)])
        self.labels.append(record.target)
        self.key_edits.append([record.id])
        return len(self.keys) - 1

    def _unplace(self, index: int, edit_id: str) -> None:
        if self.key_edits[index] == [edit_id]:
            self._drop(index)
        elif edit_id in self.key_edits[index]:
            self.key_edits[index].remove(edit_id)

    def _drop(self, index: int) -> None:
        keep = [i for i in range(len(self.keys)) if i != index]
        self.keys, self.values, self.radii = self.keys[keep], self.values[keep], self.radii[keep]
        del self.labels[index], self.key_edits[index]

    def forget(self, edit_id: str) -> None:
        """Remove an edit; its key goes when no other edit shares it."""
        if edit_id not in self.records:
            raise MethodError(f"no edit with id {edit_id!r} is held")
        index = next(i for i, ids in enumerate(self.key_edits) if edit_id in ids)
        self._unplace(index, edit_id)
        del self.records[edit_id]

    # --- tuning -------------------------------------------------------------------------------------

    @property
    def threshold_name(self) -> str:
        """The setting --tune sets."""
        return "radius_scale"

    def threshold_sweep(self):
        """(radius_scale, predict) for each of SCALES, strictest first, from one pass with every row sent to its
        nearest key and one with none."""
        return self._sweep(SCALES, lambda ratio, scale: ratio <= scale)

    # --- state --------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "radii": self.radii}

    def _fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        if set(tensors) != {"keys", "values", "radii"}:
            return False
        n = len(tensors["radii"])
        return tensors["keys"].shape == (n, self.key_size) and tensors["values"].shape == (n, self.value_size)

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.keys, self.values, self.radii = (tensors[k].to(self.device) for k in ("keys", "values", "radii"))

    def _extra_state(self) -> dict:
        return {"labels": self.labels, "key_edits": self.key_edits}

    def _load_extra(self, extra: dict) -> None:
        labels, key_edits = extra.get("labels"), extra.get("key_edits")
        if not isinstance(labels, list) or not isinstance(key_edits, list) or not \
                len(labels) == len(key_edits) == len(self.keys):
            raise StateFormatError("the GRACE codebook's labels do not match its keys")
        self.labels, self.key_edits = labels, [list(ids) for ids in key_edits]

    def close(self) -> nn.Module:
        """Take the hook out and give back the base model."""
        self._handle.remove()
        return self._release()
