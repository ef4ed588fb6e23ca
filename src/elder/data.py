"""Edit records and their JSONL file format."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from elder.errors import ElderError
from elder.files import write_text

_RECORD_KEYS = frozenset({"id", "prompt", "target", "rephrases", "locality", "subject"})
_PROBE_KEYS = frozenset({"prompt", "answer", "kind"})
LOCALITY_KINDS = ("unrelated", "neighbour")  # another topic; the edit's question about another subject


class DataError(ElderError, ValueError):
    """A bad edit record or edits file."""


def _type_name(value: Any) -> str:
    return type(value).__name__


@dataclass(frozen=True)
class LocalityProbe:
    """A prompt whose answer an edit should leave unchanged."""

    prompt: str
    answer: str | None = None
    kind: str = "unrelated"  # one of LOCALITY_KINDS: scored apart, since they test different things

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise DataError(f"locality probe: prompt must be a non-empty string, got {self.prompt!r}")
        if self.kind not in LOCALITY_KINDS:
            raise DataError(f"locality probe {self.prompt!r}: kind must be one of {', '.join(LOCALITY_KINDS)}, "
                            f"got {self.kind!r}")
        if self.answer is not None and (not isinstance(self.answer, str) or not self.answer.strip()):
            raise DataError(
                f"locality probe {self.prompt!r}: answer must be a non-empty string or None, "
                f"got {self.answer!r}"
            )


@dataclass(frozen=True)
class EditRecord:
    """One fact to edit: `prompt` should be completed with `target`."""

    id: str
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    locality: tuple[LocalityProbe, ...] = ()
    subject: str | None = None  # what the fact is about, as written in the prompt; keys subject_key deferral

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise DataError(f"edit id must be a non-empty string, got {self.id!r}")
        if self.subject is not None and (not isinstance(self.subject, str) or not self.subject.strip()):
            raise DataError(f"edit {self.id!r}: subject must be a non-empty string or absent, got {self.subject!r}")
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(f"edit {self.id!r}: {name} must be a string, got {_type_name(value)}")
            if not value.strip():
                raise DataError(f"edit {self.id!r}: empty {name}")
        # Accept lists for convenience but store tuples so records stay hashable.
        for name in ("rephrases", "locality"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise DataError(f"edit {self.id!r}: {name} must be a tuple, got {_type_name(value)}")
            object.__setattr__(self, name, tuple(value))
        for i, text in enumerate(self.rephrases, 1):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"edit {self.id!r}: rephrase {i} must be a non-empty string, got {text!r}")
        for i, probe in enumerate(self.locality, 1):
            if not isinstance(probe, LocalityProbe):
                raise DataError(
                    f"edit {self.id!r}: locality {i} must be a LocalityProbe, got {_type_name(probe)}"
                )

    @classmethod
    def from_dict(cls, d: Any, where: str) -> EditRecord:
        """Build a record from its JSON form (without an `id`, its content_id); errors start with `where`."""
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(d)}")
        unknown = sorted(set(d) - _RECORD_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
        for key in ("prompt", "target"):
            if key not in d:
                raise DataError(f"{where}: missing {key!r}")
            if not isinstance(d[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {_type_name(d[key])}")
        record_id = d["id"] if "id" in d else content_id(d["prompt"], d["target"])
        if not isinstance(record_id, str):
            raise DataError(f"{where}: 'id' must be a string, got {_type_name(record_id)}")
        rephrases = d.get("rephrases", [])
        if not isinstance(rephrases, list) or not all(isinstance(r, str) for r in rephrases):
            raise DataError(f"{where}: 'rephrases' must be a list of strings")
        locality = d.get("locality", [])
        if not isinstance(locality, list):
            raise DataError(f"{where}: 'locality' must be a list, got {_type_name(locality)}")
        probes = tuple(_probe_from_json(item, f"{where}: locality {i}") for i, item in enumerate(locality, 1))
        subject = d.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise DataError(f"{where}: 'subject' must be a string, got {_type_name(subject)}")
        try:
            return cls(record_id, d["prompt"], d["target"], tuple(rephrases), probes, subject)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form read by `from_dict`."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "target": self.target,
            "rephrases": list(self.rephrases),
            "locality": [{"prompt": p.prompt, "answer": p.answer,
                          **({"kind": p.kind} if p.kind != "unrelated" else {})} for p in self.locality],
            **({"subject": self.subject} if self.subject is not None else {}),
        }


def _probe_from_json(item: Any, where: str) -> LocalityProbe:
    # A bare string is shorthand for a probe without a known answer.
    if isinstance(item, str):
        return LocalityProbe(item)
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a string or an object, got {_type_name(item)}")
    unknown = sorted(set(item) - _PROBE_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    if "prompt" not in item:
        raise DataError(f"{where}: missing 'prompt'")
    try:
        return LocalityProbe(item["prompt"], item.get("answer"), item.get("kind", "unrelated"))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def content_id(prompt: str, target: str) -> str:
    """The id of a record that names none: the first 16 hex digits of the SHA-256 of its prompt and target, so that
    the same edit keeps its id wherever it stands in the file."""
    return hashlib.sha256(json.dumps([prompt, target], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def read_edits(path: str | os.PathLike[str]) -> list[EditRecord]:
    """Read edit records from a JSONL file, one object per line; a record without an `id` gets its content_id."""
    try:
        with open(path, "rb") as f:
            # Not splitlines(): JSON strings may hold raw U+2028 and friends.
            raw_lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise DataError(f"{path}: no such edits file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an edits file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read edits file: {e}") from None

    records: list[EditRecord] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(raw_lines, 1):
        where = f"{path} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: invalid JSON: nested too deeply") from None
        record = EditRecord.from_dict(obj, where)
        if record.id in first_line:
            first = first_line[record.id]
            if "id" in obj:
                raise DataError(f"{where}: duplicate id {record.id!r} (first used on line {first})")
            raise DataError(f"{where}: the same edit (prompt and target) as line {first}")
        first_line[record.id] = lineno
        records.append(record)
    if not records:
        raise DataError(f"{path}: no edit records")
    return records


def write_edits(path: str | os.PathLike[str], records: Iterable[EditRecord]) -> None:
    """Write edit records as JSONL, replacing `path` atomically."""
    records = list(records)
    # Refuse to write a file that read_edits would reject.
    if not records:
        raise DataError(f"{path}: no edit records to write")
    seen: set[str] = set()
    for r in records:
        if not isinstance(r, EditRecord):
            raise DataError(f"{path}: expected EditRecord, got {_type_name(r)}")
        if r.id in seen:
            raise DataError(f"{path}: duplicate id {r.id!r}")
        seen.add(r.id)

    write_text(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records))


def held_out(record: EditRecord, train_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(trained, held-out) rephrases: the first floor(fraction * n) are trained, the rest only scored."""
    cut = math.floor(train_fraction * len(record.rephrases))
    return record.rephrases[:cut], record.rephrases[cut:]
