"""EasyEdit's editing metrics, plus exact match and ELDER's deferral diagnostics.

Reliability (`rewrite_acc`) and Generalization (`rephrase_acc`) are teacher-forced token accuracies of the target
after the edit prompt and after each held-out rephrase, averaged per prompt and then over edits. Locality is the
fraction of a locality answer's token positions where the edited model's argmax equals the base model's, with the
answer teacher-forced (EasyEdit compares pre- and post-edit predictions the same way). Exact match is 1 when every
target token is the argmax: with greedy decoding that is the same as the generation equalling the target.
Locality is also split by the probe's kind: unrelated prompts (another topic) and neighbour prompts (the edit's
question about another subject), each with the rate at which the memory answered them.

Teacher forcing overstates editing success, so `generation_scores` also judges free greedy answers: right when the
answer begins with the target, and fluent by ROME's n-gram entropy, compared with the base model's answers.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from elder.data import EditRecord
from elder.methods.base import EditingMethod, TokenPrediction

Rephrases = Callable[[EditRecord], Sequence[str]]  # the held-out rephrases a record is scored on
Predict = Callable[[list[str], list[str]], list[TokenPrediction]]  # teacher-forced predictions of the edited model


@dataclass(frozen=True)
class EditScore:
    """One edit's scores; None where the record has nothing to score (no held-out rephrase, no locality probe)."""

    id: str
    rel: float
    rel_em: float
    gen: float | None
    gen_em: float | None
    loc: float | None
    used_prompt: float | None  # 1.0 when the memory answered the edit prompt (None: the method has no deferral)
    used_rephrase: float | None
    used_locality: float | None
    loc_unrelated: float | None = None
    loc_neighbour: float | None = None
    used_unrelated: float | None = None
    used_neighbour: float | None = None
    loc_neighbour_named: float | None = None  # neighbours that name the subject of an edit among the scored ones
    loc_neighbour_unnamed: float | None = None  # neighbours that name none

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


METRICS = ("rel", "rel_em", "gen", "gen_em", "loc", "used_prompt", "used_rephrase", "used_locality",
           "loc_unrelated", "loc_neighbour", "used_unrelated", "used_neighbour", "loc_neighbour_named",
           "loc_neighbour_unnamed")
SCORE_CHUNK = 512  # rows per predict call: the unit of the progress bar


def locality_rows(records: Sequence[EditRecord]) -> list[tuple[str, str]]:
    """(prompt, answer) of every locality probe that has an answer, in record order."""
    return [(p.prompt, p.answer) for r in records for p in r.locality if p.answer is not None]


def base_locality(method: EditingMethod, records: Sequence[EditRecord],
                  progress: str | None = None) -> list[tuple[int, ...]]:
    """The base model's argmax tokens on every locality row: the reference Locality compares against."""
    rows = locality_rows(records)
    predict = lambda p, t: method.predict(p, t, use_edits=False)  # noqa: E731
    return [p.predicted for p in chunked_predict(predict, [r[0] for r in rows], [r[1] for r in rows], progress)]


def chunked_predict(predict: Predict, prompts: Sequence[str], targets: Sequence[str],
                    progress: str | None = None) -> list[TokenPrediction]:
    """`predict` over the rows in chunks, with a progress bar titled `progress` (None: no bar)."""
    out: list[TokenPrediction] = []
    with tqdm(total=len(prompts), desc=progress, unit="row", disable=progress is None, leave=False) as bar:
        for start in range(0, len(prompts), SCORE_CHUNK):
            out += predict(list(prompts[start:start + SCORE_CHUNK]), list(targets[start:start + SCORE_CHUNK]))
            bar.update(min(SCORE_CHUNK, len(prompts) - start))
    return out


