"""General-ability retention: how much of a model's skill on eight unrelated tasks survives editing.

ELDER reports, like "Model Editing Harms General Abilities of LLMs" (Gu et al., 2024, whose task data
is in ``shared/data/general/``), the score of the base and of the edited model on a fixed sample of each
of eight tasks, with each task's own metric, and the edited/base ratio per task and on average:

=========  ======================  ===========================================================
key        task                    scored by
=========  ======================  ===========================================================
rte        RTE (NLI)               accuracy, option with the highest log-likelihood
boolq      BoolQ (closed QA)       accuracy, option with the highest log-likelihood
sst2       SST-2 (sentiment)       accuracy, option with the highest log-likelihood
mutual     MuTual (dialogue)       accuracy over 4 candidate next turns, highest log-likelihood
conll03    CoNLL-03 (NER)          micro entity F1 of a generated entity list (type-agnostic)
nq         NQ-open (open QA)       exact match against any answer, SQuAD normalisation
gsm8k      GSM8K (reasoning)       exact match of the last number generated
samsum     SAMSum (summarisation)  ROUGE-L F (``rouge-score``, Porter stemmer)
=========  ======================  ===========================================================

The classification tasks are scored by comparing the log-likelihood of each option rather than by
generating an answer and parsing it: the target model is SmolLM2-135M, whose free generations rarely
contain a parseable label, so generate-and-parse would measure formatting luck, not ability, and the
retention ratio would be noise. The remaining tasks have open answers and are scored on a short greedy
generation.

The model is reached only through two callables, so this module needs neither torch nor the model code:

- ``loglikelihood(prompts, continuations) -> list[float]``: for each pair, the summed log-probability of
  the continuation's tokens given the prompt;
- ``generate(prompts, max_new_tokens) -> list[str]``: for each prompt, the greedy continuation text only
  (without the prompt).

Prompts are short, few-shot-free instructions that end where the answer begins.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from elder.errors import ElderError

LogLikelihood = Callable[[list[str], list[str]], list[float]]
Generate = Callable[[list[str], int], list[str]]

DEFAULT_N = 100
"""Examples per task by default: 800 prompts per model, a few CPU minutes for SmolLM2-135M."""

MAX_PROMPT_CHARS = 1_600
"""Prompts longer than this are dropped before sampling.

It only bites on BoolQ passages and SAMSum dialogues of about 1,500 characters or more (1-3 % of those
files); MuTual dialogues and every other task stay under it. The model's context is 8k tokens, but CPU
time grows with the prompt.
"""


class GeneralDataError(ElderError, ValueError):
    """A missing general-ability data file or a malformed record in one."""

    def __init__(self, path: Path, message: str, index: int | None = None) -> None:
        self.path = Path(path)
        self.index = index
        where = f"{self.path}" if index is None else f"{self.path}: record {index}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Example:
    """One task instance: a prompt, its options (choice tasks only) and the gold answer."""

    task: str
    index: int  # position of the record in its data file (0-based)
    prompt: str
    options: tuple[str, ...] = ()  # continuations to compare; empty for generation tasks
    # choice tasks: index into options; nq: tuple of answers; gsm8k: canonical number string;
    # conll03: tuple of (entity text, type); samsum: reference summary
    gold: Any = None


Loader = Callable[[Mapping[str, Any]], tuple[str, tuple[str, ...], Any]]
Scorer = Callable[[Example, Any], Any]
Aggregator = Callable[[list[Any]], float]


@dataclass(frozen=True)
class GeneralTask:
    """How to load, prompt and score one task.

    ``load`` turns a raw record into ``(prompt, options, gold)`` and raises KeyError, TypeError or
    ValueError on a malformed record. ``score`` gives one example's statistic from the gold answer and
    the prediction (the chosen option index for choice tasks, the trimmed generation otherwise);
    ``aggregate`` turns the list of statistics into the task score in [0, 1] and ``example_score`` one
    statistic into a per-example score for the predictions list.
    """

    name: str
    title: str
    file_name: str
    metric: str
    load: Loader
    score: Scorer
    aggregate: Aggregator
    example_score: Callable[[Any], float] = float
    max_new_tokens: int | None = None  # None: scored by option log-likelihood
    stop: tuple[str, ...] = field(default=())  # a generation is cut at the first of these

    @property
    def is_choice(self) -> bool:
        return self.max_new_tokens is None


# --------------------------------------------------------------------------- metrics


_PUNCTUATION = frozenset(string.punctuation)


def _normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: str | Iterable[str]) -> bool:
    """Whether the prediction equals any of the answers after SQuAD normalisation."""
    if isinstance(answers, str):
        answers = [answers]
    predicted = _normalize_answer(prediction)
    return any(predicted == _normalize_answer(answer) for answer in answers)


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in the text, canonical: thousands commas and trailing decimal zeros removed.

    ``"so 1,234.50 dollars"`` gives ``"1234.5"``; ``"18.00"`` gives ``"18"``; no number gives None.
    """
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("-0", ""):
        number = "0"
    return number


