"""MEMOIR: a residual memory W (zero at the start) beside one FFN output layer, whose output becomes
layer(x) + (mask ⊙ x) W. A prompt's mask is TopHash of its activation: the k largest features (by magnitude) of the
layer's input averaged over the prompt's tokens, moved by a fixed random permutation, so that each edit writes its
own rows of W and edits overlap little. An edit trains W through its own mask; at inference a prompt reads W
through its own mask when that mask shares at least `threshold` of its features with a stored edit's mask, and
otherwise runs the base model unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from elder.data import EditRecord
from elder.forward import input_device, train_targets
from elder.methods.base import EditResult, Forgets, MethodError, TunesThreshold
from elder.methods.hooked import HookedMethod, StateFormatError, Use
from elder.methods.memoir.config import ACTIVE_FRACTION, MemoirConfig
from elder.modules import ffn_output_path, get_module, layer_of, linear_shape
from elder.neutral import CENTERING_TEXT
from elder.settings import ConfigError
from elder.tokens import context_limit, encode_prompt, pad_id, pad_rows, teacher_forced

BAND = 27 / 32  # the FFN output layer the paper's EasyEdit-based code edits in LLaMA-3-8B (27 of 32)
THRESHOLDS = tuple(round(1.0 - 0.05 * i, 2) for i in range(20))  # --tune tries these, strictest first


class MemoirMethod(HookedMethod, TunesThreshold, Forgets):
    """MEMOIR: one residual memory written and read through sparse, sample-dependent masks."""

    name = "memoir"
    config_class = MemoirConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: MemoirConfig) -> None:
        path = ffn_output_path(base, config.layer, config.module, BAND)
        super().__init__(base, tokenizer, base_name, config)
        try:
            self.path = path
            module = get_module(base, path)
            self.in_size, self.out_size = linear_shape(module, path)
            self.active = config.active or max(1, round(ACTIVE_FRACTION * self.in_size))
            if self.active > self.in_size:
                raise ConfigError(f"active ({self.active}) exceeds the {self.in_size} input features of {path}")
            self.device = module.weight.device
            self._handle = module.register_forward_hook(self._hook)
        except BaseException:
            self._release()
            raise
        generator = torch.Generator().manual_seed(config.seed)
        self.permutation = torch.randperm(self.in_size, generator=generator).to(self.device)
        self.memory = torch.zeros(self.in_size, self.out_size, device=self.device)  # (d_in, d_out) fp32
        self.masks = torch.zeros(0, self.in_size, dtype=torch.bool, device=self.device)  # one per stored edit
        self.mask_edits: list[str] = []  # the edit of each stored mask
        self._call: dict | None = None  # the call the hook serves: its prompts' lengths, switches, what it saw
        self.background = torch.zeros(self.in_size, device=self.device)
        self.background = self._background()

    # --- the hook ----------------------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        call = self._call
        if call is None:
            return None
        x = args[0]
        if "mask" not in call:  # the call's first forward holds every prompt token: it decides for the call
            call["mask"] = self._tophash(x, call["lengths"], call["generating"])
            call["used"], call["overlap"], call["nearest"] = self._match(call)
        used = call["used"]
        if not bool(used.any()):
            return None
        memory = call.get("memory", self.memory)
        mask = call["mask"] & used[:, None]
        residual = (x.float() * mask[:, None, :]) @ memory
        return output + residual.to(output.dtype)

    def _tophash(self, x: torch.Tensor, lengths: torch.Tensor, left_padded: bool) -> torch.Tensor:
        """(rows, d_in) masks: the top-k features of each row's mean activation over its prompt, less the
        background (the authors' `mean_decentered`), permuted."""
        positions = torch.arange(x.shape[1], device=x.device)[None, :]
        lengths = lengths.to(x.device)[:, None]
        keep = positions >= x.shape[1] - lengths if left_padded else positions < lengths
        mean = (x.float() * keep[..., None]).sum(1) / lengths
        if self._call is not None:
            self._call["means"] = mean
        top = (mean - self.background.to(x.device)).abs().topk(self.active, dim=-1).indices
        hashed = self.permutation.to(x.device)[top]
        return torch.zeros(x.shape[0], self.in_size, dtype=torch.bool, device=x.device).scatter_(1, hashed, True)

    def _match(self, call: dict) -> tuple[torch.Tensor, list[float], list[int]]:
        """Which rows read the memory, each row's best mask overlap with a stored edit, and that edit's index."""
        rows = call["mask"].shape[0]
        if len(self.masks) == 0 or not call["on"]:
            on = torch.full((rows,), call["forced"], device=call["mask"].device)
            return on, [0.0] * rows, [-1] * rows
        shared = call["mask"].float() @ self.masks.to(call["mask"].device).float().T / self.active
        overlap, nearest = shared.max(-1)
        on = torch.ones_like(overlap, dtype=torch.bool) if call["forced"] else overlap >= self.cfg.threshold
        return on, overlap.tolist(), nearest.tolist()

    @torch.no_grad()
    def _background(self) -> torch.Tensor:
        """The layer's mean input over neutral text (the project's, as the authors average irrelevant samples):
        what every prompt shares, taken off before the top-k."""
        texts = list(CENTERING_TEXT)
        ids = [encode_prompt(self.tokenizer, t, context_limit(self.base)) for t in texts]
        input_ids, mask = pad_rows(ids, pad_id(self.tokenizer), left=False)
        with self._edits(texts, use_edits=False):
            self.base(input_ids=input_ids.to(input_device(self.base)), attention_mask=mask.to(input_device(self.base)),
                      use_cache=False)
            means = self._call["means"]
        return means.mean(0).to(self.device)

    @contextmanager
    def _edits(self, prompts: Sequence[str], use_edits: bool, training: bool = False, generating: bool = False,
               forced: bool = False) -> Iterator[Use]:
        use = Use(len(prompts), False)
        limit = context_limit(self.base)
        lengths = torch.tensor([len(encode_prompt(self.tokenizer, p, limit)) for p in prompts])
        self._call = {"on": use_edits or training, "forced": forced or training, "lengths": lengths,
                      "generating": generating}
        try:
            yield use
        finally:
            call, self._call = self._call, None
        if "used" in call:
            use.used = call["used"].tolist()
            use.distance = [1.0 - o for o in call["overlap"]]
            use.score = call["overlap"]
            use.edit_ids = [self.mask_edits[i] if u and i >= 0 else None for u, i in zip(use.used, call["nearest"])]
            use.mask = call["mask"]

    # --- editing ------------------------------------------------------------------------------------

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Each edit in turn: train the memory through its prompt's mask, then store the mask."""
        self._check_new(records)
        return [self._edit_one(record) for record in records]

    def _edit_one(self, record: EditRecord) -> EditResult:
        start = time.perf_counter()
        prompts = [record.prompt, *record.rephrases]
        batch = teacher_forced(self.tokenizer, prompts, [record.target] * len(prompts), context_limit(self.base),
                               self.cfg.max_target_tokens, input_device(self.base))
        memory = nn.Parameter(self.memory.clone())
        with self._edits(prompts, True, training=True) as use, torch.enable_grad():
            self._call["memory"] = memory
            # a non-finite loss raises before W is written
            steps, learned = train_targets(self.base, batch, [memory], self.cfg.lr, self.cfg.steps, self.cfg.stop_loss,
                                           first_layer=layer_of(self.base, self.path))
        with torch.no_grad():
            self.memory = memory.detach()
        self.masks = torch.cat([self.masks, use.mask[:1].to(self.masks.device)])
        self.mask_edits.append(record.id)
        self.records[record.id] = record.to_dict()
        return EditResult(record.id, time.perf_counter() - start, steps, learned)

    def forget(self, edit_id: str) -> None:
        """Remove an edit's mask, so that no prompt reads the memory through it any more (the rows of W it wrote
        stay: other edits may share them)."""
        if edit_id not in self.records:
            raise MethodError(f"no edit with id {edit_id!r} is held")
        keep = [i for i, e in enumerate(self.mask_edits) if e != edit_id]
        self.masks = self.masks[keep]
        self.mask_edits = [self.mask_edits[i] for i in keep]
        del self.records[edit_id]

    # --- tuning -------------------------------------------------------------------------------------

    @property
    def threshold_name(self) -> str:
        """The setting --tune sets."""
        return "threshold"

    def threshold_sweep(self):
        """(threshold, predict) for each of THRESHOLDS, strictest first, from one pass with every row reading the
        memory and one with none."""
        return self._sweep(THRESHOLDS, lambda overlap, threshold: overlap >= threshold)

    # --- state --------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"memory": self.memory, "masks": self.masks}

    def _fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        if set(tensors) != {"memory", "masks"}:
            return False
        masks = tensors["masks"]
        return tensors["memory"].shape == (self.in_size, self.out_size) and masks.dtype == torch.bool and \
            masks.ndim == 2 and masks.shape[1] == self.in_size and bool((masks.sum(1) == self.active).all())

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memory = tensors["memory"].float().to(self.device)
        self.masks = tensors["masks"].to(self.device)

    def _extra_state(self) -> dict:
        return {"mask_edits": self.mask_edits}

    def _load_extra(self, extra: dict) -> None:
        mask_edits = extra.get("mask_edits")
        if not isinstance(mask_edits, list) or len(mask_edits) != len(self.masks):
            raise StateFormatError("the MEMOIR masks do not match their edit ids")
        self.mask_edits = [str(e) for e in mask_edits]

    def _check_loaded(self) -> None:
        if set(self.mask_edits) != set(self.records):
            raise StateFormatError("the MEMOIR masks and the edit log name different edits")

    def close(self) -> nn.Module:
        """Take the hook out and give back the base model."""
        self._handle.remove()
        return self._release()
