"""Which neighbour prompts an `elder bench` run let into the memory: those naming a subject edited in the stream, and
the rest (false key matches).

    .venv/bin/python benchmarks/neighbour_leaks.py /work/runs/cf-1000-e64

A neighbour asks an edit's question about another subject; when that subject is itself edited in the stream, the
memory is right to answer for it, yet it answers the other question with that edit's experts. Reads the run's
settings and per-edit scores (memory use on neighbours is kept per edit: exact per prompt when each record has one
neighbour, as in CounterFact's MEND split). No model is loaded.

With `--answers N` it also loads the run's base model and ELDER memory and answers every neighbour prompt greedily
(N tokens): of those the memory answers, how many give the matched edit's target (the experts carry the edit to
another question, or the neighbour asks the edited fact itself) and how many give something else (the experts only
unsettle the answer: a check that the answer begins with the matched target would hand these back to the base
model). Split as above.

    .venv/bin/python benchmarks/neighbour_leaks.py /work/runs/cf-5000-blocks --answers 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from elder.evaluation.datasets import load_benchmark
from elder.evaluation.metrics import begins_with
from elder.methods.elder import load_memory
from elder.models import load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an elder bench run folder")
    parser.add_argument("--method", default="elder", help="method folder inside the run")
    parser.add_argument("--answers", type=int, default=0, help="greedy tokens per neighbour answer (0: none)")
    args = parser.parse_args()
    settings = json.loads((args.run / "settings.json").read_text())
    records = load_benchmark(settings["data"], limit=settings["edits"], offset=settings["offset"]).records
    scores = [json.loads(t) for t in (args.run / args.method / "scores.jsonl").read_text().splitlines() if t.strip()]
    subjects = {r.subject for r in records if r.subject}
    groups: dict[bool, list[float]] = {True: [], False: []}
    for record, score in zip(records, scores, strict=True):
        if score.get("used_neighbour") is None:
            continue
        probes = [p.prompt for p in record.locality if p.kind == "neighbour"]
        named = any(s in p for p in probes for s in subjects if s != record.subject)
        groups[named].append(score["used_neighbour"])
    for named, label in ((True, "naming a subject edited in the stream"), (False, "the others")):
        values = groups[named]
        rate = statistics.fmean(values) if values else float("nan")
        print(f"edits whose neighbours are {label}: {len(values)}, memory used on {100 * rate:.1f}% "
              f"({sum(values):.0f} edits' worth)")
    if args.answers:
        answer_neighbours(args.run / args.method / "memory", settings, records, subjects, args.answers)


def answer_neighbours(memory: Path, settings: dict, records, subjects: set[str], tokens: int, batch: int = 64) -> None:
    base, tokenizer, name = load_base(settings.get("model"), dtype=settings.get("dtype"), device=settings.get("device"))
    model = load_memory(memory, base, tokenizer, name)
    probes = [(p.prompt, any(s in p.prompt for s in subjects if s != r.subject))
              for r in records for p in r.locality if p.kind == "neighbour"]
    counts = {named: {"prompts": 0, "used": 0, "target": 0} for named in (True, False)}
    for start in range(0, len(probes), batch):
        chunk = probes[start:start + batch]
        for (prompt, named), answer in zip(chunk, model.generate([p for p, _ in chunk], tokens), strict=True):
            counts[named]["prompts"] += 1
            if answer.used_memory:
                target = model.edit_log[answer.edit_id]["record"]["target"]
                counts[named]["used"] += 1
                counts[named]["target"] += begins_with(answer.text, target)
    for named, label in ((True, "naming a subject edited in the stream"), (False, "the others")):
        c = counts[named]
        print(f"neighbour prompts {label}: {c['prompts']}, answered by the memory {c['used']}: the matched edit's "
              f"target {c['target']}, something else {c['used'] - c['target']} ({tokens} greedy tokens)")


if __name__ == "__main__":
    main()
