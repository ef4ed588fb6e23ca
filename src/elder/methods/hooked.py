"""What the methods built on a hooked base model share: scoring and answering through the base model's own
forward with the method's hooks on or off, and saving the state as one safetensors file plus a JSON manifest."""

from __future__ import annotations

import hashlib
import json
import os
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from elder.data import EditRecord
from elder.deltas import OutputDeltas
from elder.errors import ElderError, NonFiniteLossError
from elder.files import atomic_write, write_json
from elder.forward import SCORE_BATCH, greedy, input_device, scored_batches, train_targets
from elder.methods.base import Answer, EditingMethod, EditResult, MethodError, TokenPrediction
from elder.settings import MethodConfig
from elder.tokens import InputError, context_limit, target_argmax, target_logprob, teacher_forced

STATE_FILE = "state.json"
STATE_FORMAT_VERSION = 1


class StateFormatError(ElderError, ValueError):
    """A saved state is missing, corrupt, of another method or version, or made for another base model."""


class Use:
    """Which rows of a call went through the edits (filled in by the method while the call runs); `score` is the
    measure a method's deferral threshold is compared with (GRACE's distance over radius, MEMOIR's mask overlap)."""

    def __init__(self, rows: int, used: bool) -> None:
        self.used = [used] * rows
        self.distance = [float("inf")] * rows
        self.edit_ids: list[str | None] = [None] * rows
        self.score = [float("nan")] * rows


