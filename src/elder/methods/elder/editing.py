"""The edit loop: sequential batches of edits trained into an ElderModel's shared experts and routers."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from elder.data import EditRecord
from elder.errors import NonFiniteLossError
from elder.methods.base import EditResult, MethodError
from elder.methods.elder.model import ElderModel
from elder.methods.elder.negatives import ANSWER_TOKENS, negative_rows
from elder.tokens import TeacherForced, teacher_forced

SETTLE_STEPS = 200  # router-only steps before the experts train (settle_routes); each costs well under a millisecond
ANCHOR_LIMIT = 1024  # earlier edits whose routes anchor_routes keeps per batch, at most
ROUTE_MARGIN = 1.0  # logit gap settle_routes leaves between a row's preset experts and the others


@dataclass
class _Prepared:
    records: list[EditRecord]
    fact_ids: list[str]  # one per training row: paraphrases share their edit's id and preset
    prompts: list[str]  # one per training row
    subjects: list[str | None]  # one per training row: its edit's subject
    targets: list[str]  # one per training row
    batch: TeacherForced
    negatives: list[tuple[str, str, str]]  # (edit id, prompt, base answer) of each negative (config.negatives)
    negative_ids: torch.Tensor | None  # the base model's argmax at each negative's answer positions: their targets


def training_rows(record: EditRecord, paraphrase_split: float) -> list[str]:
    """Prompts trained for one edit: its prompt, plus the first part of its rephrases in the paper's variant."""
    return [record.prompt, *record.rephrases[: math.floor(paraphrase_split * len(record.rephrases))]]


def apply_edits(model: ElderModel, records: Sequence[EditRecord], progress: bool = True,
                on_batch: Callable[[list[EditResult]], None] | None = None) -> list[EditResult]:
    """Apply edits in order, batch after batch; every record is checked before anything is trained."""
    cfg = model.config
    seen = set(model.edit_log)
    for record in records:
        if record.id in seen:
            raise MethodError(f"edit id {record.id!r} is already in the memory (or repeated); forget it first")
        seen.add(record.id)
    prepared = [_prepare(model, list(records[i:i + cfg.batch_size])) for i in range(0, len(records), cfg.batch_size)]
    results: list[EditResult] = []
    bar = tqdm(total=len(records), desc="editing", unit="edit", disable=not progress)
    try:
        for item in prepared:
            batch_results = _train_batch(model, item)
            results += batch_results
            bar.update(len(batch_results))
            if on_batch is not None:
                on_batch(batch_results)
    finally:
        bar.close()
    return results


def _prepare(model: ElderModel, records: list[EditRecord]) -> _Prepared:
    fact_ids, prompts, targets, subjects = [], [], [], []
    for record in records:
        for prompt in training_rows(record, model.config.paraphrase_split):
            fact_ids.append(record.id)
            prompts.append(prompt)
            targets.append(record.target)
            subjects.append(record.subject)
    batch = teacher_forced(model.tokenizer, prompts, targets, model.context_limit, model.config.max_target_tokens,
                           model.input_device)
    negatives = negative_rows(records, model.config.negatives, lambda texts: [
        a.text for a in model.generate(texts, ANSWER_TOKENS, use_memory=False)])
    negative_ids = None
    if negatives:  # the argmax, not the answer's tokens: its text may tokenise otherwise after the prompt
        forced = teacher_forced(model.tokenizer, [p for _, p, _ in negatives], [a for _, _, a in negatives],
                                model.context_limit, model.config.max_target_tokens, model.input_device)
        with torch.no_grad():
            negative_ids = model.target_logits(forced, defer=False, use_memory=False)[0].argmax(-1)
    return _Prepared(records, fact_ids, prompts, subjects, targets, batch, negatives, negative_ids)