def bio_entities(tokens: Sequence[str], tags: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(text, type)`` entities of a BIO-tagged sentence, tokens joined with spaces.

    ``B-X`` always starts an entity; ``I-X`` continues an entity of type X and, as in conlleval, starts
    one after ``O`` or an entity of another type.
    """
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    entities: list[tuple[str, str]] = []
    current: list[str] = []
    current_type: str | None = None
    for token, tag in zip(tokens, tags):
        if not isinstance(token, str) or not isinstance(tag, str):
            raise TypeError(f"tokens and tags must be strings, got {token!r} / {tag!r}")
        if tag == "O":
            prefix, kind = "O", None
        elif len(tag) > 2 and tag[:2] in ("B-", "I-"):
            prefix, kind = tag[0], tag[2:]
        else:
            raise ValueError(f"bad BIO tag {tag!r}")
        if prefix == "I" and kind == current_type:
            current.append(token)
            continue
        if current_type is not None:
            entities.append((" ".join(current), current_type))
        current, current_type = ([token], kind) if prefix != "O" else ([], None)
    if current_type is not None:
        entities.append((" ".join(current), current_type))
    return entities


def _normalize_entity(text: str) -> str:
    text = " ".join(text.split()).casefold()
    return text.strip(string.punctuation + " \"'`")


def entity_f1(predicted: Iterable[str], gold: Iterable[str]) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of one sentence's predicted entity strings against its gold ones.

    Both sides are sets of normalised strings (case-folded, whitespace collapsed, surrounding punctuation
    and quotes stripped), so a repeated entity counts once. Types are ignored. Pool the counts over
    sentences and apply :func:`f1_score` for the micro F1.
    """
    predicted_set = {e for e in map(_normalize_entity, predicted) if e}
    gold_set = {e for e in map(_normalize_entity, gold) if e}
    tp = len(predicted_set & gold_set)
    return tp, len(predicted_set) - tp, len(gold_set) - tp


def f1_score(tp: int, fp: int, fn: int) -> float:
    """F1 = 2tp / (2tp + fp + fn); 1.0 when there was nothing to find and nothing was claimed."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) from ``rouge-score``, with its Porter stemmer."""
    from rouge_score import rouge_scorer  # lazy: pulls in nltk's stemmer

    # a scorer per call (cheap) rather than a module-level cache: no mutable module state
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, prediction)["rougeL"].fmeasure)


_NONE_ANSWERS = frozenset({"none", "no entities", "no named entities", "n/a"})


def parse_entity_list(text: str) -> list[str]:
    """Entity strings from a generated list separated by commas or newlines.

    List bullets/numbers and a trailing parenthesised type such as ``(PER)`` are removed; an answer of
    "None" means no entities.
    """
    items = []
    for item in re.split(r"[,\n;]", text):
        item = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", item)
        item = re.sub(r"\s*\([^()]*\)\s*$", "", item).strip()
        if item and _normalize_entity(item) not in _NONE_ANSWERS:
            items.append(item)
    return items


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _micro_f1(counts: list[tuple[int, int, int]]) -> float:
    return f1_score(sum(c[0] for c in counts), sum(c[1] for c in counts), sum(c[2] for c in counts))


# --------------------------------------------------------------------------- record loaders


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string, got {type(value).__name__}")
    value = value.replace("\r\n", "\n").strip()
    if not value:
        raise ValueError(f"empty {key!r}")
    return value


def _label(record: Mapping[str, Any], labels: Mapping[str, int]) -> int:
    label = record["label"]
    if label not in labels:
        raise ValueError(f"label must be one of {sorted(labels)}, got {label!r}")
    return labels[label]


