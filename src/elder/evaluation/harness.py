"""`elder bench`: one stream of sequential edits, scored under a protocol, written to a resumable run folder.

A run folder holds `settings.json` (the snapshot every later resume must match), `base/` (the unedited model's
locality predictions and task scores, shared by all methods), and per method `edits.jsonl` (one line per applied
edit, appended as it happens), `memory/` (the method's saved state at the last checkpoint), `curve.jsonl`,
`scores.jsonl` (one line per edit after the whole stream), `tuning.json` and `summary.json`. A stopped run resumes
from its last checkpoint: lines of edits applied after it are dropped and those edits are applied again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from elder import files
from elder.data import DataError, EditRecord, held_out
from elder.errors import ElderError
from elder.evaluation import general
from elder.evaluation.datasets import load_benchmark, split_benchmark, with_neighbours
from elder.evaluation.metrics import (
    EditScore,
    GenerationScore,
    base_locality,
    generate_all,
    generation_scores,
    locality_rows,
    score_edits,
    score_from_dict,
    summarize,
    summarize_generation,
)
from elder.methods import EditingMethod, TunesThreshold, get_method

PROTOCOLS = ("final", "immediate", "curve")
RUN_FORMAT = "elder-bench-run"
JOINED_FILE = "joined.json"  # in a folder made by join_runs: the run each method came from


class RunError(ElderError, ValueError):
    """A run folder that cannot be continued with these settings."""


@dataclass(frozen=True)
class BenchSettings:
    """Everything that decides a run's numbers; saved in settings.json and checked on resume."""

    data: str  # benchmark spec, e.g. zsre:PATH
    edits: int  # T: test edits applied one after another
    protocol: str = "final"
    curve_every: int = 100  # curve protocol: score all edits so far after every this many
    methods: tuple[str, ...] = ("elder",)
    method_settings: dict = field(default_factory=dict)  # per method name: its settings (e.g. preset, overrides)
    model: str | None = None  # base model; None: the embedded SmolLM2
    dtype: str | None = None
    device: str | None = None
    offset: int = 0  # first record of the test split in the data
    train_rephrases: float = 0.0  # fraction of each edit's rephrases trained on (the paper's variant); rest held out
    validation: int = 0  # edits in the validation split, used only to tune thresholds
    validation_data: str | None = None  # spec of a separate validation set; None: the records after the test split
    tune: bool = False  # tune the method's deferral threshold on the validation split
    general_data: str | None = None  # folder of the eight general-ability tasks; None: no retention scores
    general_n: int = 50  # examples per task
    timing_prompts: int = 16  # prompts of each kind in the inference-time comparison
    checkpoint_every: int = 100  # save the method's state after this many edits
    neighbours: bool = True  # give records without neighbour probes one (datasets.with_neighbours)
    generation_tokens: int = 32  # greedy tokens per answer in the generation scores; 0: no generation scores

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise RunError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        for name in ("edits", "curve_every", "checkpoint_every", "general_n", "timing_prompts"):
            if getattr(self, name) < 1:
                raise RunError(f"{name} must be at least 1, got {getattr(self, name)}")
        if isinstance(self.generation_tokens, bool) or not isinstance(self.generation_tokens, int) \
                or self.generation_tokens < 0:
            raise RunError(f"generation_tokens must be an integer >= 0, got {self.generation_tokens!r}")
        if not 0 <= self.train_rephrases <= 1:
            raise RunError(f"train_rephrases must be in [0, 1], got {self.train_rephrases}")
        if self.tune and self.validation < 1:
            raise RunError("tuning needs a validation split: pass validation >= 1")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise RunError(f"methods must be distinct and not empty, got {self.methods}")
        for name in self.methods:
            get_method(name)
        unknown = set(self.method_settings) - set(self.methods)
        if unknown:
            raise RunError(f"settings given for method(s) not in the run: {', '.join(sorted(unknown))}")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        data = dataclasses.asdict(self)
        data["methods"] = list(self.methods)
        return data


