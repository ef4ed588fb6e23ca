"""Neighbour probes that ask a fact edited in the same stream: where the benchmark's locality answer is the old answer
an editor was told to replace. No model is loaded; it reads the data file only.

    .venv/bin/python benchmarks/conflicts.py --data counterfact:../shared/data/counterfact_mend_edit_10000.json \
        --edits 1000 --edits 5000

CounterFact pairs each edit with neighbourhood prompts about other subjects. In a long stream some of those subjects
are edited too: "Dodge Charger is a product of" (expected: Dodge) is the neighbour of one edit while "Dodge Charger,
produced by" -> Honda is another edit of the stream. An editor that holds its edits must answer Honda there and is
scored as breaking locality; one that scores 100 on such a probe has lost the edit. A probe conflicts when it names
the subject of another edit of the first T records (as a whole word run) and asks that edit's fact: the same
relation (`relation_id`, ROME records), or, where the file names no relation (the MEND split), the probe's expected
answer equals that edit's old answer (`ground_truth`). The rest of the probes naming an edited subject ask another
fact about it (the memory should defer there). Printed per T: probes, those naming an edited subject, conflicts,
and the Loc ceiling on neighbours for an editor that keeps every edit and leaves every other probe untouched.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fact:
    """One edit of the stream as this script needs it."""

    subject: str
    relation: str | None  # None where the file names no relation
    old: str  # the answer the edit replaces


@dataclass(frozen=True)
class Probe:
    """One neighbour probe and the record it belongs to."""

    owner: int
    prompt: str
    relation: str | None
    answer: str


def read_counterfact(path: Path) -> tuple[list[Fact], list[Probe]]:
    """Facts and neighbour probes of a CounterFact file, ROME records or the MEND split."""
    data = json.loads(path.read_text(encoding="utf-8"))
    facts, probes = [], []
    for i, d in enumerate(data):
        try:
            _read_record(i, d, facts, probes)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: record {i} is not a CounterFact record ({type(error).__name__}: {error})")
    return facts, probes


def _read_record(i: int, d: dict, facts: list[Fact], probes: list[Probe]) -> None:
    if "requested_rewrite" in d:
        rewrite = d["requested_rewrite"]
        relation, old = rewrite["relation_id"], rewrite["target_true"]["str"]
        facts.append(Fact(rewrite["subject"], relation, old))
        probes.extend(Probe(i, p, relation, old) for p in d.get("neighborhood_prompts", []))
    else:
        facts.append(Fact(d["subject"], None, d["ground_truth"]))
        if d.get("locality_prompt"):
            probes.append(Probe(i, d["locality_prompt"], None, d["locality_ground_truth"]))


def named_subjects(prompt: str, first_words: dict[str, set[str]]) -> set[str]:
    """The subjects (of `first_words`: first word -> subjects) that the prompt names as a whole run of words."""
    found = set()
    for word in set(re.findall(r"[\w'.-]+", prompt)):
        for subject in first_words.get(word, ()):
            if re.search(r"(?<![\w])" + re.escape(subject) + r"(?![\w])", prompt):
                found.add(subject)
    return found


def conflicts(facts: list[Fact], probes: list[Probe], edits: int,
              ask: Callable[[Probe, Fact], bool] | None = None) -> dict[str, int]:
    """Counts for the stream of the first `edits` facts and their probes; `ask` tells whether a probe asks a fact
    (default: `asks`)."""
    ask = ask or asks
    stream = facts[:edits]
    by_subject: dict[str, list[int]] = {}
    for i, fact in enumerate(stream):
        by_subject.setdefault(fact.subject, []).append(i)
    first_words: dict[str, set[str]] = {}
    for subject in by_subject:
        words = re.findall(r"[\w'.-]+", subject)
        if words:
            first_words.setdefault(words[0], set()).add(subject)
    counts = {"probes": 0, "naming an edited subject": 0, "asking an edited fact": 0}
    for probe in probes:
        if probe.owner >= edits:
            continue
        counts["probes"] += 1
        others = [j for s in named_subjects(probe.prompt, first_words) for j in by_subject[s] if j != probe.owner]
        if not others:
            continue
        counts["naming an edited subject"] += 1
        if any(ask(probe, stream[j]) for j in others):
            counts["asking an edited fact"] += 1
    return counts


def asks(probe: Probe, fact: Fact) -> bool:
    """Whether the probe asks the edited fact: its relation where both name one, else its old answer."""
    if probe.relation is not None and fact.relation is not None:
        return probe.relation == fact.relation
    return same_answer(probe, fact)


def same_answer(probe: Probe, fact: Fact) -> bool:
    """Whether the probe's expected answer is the fact's old answer (the proxy where no relation is named)."""
    return probe.answer.strip().casefold() == fact.old.strip().casefold()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="counterfact:PATH (ROME records or the MEND split)")
    parser.add_argument("--edits", type=int, action="append", required=True, help="T (repeatable)")
    args = parser.parse_args()
    kind, _, path = args.data.partition(":")
    if kind != "counterfact" or not path:
        parser.error("--data must be counterfact:PATH")
    try:
        facts, probes = read_counterfact(Path(path))
    except (OSError, ValueError) as error:  # json's decode error is a ValueError
        parser.error(str(error))
    print(f"data {args.data}")
    print("T      probes  naming an edited subject  asking an edited fact  Loc ceiling (neighbours)")
    for edits in args.edits:
        c = conflicts(facts, probes, edits)
        ceiling = 100 * (1 - c["asking an edited fact"] / c["probes"]) if c["probes"] else float("nan")
        print(f"{edits:<6} {c['probes']:>6}  {c['naming an edited subject']:>24}  {c['asking an edited fact']:>21}  "
              f"{ceiling:>24.1f}")
    if any(fact.relation is not None for fact in facts):  # how good the old-answer proxy is, where relations exist
        for edits in args.edits:
            proxy = conflicts(facts, probes, edits, same_answer)["asking an edited fact"]
            both = conflicts(facts, probes, edits, lambda p, f: same_answer(p, f) and p.relation == f.relation)
            print(f"T = {edits}: the old-answer proxy finds {proxy} conflicts, {both['asking an edited fact']} of "
                  "them with the same relation")


if __name__ == "__main__":
    main()