def score_edits(predict: Predict, records: Sequence[EditRecord], rephrases: Rephrases,
                base_tokens: Sequence[tuple[int, ...]], progress: str | None = None) -> list[EditScore]:
    """Score every record with `predict` (usually a method's); `base_tokens` is base_locality of the same records.
    `progress` titles a progress bar (None: none)."""
    prompts, targets, owners = [], [], []  # owners: (record index, kind)
    for i, record in enumerate(records):
        prompts.append(record.prompt), targets.append(record.target), owners.append((i, "prompt"))
        for text in rephrases(record):
            prompts.append(text), targets.append(record.target), owners.append((i, "rephrase"))
        for probe in record.locality:
            if probe.answer is not None:
                prompts.append(probe.prompt), targets.append(probe.answer), owners.append((i, "locality"))
    predictions = chunked_predict(predict, prompts, targets, progress)
    grouped: list[dict[str, list[TokenPrediction]]] = [{"prompt": [], "rephrase": [], "locality": []} for _ in records]
    for (i, kind), prediction in zip(owners, predictions):
        grouped[i][kind].append(prediction)
    base = iter(base_tokens)
    names = edited_subjects(records)
    scores = []
    for record, group in zip(records, grouped):
        probes = [p for p in record.locality if p.answer is not None]  # the order of group["locality"]
        kinds = [p.kind if p.kind != "neighbour" else "named" if names(p.prompt) else "unnamed" for p in probes]
        agreement = [_agreement(p.predicted, next(base)) for p in group["locality"]]
        (edit,) = group["prompt"]
        of = lambda values, *wanted: [v for v, k in zip(values, kinds) if k in wanted]  # noqa: E731
        scores.append(EditScore(
            id=record.id,
            rel=edit.accuracy,
            rel_em=float(edit.accuracy == 1.0),
            gen=_mean([p.accuracy for p in group["rephrase"]]),
            gen_em=_mean([float(p.accuracy == 1.0) for p in group["rephrase"]]),
            loc=_mean(agreement),
            used_prompt=_used([edit]),
            used_rephrase=_used(group["rephrase"]),
            used_locality=_used(group["locality"]),
            loc_unrelated=_mean(of(agreement, "unrelated")),
            loc_neighbour=_mean(of(agreement, "named", "unnamed")),
            used_unrelated=_used(of(group["locality"], "unrelated")),
            used_neighbour=_used(of(group["locality"], "named", "unnamed")),
            loc_neighbour_named=_mean(of(agreement, "named")),
            loc_neighbour_unnamed=_mean(of(agreement, "unnamed")),
        ))
    leftover = next(base, None)
    if leftover is not None:
        raise ValueError("base_tokens has more rows than the records' locality probes")
    return scores


def edited_subjects(records: Sequence[EditRecord]) -> Callable[[str], bool]:
    """Whether a text names the subject of one of these edits (as written): a subject-keyed memory lets such a
    neighbour in, and one that asks the edited fact itself should change (CounterFact's neighbours of a long
    stream hold some, benchmarks/conflicts.py)."""
    subjects = sorted({r.subject for r in records if r.subject}, key=len, reverse=True)
    if not subjects:
        return lambda text: False
    pattern = re.compile("|".join(map(re.escape, subjects)))
    return lambda text: pattern.search(text) is not None


def summarize(scores: Sequence[EditScore | GenerationScore],
              names: Sequence[str] = METRICS) -> dict[str, float | None]:
    """Mean of each metric over the edits that have it (None when none do), and the count of edits."""
    summary: dict[str, float | None] = {"edits": len(scores)}
    for name in names:
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        summary[name] = statistics.fmean(values) if values else None
    return summary


def score_from_dict(data: Mapping) -> EditScore:
    """Inverse of EditScore.to_dict."""
    return EditScore(**{k: data.get(k) for k in ("id", *METRICS)})  # runs before the split lack its metrics


def _agreement(edited: tuple[int, ...], base: tuple[int, ...]) -> float:
    if len(edited) != len(base):
        raise ValueError("a locality row was tokenised differently for the base and the edited model")
    return sum(a == b for a, b in zip(edited, base)) / len(base)


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _used(predictions: Sequence[TokenPrediction]) -> float | None:
    flags = [p.used_memory for p in predictions if p.used_memory is not None]
    return statistics.fmean(float(f) for f in flags) if flags else None


# --- generation-based scores ---------------------------------------------------------------------