def run_bench(settings: BenchSettings, out: str | os.PathLike, progress: bool = True,
              echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) a benchmark and write its report; returns the summary."""
    from elder.models import load_base  # the model stack is only needed once a run starts

    out = Path(out)
    for name in settings.methods:  # bad settings or data fail before the run folder is claimed
        get_method(name).config(settings.method_settings.get(name, {}))
    test, validation = _splits(settings)
    _claim_folder(out, settings)
    base, tokenizer, base_name = load_base(settings.model, settings.dtype, settings.device)
    results = {}
    for name in settings.methods:
        folder = out / name
        folder.mkdir(exist_ok=True)
        results[name], base = _run_method(name, settings, folder, out / "base", test, validation, base, tokenizer,
                                          base_name, progress, echo)
        summary = _write_summary(out, settings, test, machine_facts(base), results)  # each finished method shows
    return summary


def report_run(out: str | os.PathLike) -> Path:
    """Write the report of a run folder from the methods that have finished, also while later ones still run or
    after the run was stopped; returns the report's path."""
    out = Path(out)
    settings = _read_settings(out)
    results = {}
    for name in settings.methods:
        path = out / name / "summary.json"
        if path.is_file():
            try:
                results[name] = json.loads(path.read_text())
            except ValueError as err:
                raise RunError(f"{path} is damaged ({err}); run the method again with elder bench") from None
    if not results:
        raise RunError(f"no method of the run in {out} has finished yet")
    test, _ = _splits(settings)
    machine = next((r["machine"] for r in results.values() if "machine" in r), None)
    _write_summary(out, settings, test, machine or machine_facts(), results)  # runs before 'machine' was kept
    return out / "report.md"


def join_runs(out: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> Path:
    """A new report folder `out` holding the finished methods of several runs of one stream (the same settings
    but for their methods), as one run: one report, one table and one plot for methods run in different folders,
    sessions or machines. Each method's folder is copied without its saved memory, so `out` can be reported on
    but not resumed (`joined.json` names the sources). Returns the report's path."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out} already exists and is not an empty folder; join the runs into a new one")
    if not sources:
        raise RunError("name at least one run folder to join")
    runs = [(Path(source), _read_settings(Path(source))) for source in sources]
    first, methods, method_settings, origin = _stream(runs[0][1].to_dict()), [], {}, {}
    for folder, settings in runs:
        stream = _stream(settings.to_dict())
        if stream != first:
            changed = sorted(k for k in first if stream[k] != first[k])
            raise RunError(f"{folder} ran another stream than {runs[0][0]} ({', '.join(changed)} differ)")
        for name in settings.methods:
            if not (folder / name / "summary.json").is_file():
                continue  # not finished there
            if name in origin:
                raise RunError(f"{name} finished in both {origin[name]} and {folder}; join only one of them")
            methods.append(name)
            origin[name] = folder
            if name in settings.method_settings:
                method_settings[name] = settings.method_settings[name]
    if not methods:
        raise RunError(f"no method has finished in {', '.join(str(f) for f, _ in runs)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        shutil.copytree(runs[0][0] / "base", staging / "base")
        for name in methods:
            shutil.copytree(origin[name] / name, staging / name, ignore=shutil.ignore_patterns("memory"))
        settings = BenchSettings(**{**first, "methods": tuple(methods), "method_settings": method_settings})
        files.write_json(staging / "settings.json", settings.to_dict())
        files.write_json(staging / JOINED_FILE, {"methods": {name: str(origin[name]) for name in methods}})
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report_run(out)


def _stream(settings: dict) -> dict:
    """A run's settings (`BenchSettings.to_dict()`) less its methods and their settings: what decides its stream,
    base scores and scoring, which runs that grow or join must share."""
    return {k: v for k, v in settings.items() if k not in ("methods", "method_settings")}


def _read_settings(out: Path) -> BenchSettings:
    """The settings of the run in `out`."""
    try:
        saved = json.loads((out / "settings.json").read_text())
        return BenchSettings(**{**saved, "methods": tuple(saved["methods"])})
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunError(f"{out} holds no readable run (settings.json: {err})") from None


def _write_summary(out: Path, settings: BenchSettings, test, machine: dict, results: dict) -> dict:
    """summary.json and report.md for the methods in `results`; the run's other methods are listed as pending."""
    summary = {"format": RUN_FORMAT, "settings": settings.to_dict(), "machine": machine,
               "test": {"data": settings.data, "edits": len(test), "first_id": test[0].id, "last_id": test[-1].id},
               "methods": dict(results), "pending": [name for name in settings.methods if name not in results]}
    files.write_json(out / "summary.json", summary)
    from elder.evaluation.report import write_report  # matplotlib only when a report is written

    write_report(out, summary)
    return summary


def _claim_folder(out: Path, settings: BenchSettings) -> None:
    """Claim a new run folder, or resume the run in it: the same settings, or the same with methods added after
    the ones it holds (their settings given or not; the methods already run keep theirs), which then join it."""
    path = out / "settings.json"
    if (out / JOINED_FILE).exists():
        raise RunError(f"{out} joins finished runs for their report and cannot be run; resume the runs it names in "
                       f"{JOINED_FILE}")
    if path.exists():
        saved, wanted = json.loads(path.read_text()), settings.to_dict()
        held = saved.get("methods", [])
        grows = wanted["methods"][:len(held)] == held and len(wanted["methods"]) > len(held) and \
            {k: v for k, v in wanted["method_settings"].items() if k in held} == saved.get("method_settings")
        same = _stream(saved) == _stream(wanted)
        if saved != wanted and not (grows and same):
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise RunError(f"{out} holds a run with other settings ({', '.join(changed)} differ); resume it with "
                           "the same settings (more methods may follow the ones it holds) or choose another --out")
        if saved != wanted:
            files.write_json(path, wanted)
        return
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} is not empty and holds no run; choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(path, settings.to_dict())


