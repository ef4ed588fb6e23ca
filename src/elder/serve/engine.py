"""The service's engine: one editor answers, a second one (on its own copy of the base model) trains; a background
worker applies the journal's ops in order, checkpoints the trained state with the journal position it holds, and
then swaps the answering editor to it, so that every answer comes from one whole state.

On disk, in the memory folder: `journal.sqlite3` (the ops), `checkpoints/<seq>/` (an editor's saved state after
op `seq`) and `checkpoint.json` (which checkpoint is current), written in that order, each atomically: a kill at any
moment leaves the last published checkpoint whole, and the ops after it are replayed on start."""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from elder.data import DataError, EditRecord
from elder.errors import ElderError
from elder.files import sync_folder, write_json
from elder.methods import EditingMethod, Forgets, MethodError, get_method
from elder.methods.base import Answer
from elder.models import load_base
from elder.serve.journal import Journal, JournalError, Op
from elder.tokens import context_limit, encode_prompt, encode_target

CHECKPOINT = "checkpoint.json"
CHECKPOINT_DELAY = "ELDER_SERVE_CHECKPOINT_DELAY"  # seconds between writing and publishing a checkpoint (crash tests)


class ServiceError(ElderError, ValueError):
    """A request the service refuses; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    """Bounds on what one request may ask."""

    edits_per_request: int = 64
    prompts_per_request: int = 32
    prompt_chars: int = 4000
    max_new_tokens: int = 256
    queue: int = 10_000
    body_bytes: int = 1 << 20


@dataclass
class Stats:
    """Counters the metrics endpoint reports."""

    applied: int = 0  # edit and replace ops applied
    failed: int = 0  # ops the method refused
    prompts: int = 0  # prompts answered
    memory_used: int = 0  # of them, answered through the edit memory
    batch_seconds: float = 0.0  # wall time of the last applied batch (training, checkpoint and swap)


class Engine:
    """The edited model behind the service."""

    def __init__(self, folder: str | os.PathLike, method: str | None = None, settings: Mapping | None = None,
                 model: str | None = None, dtype: str | None = None, device: str | None = None,
                 limits: Limits | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.journal = Journal(self.folder / "journal.sqlite3")
        meta = self.journal.meta()
        if meta:
            if method is not None and method != meta["method"]:
                raise JournalError(f"{self.folder} serves a {meta['method']!r} memory, not {method!r}")
            if settings and dict(settings) != meta["settings"]:
                raise JournalError(f"{self.folder} was started with other settings; they cannot change")
            if model is not None and model != meta["model"]:
                raise JournalError(f"{self.folder} serves model {meta['model']!r}, not {model!r}")
        else:
            meta = {"method": method or "elder", "settings": dict(settings or {}), "model": model}
        self.cls: type[EditingMethod] = get_method(meta["method"])
        self.cls.config(meta["settings"])  # bad settings fail before a model loads
        base, self.tokenizer, self.base_name = load_base(meta["model"], dtype, device)
        self.context = context_limit(base)
        self.journal.set_meta(meta)
        self.meta = meta
        trainer_base = copy.deepcopy(base)  # before any hook is attached
        self.applied_seq, path = self._published()
        self._clean(keep=path)
        self.serving = self._open(path, base)
        self.trainer = self._open(path, trainer_base)
        self.stats = Stats()
        self._serve_lock = threading.Lock()  # one call on the answering editor at a time; the swap takes it too
        self._submit_lock = threading.Lock()
        self._wake = threading.Condition()
        self._stop = False
        self.worker_error: str | None = None
        self.known = self._known()  # edit id -> True while held or queued (False: queued to be forgotten)
        self._worker = threading.Thread(target=self._work, name="elder-edit-worker", daemon=True)
        self._worker.start()

    # --- checkpoints ---------------------------------------------------------------------------------

    def _published(self) -> tuple[int, Path | None]:
        path = self.folder / CHECKPOINT
        if not path.exists():
            return 0, None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            seq, folder = int(data["seq"]), self.folder / "checkpoints" / str(data["folder"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise JournalError(f"{path} is damaged: {error}") from None
        if not folder.is_dir():
            raise JournalError(f"{path} names {folder}, which is missing")
        return seq, folder

    def _clean(self, keep: Path | None) -> None:
        """Remove checkpoint folders a crash left unpublished or a later checkpoint replaced."""
        root = self.folder / "checkpoints"
        if root.is_dir():
            for child in root.iterdir():
                if keep is None or child.resolve() != keep.resolve():
                    shutil.rmtree(child, ignore_errors=True)

    def _open(self, path: Path | None, base) -> EditingMethod:
        if path is None:
            return self.cls.create(base, self.tokenizer, self.base_name, self.meta["settings"])
        return self.cls.load(path, base, self.tokenizer, self.base_name)

    def _checkpoint(self, seq: int) -> Path:
        """Save the trainer's state as of op `seq` and publish it; the previous checkpoint is then removed."""
        root = self.folder / "checkpoints"
        root.mkdir(exist_ok=True)
        name = f"{seq:012d}"
        final = root / name
        if self._published()[0] == seq and final.is_dir():
            return final  # published already (a batch taken one op at a time): never rewrite a published folder
        staging = root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        self.trainer.save(staging)
        shutil.rmtree(final, ignore_errors=True)  # an unpublished leftover
        os.replace(staging, final)
        sync_folder(root)
        delay = float(os.environ.get(CHECKPOINT_DELAY, "0") or 0)
        if delay:
            time.sleep(delay)
        write_json(self.folder / CHECKPOINT, {"seq": seq, "folder": name})
        self._clean(keep=final)
        return final

    # --- the worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while not self._stop:
                ops = self._next_ops()
                if not ops:
                    with self._wake:
                        self._wake.wait(timeout=0.5)
                    continue
                start = time.perf_counter()
                self._apply(ops)
                path = self._checkpoint(ops[-1].seq)
                with self._serve_lock:  # answers wait for the swap only, never for training
                    base = self.serving.close()
                    self.serving = self.cls.load(path, base, self.tokenizer, self.base_name)
                    self.applied_seq = ops[-1].seq
                self.stats.batch_seconds = time.perf_counter() - start
        except Exception as error:  # a bug: the worker stops, /health says so, answers go on from the last state
            self.worker_error = f"{type(error).__name__}: {error}"
            raise

    def _next_ops(self) -> list[Op]:
        """The next ops to apply as one batch: consecutive new edits up to the method's batch size, else one op."""
        ops = self.journal.after(self.applied_seq, self.trainer.batch_size)
        if not ops or ops[0].kind != "edit":
            return ops[:1]
        batch = []
        for op in ops:
            if op.kind != "edit" or op.edit_id in {o.edit_id for o in batch}:
                break
            batch.append(op)
        return batch

    def _apply(self, ops: list[Op]) -> None:
        """Apply ops to the trainer. When the method refuses a batch, the trainer goes back to the last checkpoint
        and takes the ops one at a time, each checkpointed, so that only the refused ones fail (and are recorded
        as failed), and nothing of them stays."""
        try:
            self._apply_all(ops)
            self.stats.applied += sum(op.kind != "forget" for op in ops)
            return
        except ElderError as error:
            self._reload()
            if len(ops) == 1:
                self._failed(ops[0], error)
                return
        for op in ops:
            try:
                self._apply_all([op])
            except ElderError as error:
                self._reload()
                self._failed(op, error)
                continue
            self.stats.applied += op.kind != "forget"
            self._checkpoint(op.seq)

    def _reload(self) -> None:
        base = self.trainer.close()
        self.trainer = self._open(self._published()[1], base)

    def _failed(self, op: Op, error: Exception) -> None:
        self.journal.fail(op.seq, str(error))
        self.stats.failed += 1

    def _apply_all(self, ops: list[Op]) -> None:
        edits = []
        for op in ops:
            if op.kind in ("forget", "replace") and op.edit_id in self.trainer.held_edits:
                self.trainer.forget(op.edit_id)
            elif op.kind == "forget":
                raise MethodError(f"no edit with id {op.edit_id!r} is held")
            if op.kind in ("edit", "replace"):
                edits.append(EditRecord.from_dict(op.record, f"op {op.seq}"))
        if edits:
            self.trainer.edit(edits)

    def close(self) -> None:
        """Stop the worker (after the batch it is applying) and close the journal."""
        self._stop = True
        with self._wake:
            self._wake.notify_all()
        self._worker.join(timeout=600)
        self.journal.close()

    # --- requests -----------------------------------------------------------------------------------

    def _known(self) -> dict[str, bool]:
        known = {edit_id: True for edit_id in self.serving.held_edits}
        for op in self.journal.after(self.applied_seq):
            known[op.edit_id] = op.kind != "forget"
        return known

    def queued(self) -> int:
        """Ops accepted but not yet applied."""
        return self.journal.count_after(self.applied_seq)

    def _check_record(self, data: object, where: str) -> EditRecord:
        try:
            record = EditRecord.from_dict(data, where)
        except DataError as error:
            raise ServiceError(str(error)) from None
        for prompt in (record.prompt, *record.rephrases):
            self._check_size(prompt, f"{where}: ")
        try:
            ids = encode_prompt(self.tokenizer, record.prompt, self.context)
            encode_target(self.tokenizer, ids, record.prompt, record.target, 1 << 30)
        except ElderError as error:
            raise ServiceError(f"{where}: {error}") from None
        return record

    def _check_size(self, prompt: str, where: str = "") -> None:
        if len(prompt) > self.limits.prompt_chars:
            raise ServiceError(f"{where}a prompt of {len(prompt)} characters is over the limit of "
                               f"{self.limits.prompt_chars}", 413)

    def submit(self, records: Sequence[object]) -> list[tuple[str, int, int]]:
        """Journal new edits; (id, seq, position in the queue) for each, once durable."""
        if not records:
            raise ServiceError("no edits given")
        if len(records) > self.limits.edits_per_request:
            raise ServiceError(f"{len(records)} edits in one request; at most {self.limits.edits_per_request}", 413)
        checked = [self._check_record(r, f"edit {i}") for i, r in enumerate(records)]
        with self._submit_lock:
            ids = [r.id for r in checked]
            taken = [i for i in ids if self.known.get(i)] + [i for i in set(ids) if ids.count(i) > 1]
            if taken:
                raise ServiceError(f"edit id {taken[0]!r} is already held, queued or repeated; PUT /edits/{taken[0]} "
                                   "replaces it", 409)
            queued = self._room(len(checked))
            seqs = self.journal.append([("edit", r.id, r.to_dict()) for r in checked])
            for r in checked:
                self.known[r.id] = True
        self._notify()
        return [(r.id, s, queued + i + 1) for i, (r, s) in enumerate(zip(checked, seqs, strict=True))]

    def replace(self, edit_id: str, data: object) -> tuple[int, int]:
        """Journal a replacement of a held or queued edit: the new target wins, the old is forgotten."""
        if not isinstance(data, dict):
            raise ServiceError("the replacement must be a JSON object")
        if data.get("id", edit_id) != edit_id:
            raise ServiceError(f"the body's id {data['id']!r} is not the path's {edit_id!r}")
        record = self._check_record({**data, "id": edit_id}, f"edit {edit_id!r}")
        with self._submit_lock:
            self._known_or_404(edit_id)
            self._forgets_or_409("replace")
            queued = self._room(1)
            seq = self.journal.append([("replace", edit_id, record.to_dict())])[0]
        self._notify()
        return seq, queued + 1

    def forget(self, edit_id: str) -> tuple[int, int]:
        """Journal forgetting a held or queued edit."""
        with self._submit_lock:
            self._known_or_404(edit_id)
            self._forgets_or_409("forget")
            queued = self._room(1)
            seq = self.journal.append([("forget", edit_id, None)])[0]
            self.known[edit_id] = False
        self._notify()
        return seq, queued + 1

    def _known_or_404(self, edit_id: str) -> None:
        if not self.known.get(edit_id):
            raise ServiceError(f"no edit with id {edit_id!r} is held or queued", 404)

    def _forgets_or_409(self, what: str) -> None:
        if not isinstance(self.trainer, Forgets):
            raise ServiceError(f"{self.cls.name} cannot forget an edit, so it cannot {what} one", 409)

    def _room(self, count: int) -> int:
        queued = self.queued()
        if queued + count > self.limits.queue:
            raise ServiceError(f"the queue holds {queued} ops; at most {self.limits.queue}", 429)
        return queued

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def status(self, edit_id: str) -> dict:
        """Where an edit stands: queued, applied, failed or forgotten, with its newest op."""
        op = self.journal.last_of(edit_id)
        if op is None:
            raise ServiceError(f"no edit with id {edit_id!r} was ever submitted", 404)
        failure = self.journal.failure(op.seq)
        if op.seq > self.applied_seq:
            state = "queued"
        elif failure is not None:
            state = "failed"
        else:
            state = "forgotten" if op.kind == "forget" else "applied"
        return {"id": edit_id, "status": state, "seq": op.seq, "op": op.kind, "record": op.record,
                "error": failure}

    def edits(self) -> dict:
        """The held edits (as answering now) and the queued ops."""
        with self._serve_lock:
            held = self.serving.held_edits
        queued = [{"seq": op.seq, "op": op.kind, "id": op.edit_id} for op in self.journal.after(self.applied_seq)]
        return {"held": [{"id": k, **{f: v[f] for f in ("prompt", "target")}} for k, v in held.items()],
                "queued": queued}

    def answer(self, prompts: Sequence[str], max_new_tokens: int) -> list[Answer]:
        """Greedy answers from the current state, all from one state."""
        if not prompts:
            raise ServiceError("no prompts given")
        if len(prompts) > self.limits.prompts_per_request:
            raise ServiceError(f"{len(prompts)} prompts in one request; at most {self.limits.prompts_per_request}",
                               413)
        if not 1 <= max_new_tokens <= self.limits.max_new_tokens:
            raise ServiceError(f"max_new_tokens must lie in 1..{self.limits.max_new_tokens}, got {max_new_tokens}")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ServiceError("every prompt must be a string")
            self._check_size(prompt)
        with self._serve_lock:
            try:
                answers = self.serving.answer(list(prompts), max_new_tokens)
            except ElderError as error:
                raise ServiceError(str(error)) from None
        self.stats.prompts += len(answers)
        self.stats.memory_used += sum(a.used_memory for a in answers)
        return answers
