"""The `elder` command line: edit, ask, demo."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model and local folders need no network

from elder.data import held_out, read_edits  # noqa: E402
from elder.errors import ElderError  # noqa: E402
from elder.files import folder_lock  # noqa: E402
from elder.methods import EditingMethod, Forgets, MethodError, get_method, method_of_folder, registered  # noqa: E402
from elder.models import DEFAULT_MODEL, load_base  # noqa: E402
from elder.settings import ConfigError  # noqa: E402

app = typer.Typer(help="Lifelong knowledge editing of causal LMs with ELDER and other editors.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="hub id or local folder; default: the "
                                                 f"embedded {DEFAULT_MODEL}")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="dtype of the frozen base: float32, bfloat16, float16")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="device of the base model, e.g. cpu or cuda")]


MethodOpt = Annotated[Optional[str], typer.Option(help="editing method (see `elder methods`); default: elder")]
PresetOpt = Annotated[Optional[str], typer.Option(help="settings preset of the method (ELDER: paper or fast, "
                                                  "default fast)")]
SetOpt = Annotated[list[str], typer.Option("--set", help="override a setting, e.g. --set key_threshold=0.9")]


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _pairs(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        out.append((key, value))
    return out


def _settings(cls: type[EditingMethod], preset: str | None, pairs: list[str]) -> dict:
    """A method's settings from --preset and --set KEY=VALUE pairs, each value read against the setting's type."""
    settings: dict = {} if preset is None else {"preset": preset}
    for key, value in _pairs(pairs):
        try:
            settings[key] = cls.config_class.parse(key, value)
        except ConfigError as error:
            raise ConfigError(f"--set {key}={value}: {error}") from None
    cls.config(settings)  # every setting checked before a model loads
    return settings


def _load_saved(folder: Path, model: str | None, dtype: str | None, device: str | None) -> EditingMethod:
    cls = method_of_folder(folder)
    base, tokenizer, name = load_base(model or cls.saved_base_name(folder), dtype, device)
    return cls.load(folder, base, tokenizer, name)


@app.command()
def edit(
    edits: Annotated[Path, typer.Argument(help="JSONL file, one edit per line")],
    out: Annotated[Path, typer.Option(help="folder to write the edit memory to")],
    model: ModelOpt = None,
    method: MethodOpt = "elder",
    preset: PresetOpt = None,
    set_: SetOpt = [],
    resume: Annotated[bool, typer.Option(help="continue the memory in --out, skipping edits it already holds")] = False,
    replace: Annotated[bool, typer.Option(help="with --resume: an id the memory holds with another prompt or "
                                          "target is forgotten and applied anew (without it, refused)")] = False,
    save_every: Annotated[int, typer.Option(min=1, help="save after this many edits (and at the end)")] = 100,
    train_rephrases: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="fraction of each record's rephrases trained on as well (0: the edit prompt only, as "
        "EasyEdit and WISE train; the paper trains some)")] = 0.0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Apply the edits in EDITS to the model and write the edit memory to --out."""
    try:
        records = [dataclasses.replace(r, rephrases=held_out(r, train_rephrases)[0]) for r in read_edits(edits)]
        if replace and not resume:
            raise ConfigError("--replace needs --resume (it replaces edits of a memory being continued)")
        with folder_lock(out):
            saved = _saved(out)
            if resume and saved is not None:
                if method is not None and method != saved.name:
                    raise MethodError(f"{out} holds a {saved.name!r} memory, not {method!r}")
                if set_ or preset is not None:
                    raise ConfigError("--set and --preset cannot change a saved memory's settings when resuming")
                editor = _load_saved(out, model, dtype, device)
                records = _resumed(editor, records, replace)
            else:
                if saved is not None:
                    raise MethodError(f"{out} already holds a memory; pass --resume to continue it")
                cls = get_method(method or "elder")
                settings = _settings(cls, preset, set_)
                base, tokenizer, name = load_base(model, dtype, device)
                editor = cls.create(base, tokenizer, name, settings)
            results, pending = [], 0
            with tqdm(total=len(records), desc="editing", unit="edit", disable=not sys.stderr.isatty()) as bar:
                for lo in range(0, len(records), editor.batch_size):
                    batch = records[lo:lo + editor.batch_size]
                    results += editor.edit(batch)
                    bar.update(len(batch))
                    pending += len(batch)
                    if pending >= save_every:
                        editor.save(out)
                        pending = 0
            editor.save(out)
    except ElderError as error:
        _fail(error)
    seconds = sorted(r.seconds for r in results)
    learned = sum(r.learned for r in results)
    median = seconds[len(seconds) // 2] if seconds else 0.0
    typer.echo(f"applied {len(results)} edits ({learned} learned when trained), median {median:.2f} s/edit; "
               f"memory holds {len(editor.edited_ids)} edits in {out}")


def _saved(folder: Path) -> type[EditingMethod] | None:
    """The method whose state `folder` holds (None: none does); a damaged state is refused, never overwritten."""
    for cls in registered().values():
        cls.check_folder(folder)
    return method_of_folder(folder) if any(cls.recognises(folder) for cls in registered().values()) else None


def _resumed(editor: EditingMethod, records: list, replace: bool) -> list:
    """The records still to apply to a loaded memory: a held id with the same edit is skipped; one with another
    prompt, target or subject is refused, or with `replace` forgotten and applied anew."""
    held_edits = editor.held_edits
    held = [r for r in records if r.id in held_edits]
    changed = [r.id for r in held if _edit_of(held_edits[r.id]) != _edit_of(r.to_dict())]
    if changed and not replace:
        shown = ", ".join(map(repr, changed[:3])) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise MethodError(f"{len(changed)} edits have an id the memory holds with another prompt, target or subject "
                          f"({shown}); give a new fact a new id, or pass --replace to forget the held ones")
    if changed and not isinstance(editor, Forgets):
        raise MethodError(f"--replace needs a method that can forget an edit; {editor.name} cannot")
    for edit_id in changed:
        editor.forget(edit_id)
    todo = [r for r in records if r.id not in editor.held_edits]
    typer.echo(f"resuming: {len(editor.edited_ids)} edits in the memory; {len(held) - len(changed)} of the file's "
               f"already held (skipped), {len(changed)} replaced, {len(todo)} to apply", err=True)
    return todo


def _edit_of(record: dict) -> tuple:
    return record["prompt"], record["target"], record.get("subject")


@app.command()
def ask(
    prompts: Annotated[list[str], typer.Argument(help="prompts to answer")],
    memory: Annotated[Optional[Path], typer.Option(help="edit memory folder (any method's); none: the base model")] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate per answer")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per line")] = False,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Greedy answers of the edited model, and whether the edit memory was used or deferred."""
    try:
        if memory is not None:
            editor = _load_saved(memory, model, dtype, device)
            answers = editor.answer(list(prompts), max_new_tokens)
        else:
            base, tokenizer, name = load_base(model, dtype, device)
            editor = get_method("elder").create(base, tokenizer, name, {})  # an empty memory: the base model
            answers = editor.answer(list(prompts), max_new_tokens, use_edits=False)
    except ElderError as error:
        _fail(error)
    for answer in answers:
        if as_json:
            typer.echo(json.dumps({"prompt": answer.prompt, "answer": answer.text, "used_memory": answer.used_memory,
                                   "distance": None if answer.distance == float("inf") else answer.distance,
                                   "edit_id": answer.edit_id}))
        else:
            how = "edited" if answer.used_memory else "deferred"
            typer.echo(f"[{how}] {answer.prompt!r} -> {answer.text.strip()!r}")


@app.command()
def demo(
    facts: Annotated[int, typer.Option(help="how many counterfactual capital facts to edit")] = 24,
    out: Annotated[Optional[Path], typer.Option(help="also save the memory here")] = None,
    method: MethodOpt = "elder",
    preset: PresetOpt = None,
    set_: SetOpt = [],
) -> None:
    """Edit counterfactual capitals into the embedded SmolLM2-135M and show answers before and after."""
    from elder.demo import run_demo

    try:
        method = method or "elder"
        settings = _settings(get_method(method), preset, set_)
        if out is None:
            run_demo(facts, None, method, settings, echo=typer.echo)
        else:
            with folder_lock(out):
                if _saved(out) is not None:
                    raise MethodError(f"{out} already holds a memory; the demo saves only to a new folder")
                run_demo(facts, out, method, settings, echo=typer.echo)
    except ElderError as error:
        _fail(error)


@app.command()
def serve(
    memory: Annotated[Path, typer.Option(help="folder of the service's journal and checkpoints (created; an existing "
                                         "one is resumed)")] = Path("elder-serve"),
    model: ModelOpt = None,
    method: Annotated[Optional[str], typer.Option(help="editing method of a new service (see `elder methods`); "
                                                  "default: elder")] = None,
    preset: PresetOpt = None,
    set_: SetOpt = [],
    host: Annotated[str, typer.Option(help="address to listen on; off loopback a --token is required")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        envvar="ELDER_TOKEN", help="bearer token every request that changes the memory must carry")] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="most ops waiting to be applied")] = 10_000,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Serve the edited model over HTTP: edits stream in, answers stream out, nothing acknowledged is lost."""
    try:
        from elder.serve import Engine, Limits, is_loopback
        from elder.serve import serve as run_service
    except ImportError as error:
        _fail(ConfigError(f"elder serve needs the serve extra (pip install 'elder[serve]'): {error}"))
    try:
        if not token and not is_loopback(host):
            raise ConfigError(f"refusing to listen on {host} without a bearer token: pass --token or set ELDER_TOKEN")
        settings = None
        if method is not None or preset is not None or set_:
            settings = _settings(get_method(method or "elder"), preset, set_)
        engine = Engine(memory, method, settings, model, dtype, device, Limits(queue=max_queue))
    except ElderError as error:
        _fail(error)
    typer.echo(f"serving {engine.cls.name} on {engine.base_name} at http://{host}:{port} "
               f"({len(engine.serving.held_edits)} edits held, journal at {engine.applied_seq}, {engine.queued()} queued); memory in {memory}", err=True)
    run_service(engine, host, port, token or None)