def _splits(settings: BenchSettings) -> tuple[tuple[EditRecord, ...], tuple[EditRecord, ...]]:
    """The test and validation records; with `neighbours`, each gets neighbour probes whose subjects come from the
    records of its own file outside both splits."""
    if settings.validation_data is None:
        bench = load_benchmark(settings.data, limit=settings.edits + settings.validation, offset=settings.offset)
        test, validation = split_benchmark(bench, settings.edits, settings.validation)
    else:
        test = load_benchmark(settings.data, limit=settings.edits, offset=settings.offset).records
        validation, after = (), 0
        if settings.validation:
            validation, after = _validation_records(settings, {r.prompt for r in test})
    if not settings.neighbours:
        return test, validation
    # only subjects are taken from outside the splits, so a malformed record there is left out, not an error
    every = load_benchmark(settings.data, skip_invalid=True).records
    if settings.validation_data is None:
        inside = {r.id for r in test + validation}
        test_pool = validation_pool = [r for r in every if r.id not in inside]
    else:
        edited = {r.id for r in test}
        test_pool = [r for r in every if r.id not in edited]
        validation_pool = () if not validation else load_benchmark(
            settings.validation_data, offset=after, skip_invalid=True).records
    return with_neighbours(test, test_pool), with_neighbours(validation, validation_pool)


def _validation_records(settings: BenchSettings, test_prompts: set[str]) -> tuple[tuple[EditRecord, ...], int]:
    """The first `validation` records of the validation data whose edit prompt is not in the test split (a record
    sharing one is passed over, so no tuned threshold has seen a test edit), and the offset just after them."""
    kept: list[EditRecord] = []
    offset = 0
    while len(kept) < settings.validation:
        try:
            part = load_benchmark(settings.validation_data, limit=settings.validation - len(kept), offset=offset)
        except DataError as error:
            raise DataError(f"{settings.validation} validation edits asked for, but only {len(kept)} of the "
                            f"validation data's edit prompts are outside the test split ({error})") from None
        offset += len(part.records)
        kept += [r for r in part.records if r.prompt not in test_prompts]
    return tuple(kept), offset


