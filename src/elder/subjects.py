"""Finding what a fact is about in its prompt: a subject guessed when a record names none, and the subject's
tokens (ELDER's subject keys, AlphaEdit's keys, the negatives' questions)."""

from __future__ import annotations

import re

_STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been what which who whom whose when where "
    "how why does do did that this these those it its as into than then there their his her they he she we you "
    "i me my our your has have had not no yes can could would should will shall may might must about".split()
)


def guess_subject(prompt: str) -> str:
    """A subject for a record that names none: the last run of capitalised words after the first word, else the
    last word that is not a function word, else the last word."""
    words = re.findall(r"[\w][\w'.-]*", prompt)
    if not words:
        return prompt.strip()
    runs, current = [], []
    for i, word in enumerate(words):
        if i > 0 and word[0].isupper():
            current.append(word)
        else:
            if current:
                runs.append(current)
            current = []
    if current:
        runs.append(current)
    if runs:
        return " ".join(runs[-1]).removesuffix("'s")
    content = [w for w in words if w.lower() not in _STOPWORDS]
    return (content or words)[-1]


def subject_tokens(tokenizer, text: str, subject: str | None, span: int) -> list[int]:
    """Indices of the subject's last `span` tokens in `tokenizer(text)` without special tokens, the last first
    (the subject guessed when absent or not found in the text)."""
    if subject is None or subject not in text:
        subject = guess_subject(text)
    start = text.find(subject)
    count = lambda part: len(tokenizer(part, add_special_tokens=False).input_ids)  # noqa: E731
    total = count(text)
    if start < 0:  # the guess itself is always in the text, but stay total
        return [max(total - 1, 0)]
    last = min(count(text[: start + len(subject)]), total) - 1
    first = min(count(text[:start].rstrip()), last)  # a space before the subject belongs to its first token
    return list(range(last, max(first, last - span + 1) - 1, -1))
