"""The EasyEdit user's way in: `BaseEditor.from_hparams(...).edit(prompts=, target_new=, ...)` with EasyEdit's
argument names, returning EasyEdit-shaped per-edit metrics, so that a script written for EasyEdit runs on any
method of elder with its import changed:

    from elder.easyedit import BaseEditor                 # was: from easyeditor import BaseEditor
    editor = BaseEditor.from_hparams({"alg_name": "GRACE", "model_name": None})
    metrics, edited_model, _ = editor.edit(prompts=[...], target_new=[...], rephrase_prompts=[...],
                                           locality_inputs={"neighborhood": {"prompt": [...], "ground_truth": [...]}},
                                           sequential_edit=True)
    metrics[0]["post"]["rewrite_acc"], metrics[0]["post"]["rephrase_acc"], metrics[0]["post"]["locality"]

The scores are EasyEdit's: rewrite_acc and rephrase_acc are the teacher-forced token accuracy of the target after
the prompt (a list of one value per prompt); locality[f"{key}_acc"] is the fraction of the locality answer's
positions where the edited model's argmax equals the unedited model's. `edited_model` is the elder editor itself
(an EditingMethod: `answer`, `predict`, `save`, `close`), since the edits live beside the base weights, not in them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from elder.data import DataError, EditRecord
from elder.methods import EditingMethod, get_method
from elder.methods.base import TokenPrediction
from elder.models import load_base

# EasyEdit's alg_name values and elder's methods of the same algorithm
ALGORITHMS = {"ELDER": "elder", "FT": "ft", "FT-L": "ft", "LORA": "lora", "GRACE": "grace", "MELO": "melo",
              "MEMOIR": "memoir", "ALPHAEDIT": "alphaedit"}


class BaseEditor:
    """EasyEdit's editor, over one elder method on one base model."""

    def __init__(self, method: EditingMethod) -> None:
        self.method = method

    @classmethod
    def from_hparams(cls, hparams: Any, **settings) -> "BaseEditor":
        """An editor from EasyEdit-style hyperparameters: a mapping or an object with `alg_name` (EasyEdit's name,
        e.g. "GRACE", or elder's, e.g. "memoir") and `model_name` (a hub id, a local folder, or None for the
        embedded SmolLM2-135M); `settings` are the method's own (elder's names, checked)."""
        get = hparams.get if isinstance(hparams, Mapping) else lambda key, default=None: getattr(hparams, key, default)
        alg = get("alg_name")
        if not isinstance(alg, str) or not alg:
            raise DataError(f"hparams need an alg_name (one of {', '.join(ALGORITHMS)}), got {alg!r}")
        cls_ = get_method(ALGORITHMS.get(alg.upper(), alg))
        cls_.config(settings)  # bad settings fail before the model loads
        base, tokenizer, name = load_base(get("model_name"), device=get("device"))
        return cls(cls_.create(base, tokenizer, name, settings))

    def edit(self, prompts: str | Sequence[str], target_new: str | Sequence[str],
             ground_truth: str | Sequence[str] | None = None, subject: str | Sequence[str] | None = None,
             rephrase_prompts: str | Sequence[str] | None = None,
             locality_inputs: Mapping[str, Mapping[str, Any]] | None = None,
             sequential_edit: bool = True, **ignored) -> tuple[list[dict], EditingMethod, None]:
        """Apply the edits in order and score them as EasyEdit does: after all of them (`sequential_edit=True`, the
        lifelong setting, in the method's batches) or each right after it is made (False, one at a time; nothing
        is rolled back, unlike EasyEdit's per-edit restore). Returns (metrics, edited model, None), EasyEdit's
        triple."""
        prompts, target_new = _listed(prompts, "prompts"), _listed(target_new, "target_new")
        n = len(prompts)
        ground_truth = _aligned(ground_truth, n, "ground_truth")
        subject = _aligned(subject, n, "subject")
        rephrases = _aligned(rephrase_prompts, n, "rephrase_prompts")
        locality = {key: (_aligned(value.get("prompt"), n, f"locality_inputs[{key!r}]['prompt']"),
                          _aligned(value.get("ground_truth"), n, f"locality_inputs[{key!r}]['ground_truth']"))
                    for key, value in (locality_inputs or {}).items()}
        if len(target_new) != n:
            raise DataError(f"{n} prompts but {len(target_new)} target_new")
        start = len(self.method.edited_ids)
        records = [EditRecord(f"easyedit-{start + i}", p, t, subject=s)
                   for i, (p, t, s) in enumerate(zip(prompts, target_new, subject))]
        pre = [self._scores(i, records, rephrases, locality, use_edits=False) for i in range(n)]
        metrics, seconds = [], []
        step = self.method.batch_size if sequential_edit else 1  # the method's own batches, as elder bench runs it
        for lo in range(0, n, step):
            chunk = records[lo:lo + step]
            began = time.perf_counter()
            self.method.edit(chunk)
            seconds += [(time.perf_counter() - began) / len(chunk)] * len(chunk)
            if not sequential_edit:
                metrics.append(self._scores(lo, records, rephrases, locality, use_edits=True, reference=pre[lo]))
        if sequential_edit:
            metrics = [self._scores(i, records, rephrases, locality, use_edits=True, reference=pre[i])
                       for i in range(n)]
        out = []
        for i, record in enumerate(records):
            rewrite = {"prompt": record.prompt, "target_new": record.target, "ground_truth": ground_truth[i],
                       "subject": subject[i], "rephrase_prompt": rephrases[i],
                       "locality": {k: {"prompt": v[0][i], "ground_truth": v[1][i]} for k, v in locality.items()}}
            out.append({"case_id": i, "requested_rewrite": rewrite, "time": seconds[i],
                        "pre": _public(pre[i]), "post": _public(metrics[i])})
        return out, self.method, None

    def _scores(self, i: int, records: list[EditRecord], rephrases: list, locality: dict, use_edits: bool,
                reference: dict | None = None) -> dict:
        predict = lambda p, t: self.method.predict([p], [t], use_edits=use_edits)[0]  # noqa: E731
        record = records[i]
        scores = {"rewrite_acc": [predict(record.prompt, record.target).accuracy], "locality": {}, "portability": {},
                  "_locality_tokens": {}}
        if rephrases[i] is not None:
            scores["rephrase_acc"] = [predict(rephrases[i], record.target).accuracy]
        for key, (prompts, answers) in locality.items():
            if prompts[i] is None or answers[i] is None:
                continue
            tokens = predict(prompts[i], answers[i])
            scores["_locality_tokens"][key] = tokens
            if reference is not None:
                scores["locality"][f"{key}_acc"] = [_agreement(tokens, reference["_locality_tokens"][key])]
        return scores


def _agreement(edited: TokenPrediction, base: TokenPrediction) -> float:
    return sum(a == b for a, b in zip(edited.predicted, base.predicted)) / len(base.predicted)


def _public(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if not k.startswith("_")}


def _listed(value, name: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value) if value is not None else []
    if not values:
        raise DataError(f"{name} is empty")
    return values


def _aligned(value, n: int, name: str) -> list:
    """One entry per edit (None where there is none): a string is the one edit's, a list must have n entries."""
    if value is None:
        return [None] * n
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != n:
        raise DataError(f"{name} has {len(values)} entries for {n} prompts")
    return values