def _run_method(name: str, settings: BenchSettings, folder: Path, base_folder: Path, test, validation, base,
                tokenizer, base_name: str, progress: bool, echo) -> tuple[dict, object]:
    """Run one method on the stream; returns its result and the base model, released for the next method."""
    cls = get_method(name)
    method_settings = dict(settings.method_settings.get(name, {}))
    trained = lambda r: dataclasses.replace(r, rephrases=held_out(r, settings.train_rephrases)[0])  # noqa: E731
    scored = lambda r: held_out(r, settings.train_rephrases)[1]  # noqa: E731
    clock = _Clock()
    bar = (lambda title: title) if progress else (lambda title: None)  # noqa: E731  a bar's title, or no bar
    if settings.tune and validation and issubclass(cls, TunesThreshold):  # a method with no threshold runs as set
        tuning = _tune(cls, folder, method_settings, validation, base, tokenizer, base_name, trained, scored, echo,
                       bar)
        method_settings.update(tuning["chosen"])
        clock.lap("tuning")
    memory = folder / "memory"
    if cls.recognises(memory):
        method = cls.load(memory, base, tokenizer, base_name)
    else:
        method = cls.create(base, tokenizer, base_name, method_settings)
    try:
        if not method.edited_ids:  # what the state weighs before any edit, for the bytes each edit adds
            _cached(folder / "empty_state.json", lambda: {"bytes": _state_bytes(method)})
        clock.lap("loading")
        base_tokens = _cached(base_folder / "locality.json",
                              lambda: [list(t) for t in base_locality(method, test, bar("base locality"))])
        base_tokens = [tuple(t) for t in base_tokens]
        offsets = _locality_offsets(test)
        unedited = _cached(base_folder / "unedited.json", lambda: summarize(score_edits(
            lambda p, t: method.predict(p, t, use_edits=False), test, scored, base_tokens, bar("base scores"))))
        clock.lap("base_model_scores")
        _edit_stream(method, settings, folder, test, trained, scored, base_tokens, offsets, progress)
        clock.lap("editing")
        scores = _final_scores(method, folder, test, scored, base_tokens, bar("final scores"))
        clock.lap("final_scoring")
        result = {"method": name, "settings": method.settings, "final": summarize(scores), "unedited": unedited}
        if settings.generation_tokens:
            result["generation"] = summarize_generation(
                _generations(method, settings, folder, base_folder, test, scored, bar))
            clock.lap("generation_scoring")
        result["cost"] = _cost(folder, len(test))
        result["inference"] = _cached(folder / "inference.json", lambda: _inference_time(
            method, test, settings.timing_prompts, progress=progress))  # timed once, in the run that edited
        clock.lap("inference_timing")
        if settings.general_data is not None:
            result["general"] = _retention(method, settings, base_folder, folder, progress)
            clock.lap("retention")
        if (folder / "tuning.json").exists():
            result["tuning"] = json.loads((folder / "tuning.json").read_text())
        if settings.protocol == "immediate":
            result["immediate"] = summarize([score_from_dict(line["immediate"]) for line in _read_lines(folder / "edits.jsonl")])
        if settings.protocol == "curve":
            result["curve"] = _read_lines(folder / "curve.jsonl")
        result["machine"] = machine_facts(base)
        result["wall_seconds_this_invocation"] = clock.laps  # phases cached by an earlier invocation take ~0 s
        files.write_json(folder / "summary.json", result)
        final = result["final"]
        echo(f"{name}: Rel {final['rel']:.3f}  Gen {_fmt(final['gen'])}  Loc {_fmt(final['loc'])} (unrelated "
             f"{_fmt(final['loc_unrelated'])}, neighbours {_fmt(final['loc_neighbour'])})  after {len(test)} edits "
             f"({result['cost']['seconds_per_edit_median']:.2f} s/edit median)")
    finally:
        base = method.close()
    return result, base


def _edit_stream(method: EditingMethod, settings: BenchSettings, folder: Path, test, trained, scored, base_tokens,
                 offsets, progress: bool) -> None:
    done = method.edited_ids
    if done != [r.id for r in test[:len(done)]]:
        raise RunError(f"{folder} holds edits that are not the start of this test stream")
    log, curve = folder / "edits.jsonl", folder / "curve.jsonl"
    # lines written after the last checkpoint describe edits the saved state does not hold: they are redone
    files.write_lines(log, [line for line in _read_lines(log) if line["index"] < len(done)])
    files.write_lines(curve, [line for line in _read_lines(curve) if line["edits"] <= len(done)])
    step = method.batch_size
    bar = tqdm(total=len(test), initial=len(done), desc=f"{method.name} edits", unit="edit", disable=not progress)
    position = len(done)
    since_save = 0
    try:
        while position < len(test):
            chunk = test[position:position + step]
            results = method.edit([trained(r) for r in chunk])
            lines = []
            for i, (record, result) in enumerate(zip(chunk, results)):
                line = {"index": position + i, **result.to_dict(), "peak_rss_mb": _peak_rss_mb(),
                        "peak_cuda_mb": _peak_cuda_mb()}
                lines.append(line)
            if settings.protocol == "immediate":
                lo, hi = offsets[position], offsets[position + len(chunk)]
                now = score_edits(method.predict, chunk, scored, base_tokens[lo:hi])
                for line, score in zip(lines, now):
                    line["immediate"] = score.to_dict()
            files.append_lines(log, lines)
            position += len(chunk)
            since_save += len(chunk)
            bar.update(len(chunk))
            if settings.protocol == "curve" and (position % settings.curve_every < step or position == len(test)):
                scores = score_edits(method.predict, test[:position], scored, base_tokens[:offsets[position]])
                files.append_lines(curve, [{"edits": position, **summarize(scores)}])
            if since_save >= settings.checkpoint_every or position == len(test):
                method.save(folder / "memory")
                since_save = 0
    finally:
        bar.close()
    if position == len(test) and since_save:
        method.save(folder / "memory")