def _training_batch(model: ElderModel, item: _Prepared) -> tuple[list[str], TeacherForced]:
    """The rows one batch trains, and their fact ids: the batch's own rows; then those of `replay` earlier edits
    drawn at random (reproducibly, anew for each batch), which keeps the experts they share with the new edits on
    their answers; then the batch's negatives, routed as their edits, which keep other questions about the edited
    subjects on the base model's answers."""
    picked = _replay_picks(model)
    if not picked and not item.negatives:
        return item.fact_ids, item.batch
    fact_ids, prompts, targets = list(item.fact_ids), list(item.prompts), list(item.targets)
    for edit_id in picked:
        record = model.edit_log[edit_id]["record"]
        for prompt in training_rows(EditRecord.from_dict(record, f"edit {edit_id}"), model.config.paraphrase_split):
            fact_ids.append(edit_id), prompts.append(prompt), targets.append(record["target"])
    for edit_id, prompt, answer in item.negatives:
        fact_ids.append(edit_id), prompts.append(prompt), targets.append(answer)
    batch = teacher_forced(model.tokenizer, prompts, targets, model.context_limit, model.config.max_target_tokens,
                           model.input_device)
    if item.negative_ids is not None:  # the negatives are the last rows, their target tokens the last ones
        batch.target_ids[-len(item.negative_ids):] = item.negative_ids.to(batch.target_ids.device)
    return fact_ids, batch


def _replay_picks(model: ElderModel) -> list[str]:
    """The earlier edits replayed beside a new batch (none without `replay`)."""
    if model.config.replay == 0:
        return []
    # edits that never stopped would never let a batch stop; frozen blocks are not trained (block_edits)
    held = model.open_block_edits() if model.config.block_edits else model.edit_log
    earlier = [edit_id for edit_id in held if model.edit_log[edit_id]["learned"]]
    count = min(model.config.replay, len(earlier))
    if count == 0:
        return []
    generator = torch.Generator().manual_seed(model.config.seed * 1_000_003 + len(earlier))
    return [earlier[i] for i in torch.randperm(len(earlier), generator=generator)[:count].sort().values.tolist()]


def _train_batch(model: ElderModel, item: _Prepared) -> list[EditResult]:
    cfg = model.config
    start = time.perf_counter()
    model.make_room(len(item.records))  # block_edits: a full open block is frozen, these edits go to a fresh one
    fact_ids, batch = _training_batch(model, item)
    new = batch.rows < len(item.fact_ids)  # target tokens of the batch's own edits (then replayed ones, negatives)
    presets = torch.stack([model.preset_for(fid) for fid in fact_ids]).to(model.query_device)
    snapshot = {k: v.detach().clone() for k, v in model.adapters.state_dict().items()}
    routers = [p for a in model.adapters for p in a.router.parameters()]
    experts = [p for a in model.adapters for p in (a.lora_A, a.lora_B)]
    optimizer = torch.optim.Adam([{"params": experts}, {"params": routers, "lr": cfg.router_lr or cfg.lr}], lr=cfg.lr)
    keyed = cfg.deferral == "subject_key"  # the route is each row's preset: no router to train or settle
    anchors = None if keyed else _anchors(model)
    prefix = model.run_prefix(batch)  # the layers below the band are frozen: run them once per batch
    if cfg.settle_routes and not keyed and prefix is not None and prefix.query is not None:
        _settle_routes(model, prefix.query, presets, anchors, routers)
    steps = 0
    while True:
        logits, route = model.target_logits(batch, defer=False, prefix=prefix, forced=presets if keyed else None)
        targets = batch.target_ids.to(logits.device)
        hits = logits.argmax(-1) == targets
        learned = bool(hits[new.to(hits.device)].all())
        margin = cfg.stop_probability == 0.0 or bool(
            (logits.float().log_softmax(-1).gather(-1, targets[:, None]) >= math.log(cfg.stop_probability)).all())
        routed = keyed or _routed(route.scores, presets)
        if steps == cfg.iterations or (cfg.early_stop and bool(hits.all()) and margin
                                       and (routed or not cfg.anchor_routes)):
            break
        lm_loss = F.cross_entropy(logits.float(), targets)
        loss = lm_loss
        if not keyed:
            loss = loss + cfg.guide_weight * _guide_loss(model, route.scores, presets, anchors).to(lm_loss.device)
        if not torch.isfinite(loss):
            model.adapters.load_state_dict(snapshot)
            raise NonFiniteLossError(f"non-finite loss at step {steps} of the batch starting with edit "
                                     f"{item.records[0].id!r}; the batch was rolled back")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    keep_queries = route.query if (cfg.refresh_codes or cfg.anchor_routes) and not keyed else None
    keys = model.subject_keys(item.prompts, item.subjects) if keyed else None
    model.bank.add(item.fact_ids, route.codes[:len(item.fact_ids)], keep_queries, keys=keys)
    if cfg.refresh_codes:
        model.refresh_codes()
    seconds = (time.perf_counter() - start) / len(item.records)
    results = [EditResult(r.id, seconds, steps, learned) for r in item.records]
    for record, result in zip(item.records, results):
        model.edit_log[record.id] = {"record": record.to_dict(), **result.to_dict()}
    return results


