"""Negatives: other questions about an edit's subject, trained to keep the base model's answers.

A subject key lets in every prompt that names an edited subject, including questions the edit does not answer
("Where was Danielle Darrieux born?" after "Danielle Darrieux's mother tongue -> English"); experts trained on the
edit prompt alone learn "this subject -> the target" and change those answers too. ROME keeps a subject's
"essence" with a KL term on "{subject} is a" prompts and WISE trains on irrelevant samples; here each edit trains a
few questions about its subject beside its prompt, under its own route, with the base model's greedy answers as
their targets.

The questions are the project's own generic templates, not any benchmark's. A template that asks what the edit
asks (its base answer starts as the edit prompt's base answer does) is left out, so that a paraphrase of the edit
is never trained to keep the old answer.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from elder.data import EditRecord
from elder.subjects import guess_subject

# Questions most facts about a person, a place, an organisation or a work do not share with each other.
TEMPLATES = (
    "{} is located in the country of",
    "{} was born in the city of",
    "The occupation of {} is",
    "{} is best known for",
    "The language spoken by {} is",
    "{} was founded in the year",
    "{} is a member of",
    "The religion of {} is",
    "{} works for",
    "The nationality of {} is",
    "{} was created by",
    "The headquarters of {} are in",
)
ANSWER_TOKENS = 3  # greedy base-model tokens each negative keeps


def candidate_prompts(record: EditRecord, count: int) -> list[str]:
    """`count` templates filled with the edit's subject, starting at a place fixed by its id (so that edits spread
    over every template while a rerun picks the same ones); none that repeats the edit prompt."""
    subject = record.subject or guess_subject(record.prompt)
    if count == 0 or not subject:
        return []
    start = zlib.crc32(record.id.encode()) % len(TEMPLATES)
    picked = [TEMPLATES[(start + i) % len(TEMPLATES)].format(subject) for i in range(len(TEMPLATES))]
    return [p for p in picked if p.strip() != record.prompt.strip()][:count]


def negative_rows(records: Sequence[EditRecord], count: int, base_answers) -> list[tuple[str, str, str]]:
    """(edit id, prompt, base answer) of each edit's negatives. `base_answers(prompts)` gives the base model's
    greedy answers; a negative is dropped when its answer is empty or begins as the edit prompt's does."""
    asked = [(r, candidate_prompts(r, count)) for r in records]
    prompts = [p for r, negatives in asked if negatives for p in (r.prompt, *negatives)]
    if not prompts:
        return []
    answers = iter(base_answers(prompts))
    rows = []
    for record, negatives in asked:
        if not negatives:
            continue
        own = _first_word(next(answers))
        for prompt in negatives:
            answer = next(answers)
            if answer.strip() and _first_word(answer) != own:
                rows.append((record.id, prompt, answer))
    return rows


def _first_word(text: str) -> str:
    words = text.split()
    return words[0].strip(".,;:!?\"'").lower() if words else ""