class HookedMethod(EditingMethod):
    """An editor whose edited model is the frozen base model with the method's hooks at work.

    A subclass builds its hooks in `__init__`, implements `_edits(prompts, use_edits)` (a context manager that
    switches them on for the call and yields a `Use`), `edit`, `_tensors`/`_load_tensors` (its whole trained state)
    and `close`."""

    state_file: ClassVar[str] = STATE_FILE

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: MethodConfig) -> None:
        if getattr(base, "_elder_attached", False):
            raise MethodError("this base model already carries an editor; close() it first")
        self.base, self.tokenizer, self.base_name, self.cfg = base, tokenizer, base_name, config
        self.records: dict[str, dict] = {}  # edit id -> its record, in edit order
        base.requires_grad_(False)
        base._elder_attached = True

    @classmethod
    def create(cls, base: nn.Module, tokenizer, base_name: str, settings: Mapping) -> "HookedMethod":
        """A fresh editor with no edits."""
        return cls(base, tokenizer, base_name, cls.config(settings))

    @abstractmethod
    def _edits(self, prompts: Sequence[str], use_edits: bool, training: bool = False, generating: bool = False):
        """A context manager: the method's hooks on (or off) for one call on these prompts, yielding a `Use`
        (`training`: the call trains the edits, so the hooks are on whatever is held; `generating`: the prompts
        are left-padded and answered token by token, else right-padded and teacher-forced)."""

    @abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The whole trained state as named tensors."""

    @abstractmethod
    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `_tensors()` output (shapes already checked against a fresh editor's)."""

    def _fit(self, records: Sequence[EditRecord], parameters: list[nn.Parameter], after_step=None,
             first_layer: int = 0) -> list[EditResult]:
        """Train `parameters` (with the hooks on) on each batch of edits in turn: the prompt and the rephrases a
        record carries, its target teacher-forced; a batch whose loss turns non-finite is undone and raises.
        `first_layer`: the lowest decoder layer the parameters change (the layers below are replayed)."""
        self._check_new(records)
        cfg, results = self.cfg, []
        for lo in range(0, len(records), cfg.batch_size):
            batch_records = list(records[lo:lo + cfg.batch_size])
            start = time.perf_counter()
            prompts = [p for r in batch_records for p in (r.prompt, *r.rephrases)]
            targets = [r.target for r in batch_records for _ in (r.prompt, *r.rephrases)]
            batch = teacher_forced(self.tokenizer, prompts, targets, context_limit(self.base),
                                   cfg.max_target_tokens, input_device(self.base))
            before = [p.detach().clone() for p in parameters]
            try:
                with self._training(batch_records), torch.enable_grad():
                    steps, learned = train_targets(self.base, batch, parameters, cfg.lr, cfg.steps, cfg.stop_loss,
                                                   after_step, first_layer)
            except NonFiniteLossError:
                with torch.no_grad():
                    for p, b in zip(parameters, before):
                        p.copy_(b)
                raise
            seconds = (time.perf_counter() - start) / len(batch_records)
            for r in batch_records:
                self.records[r.id] = r.to_dict()
                results.append(EditResult(r.id, seconds, steps, learned))
        return results

    def _in_batches(self, records: Sequence[EditRecord], size: int,
                    edit_batch: Callable[[list[EditRecord]], list[EditResult]]) -> list[EditResult]:
        """Check every record is new, then apply them `size` at a time with `edit_batch`, in order."""
        self._check_new(records)
        results: list[EditResult] = []
        for lo in range(0, len(records), size):
            results += edit_batch(list(records[lo:lo + size]))
        return results

    def _training(self, records: Sequence[EditRecord]):
        """The hooks as they train on these records (default: as they answer an edited prompt)."""
        return self._edits([r.prompt for r in records], use_edits=True, training=True)

    def _extra_state(self) -> dict:
        """JSON-ready state beside the tensors (default: none)."""
        return {}

    def _load_extra(self, extra: dict) -> None:
        """Restore `_extra_state()` output."""

    def _check_loaded(self) -> None:
        """Raise a StateFormatError when the restored state disagrees with itself (default: nothing to check)."""

    def _fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether saved tensors fit this editor (default: the same names and shapes as its own)."""
        expected = {k: tuple(v.shape) for k, v in self._tensors().items()}
        return set(tensors) == set(expected) and all(tuple(tensors[k].shape) == expected[k] for k in expected)

    def _check_new(self, records: Sequence[EditRecord]) -> None:
        seen = set(self.records)
        for record in records:
            if record.id in seen:
                raise MethodError(f"edit id {record.id!r} is already held (or repeated); forget it first")
            seen.add(record.id)

    # --- scoring and answering -----------------------------------------------------------------

    def predict(self, prompts: Sequence[str], targets: Sequence[str], use_edits: bool = True) -> list[TokenPrediction]:
        """Teacher-forced argmax tokens of each target, SCORE_BATCH rows per forward."""
        out = []
        for p, t in in_chunks(prompts, targets):
            with self._edits(p, use_edits) as use:
                rows = [pair for batch, logits in scored_batches(self.base, self.tokenizer, p, t)
                        for pair in target_argmax(batch, logits)]
            out += [TokenPrediction(a, b, u) for (a, b), u in zip(rows, use.used)]
        return out

    def loglikelihood(self, prompts: Sequence[str], continuations: Sequence[str], use_edits: bool = True) -> list[float]:
        """Summed log-probability of each continuation."""
        out = []
        for p, t in in_chunks(prompts, continuations):
            with self._edits(p, use_edits):
                out += [v for batch, logits in scored_batches(self.base, self.tokenizer, p, t)
                        for v in target_logprob(batch, logits)]
        return out

    def answer(self, prompts: Sequence[str], max_new_tokens: int, use_edits: bool = True) -> list[Answer]:
        """Greedy answers, SCORE_BATCH prompts per generation."""
        out = []
        for lo in range(0, len(prompts), SCORE_BATCH):
            chunk = list(prompts[lo:lo + SCORE_BATCH])
            with self._edits(chunk, use_edits, generating=True) as use:
                texts = greedy(self.base, self.tokenizer, chunk, max_new_tokens)
            out += [Answer(p, t, u, d, e) for p, t, u, d, e in zip(chunk, texts, use.used, use.distance, use.edit_ids)]
        return out

    def _sweep(self, values: Sequence[float], passes: Callable[[float, float], bool]):
        """(value, predict) for each threshold value, each `predict` scoring as the method would with it: from one
        pass with every row forced through its nearest stored edit (`_edits(..., forced=True)`, which fills
        `use.score`) and one with none; a row takes the forced prediction when `passes(score, value)`."""
        return self._sweep_passes(values, (True,), lambda scores, value: 0 if passes(scores[0], value) else None)

    def _sweep_passes(self, values: Sequence[float], forced: Sequence[object],
                      choose: Callable[[list[float], float], int | None]):
        """`_sweep` over several forced passes (`_edits(..., forced=f)` for each f of `forced`, each filling
        `use.score`): `choose(scores, value)` names the pass whose prediction a row takes with that value (its
        score in every pass given), or None for the base model's."""
        cache: dict = {}

        def rows(prompts: Sequence[str], targets: Sequence[str]):
            key = (tuple(prompts), tuple(targets))
            if key not in cache:
                predictions, scores = [[] for _ in forced], [[] for _ in forced]
                for p, t in in_chunks(prompts, targets):
                    for f, made, scored in zip(forced, predictions, scores, strict=True):
                        with self._edits(p, True, forced=f) as use:
                            made += [TokenPrediction(a, b, True) for batch, logits in
                                     scored_batches(self.base, self.tokenizer, p, t)
                                     for a, b in target_argmax(batch, logits)]
                        scored += use.score
                cache[key] = (predictions, [list(row) for row in zip(*scores)],
                              self.predict(prompts, targets, use_edits=False))
            return cache[key]

        for value in values:
            def predict(prompts: Sequence[str], targets: Sequence[str], value: float = value):
                predictions, scores, base = rows(prompts, targets)
                picks = [choose(row, value) for row in scores] if forced else [None] * len(base)
                return [predictions[k][i] if k is not None else TokenPrediction(b.predicted, b.target, False)
                        for i, (k, b) in enumerate(zip(picks, base, strict=True))]
            yield value, predict

    # --- state ---------------------------------------------------------------------------------

    @property
    def held_edits(self) -> dict[str, dict]:
        """Each held edit's record, in the order they were applied."""
        return dict(self.records)

    @property
    def settings(self) -> dict:
        """The method's whole config."""
        return self.cfg.to_dict()

    def save(self, folder: str | os.PathLike) -> None:
        """The tensors under a content-addressed name, then the manifest naming them, each written atomically:
        a crash at any point leaves the previous save whole."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                   for k, v in self._tensors().items()}  # floats as fp32; masks and indices keep their type
        blob = save(tensors)
        digest = hashlib.sha256(blob).hexdigest()
        name = f"{self.name}-{digest[:16]}.safetensors"
        atomic_write(folder / name, lambda tmp: Path(tmp).write_bytes(blob))
        write_json(folder / STATE_FILE, {
            "format": "elder-state", "format_version": STATE_FORMAT_VERSION, "method": self.name,
            "config": self.cfg.to_dict(), "base": self._base_identity(), "tensors": {"file": name, "sha256": digest},
            "edits": self.records, "extra": self._extra_state()})
        for stale in folder.glob(f"{self.name}-*.safetensors"):
            if stale.name != name:
                stale.unlink(missing_ok=True)

    @classmethod
    def recognises(cls, folder: str | os.PathLike) -> bool:
        """A state.json naming this method."""
        try:
            return _read_state(Path(folder))["method"] == cls.name
        except StateFormatError:
            return False

    @classmethod
    def saved_base_name(cls, folder: str | os.PathLike) -> str | None:
        """The base model named in the manifest."""
        return _read_state(Path(folder))["base"]["name"]

    @classmethod
    def load(cls, folder: str | os.PathLike, base: nn.Module, tokenizer, base_name: str) -> "HookedMethod":
        """Restore a saved state onto `base`, refusing another method's state, another base model's, or damage."""
        folder = Path(folder)
        state = _read_state(folder)
        if state["method"] != cls.name:
            raise StateFormatError(f"{folder} holds a {state['method']!r} state, not {cls.name!r}")
        path = folder / state["tensors"]["file"]
        try:
            blob = path.read_bytes()
        except OSError:
            raise StateFormatError(f"{path} is missing") from None
        if hashlib.sha256(blob).hexdigest() != state["tensors"]["sha256"]:
            raise StateFormatError(f"{path} does not match the checksum its manifest records (damaged)")
        try:
            tensors = load(blob)
        except SafetensorError as error:
            raise StateFormatError(f"{path} is not a readable safetensors file: {error}") from None
        editor = cls(base, tokenizer, base_name, cls.config_class.from_dict(state["config"]))
        try:
            saved = state["base"]
            if saved["class"] != type(base).__name__ or saved["hidden"] != editor._base_identity()["hidden"]:
                raise StateFormatError(f"{folder} was made on a {saved['class']} of width {saved['hidden']}, not "
                                       f"on this {type(base).__name__}")
            if not editor._fits(tensors):
                raise StateFormatError(f"{folder}: the saved tensors do not fit these settings on this model")
            editor._load_tensors(tensors)
            editor._load_extra(state.get("extra", {}))
            editor.records = {k: EditRecord.from_dict(v, f"{folder} edit {k}").to_dict()
                              for k, v in state["edits"].items()}
            editor._check_loaded()
        except BaseException:
            editor.close()
            raise
        return editor

    def _base_identity(self) -> dict:
        config = self.base.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        return {"name": self.base_name, "class": type(self.base).__name__, "hidden": hidden}

    def _release(self) -> nn.Module:
        self.base._elder_attached = False
        return self.base


def _read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise StateFormatError(f"no saved editor state in {folder} ({STATE_FILE} is missing)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateFormatError(f"{path} is corrupt: {error}") from None
    if not isinstance(state, dict) or state.get("format") != "elder-state":
        raise StateFormatError(f"{path} is not an elder editor state")
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise StateFormatError(f"{path} has format version {state.get('format_version')}; this elder reads "
                               f"version {STATE_FORMAT_VERSION}")
    for key in ("method", "config", "base", "tensors", "edits"):
        if key not in state:
            raise StateFormatError(f"{path} has no {key!r}")
    return state


def in_chunks(prompts: Sequence[str], targets: Sequence[str]):
    if len(prompts) != len(targets):
        raise InputError(f"{len(prompts)} prompts but {len(targets)} targets")
    for lo in range(0, len(prompts), SCORE_BATCH):
        yield list(prompts[lo:lo + SCORE_BATCH]), list(targets[lo:lo + SCORE_BATCH])


class DeltaMethod(HookedMethod):
    """A hooked method whose edits are additive deltas (`self.deltas`, an OutputDeltas) trained by `_fit`: on for
    every input once anything is held, with no deferral."""

    deltas: OutputDeltas

    @contextmanager
    def _edits(self, prompts: Sequence[str], use_edits: bool, training: bool = False,
               generating: bool = False) -> Iterator[Use]:
        on = training or (use_edits and bool(self.records))
        with self.deltas.active(on):
            yield Use(len(prompts), on)

    def close(self) -> nn.Module:
        """Take the hooks out and give back the base model."""
        self.deltas.remove()
        return self._release()
