"""The `elder` command line: edit, ask, demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model and local folders need no network

from elder.config import ConfigError, ElderConfig, parse_setting  # noqa: E402
from elder.data import DataError, read_edits  # noqa: E402
from elder.editing import NonFiniteLossError, apply_edits, forget  # noqa: E402
from elder.mechanism import ElderModel, InputError  # noqa: E402
from elder.models import DEFAULT_MODEL, ModelLoadError, load_base  # noqa: E402
from elder.persistence import (MANIFEST, MemoryBusyError, MemoryFormatError, load_memory, memory_lock,  # noqa: E402
                               read_manifest, save_memory)

app = typer.Typer(help="Lifelong knowledge editing of causal LMs with ELDER.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
_USER_ERRORS = (ConfigError, DataError, InputError, MemoryBusyError, MemoryFormatError, ModelLoadError,
                NonFiniteLossError, ValueError)

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="hub id or local folder; default: the "
                                                 f"embedded {DEFAULT_MODEL}")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="dtype of the frozen base: float32, bfloat16, float16")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="device of the base model, e.g. cpu or cuda")]


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _parse_overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs, each value read against the setting's type (KEY may be METHOD.KEY in `bench`)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = parse_setting(key.rpartition(".")[2], value)
        except ConfigError as error:
            raise ConfigError(f"--set {pair}: {error}") from None
    return overrides


@app.command()
def edit(
    edits: Annotated[Path, typer.Argument(help="JSONL file, one edit per line")],
    out: Annotated[Path, typer.Option(help="folder to write the edit memory to")],
    model: ModelOpt = None,
    preset: Annotated[str, typer.Option(help="settings preset: paper or fast")] = "fast",
    set_: Annotated[list[str], typer.Option("--set", help="override a setting, e.g. --set epsilon=6")] = [],
    resume: Annotated[bool, typer.Option(help="continue the memory in --out, skipping edits it already holds")] = False,
    replace: Annotated[bool, typer.Option(help="with --resume: an id the memory holds with another prompt or "
                                          "target is forgotten and applied anew (without it, refused)")] = False,
    save_every: Annotated[int, typer.Option(min=1, help="save after this many edits (and at the end)")] = 100,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Apply the edits in EDITS to the model and write the edit memory to --out."""
    try:
        records = read_edits(edits)
        overrides = _parse_overrides(set_)
        if replace and not resume:
            raise ConfigError("--replace needs --resume (it replaces edits of a memory being continued)")
        with memory_lock(out):
            if resume and (out / MANIFEST).exists():
                if set_:
                    raise ConfigError("--set cannot change a saved memory's settings when resuming")
                manifest = read_manifest(out)
                base, tokenizer, name = load_base(model or manifest["base"]["name"], dtype, device)
                elder = load_memory(out, base, tokenizer, name)
                records = _resumed(elder, records, replace)
            else:
                if (out / MANIFEST).exists():
                    raise ValueError(f"{out} already holds a memory; pass --resume to continue it")
                config = ElderConfig.preset(preset, **overrides)
                base, tokenizer, name = load_base(model, dtype, device)
                elder = ElderModel(base, tokenizer, config, name)
            pending = 0

            def checkpoint(batch_results):
                nonlocal pending
                pending += len(batch_results)
                if pending >= save_every:
                    save_memory(elder, out)
                    pending = 0

            results = apply_edits(elder, records, progress=sys.stderr.isatty(), on_batch=checkpoint)
            save_memory(elder, out)
    except _USER_ERRORS as error:
        _fail(error)
    seconds = sorted(r.seconds for r in results)
    learned = sum(r.learned for r in results)
    median = seconds[len(seconds) // 2] if seconds else 0.0
    typer.echo(f"applied {len(results)} edits ({learned} learned when trained), median {median:.2f} s/edit; "
               f"memory holds {len(elder.edit_log)} edits in {out}")


def _resumed(elder: ElderModel, records: list, replace: bool) -> list:
    """The records still to apply to a loaded memory: a held id with the same edit is skipped; one with another
    prompt, target or subject is refused, or with `replace` forgotten and applied anew."""
    held = [r for r in records if r.id in elder.edit_log]
    changed = [r.id for r in held if _edit_of(elder.edit_log[r.id]["record"]) != _edit_of(r.to_dict())]
    if changed and not replace:
        shown = ", ".join(map(repr, changed[:3])) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ValueError(f"{len(changed)} edits have an id the memory holds with another prompt, target or subject "
                         f"({shown}); give a new fact a new id, or pass --replace to forget the held ones")
    for edit_id in changed:
        forget(elder, edit_id)
    todo = [r for r in records if r.id not in elder.edit_log]
    typer.echo(f"resuming: {len(elder.edit_log)} edits in the memory; {len(held) - len(changed)} of the file's "
               f"already held (skipped), {len(changed)} replaced, {len(todo)} to apply", err=True)
    return todo


def _edit_of(record: dict) -> tuple:
    return record["prompt"], record["target"], record.get("subject")


@app.command()
def ask(
    prompts: Annotated[list[str], typer.Argument(help="prompts to answer")],
    memory: Annotated[Optional[Path], typer.Option(help="edit memory folder; none: the base model")] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate per answer")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per line")] = False,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Greedy answers of the edited model, and whether the edit memory was used or deferred."""
    try:
        if memory is not None:
            name = model or read_manifest(memory)["base"]["name"]
            base, tokenizer, name = load_base(name, dtype, device)
            elder = load_memory(memory, base, tokenizer, name)
        else:
            base, tokenizer, name = load_base(model, dtype, device)
            elder = ElderModel(base, tokenizer, ElderConfig(), name)  # empty memory: always defers
        answers = elder.generate(list(prompts), max_new_tokens=max_new_tokens)
    except _USER_ERRORS as error:
        _fail(error)
    for answer in answers:
        if as_json:
            typer.echo(json.dumps({"prompt": answer.prompt, "answer": answer.text, "used_memory": answer.used_memory,
                                   "distance": None if answer.distance == float("inf") else answer.distance}))
        else:
            how = "edited" if answer.used_memory else "deferred"
            typer.echo(f"[{how}] {answer.prompt!r} -> {answer.text.strip()!r}")


@app.command()
def demo(
    facts: Annotated[int, typer.Option(help="how many counterfactual capital facts to edit")] = 24,
    out: Annotated[Optional[Path], typer.Option(help="also save the memory here")] = None,
    preset: Annotated[str, typer.Option(help="settings preset: paper or fast")] = "fast",
    set_: Annotated[list[str], typer.Option("--set", help="override a setting, e.g. --set epsilon=6")] = [],
) -> None:
    """Edit counterfactual capitals into the embedded SmolLM2-135M and show answers before and after."""
    from elder.demo import run_demo

    try:
        config = ElderConfig.preset(preset, **_parse_overrides(set_))
        if out is None:
            run_demo(facts, None, config, echo=typer.echo)
        else:
            with memory_lock(out):
                if (out / MANIFEST).exists():
                    raise ValueError(f"{out} already holds a memory; the demo saves only to a new folder")
                run_demo(facts, out, config, echo=typer.echo)
    except _USER_ERRORS as error:
        _fail(error)


@app.command()
def bench(
    data: Annotated[str, typer.Option(help="benchmark: zsre:PATH, counterfact:PATH, jsonl:PATH, hf:NAME, or a path")],
    out: Annotated[Path, typer.Option(help="run folder (created; an existing run in it is resumed)")],
    edits: Annotated[int, typer.Option(help="T: sequential edits in the test stream")] = 1000,
    protocol: Annotated[str, typer.Option(help="final, immediate or curve")] = "final",
    curve_every: Annotated[int, typer.Option(help="curve protocol: score all edits so far every K edits")] = 100,
    methods: Annotated[str, typer.Option(help="comma-separated editing methods run on the same stream")] = "elder",
    preset: Annotated[str, typer.Option(help="ELDER settings preset: paper or fast")] = "fast",
    set_: Annotated[list[str], typer.Option("--set", help="method setting K=V, or METHOD.K=V for one method")] = [],
    model: ModelOpt = None,
    offset: Annotated[int, typer.Option(help="first record of the test split")] = 0,
    train_rephrases: Annotated[float, typer.Option(help="fraction of rephrases trained on (paper variant)")] = 0.0,
    validation: Annotated[int, typer.Option(help="validation edits (after the test split unless --validation-data)")] = 0,
    validation_data: Annotated[Optional[str], typer.Option(help="separate validation data spec")] = None,
    tune: Annotated[bool, typer.Option(help="tune the deferral threshold on the validation split")] = False,
    general: Annotated[Optional[Path], typer.Option(help="folder of the 8 general-ability tasks (retention)")] = None,
    general_n: Annotated[int, typer.Option(help="examples per general-ability task")] = 50,
    checkpoint_every: Annotated[int, typer.Option(help="save the method's state every N edits")] = 100,
    neighbours: Annotated[bool, typer.Option(
        help="give records without neighbour probes one: their question about a subject outside the stream")] = True,
    generation_tokens: Annotated[int, typer.Option(
        help="greedy tokens per answer in the generation scores (0: none)")] = 32,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Run T sequential edits from a benchmark, score them, and write a report (resumes a stopped run)."""
    from elder.evaluation.harness import BenchSettings, RunError, run_bench
    from elder.evaluation.general import GeneralDataError

    try:
        names = tuple(m.strip() for m in methods.split(",") if m.strip())
        per_method: dict[str, dict] = {name: {} for name in names}
        if "elder" in per_method:
            per_method["elder"]["preset"] = preset
        for key, value in _parse_overrides(set_).items():
            target, dot, field_name = key.rpartition(".")
            for name in ([target] if dot else names):
                if name not in per_method:
                    raise ConfigError(f"--set {key}: method {name!r} is not in --methods")
                per_method[name][field_name] = value
        settings = BenchSettings(
            data=data, edits=edits, protocol=protocol, curve_every=curve_every, methods=names,
            method_settings={k: v for k, v in per_method.items() if v}, model=model, dtype=dtype, device=device,
            offset=offset, train_rephrases=train_rephrases, validation=validation, validation_data=validation_data,
            tune=tune, general_data=str(general) if general is not None else None, general_n=general_n,
            checkpoint_every=checkpoint_every, neighbours=neighbours, generation_tokens=generation_tokens)
        run_bench(settings, out, progress=True, echo=typer.echo)
    except (*_USER_ERRORS, RunError, GeneralDataError) as error:
        _fail(error)
    typer.echo(f"report: {out / 'report.md'}")