def _final_scores(method: EditingMethod, folder: Path, test, scored, base_tokens,
                  progress: str | None = None) -> list[EditScore]:
    path = folder / "scores.jsonl"
    lines = _read_lines(path)
    if [line["id"] for line in lines] == [r.id for r in test]:
        return [score_from_dict(line) for line in lines]  # already scored after this very stream
    scores = score_edits(method.predict, test, scored, base_tokens, progress)
    files.write_lines(path, [s.to_dict() for s in scores])
    return scores


def _generations(method: EditingMethod, settings: BenchSettings, folder: Path, base_folder: Path, test, scored,
                 bar) -> list[GenerationScore]:
    """Greedy answers of the base model (shared by all methods) and of the edited one, judged per edit."""
    path = folder / "generations.jsonl"
    lines = _read_lines(path)
    if [line["id"] for line in lines] == [r.id for r in test]:
        return [GenerationScore(**line) for line in lines]
    answer = lambda prompts, use_edits: [  # noqa: E731
        a.text for a in method.answer(prompts, settings.generation_tokens, use_edits=use_edits)]
    base = _cached(base_folder / "answers.json",
                   lambda: generate_all(answer, [r.prompt for r in test], False, bar("base answers")))
    scores = generation_scores(answer, test, scored, base, bar("edited answers"))
    files.write_lines(path, [s.to_dict() for s in scores])
    return scores


def _tune(cls, folder: Path, method_settings: dict, validation, base, tokenizer, base_name, trained, scored,
          echo, bar) -> dict:
    path = folder / "tuning.json"
    if path.exists():
        return json.loads(path.read_text())
    method = cls.create(base, tokenizer, base_name, method_settings)
    try:
        base_tokens = base_locality(method, validation, bar("validation base locality"))
        step = method.batch_size
        title = bar("validation edits")
        with tqdm(total=len(validation), desc=title, unit="edit", disable=title is None) as edits:
            for start in range(0, len(validation), step):
                method.edit([trained(r) for r in validation[start:start + step]])
                edits.update(len(validation[start:start + step]))
        table = []
        for i, (value, predict) in enumerate(method.threshold_sweep()):
            # the first threshold runs the model (with and without the memory); the others reuse those rows
            summary = summarize(score_edits(predict, validation, scored, base_tokens,
                                            bar("validation scores") if i == 0 else None))
            table.append({"value": value, **summary})
        key = lambda row: statistics.fmean(row[m] for m in ("rel", "gen", "loc") if row[m] is not None)  # noqa: E731
        # the first best is the strictest (threshold_sweep's order): false matches grow with the memory, so a tie
        # on the small validation memory is no reason to let more in
        best = max(table, key=key)
        tuning = {"setting": method.threshold_name, "chosen": {method.threshold_name: best["value"]},
                  "objective": "mean of Rel, Gen and Loc on the validation split", "validation_edits": len(validation),
                  "table": table}
    finally:
        method.close()
    files.write_json(path, tuning)
    echo(f"tuned {tuning['setting']} = {best['value']} on {len(validation)} validation edits")
    return tuning