def _load_rte(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Any]:
    label = _label(record, {"entailment": 0, "not_entailment": 1})
    prompt = f"{_text(record, 'sentence1')}\nQuestion: {_text(record, 'sentence2')} True or False?\nAnswer:"
    return prompt, (" True", " False"), label


def _load_boolq(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Any]:
    answer = record["answer"]
    if not isinstance(answer, bool):
        raise TypeError(f"'answer' must be a boolean, got {answer!r}")
    question = _text(record, "question").rstrip("?")
    prompt = f"{_text(record, 'passage')}\nQuestion: {question}?\nAnswer:"
    return prompt, (" yes", " no"), 0 if answer else 1


def _load_sst2(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Any]:
    label = _label(record, {"0": 0, "1": 1})
    prompt = f"{_text(record, 'sentence')}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return prompt, (" negative", " positive"), label


_MUTUAL_TURN = re.compile(r"\s+(?=[mf] : )")


def _load_mutual(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Any]:
    options = record["options"]
    if not isinstance(options, list) or len(options) != 4 or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError("'options' must be a list of 4 non-empty strings")
    answer = record["answers"]
    if answer not in ("A", "B", "C", "D"):
        raise ValueError(f"'answers' must be one of A-D, got {answer!r}")
    # one speaker turn ("m : ..." / "f : ...") per line; each option is a candidate next turn
    dialogue = _MUTUAL_TURN.sub("\n", _text(record, "article"))
    prompt = f"Choose the most natural next turn of the dialogue.\n{dialogue}\n"
    return prompt, tuple(o.strip() for o in options), "ABCD".index(answer)


def _load_conll(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Any]:
    tokens, tags = record["tokens"], record["ner"]
    if not isinstance(tokens, list) or not isinstance(tags, list) or not tokens:
        raise TypeError("'tokens' and 'ner' must be non-empty lists")
    entities = tuple(bio_entities(tokens, tags))
    prompt = (
        "List the named entities (people, organizations, locations and other names) in the sentence, "
        "separated by commas, or write None.\n"
        f"Sentence: {' '.join(tokens)}\nEntities:"
    )
    return prompt, (), entities