@app.command("methods")
def list_methods() -> None:
    """The editing methods this install knows, with their presets."""
    for name, cls in sorted(registered().items()):
        presets = ", ".join(cls.config_class.PRESETS) or "none"
        typer.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]} (presets: {presets})")


@app.command()
def bench(
    data: Annotated[str, typer.Option(help="benchmark: zsre:PATH, counterfact:PATH, jsonl:PATH, hf:NAME, or a path")],
    out: Annotated[Path, typer.Option(help="run folder (created; an existing run in it is resumed)")],
    edits: Annotated[int, typer.Option(help="T: sequential edits in the test stream")] = 1000,
    protocol: Annotated[str, typer.Option(help="final, immediate or curve")] = "final",
    curve_every: Annotated[int, typer.Option(help="curve protocol: score all edits so far every K edits")] = 100,
    methods: Annotated[str, typer.Option(help="comma-separated editing methods run on the same stream")] = "elder",
    preset: Annotated[Optional[str], typer.Option(help="ELDER settings preset: paper or fast (default fast)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="method setting K=V (for every method that has it), or "
                                            "METHOD.K=V for one")] = [],
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
    from elder.evaluation.harness import BenchSettings, run_bench

    try:
        names = tuple(m.strip() for m in methods.split(",") if m.strip())
        per_method: dict[str, dict] = {name: {} for name in names}
        if preset is not None and "elder" in per_method:
            per_method["elder"]["preset"] = preset
        for key, value in _pairs(set_):
            target, dot, field_name = key.rpartition(".")
            if dot and target not in per_method:
                raise ConfigError(f"--set {key}: method {target!r} is not in --methods")
            chosen = [target] if dot else [n for n in names if field_name in get_method(n).config_class.help()]
            if not chosen:
                raise ConfigError(f"--set {key}: no method in --methods has a setting {field_name!r}")
            for name in chosen:
                try:
                    per_method[name][field_name] = get_method(name).config_class.parse(field_name, value)
                except ConfigError as error:
                    raise ConfigError(f"--set {key}={value}: {error}") from None
        settings = BenchSettings(
            data=data, edits=edits, protocol=protocol, curve_every=curve_every, methods=names,
            method_settings={k: v for k, v in per_method.items() if v}, model=model, dtype=dtype, device=device,
            offset=offset, train_rephrases=train_rephrases, validation=validation, validation_data=validation_data,
            tune=tune, general_data=str(general) if general is not None else None, general_n=general_n,
            checkpoint_every=checkpoint_every, neighbours=neighbours, generation_tokens=generation_tokens)
        run_bench(settings, out, progress=True, echo=typer.echo)
    except ElderError as error:
        _fail(error)
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="run folder of `elder bench` (with --join: a new folder)")],
    join: Annotated[Optional[list[Path]], typer.Option(
        help="a run folder of the same stream whose finished methods join the report (repeat it); OUT is made "
             "as one run of them all")] = None,
) -> None:
    """Write a run's report from the methods that have finished (while later ones still run, or after a stop), or
    with --join one report of several runs of the same stream."""
    from elder.evaluation.harness import join_runs, report_run

    try:
        typer.echo(f"report: {join_runs(out, join) if join else report_run(out)}")
    except ElderError as error:
        _fail(error)
