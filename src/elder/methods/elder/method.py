"""ELDER behind the harness's interface."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from elder.data import EditRecord
from elder.forward import SCORE_BATCH, SCORE_MAX_TOKENS
from elder.methods.base import Answer, EditingMethod, EditResult, Forgets, TokenPrediction, TunesThreshold
from elder.methods.elder.config import ElderConfig
from elder.methods.elder.editing import apply_edits, forget
from elder.methods.elder.model import ElderModel
from elder.methods.elder.persistence import MANIFEST, check_memory_folder, load_memory, read_manifest, save_memory
from elder.settings import ConfigError
from elder.tokens import InputError, TeacherForced, target_argmax, target_logprob, teacher_forced


class ElderMethod(EditingMethod, TunesThreshold, Forgets):
    """Mixture-of-LoRA experts, a sequence-level router, guided loss and deferral (Li et al., AAAI 2025)."""

    name = "elder"
    config_class = ElderConfig
    state_file = MANIFEST

    def __init__(self, model: ElderModel) -> None:
        self.model = model

    @classmethod
    def config(cls, settings: Mapping) -> ElderConfig:
        """Settings: `preset` (paper or fast, default fast) plus any ElderConfig field but paraphrase_split."""
        if "paraphrase_split" in settings:
            raise ConfigError("the caller decides which rephrases are trained (--train-rephrases), "
                              "not the method's paraphrase_split")
        # every rephrase a caller passes is a training rephrase; held-out ones never reach the method
        return super().config({**settings, "paraphrase_split": 1.0})

    @classmethod
    def create(cls, base: nn.Module, tokenizer, base_name: str, settings: Mapping) -> "ElderMethod":
        """A fresh ELDER memory on `base`; settings as in `config`."""
        return cls(ElderModel(base, tokenizer, cls.config(settings), base_name))

    @classmethod
    def load(cls, folder: str | os.PathLike, base: nn.Module, tokenizer, base_name: str) -> "ElderMethod":
        """Restore a saved ELDER memory onto `base`."""
        return cls(load_memory(folder, base, tokenizer, base_name))

    def save(self, folder: str | os.PathLike) -> None:
        """Atomic save of adapters, code bank and edit log."""
        save_memory(self.model, folder)

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Train the edits batch after batch into the shared experts and routers."""
        return apply_edits(self.model, records, progress=False)  # the harness shows progress

    def forget(self, edit_id: str) -> None:
        """Remove an edit's keys and codes: its prompts defer to the base model again."""
        forget(self.model, edit_id)

    @property
    def batch_size(self) -> int:
        """Edits trained together (the config's batch_size)."""
        return self.model.config.batch_size

    @torch.no_grad()
    def predict(self, prompts: Sequence[str], targets: Sequence[str], use_edits: bool = True) -> list[TokenPrediction]:
        """Teacher-forced argmax tokens; deferral is decided per prompt as at inference."""
        out = []
        for batch, logits, route in self._scored(prompts, targets, use_edits):
            out += _rows(batch, logits, route.used.tolist() if route is not None else [False] * len(batch.query_positions))
        return out

    @torch.no_grad()
    def loglikelihood(self, prompts: Sequence[str], continuations: Sequence[str], use_edits: bool = True) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens."""
        out = []
        for batch, logits, _ in self._scored(prompts, continuations, use_edits):
            out += target_logprob(batch, logits)
        return out

    def answer(self, prompts: Sequence[str], max_new_tokens: int, use_edits: bool = True) -> list[Answer]:
        """Greedy generations, each prompt routed once."""
        return self.model.generate(list(prompts), max_new_tokens, use_memory=use_edits)

    @property
    def threshold_name(self) -> str:
        """The deferral threshold that --tune sets."""
        return "key_threshold" if self.model.config.deferral == "subject_key" else "epsilon"

    def threshold_sweep(self):
        """(threshold, predict) for every epsilon that gives distinct decisions (or, under subject_key deferral, a
        grid of key similarities), from one pass with and without memory; the strictest threshold comes first."""
        cache: dict = {}
        keyed = self.model.config.deferral == "subject_key"

        def rows(prompts: Sequence[str], targets: Sequence[str]):
            key = (tuple(prompts), tuple(targets))
            if key not in cache:
                forced, distances = [], []
                for batch, logits, route in self._scored(prompts, targets, use_edits=True, defer=False):
                    forced += _rows(batch, logits, [True] * len(route.used))
                    if keyed:  # the route is the nearest edit's; its distance is 1 - similarity
                        distances += route.distance.tolist()
                    else:
                        distances += self.model.bank.min_distance(route.codes).tolist()
                cache[key] = (forced, distances, self.predict(prompts, targets, use_edits=False))
            return cache[key]

        if keyed:
            # strictest first; in steps of 0.01 above 0.9, where matches of a subject and of another one part
            grid = [round(0.99 - 0.01 * i, 2) for i in range(10)] + [round(0.85 - 0.05 * i, 2) for i in range(8)]
            for similarity in grid:
                def predict(prompts: Sequence[str], targets: Sequence[str], similarity: float = similarity):
                    forced, distances, base = rows(prompts, targets)
                    return [f if 1.0 - d >= similarity else TokenPrediction(b.predicted, b.target, False)
                            for f, d, b in zip(forced, distances, base)]
                yield similarity, predict
            return
        # codes have k ones per layer, so Hamming distances are even: odd thresholds cover every decision
        for epsilon in range(1, 2 * self.model.config.top_k * len(self.model.adapters) + 2, 2):
            def predict(prompts: Sequence[str], targets: Sequence[str], epsilon: float = float(epsilon)):
                forced, distances, base = rows(prompts, targets)
                return [f if d < epsilon else TokenPrediction(b.predicted, b.target, False)
                        for f, d, b in zip(forced, distances, base)]
            yield float(epsilon), predict

    def _scored(self, prompts: Sequence[str], targets: Sequence[str], use_edits: bool, defer: bool = True):
        if len(prompts) != len(targets):
            raise InputError(f"{len(prompts)} prompts but {len(targets)} targets")
        for start in range(0, len(prompts), SCORE_BATCH):
            batch: TeacherForced = teacher_forced(self.model.tokenizer, list(prompts[start:start + SCORE_BATCH]),
                                                  list(targets[start:start + SCORE_BATCH]), self.model.context_limit,
                                                  SCORE_MAX_TOKENS, self.model.input_device)
            logits, route = self.model.target_logits(batch, defer=defer, use_memory=use_edits)
            yield batch, logits, route

    @property
    def held_edits(self) -> dict[str, dict]:
        """Each held edit's record, in the order they were applied."""
        return {edit_id: entry["record"] for edit_id, entry in self.model.edit_log.items()}

    @classmethod
    def check_folder(cls, folder: str | os.PathLike) -> None:
        """Tensors without a manifest are a damaged or partly copied memory."""
        check_memory_folder(folder)

    @classmethod
    def saved_base_name(cls, folder: str | os.PathLike) -> str | None:
        """The base model named in the memory's manifest."""
        return read_manifest(folder)["base"]["name"]

    @property
    def settings(self) -> dict:
        """The full ElderConfig."""
        return self.model.config.to_dict()

    def close(self) -> nn.Module:
        """Remove ELDER's hooks and hand back the base model."""
        return self.model.detach()


def _rows(batch: TeacherForced, logits: torch.Tensor, used: list[bool]) -> list[TokenPrediction]:
    return [TokenPrediction(predicted, target, flag) for (predicted, target), flag in zip(target_argmax(batch, logits), used)]
