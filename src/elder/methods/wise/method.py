"""WISE: side memories beside one FFN output linear W. A side memory is a copy of W with some entries changed (kept
here as its change D from W, so the side output is the main output plus x D); the main memory, W itself, is never
changed. Edits are written into knowledge shards: each shard may change only the entries of its own random mask
(density `mask_ratio`), and every `merge_edits` edits the shards written since the last merge are TIES-merged into
one side memory (WISE-Retrieve: the merged memories are kept side by side). A prompt's activation score for a side
memory is the mean over its tokens of ||act(x W + x D) - act(x W)||, act being the model's FFN activation; the
prompt reads the side memory whose score is highest against that memory's floor (the lowest score an edit of it had
when written) when the score reaches `act_ratio` times the floor, and otherwise runs the base model unchanged.

Training an edit (SGD, one edit at a time): the target's cross-entropy after the prompt and after the prompt behind
each context template, plus the authors' margin loss on activation scores: irrelevant text (one of the project's
neutral sentences) below alpha, the edit's rows above beta, and the edit's rows above the irrelevant text by gamma.

Departures from the authors' code, each for a reason: the route is decided once per call from the prompt's tokens
(theirs: each forward decides from all the tokens it sees, a teacher-forced target included) and per row of a batch
(theirs: per batch); a floor is the edit prompt's score (theirs: the mean over all the edit's rows and tokens), so
that it is measured as a prompt is routed; the context templates are written greedily (theirs: sampled); the
layers below the side memory run once per edit, not once per step (the same loss, faster)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from elder.data import EditRecord
from elder.errors import NonFiniteLossError
from elder.forward import head_logits, input_device
from elder.methods.base import EditResult, TunesThreshold
from elder.methods.hooked import HookedMethod, StateFormatError, Use
from elder.methods.wise.config import WiseConfig
from elder.modules import decoder_layers_path, ffn_output_path, get_module, layers_below, linear_shape, replaying
from elder.neutral import CENTERING_TEXT
from elder.settings import ConfigError
from elder.tokens import context_limit, encode_prompt, pad_id, prompt_batch, teacher_forced

BAND = 27 / 32  # the FFN output layer EasyEdit's WISE hparams edit in LLaMA-2-7B (27 of 32)
STARTERS = ("The", "Therefore", "Because", "I", "You")  # the authors' (and ROME's) context-template starts
TEMPLATE_TOKENS = (5, 10)  # tokens written after each start: five templates of each length
RATIOS = (2.0, 1.5, 1.25, 1.1, 1.0, 0.95, 0.9, 0.88, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


class WiseMethod(HookedMethod, TunesThreshold):
    """WISE (Wang et al., NeurIPS 2024): side memories routed by activation score, written in shards and merged."""

    name = "wise"
    config_class = WiseConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: WiseConfig) -> None:
        path = ffn_output_path(base, config.layer, config.module, BAND)
        super().__init__(base, tokenizer, base_name, config)
        try:
            self.path, self.layers_path = path, decoder_layers_path(base)
            self.layer = int(path[len(self.layers_path) + 1:].split(".", 1)[0])
            module = get_module(base, path)
            self.in_size, self.out_size = linear_shape(module, path)
            activation = getattr(base.config, "hidden_act", None) or getattr(base.config, "activation_function", None)
            if activation not in ACT2FN:
                raise ConfigError(f"cannot tell the FFN activation of {type(base).__name__} (got {activation!r})")
            self.act = ACT2FN[activation]
            self.device = module.weight.device
            self._handle = module.register_forward_hook(self._hook)
        except BaseException:
            self._release()
            raise
        self.memories = torch.zeros(0, self.in_size, self.out_size, device=self.device)  # side memories' changes
        self.floors: list[float] = []  # per memory: the lowest score an edit of it had when written
        self.sizes: list[int] = []  # per memory: the edits it holds
        self.merged: list[bool] = []  # per memory: a TIES merge of shards (else one shard)
        self.shards_opened = 0  # shards ever opened (numbers their gradient masks)
        self.templates: list[str] | None = None  # the context templates' prefixes, written at the first edit
        self._call: dict | None = None  # the call the hook serves

    # --- the hook ----------------------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        call = self._call
        if call is None:
            return None
        x, out = args[0].float(), output.float()
        if "train" in call:  # every row through the shard being trained; its scores kept for the margin loss
            new = out + x @ call["train"]
            call["scores"] = _mean(self._score(new, out), call["tokens"].to(x.device))
            return new.to(output.dtype)
        if "choice" not in call:  # the call's first forward holds every prompt token: it decides for the call
            self._decide(call, x, out)
        choice = call["choice"]
        if not bool((choice >= 0).any()):
            return None
        memories = call["memories"].to(x.device)
        new = out.clone()
        for m in choice[choice >= 0].unique().tolist():
            rows = (choice == m).nonzero().squeeze(-1).to(x.device)
            new[rows] = out[rows] + x[rows] @ memories[m]
        return new.to(output.dtype)

    def _score(self, new: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(rows, tokens) activation scores: how far the side output moves the activated output."""
        return torch.linalg.vector_norm(self.act(new) - self.act(out), dim=-1)

    def _decide(self, call: dict, x: torch.Tensor, out: torch.Tensor) -> None:
        """Each row's side memory, from the prompt's tokens: of the memories whose score reaches act_ratio times
        their floor, the one with the highest score (the authors' rule); none (-1) when no memory's does."""
        rows, width = x.shape[:2]
        positions = torch.arange(width, device=x.device)[None, :]
        lengths = call["lengths"].to(x.device)[:, None]
        keep = positions >= width - lengths if call["generating"] else positions < lengths
        memories, floors = call["memories"].to(x.device), torch.tensor(call["floors"], device=x.device)
        if len(memories) == 0 or not call["on"]:
            call["choice"], call["scores"] = torch.full((rows,), -1, device=x.device), torch.zeros(rows, 0)
            return
        scores = torch.stack([_mean(self._score(out + x @ memory, out), keep) for memory in memories], dim=1)
        call["scores"] = scores.cpu()
        if call["forced"] is not None:
            call["choice"] = torch.full((rows,), call["forced"], device=x.device)
            return
        passing = scores >= self.cfg.act_ratio * floors
        best = torch.where(passing, scores, torch.full_like(scores, -1.0)).argmax(dim=1)
        call["choice"] = torch.where(passing.any(dim=1), best, -1)

    @contextmanager
    def _edits(self, prompts: Sequence[str], use_edits: bool, training: bool = False, generating: bool = False,
               forced: int | None = None, memories: tuple[torch.Tensor, list[float]] | None = None) -> Iterator[Use]:
        """The hook on (or off) for one call; `forced`: every row reads that side memory; `memories`: (changes,
        floors) to read instead of the held ones."""
        use = Use(len(prompts), False)
        limit = context_limit(self.base)
        lengths = torch.tensor([len(encode_prompt(self.tokenizer, p, limit)) for p in prompts])
        memories, floors = memories if memories is not None else (self.memories, self.floors)
        self._call = {"on": use_edits, "forced": forced, "lengths": lengths, "generating": generating,
                      "memories": memories, "floors": floors}
        try:
            yield use
        finally:
            call, self._call = self._call, None
        if "choice" in call:
            use.used = (call["choice"] >= 0).tolist()
            use.scores = call["scores"]  # (rows, memories) activation scores
            if forced is not None and use.scores.shape[1]:
                use.score = use.scores[:, forced].tolist()  # the forced memory's, for the sweep
            floors = torch.tensor(floors, dtype=torch.float32)
            use.distance = [float(floors[c] / use.scores[i, c]) if c >= 0 and use.scores[i, c] > 0 else float("inf")
                            for i, c in enumerate(call["choice"].tolist())]  # the read memory's floor over score

    # --- editing ------------------------------------------------------------------------------------

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """One edit at a time, as the authors write them: train the open shard on it, then merge when due."""
        return self._in_batches(records, 1, lambda batch: [self._edit_one(batch[0])])

    def _edit_one(self, record: EditRecord) -> EditResult:
        start = time.perf_counter()
        if self.templates is None:
            self.templates = self._write_templates()
        opening = not self.merged or self.merged[-1] or self.sizes[-1] >= self.cfg.shard_edits
        number = self.shards_opened if opening else self.shards_opened - 1
        shard = torch.zeros(self.in_size, self.out_size, device=self.device) if opening else self.memories[-1]
        delta, steps, learned = self._train(record, shard.clone(), self._mask(number))
        floor = self._floor(record.prompt, delta)
        with torch.no_grad():
            if opening:
                self.memories = torch.cat([self.memories, delta[None]])
                self.floors, self.sizes, self.merged = [*self.floors, floor], [*self.sizes, 1], [*self.merged, False]
                self.shards_opened += 1
            else:
                self.memories[-1] = delta
                self.floors[-1], self.sizes[-1] = min(self.floors[-1], floor), self.sizes[-1] + 1
        self.records[record.id] = record.to_dict()
        if len(self.records) % self.cfg.merge_edits == 0:
            self._merge()
        return EditResult(record.id, time.perf_counter() - start, steps, learned)

    def _mask(self, number: int) -> torch.Tensor:
        """Shard `number`'s gradient mask: each entry of the side weight with probability mask_ratio."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + number)
        return (torch.rand(self.in_size, self.out_size, generator=generator) < self.cfg.mask_ratio).to(self.device)

    def _train(self, record: EditRecord, start: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        """SGD on the shard's change through its mask; returns the change, the steps taken and whether every
        target token of the edit's rows is then the argmax."""
        cfg = self.cfg
        prompts = [prefix + p for prefix in ["", *self.templates] for p in (record.prompt, *record.rephrases)]
        neutral = CENTERING_TEXT[len(self.records) % len(CENTERING_TEXT)]
        cut = neutral.rindex(" ")  # the irrelevant row is teacher-forced too; its target is not trained
        device = input_device(self.base)
        batch = teacher_forced(self.tokenizer, [*prompts, neutral[:cut]],
                               [record.target] * len(prompts) + [neutral[cut:]], context_limit(self.base),
                               cfg.max_target_tokens, device)
        trained = batch.rows < len(prompts)
        rows, cols, targets = batch.rows[trained], batch.cols[trained], batch.target_ids[trained]
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        below = layers_below(self.base, self.layers_path, self.layer,
                             lambda: self.base.base_model(**kwargs)) if self.layer > 0 else None
        delta = nn.Parameter(start)
        optimizer = torch.optim.SGD([delta], lr=cfg.lr, weight_decay=cfg.weight_decay)
        alpha, beta, gamma = cfg.alpha, cfg.beta, cfg.gamma
        last = previous = float("inf")

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            self._call = {"train": delta, "tokens": batch.attention_mask.bool()}
            try:
                with replaying(self.base, self.layers_path, self.layer, below) if below is not None else nullcontext():
                    hidden = self.base.base_model(**kwargs).last_hidden_state
            finally:
                call, self._call = self._call, None
            logits = head_logits(self.base, hidden, rows, cols).float()
            return logits, call["scores"]

        taken = 0
        with torch.enable_grad():
            for taken in range(1, cfg.steps + 1):
                if abs(last - previous) <= 1e-4 and last <= 0.02:  # the authors' early stop
                    taken -= 1
                    break
                logits, scores = forward()
                inside, outside = scores[:len(prompts)], scores[len(prompts):]
                loss = F.cross_entropy(logits, targets.to(logits.device)) + _hinge(
                    outside[:, None] - inside[None, :] + gamma) + _hinge(outside - alpha) + _hinge(beta - inside)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"the training loss is {loss.item()} at step {taken}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                delta.grad *= mask
                optimizer.step()
                with torch.no_grad():
                    delta.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
                previous, last = last, loss.item()
        with torch.no_grad():
            logits, _ = forward()
        return delta.detach(), taken, bool((logits.argmax(-1) == targets.to(logits.device)).all())

    @torch.no_grad()
    def _floor(self, prompt: str, delta: torch.Tensor) -> float:
        """The edit prompt's activation score under the shard just trained."""
        with self._edits([prompt], True, forced=0, memories=(delta[None], [1.0])) as use:
            ids, mask = prompt_batch(self.tokenizer, [prompt], context_limit(self.base), input_device(self.base))
            self.base(input_ids=ids, attention_mask=mask, use_cache=False)
        return max(float(use.scores[0, 0]), 1e-6)  # a shard that moves nothing still gets a positive floor

    @torch.no_grad()
    def _merge(self) -> None:
        """TIES-merge the shards written since the last merge into one side memory: keep each shard's `density`
        largest changes, elect each entry's sign by the summed changes, average the changes that agree with it."""
        count = self.cfg.merge_edits // self.cfg.shard_edits
        shards = self.memories[-count:].flatten(1)
        keep = max(1, int(self.cfg.density * shards.shape[1]))
        cut = shards.abs().kthvalue(shards.shape[1] - keep + 1, dim=1, keepdim=True).values
        trimmed = torch.where(shards.abs() >= cut, shards, torch.zeros_like(shards))
        agree = (torch.sign(trimmed) == torch.sign(trimmed.sum(0))) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
        self.memories = torch.cat([self.memories[:-count], merged.view(1, self.in_size, self.out_size)])
        self.floors = [*self.floors[:-count], min(self.floors[-count:])]
        self.sizes = [*self.sizes[:-count], sum(self.sizes[-count:])]
        self.merged = [*self.merged[:-count], True]

    @torch.no_grad()
    def _write_templates(self) -> list[str]:
        """The context templates' prefixes: the base model's greedy continuations of the authors' starts."""
        if self.cfg.context_templates == 0:
            return []
        ids, mask = prompt_batch(self.tokenizer, list(STARTERS), context_limit(self.base), input_device(self.base))
        prefixes = []
        for tokens in TEMPLATE_TOKENS:
            out = self.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                                     num_beams=1, pad_token_id=pad_id(self.tokenizer))
            texts = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            prefixes += [f"{start}{text}".strip() + ". " for start, text in zip(STARTERS, texts, strict=True)]
        return prefixes[:self.cfg.context_templates]

    # --- tuning -------------------------------------------------------------------------------------

    @property
    def threshold_name(self) -> str:
        """The setting --tune sets."""
        return "act_ratio"

    def threshold_sweep(self):
        """(act_ratio, predict) for each of RATIOS, strictest first, each `predict` scoring as the method would with
        that act_ratio: from one pass per side memory with every row reading it (each giving the rows' scores for
        that memory) and one pass with none."""
        floors = torch.tensor(self.floors)

        def choose(scores: list[float], ratio: float) -> int | None:
            row = torch.tensor(scores)
            passing = row >= ratio * floors  # as _decide compares, in fp32
            return int(torch.where(passing, row, torch.full_like(row, -1.0)).argmax()) if bool(passing.any()) else None

        return self._sweep_passes(RATIOS, range(len(self.floors)), choose)

    # --- state --------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"memories": self.memories}

    def _fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        memories = tensors.get("memories")
        return set(tensors) == {"memories"} and memories.ndim == 3 and \
            tuple(memories.shape[1:]) == (self.in_size, self.out_size)

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memories = tensors["memories"].float().to(self.device)

    def _extra_state(self) -> dict:
        return {"floors": self.floors, "sizes": self.sizes, "merged": self.merged,
                "shards_opened": self.shards_opened, "templates": self.templates}

    def _load_extra(self, extra: dict) -> None:
        try:
            self.floors = [float(v) for v in extra["floors"]]
            self.sizes = [int(v) for v in extra["sizes"]]
            self.merged = [bool(v) for v in extra["merged"]]
            self.shards_opened = int(extra["shards_opened"])
            templates = extra["templates"]
        except (KeyError, TypeError, ValueError):
            raise StateFormatError("the WISE state lacks its memories' floors, sizes or merge marks") from None
        if templates is not None and not (isinstance(templates, list) and all(isinstance(t, str) for t in templates)):
            raise StateFormatError("the WISE context templates are not a list of strings")
        self.templates = templates

    def _check_loaded(self) -> None:
        count = len(self.memories)
        if not len(self.floors) == len(self.sizes) == len(self.merged) == count:
            raise StateFormatError(f"the WISE state has {count} side memories but {len(self.floors)} floors, "
                                   f"{len(self.sizes)} sizes and {len(self.merged)} merge marks")
        if sum(self.sizes) != len(self.records) or any(f <= 0 for f in self.floors):
            raise StateFormatError("the WISE side memories disagree with the edit log")

    def close(self) -> nn.Module:
        """Take the hook out and give back the base model."""
        self._handle.remove()
        return self._release()


def _mean(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(rows,) mean of (rows, tokens) scores over the kept tokens."""
    keep = keep.to(scores.dtype)
    return (scores * keep).sum(1) / keep.sum(1).clamp_min(1)


def _hinge(values: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries (0 when none is): the authors' margin terms."""
    positive = values[values > 0]
    return positive.mean() if len(positive) else values.new_zeros(())