def _guide_loss(model: ElderModel, scores: torch.Tensor, presets: torch.Tensor,
                anchors: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The guided loss: -log of the router scores at each fact's preset (layer, expert) pairs; with anchors, also
    at earlier edits' presets from their stored queries, so the routers keep old routes while learning new ones."""
    guide = -scores.gather(-1, presets).clamp_min(1e-12).log().sum(dim=(1, 2)).mean()
    if anchors is not None:
        old = model.router_scores(anchors[0])
        guide = guide - old.gather(-1, anchors[1]).clamp_min(1e-12).log().sum(dim=(1, 2)).mean()
    return guide


def _routed(scores: torch.Tensor, presets: torch.Tensor, margin: float = 0.0) -> bool:
    """Every row's top-k experts are its preset, in every layer, each preset expert's logit at least `margin` above
    every other expert's."""
    if margin == 0.0:
        return bool((scores.topk(presets.shape[-1], dim=-1).indices.sort(-1).values == presets).all())
    logs = scores.clamp_min(1e-30).log()
    weakest = logs.gather(-1, presets).min(-1).values
    others = logs.scatter(-1, presets, float("-inf")).max(-1).values
    return bool((weakest - others >= margin).all())


def _settle_routes(model: ElderModel, query: torch.Tensor, presets: torch.Tensor,
                   anchors: tuple[torch.Tensor, torch.Tensor] | None, routers: list[torch.nn.Parameter]) -> int:
    """Train the routers alone until the batch routes to its presets with a margin of ROUTE_MARGIN in logits (at most
    SETTLE_STEPS steps; the margin keeps the stored codes stable under small query changes); returns the steps.

    The query is read below the adapted band, so it does not depend on the experts: routing can be settled from the
    cached query with no model forward, before any expert is trained. The experts then learn under the final route
    instead of under whatever the routers picked on the way to it.
    """
    optimizer = torch.optim.Adam(routers, lr=model.config.router_lr or model.config.lr)
    for step in range(SETTLE_STEPS):
        scores = model.router_scores(query)
        if _routed(scores, presets, ROUTE_MARGIN):
            return step
        optimizer.zero_grad(set_to_none=True)
        _guide_loss(model, scores, presets, anchors).backward()
        optimizer.step()
    return SETTLE_STEPS


def _anchors(model: ElderModel) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stored queries and presets of earlier edits for anchor_routes: all of them, or a random ANCHOR_LIMIT of them
    (drawn anew for each batch, reproducibly) once the bank is larger, so a step's cost stays flat as edits grow."""
    bank = model.bank
    if not model.config.anchor_routes or bank.quantized_queries is None or len(bank) == 0:
        return None
    rows = torch.arange(len(bank))
    if len(bank) > ANCHOR_LIMIT:
        generator = torch.Generator().manual_seed(model.config.seed * 1_000_003 + len(bank))
        rows = torch.randperm(len(bank), generator=generator)[:ANCHOR_LIMIT].sort().values
    presets = torch.stack([model.presets[bank.ids[i]] for i in rows.tolist()]).to(model.query_device)
    return bank.query_rows(rows).to(model.query_device), presets


def forget(model: ElderModel, edit_id: str) -> None:
    """Remove an edit's codes so its prompt defers to the base model again."""
    if edit_id not in model.edit_log:
        raise MethodError(f"no edit with id {edit_id!r} in the memory")
    model.bank.remove(edit_id)
    del model.edit_log[edit_id]
