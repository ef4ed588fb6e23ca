"""Which neighbour prompts an `elder bench` run let into the memory: those naming a subject edited in the stream, and
the rest (false key matches).

    .venv/bin/python benchmarks/neighbour_leaks.py /work/runs/cf-1000-e64

A neighbour asks an edit's question about another subject; when that subject is itself edited in the stream, the
memory is right to answer for it, yet it answers the other question with that edit's experts. Reads the run's
settings and per-edit scores (memory use on neighbours is kept per edit: exact per prompt when each record has one
neighbour, as in CounterFact's MEND split). No model is loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from elder.evaluation.datasets import load_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an elder bench run folder")
    parser.add_argument("--method", default="elder", help="method folder inside the run")
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


if __name__ == "__main__":
    main()