Answerer = Callable[[list[str], bool], list[str]]  # (prompts, use_edits) -> greedy answers, prompt not included
GENERATION_BATCH = 32  # prompts per generate call: the unit of the progress bar
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class GenerationScore:
    """One edit's free greedy answers, judged against its target and the base model's answer."""

    id: str
    rel_gen: float  # 1.0 when the answer to the edit prompt begins with the target
    gen_gen: float | None  # the same over the held-out rephrases (None: none)
    fluency: float  # n-gram entropy of the edited answer to the edit prompt
    fluency_base: float  # the same for the base model's answer to the same prompt
    repeated_target: float  # 1.0 when the edited answer states the target twice in a row
    answer: str
    base_answer: str

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


GENERATION_METRICS = ("rel_gen", "gen_gen", "fluency", "fluency_base", "repeated_target")


def _plain(text: str) -> str:
    return " ".join(text.split()).casefold()


def begins_with(answer: str, target: str) -> bool:
    """Whether `answer` starts with `target`, ignoring case and runs of white space."""
    return _plain(answer).startswith(_plain(target))


def ngram_entropy(text: str, orders: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: the weighted mean of the entropies (bits) of the text's word 2- and 3-gram
    frequencies. Words are runs of letters and digits or single punctuation marks (ROME uses NLTK's tokenizer)."""
    words = _WORD.findall(text)
    entropies = []
    for n in orders:
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropies.append(-sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0)
    return statistics.fmean(w * h for w, h in zip(weights, entropies))


def repeats(answer: str, target: str) -> bool:
    """Whether the answer states the target twice in a row, with nothing but spaces or punctuation between
    ("Lima Lima.", "Moscow, Moscow"): the stutter of experts that act on every generated token. Restating it in a
    later sentence is not counted."""
    target = re.escape(_plain(target))
    return re.search(rf"{target}[\W_]*{target}", _plain(answer)) is not None


def generate_all(answer: Answerer, prompts: Sequence[str], use_edits: bool, progress: str | None = None) -> list[str]:
    """`answer` over the prompts in batches, with a progress bar titled `progress` (None: no bar)."""
    out: list[str] = []
    with tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None, leave=False) as bar:
        for start in range(0, len(prompts), GENERATION_BATCH):
            out += answer(list(prompts[start:start + GENERATION_BATCH]), use_edits)
            bar.update(min(GENERATION_BATCH, len(prompts) - start))
    return out


def generation_scores(answer: Answerer, records: Sequence[EditRecord], rephrases: Rephrases,
                      base_answers: Sequence[str], progress: str | None = None) -> list[GenerationScore]:
    """Judge the edited model's greedy answers to every edit prompt and held-out rephrase; `base_answers` are the
    base model's answers to the edit prompts (generate_all with use_edits=False)."""
    if len(base_answers) != len(records):
        raise ValueError(f"{len(base_answers)} base answers for {len(records)} records")
    prompts, owners = [], []
    for i, record in enumerate(records):
        prompts.append(record.prompt), owners.append((i, "prompt"))
        for text in rephrases(record):
            prompts.append(text), owners.append((i, "rephrase"))
    texts = generate_all(answer, prompts, True, progress)
    grouped: list[dict[str, list[str]]] = [{"prompt": [], "rephrase": []} for _ in records]
    for (i, kind), text in zip(owners, texts):
        grouped[i][kind].append(text)
    scores = []
    for record, group, base in zip(records, grouped, base_answers):
        (edited,) = group["prompt"]
        scores.append(GenerationScore(
            id=record.id, rel_gen=float(begins_with(edited, record.target)),
            gen_gen=_mean([float(begins_with(t, record.target)) for t in group["rephrase"]]),
            fluency=ngram_entropy(edited), fluency_base=ngram_entropy(base),
            repeated_target=float(repeats(edited, record.target)), answer=edited, base_answer=base))
    return scores


def summarize_generation(scores: Sequence[GenerationScore]) -> dict[str, float | None]:
    """Mean of each generation metric, and the edited answers' fluency over the base model's."""
    summary = summarize(scores, GENERATION_METRICS)
    base = summary["fluency_base"]
    summary["fluency_ratio"] = summary["fluency"] / base if base else None
    return summary
