"""The contract between an editing method and everything that drives one (the harness, the command line, the
service): the types every method returns, the abilities a method may declare, and the base class itself."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from elder.data import EditRecord
from elder.errors import ElderError
from elder.settings import MethodConfig


class MethodError(ElderError, ValueError):
    """A method was asked for what it cannot do: an unknown name, a base model another editor holds, an edit id
    held twice, an id it does not hold."""


@dataclass
class EditResult:
    """What training one edit cost and whether its target was learned."""

    id: str
    seconds: float  # wall time of its batch divided by the edits in it
    iterations: int  # optimisation steps its batch took
    learned: bool  # every target token of its batch was predicted after training

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class Answer:
    """A greedy answer and whether the edit memory produced it."""

    prompt: str
    text: str
    used_memory: bool  # False: the method deferred to the base model (methods without deferral: True once edited)
    distance: float  # the method's distance to the nearest stored edit (inf: none or not measured)
    edit_id: str | None = None  # the stored edit that answered, where the method can name one


@dataclass(frozen=True)
class TokenPrediction:
    """Teacher-forced greedy predictions for one prompt + target row."""

    predicted: tuple[int, ...]  # argmax token at each target position
    target: tuple[int, ...]  # the target's token ids
    used_memory: bool | None  # whether the method's edit memory answered (None: the method has no such notion)

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens predicted: EasyEdit's per-prompt token accuracy."""
        return sum(p == t for p, t in zip(self.predicted, self.target)) / len(self.target)


Predict = Callable[[Sequence[str], Sequence[str]], list[TokenPrediction]]


class EditingMethod(ABC):
    """A lifelong editor: edit a batch, answer, save, load.

    Every call with `use_edits=False` must answer exactly as the unedited base model would; the harness uses it
    for locality references and for timing the base model in the same run. A subclass sets `name`, `config_class`
    (its settings dataclass) and `state_file` (the file its `save` always writes, by which a saved state is known),
    and registers itself with `elder.methods.register_method`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    state_file: ClassVar[str]

    @classmethod
    def config(cls, settings: Mapping) -> MethodConfig:
        """The method's settings from a mapping (`preset` picks a preset where the method has them); raises a
        ConfigError naming what is wrong, before any model is touched."""
        settings = dict(settings)
        preset = settings.pop("preset", None)
        return cls.config_class.preset(preset, **settings)

    @classmethod
    def recognises(cls, folder: str | os.PathLike) -> bool:
        """Whether `folder` holds a state this method saved."""
        return (Path(folder) / cls.state_file).is_file()

    @classmethod
    def check_folder(cls, folder: str | os.PathLike) -> None:
        """Raise an ElderError when `folder` holds a damaged state of this method (which must not be overwritten)."""

    @classmethod
    @abstractmethod
    def create(cls, base: nn.Module, tokenizer, base_name: str, settings: Mapping) -> "EditingMethod":
        """A fresh editor on `base` with the given settings (unknown settings are an error)."""

    @classmethod
    @abstractmethod
    def load(cls, folder: str | os.PathLike, base: nn.Module, tokenizer, base_name: str) -> "EditingMethod":
        """An editor restored from `save` output."""

    @abstractmethod
    def save(self, folder: str | os.PathLike) -> None:
        """Write the editor's whole state atomically."""

    @abstractmethod
    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Apply edits in order; each record's rephrases are trained on too (the harness holds test ones back)."""

    @abstractmethod
    def predict(self, prompts: Sequence[str], targets: Sequence[str], use_edits: bool = True) -> list[TokenPrediction]:
        """Teacher-forced argmax tokens of each target after its prompt."""

    @abstractmethod
    def loglikelihood(self, prompts: Sequence[str], continuations: Sequence[str], use_edits: bool = True) -> list[float]:
        """Summed log-probability of each continuation after its prompt."""

    @abstractmethod
    def answer(self, prompts: Sequence[str], max_new_tokens: int, use_edits: bool = True) -> list[Answer]:
        """Greedy generations."""

    @property
    def batch_size(self) -> int:
        """Edits the method trains together; the harness hands it whole batches (and checkpoints between them)."""
        return 1

    @property
    @abstractmethod
    def held_edits(self) -> Mapping[str, dict]:
        """The records of the edits held (as EditRecord.to_dict gives them), by id, in the order they were applied."""

    @property
    def edited_ids(self) -> list[str]:
        """Ids of the edits held, in the order they were applied."""
        return list(self.held_edits)

    @classmethod
    def saved_base_name(cls, folder: str | os.PathLike) -> str | None:
        """The base model a saved state was made on, as `load_base` takes it (None: not recorded)."""
        return None

    @property
    @abstractmethod
    def settings(self) -> dict:
        """Every setting, JSON-ready, for the run's snapshot."""

    @abstractmethod
    def close(self) -> nn.Module:
        """Release the base model, untouched, so another editor can use it."""


class TunesThreshold(ABC):
    """An ability: the method defers to the base model past a threshold, which the harness can tune."""

    @property
    @abstractmethod
    def threshold_name(self) -> str:
        """The setting the tuned value is written to."""

    @abstractmethod
    def threshold_sweep(self) -> Iterator[tuple[float, Predict]]:
        """(threshold, predict) for each candidate value, strictest first, each `predict` scoring as the method
        would with that threshold; cheap after the first (the model runs once)."""


class EditsInContext(ABC):
    """A trait: the method trains nothing and puts a matched edit in the prompt, so its edits take only on a model
    that reads its context (a language model, not a tiny random one); `EditResult.learned` says whether the base
    model gave the target with the edit before the prompt."""


class Forgets(ABC):
    """An ability: a held edit can be removed by id, and the method then answers as if it had never been made."""

    @abstractmethod
    def forget(self, edit_id: str) -> None:
        """Remove the edit `edit_id`; a MethodError when it is not held."""
