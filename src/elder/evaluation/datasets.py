"""Load editing benchmarks (ZsRE, CounterFact, WISE, our edits JSONL) as edit records."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from elder.data import DataError, EditRecord, LocalityProbe, read_edits

KINDS = ("zsre", "counterfact", "jsonl", "hf")


@dataclass(frozen=True)
class Benchmark:
    """Edit records taken, in source order, from one benchmark file or dataset."""

    name: str  # file stem, folder name or hub dataset name
    format: str  # one of FORMATS
    source: str  # the path or hf:NAME[@SPLIT] the records came from
    records: tuple[EditRecord, ...]


@dataclass(frozen=True)
class _Source:
    name: str
    label: str  # starts every error message about this source
    stem: str  # id prefix for flattened records without a case_id
    rows: Any  # a list of decoded JSON values, or a datasets.Dataset
    jsonl: Path | None = None  # set when rows came from a JSONL file


def _type_name(value: Any) -> str:
    return type(value).__name__


def _text(value: Any, where: str, name: str) -> str:
    # None counts as missing: a datasets table fills a column absent from a row with None.
    if value is None:
        raise DataError(f"{where}: missing {name!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise DataError(f"{where}: empty {name!r}")
    return value


def _texts(value: Any, where: str, name: str, *, allow_str: bool = False) -> tuple[str, ...]:
    if allow_str and isinstance(value, str):
        return (_text(value, where, name),)
    if value is None:
        raise DataError(f"{where}: missing {name!r}")
    if not isinstance(value, list):
        raise DataError(f"{where}: {name!r} must be a list, got {_type_name(value)}")
    return tuple(_text(item, where, f"{name}[{i}]") for i, item in enumerate(value))


def _obj(value: Any, where: str, name: str) -> dict[str, Any]:
    if value is None:
        raise DataError(f"{where}: missing {name!r}")
    if not isinstance(value, dict):
        raise DataError(f"{where}: {name!r} must be an object, got {_type_name(value)}")
    return value


def _case_id(value: Any, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise DataError(f"{where}: missing 'case_id'")
    if not isinstance(value, str):
        raise DataError(f"{where}: 'case_id' must be an integer or a string, got {_type_name(value)}")
    return _text(value, where, "case_id")


def _subject(value: Any, where: str) -> str | None:
    # optional in every format: records without one get a subject guessed from the prompt when it is needed
    return None if value is None else _text(value, where, "subject")


def _from_zsre(d: dict[str, Any], index: int, where: str, stem: str) -> EditRecord:
    return EditRecord(
        f"zsre-{index}",
        _text(d.get("src"), where, "src"),
        # Kept as is: ROME-era files keep a leading space on some answers (" 625").
        _text(d.get("alt"), where, "alt"),
        _texts(d.get("rephrase"), where, "rephrase", allow_str=True),
        (LocalityProbe(_text(d.get("loc"), where, "loc"), _text(d.get("loc_ans"), where, "loc_ans")),),
        _subject(d.get("subject"), where),
    )


def _from_rome(d: dict[str, Any], index: int, where: str, stem: str) -> EditRecord:
    record_id = f"cf-{_case_id(d.get('case_id'), where)}"
    rewrite = _obj(d.get("requested_rewrite"), where, "requested_rewrite")
    template = _text(rewrite.get("prompt"), where, "requested_rewrite.prompt")
    if "{}" not in template:
        raise DataError(f"{where}: 'requested_rewrite.prompt' has no '{{}}' for the subject: {template!r}")
    subject = _text(rewrite.get("subject"), where, "requested_rewrite.subject")
    target_new = _obj(rewrite.get("target_new"), where, "requested_rewrite.target_new")
    target_true = _obj(rewrite.get("target_true"), where, "requested_rewrite.target_true")
    new = _text(target_new.get("str"), where, "requested_rewrite.target_new.str")
    true = _text(target_true.get("str"), where, "requested_rewrite.target_true.str")

    neighbours = d.get("neighborhood_prompts")
    if neighbours is None:
        raise DataError(f"{where}: missing 'neighborhood_prompts'")
    if not isinstance(neighbours, list):
        raise DataError(f"{where}: 'neighborhood_prompts' must be a list, got {_type_name(neighbours)}")
    prompts = []
    for i, item in enumerate(neighbours):
        name = f"neighborhood_prompts[{i}]"
        # Some CounterFact versions store each neighbour as {"prompt": ..., "target": ...}.
        if isinstance(item, dict):
            prompts.append(_text(item.get("prompt"), where, f"{name}.prompt"))
        elif isinstance(item, str):
            prompts.append(_text(item, where, name))
        else:
            raise DataError(f"{where}: {name!r} must be a string or an object, got {_type_name(item)}")

    return EditRecord(
        record_id,
        # replace, not format: a stray brace elsewhere in the template must not break it.
        template.replace("{}", subject),
        new,
        _texts(d.get("paraphrase_prompts"), where, "paraphrase_prompts"),
        tuple(LocalityProbe(p, true, "neighbour") for p in prompts),
        subject,
    )


def _from_flat(d: dict[str, Any], index: int, where: str, stem: str) -> EditRecord:
    case_id = d.get("case_id")
    record_id = f"cf-{_case_id(case_id, where)}" if case_id is not None else f"{stem}-{index}"
    rephrases: tuple[str, ...] = ()
    # WISE's temporal set names its rephrase ood_rephrase; the others use rephrase_prompt.
    for key in ("rephrase_prompt", "ood_rephrase"):
        if d.get(key) is not None:
            rephrases += _texts(d[key], where, key, allow_str=True)
    answer = d.get("locality_ground_truth")
    # WISE's sets leave a few continuations empty; such a probe is scored against the unedited model.
    if isinstance(answer, str) and not answer.strip():
        answer = None
    else:
        answer = _text(answer, where, "locality_ground_truth")
    # CounterFact's flattened split asks its locality prompt about another subject with the same relation (a
    # neighbour); WISE's sets ask about something else entirely
    kind = "neighbour" if case_id is not None else "unrelated"
    probe = LocalityProbe(_text(d.get("locality_prompt"), where, "locality_prompt"), answer, kind)
    return EditRecord(
        record_id, _text(d.get("prompt"), where, "prompt"), _text(d.get("target_new"), where, "target_new"),
        rephrases, (probe,), _subject(d.get("subject"), where),
    )


def _from_edits(d: dict[str, Any], index: int, where: str, stem: str) -> EditRecord:
    return EditRecord.from_dict(d, where)  # a record without an id gets its content_id, as read_edits gives it


_Converter = Callable[[dict[str, Any], int, str, str], EditRecord]
_CONVERTERS: Mapping[str, _Converter] = MappingProxyType({
    "zsre": _from_zsre,
    "counterfact-rome": _from_rome,
    "flat": _from_flat,  # MEND/EasyEdit flattened CounterFact, and WISE's sets
    "edits": _from_edits,  # this project's own edits format
})
FORMATS = tuple(_CONVERTERS)


def _detect(first: Any, label: str) -> str:
    where = f"{label} record 0"
    if not isinstance(first, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(first)}")
    keys = {k for k, v in first.items() if v is not None}
    if "requested_rewrite" in keys:
        return "counterfact-rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new"} <= keys:
        return "flat"
    if {"prompt", "target"} <= keys:
        return "edits"
    raise DataError(
        f"{where}: unknown benchmark format (keys {', '.join(sorted(map(str, keys)))}); expected ZsRE "
        "('src', 'alt'), CounterFact ROME ('requested_rewrite'), flattened ('prompt', 'target_new') "
        "or edits ('prompt', 'target')"
    )


def _read_file(path: Path) -> _Source:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None

    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
        return _Source(path.stem, str(path), path.stem, rows)

    rows = []
    # Not splitlines(): JSON strings may hold raw U+2028 and friends.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno} (record {len(rows)}): invalid JSON: {e.msg} (column {e.colno})"
            ) from None
    return _Source(path.stem, str(path), path.stem, rows, path)


def _datasets() -> Any:
    # Imported on use: it is slow to import and only hub datasets and saved folders need it.
    try:
        import datasets
    except ImportError:
        raise DataError("the 'datasets' package is needed for hub datasets and saved dataset folders") from None
    return datasets


def _one_split(data: Any, label: str) -> Any:
    if isinstance(data, _datasets().DatasetDict):
        if len(data) != 1:
            raise DataError(f"{label}: has splits {', '.join(data)}; name one as hf:NAME@SPLIT or save one split")
        return next(iter(data.values()))
    return data


def _read_folder(path: Path) -> _Source:
    # save_to_disk writes state.json (a Dataset) or dataset_dict.json (a DatasetDict).
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        datasets = _datasets()
        try:
            data = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot load the saved dataset: {e}") from None
        return _Source(path.name, str(path), path.name, _one_split(data, str(path)))
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl"))
    if len(files) != 1:
        raise DataError(
            f"{path}: a benchmark folder must hold a saved datasets dataset or exactly one .json/.jsonl file, "
            f"found {len(files)} such files"
        )
    return _read_file(files[0])


def _read_hub(target: str) -> _Source:
    name, _, split = (part.strip() for part in target.partition("@"))
    if not name:
        raise DataError(f"hf:{target}: missing the dataset name")
    label = f"hf:{name}@{split}" if split else f"hf:{name}"
    datasets = _datasets()
    try:
        data = datasets.load_dataset(name, split=split or None)
    except ConnectionError as e:
        raise DataError(
            f"{label}: cannot reach the Hugging Face hub ({e}); pass a local path instead "
            "(a .json/.jsonl file or a save_to_disk folder)"
        ) from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise DataError(
            f"{label}: cannot load the dataset ({e}); if the hub cannot be reached, pass a local path instead"
        ) from None
    stem = name.rsplit("/", 1)[-1]
    return _Source(name, label, stem, _one_split(data, label))


def _parse_spec(spec: str) -> tuple[str | None, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"benchmark spec must be a non-empty string, got {spec!r}")
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        if not rest.strip():
            raise DataError(f"benchmark spec {spec!r}: nothing after {kind + ':'!r}")
        return kind, rest
    return None, spec


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")


def load_benchmark(spec: str, limit: int | None = None, offset: int = 0, skip_invalid: bool = False) -> Benchmark:
    """Load records [offset, offset+limit) of `KIND:PATH`, `hf:NAME[@SPLIT]` or a bare file or folder;
    `skip_invalid` leaves out malformed records instead of failing (for pools of subjects, never for a stream)."""
    kind, target = _parse_spec(spec)
    _check_count("offset", offset, 0)
    if limit is not None:
        _check_count("limit", limit, 1)

    if kind == "hf":
        source = _read_hub(target)
    else:
        path = Path(target).expanduser()
        if path.is_dir():
            source = _read_folder(path)
        elif path.exists() or kind is not None:
            source = _read_file(path)
        else:
            raise DataError(
                f"{target}: no such file or folder (name a hub dataset as hf:NAME; kinds: {', '.join(KINDS)})"
            )

    total = len(source.rows)
    if total == 0:
        raise DataError(f"{source.label}: no records")
    if offset >= total:
        raise DataError(f"{source.label}: offset {offset} asked for, but it has only {total} records")
    stop = total if limit is None else offset + limit
    if stop > total:
        raise DataError(f"{source.label}: {limit} records from offset {offset} asked for, but it has only {total}")

    if kind == "zsre":
        fmt = "zsre"
    elif kind == "jsonl":
        fmt = "edits"
    else:
        fmt = _detect(source.rows[0], source.label)
        if kind == "counterfact" and fmt not in ("counterfact-rome", "flat"):
            raise DataError(
                f"{source.label} record 0: not a CounterFact record; expected 'requested_rewrite' (ROME) "
                "or 'prompt' and 'target_new' (MEND/EasyEdit)"
            )

    if fmt == "edits" and source.jsonl is not None:
        # read_edits gives default ids by line number, so the file keeps its ids however it is loaded.
        records = tuple(read_edits(source.jsonl)[offset:stop])
    else:
        records = _convert(source, fmt, offset, stop, skip_invalid)
    return Benchmark(source.name, fmt, source.label, records)


def _convert(source: _Source, fmt: str, start: int, stop: int, skip_invalid: bool = False) -> tuple[EditRecord, ...]:
    convert = _CONVERTERS[fmt]
    if isinstance(source.rows, list):
        rows = source.rows[start:stop]
    else:
        rows = source.rows.select(range(start, stop)).to_list()
    records = []
    first_index: dict[str, int] = {}
    for index, row in enumerate(rows, start):
        where = f"{source.label} record {index}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {_type_name(row)}")
            record = convert(row, index, where, source.stem)
        except DataError:
            if skip_invalid:
                continue
            raise
        if record.id in first_index:
            raise DataError(f"{where}: duplicate id {record.id!r} (first used by record {first_index[record.id]})")
        first_index[record.id] = index
        records.append(record)
    return tuple(records)


def with_neighbours(records: Sequence[EditRecord], pool: Sequence[EditRecord]) -> tuple[EditRecord, ...]:
    """Give each record that names its subject in its prompt, and has no neighbour probe, one: its own question
    asked about the subject of a `pool` record that no record here is about (records of the same file outside the
    stream), teacher-forced with the edit's target. An edit should leave it alone; ZsRE ships no such probes."""
    edited = {r.subject.casefold() for r in records if r.subject}
    subjects = [s for s in dict.fromkeys(r.subject for r in pool if r.subject) if s.casefold() not in edited]
    out = []
    for i, record in enumerate(records):
        if (subjects and record.subject and record.subject in record.prompt
                and not any(p.kind == "neighbour" for p in record.locality)):
            prompt = record.prompt.replace(record.subject, subjects[i % len(subjects)])
            record = dataclasses.replace(
                record, locality=record.locality + (LocalityProbe(prompt, record.target, "neighbour"),))
        out.append(record)
    return tuple(out)


def split_benchmark(
    bench: Benchmark, test: int, validation: int
) -> tuple[tuple[EditRecord, ...], tuple[EditRecord, ...]]:
    """Return the first `test` records and the `validation` records after them."""
    _check_count("test", test, 1)
    _check_count("validation", validation, 0)
    total = len(bench.records)
    if test + validation > total:
        raise DataError(
            f"{bench.source}: {test} test + {validation} validation records asked for, but it has only {total}"
        )
    return bench.records[:test], bench.records[test:test + validation]