def _load_nq(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Any]:
    answers = record["answer"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("'answer' must be a non-empty list of non-empty strings")
    question = _text(record, "question").rstrip("?")
    return f"Answer the question.\nQuestion: {question}?\nAnswer:", (), tuple(answers)


def _load_gsm8k(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Any]:
    solution = _text(record, "answer")
    if "####" not in solution:
        raise ValueError("'answer' has no '####' before the final number")
    gold = final_number(solution.rsplit("####", 1)[1])
    if gold is None:
        raise ValueError("no number after '####' in 'answer'")
    return f"Question: {_text(record, 'question')}\nAnswer:", (), gold


def _load_samsum(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Any]:
    prompt = f"Summarize the dialogue in one or two sentences.\nDialogue:\n{_text(record, 'dialogue')}\nSummary:"
    return prompt, (), _text(record, "summary")


# --------------------------------------------------------------------------- scorers


def _score_choice(example: Example, choice: int) -> float:
    return float(choice == example.gold)


def _score_conll(example: Example, generation: str) -> tuple[int, int, int]:
    return entity_f1(parse_entity_list(generation), [text for text, _ in example.gold])


def _score_nq(example: Example, generation: str) -> float:
    # the answer is the first line; a small model tends to go on with another "Question:"
    return float(exact_match(generation.strip().split("\n", 1)[0], example.gold))


def _score_gsm8k(example: Example, generation: str) -> float:
    return float(final_number(generation) == example.gold)


def _score_samsum(example: Example, generation: str) -> float:
    return rouge_l(generation, example.gold)


def _choice_task(name: str, title: str, file_name: str, load: Loader) -> GeneralTask:
    return GeneralTask(name, title, file_name, "accuracy", load, _score_choice, _mean)


TASKS: Mapping[str, GeneralTask] = MappingProxyType({
    task.name: task
    for task in (
        _choice_task("rte", "RTE", "rte_nli_2489.jsonl", _load_rte),
        _choice_task("boolq", "BoolQ", "boolq_closed_domain_qa_3267.jsonl", _load_boolq),
        _choice_task("sst2", "SST-2", "sst2_sentiment_872.jsonl", _load_sst2),
        _choice_task("mutual", "MuTual", "mutual_dialogue_886.jsonl", _load_mutual),
        GeneralTask("conll03", "CoNLL-03", "conll2003_ner_3250.jsonl", "entity_f1", _load_conll, _score_conll,
                    _micro_f1, lambda counts: f1_score(*counts), max_new_tokens=32,
                    stop=("\n\n", "\nSentence:")),
        GeneralTask("nq", "NQ", "nq_open_domain_qa_3610.jsonl", "exact_match", _load_nq, _score_nq, _mean,
                    max_new_tokens=16, stop=("\n",)),
        GeneralTask("gsm8k", "GSM8K", "gsm8k_reasoning_1319.jsonl", "exact_match", _load_gsm8k, _score_gsm8k,
                    _mean, max_new_tokens=96, stop=("\nQuestion:", "\n\n\n")),
        GeneralTask("samsum", "SAMSum", "samsum_summarization_818.json", "rouge_l", _load_samsum, _score_samsum,
                    _mean, max_new_tokens=48, stop=("\n\n", "\nDialogue:")),
    )
})
"""The eight tasks, in the order the ELDER paper and Gu et al. report them."""


# --------------------------------------------------------------------------- data


def _task(task: str | GeneralTask) -> GeneralTask:
    if isinstance(task, GeneralTask):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown general task {task!r}; expected one of {', '.join(TASKS)}") from None


def _raw_records(path: Path) -> list[Any]:
    if not path.is_file():
        raise GeneralDataError(path, "general-ability data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GeneralDataError(path, f"cannot read: {exc}") from exc
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GeneralDataError(path, f"invalid JSON: {exc}") from exc
        if not isinstance(records, list):
            raise GeneralDataError(path, "expected a JSON array of records")
        return records
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise GeneralDataError(path, f"invalid JSON on line {line_number}: {exc}", len(records)) from exc
    return records


def load_task(task: str | GeneralTask, data_dir: Path) -> list[Example]:
    """Every record of a task's file as an Example (none dropped), validating each one.

    Raises GeneralDataError naming the file, and the record index for a malformed record.
    """
    spec = _task(task)
    path = Path(data_dir) / spec.file_name
    examples = []
    for index, record in enumerate(_raw_records(path)):
        if not isinstance(record, Mapping):
            raise GeneralDataError(path, f"expected a JSON object, got {type(record).__name__}", index)
        try:
            prompt, options, gold = spec.load(record)
        except KeyError as exc:
            raise GeneralDataError(path, f"missing field {exc}", index) from exc
        except (TypeError, ValueError) as exc:
            raise GeneralDataError(path, str(exc), index) from exc
        examples.append(Example(spec.name, index, prompt, options, gold))
    if not examples:
        raise GeneralDataError(path, "no records")
    return examples


def sample_task(task: str | GeneralTask, data_dir: Path, n: int, seed: int) -> list[Example]:
    """A fixed sample of ``n`` examples of a task (all of them if fewer), ordered by record index.

    Every record is validated first. Records whose prompt is longer than ``MAX_PROMPT_CHARS`` are then
    dropped (deterministically, before sampling, so the sample does not depend on them), and ``n``
    record indexes are drawn with ``random.Random(f"{seed}:{task}")``: the same seed gives base and
    edited model the same examples, independently of which other tasks are run.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    spec = _task(task)
    eligible = [example for example in load_task(spec, data_dir) if len(example.prompt) <= MAX_PROMPT_CHARS]
    if not eligible:
        raise GeneralDataError(Path(data_dir) / spec.file_name, f"no prompt within {MAX_PROMPT_CHARS} characters")
    rng = random.Random(f"{seed}:{spec.name}")
    chosen = sorted(rng.sample(range(len(eligible)), min(n, len(eligible))))
    return [eligible[i] for i in chosen]


# --------------------------------------------------------------------------- evaluation


def _cut(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        position = text.find(stop)
        if position >= 0:
            text = text[:position]
    return text.strip()


def _checked(values: Sequence[Any], expected: int, what: str) -> list[Any]:
    values = list(values)
    if len(values) != expected:
        raise ValueError(f"{what} returned {len(values)} results for {expected} inputs")
    return values


def _batches(items: list[Any], batch_size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def _choose(task: GeneralTask, examples: list[Example], loglikelihood: LogLikelihood, batch_size: int,
            bar: Any) -> list[int]:
    pairs = [(example.prompt, option) for example in examples for option in example.options]
    scores: list[float] = []
    for batch in _batches(pairs, batch_size):
        prompts, continuations = [p for p, _ in batch], [c for _, c in batch]
        scores.extend(float(s) for s in _checked(loglikelihood(prompts, continuations), len(batch), "loglikelihood"))
        bar.update(len(batch))
    choices, offset = [], 0
    for example in examples:
        option_scores = [s if not math.isnan(s) else -math.inf for s in scores[offset:offset + len(example.options)]]
        choices.append(max(range(len(option_scores)), key=option_scores.__getitem__))  # ties: first option
        offset += len(example.options)
    return choices


def _generate(task: GeneralTask, examples: list[Example], generate: Generate, batch_size: int,
              bar: Any) -> list[str]:
    outputs: list[str] = []
    for batch in _batches(examples, batch_size):
        texts = _checked(generate([e.prompt for e in batch], task.max_new_tokens), len(batch), "generate")
        outputs.extend(_cut(str(text), task.stop) for text in texts)
        bar.update(len(batch))
    return outputs


def evaluate_general(loglikelihood: LogLikelihood, generate: Generate, data_dir: Path,
                     tasks: Iterable[str] | None = None, n: int = DEFAULT_N, seed: int = 0,
                     batch_size: int = 8, progress: bool = False) -> dict[str, dict]:
    """Score a model on a fixed sample of each task.

    Returns, per task key in registry order, ``{"metric": str, "score": float in [0, 1], "n": int,
    "predictions": [{"index": record index, "prediction": option text or trimmed generation,
    "score": per-example score}, ...]}``. The callables are given at most ``batch_size`` inputs a call
    (prompt/option pairs for choice tasks, prompts for generation tasks).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    names = list(TASKS) if tasks is None else [_task(name).name for name in tasks]
    selected = [task for task in TASKS.values() if task.name in names]  # registry order, no duplicates
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    for task in selected:
        examples = sample_task(task, data_dir, n, seed)
        total = sum(len(e.options) for e in examples) if task.is_choice else len(examples)
        with tqdm(total=total, desc=task.name, unit="seq", disable=not progress) as bar:
            if task.is_choice:
                raw: list[Any] = _choose(task, examples, loglikelihood, batch_size, bar)
                shown = [e.options[c].strip() for e, c in zip(examples, raw)]
            else:
                raw = _generate(task, examples, generate, batch_size, bar)
                shown = raw
        stats = [task.score(example, prediction) for example, prediction in zip(examples, raw)]
        score = float(task.aggregate(stats))
        results[task.name] = {
            "metric": task.metric,
            "score": score,
            "n": len(examples),
            "predictions": [
                {"index": e.index, "prediction": p, "score": float(task.example_score(s))}
                for e, p, s in zip(examples, shown, stats)
            ],
        }
    return results


def _value(result: Any) -> float:
    return float(result["score"] if isinstance(result, Mapping) else result)


def _ratio(edited: float, base: float) -> float | None:
    return None if base == 0 else edited / base


def retention_table(base: Mapping[str, Any], edited: Mapping[str, Any]) -> dict:
    """Edited over base, per task and on average.

    ``base`` and ``edited`` are :func:`evaluate_general` results (or plain task -> score mappings) over
    the same tasks. Returns ``{"tasks": {task: {"metric", "base", "edited", "ratio"}}, "average":
    {"base", "edited", "ratio"}}``, the averages taken over tasks with equal weight; a ratio is None
    when its base score is 0.
    """
    if set(base) != set(edited):
        raise ValueError(f"base and edited cover different tasks: {sorted(base)} vs {sorted(edited)}")
    if not base:
        raise ValueError("no tasks to compare")
    rows = {}
    for name in base:
        b, e = _value(base[name]), _value(edited[name])
        metric = base[name].get("metric") if isinstance(base[name], Mapping) else None
        rows[name] = {"metric": metric, "base": b, "edited": e, "ratio": _ratio(e, b)}
    mean_base = sum(r["base"] for r in rows.values()) / len(rows)
    mean_edited = sum(r["edited"] for r in rows.values()) / len(rows)
    average = {"base": mean_base, "edited": mean_edited, "ratio": _ratio(mean_edited, mean_base)}
    return {"tasks": rows, "average": average}