class _Clock:
    """Wall time of each phase of one invocation."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round(now - self.last, 1)
        self.last = now


def _locality_offsets(records: Sequence[EditRecord]) -> list[int]:
    offsets = [0]
    for record in records:
        offsets.append(offsets[-1] + len(locality_rows([record])))
    return offsets


def _state_bytes(method: EditingMethod) -> int:
    """Bytes of the method's saved state as it is now (saved to a scratch folder, then removed)."""
    with tempfile.TemporaryDirectory() as scratch:
        method.save(scratch)
        return _folder_bytes(Path(scratch))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _cost(folder: Path, edits: int) -> dict:
    lines = _read_lines(folder / "edits.jsonl")
    seconds = sorted(line["seconds"] for line in lines)
    iterations = [line["iterations"] for line in lines]
    empty = json.loads((folder / "empty_state.json").read_text())["bytes"] if (folder / "empty_state.json").exists() \
        else None
    state = _folder_bytes(folder / "memory")
    return {
        "state_bytes": state,
        "state_bytes_before_edits": empty,
        "bytes_per_edit": None if empty is None else (state - empty) / edits,
        "seconds_per_edit_median": statistics.median(seconds),
        "seconds_per_edit_p90": seconds[min(len(seconds) - 1, math.ceil(0.9 * len(seconds)) - 1)],
        "seconds_total": sum(seconds),
        "iterations_median": statistics.median(iterations),
        "iterations_mean": statistics.fmean(iterations),
        "learned_when_trained": statistics.fmean(float(line["learned"]) for line in lines),
        "peak_rss_mb": max(line["peak_rss_mb"] for line in lines),
        "peak_cuda_mb": max(line["peak_cuda_mb"] for line in lines),
    }


def _inference_time(method: EditingMethod, test, count: int, max_new_tokens: int = 16, repeats: int = 5,
                    progress: bool = False) -> dict:
    """Greedy generation time, edited over base, on edit prompts and on unrelated prompts, interleaved."""
    unrelated = [p.prompt for r in test for p in r.locality if p.kind == "unrelated"]
    groups = {"edit_prompts": [r.prompt for r in test[:count]],
              "unrelated_prompts": (unrelated or [p for p, _ in locality_rows(test)])[:count]}
    out = {}
    for kind, prompts in groups.items():
        if not prompts:
            continue
        times = {True: [], False: []}
        method.answer(prompts[:1], 1)  # warm-up
        for repeat in tqdm(range(repeats), desc=f"timing {kind.replace('_', ' ')}", disable=not progress,
                           leave=False):
            for use_edits in ((False, True) if repeat % 2 == 0 else (True, False)):  # alternate: drift cancels
                start = time.perf_counter()
                answers = method.answer(prompts, max_new_tokens, use_edits=use_edits)
                times[use_edits].append(time.perf_counter() - start)
        used = [a.used_memory for a in answers]
        out[kind] = {"prompts": len(prompts), "base_seconds": statistics.median(times[False]),
                     "edited_seconds": statistics.median(times[True]),
                     "ratio": statistics.median(times[True]) / statistics.median(times[False]),
                     "memory_used": statistics.fmean(float(u) for u in used)}
    return out


def _retention(method: EditingMethod, settings: BenchSettings, base_folder: Path, folder: Path, progress: bool) -> dict:
    def evaluate(use_edits: bool) -> dict:
        return general.evaluate_general(
            lambda p, c: method.loglikelihood(p, c, use_edits=use_edits),
            lambda p, n: [a.text for a in method.answer(p, n, use_edits=use_edits)],
            Path(settings.general_data), n=settings.general_n, progress=progress)

    base = _cached(base_folder / "general.json", lambda: evaluate(False))
    edited = _cached(folder / "general.json", lambda: evaluate(True))
    return general.retention_table(base, edited)


def machine_facts(base=None) -> dict:
    """Where the numbers were measured."""
    facts = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
             "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        facts["cuda_device"] = torch.cuda.get_device_name()
    if base is not None:
        facts["base_dtype"] = str(next(base.parameters()).dtype)
        facts["base_device"] = str(next(base.parameters()).device)
    return facts


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _peak_cuda_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cached(path: Path, compute: Callable[[], object]):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, value)
    return json.loads(path.read_text())


def _read_lines(path: Path) -> list[dict]:
    return files.read_lines(path, RunError) if path.exists() else []
