"""Final scores after T sequential edits under several ELDER settings: one model load, the same edit stream.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ablation.py --data zsre:../shared/data/zsre_wise_edit_1037.json \
        --edits 200 --config '{"settle_routes": false, "lr": 3e-3}' --config '{}'

Each --config is a JSON object of ELDER settings: a `preset` (default `fast`) plus any ElderConfig field. Every config
trains the same first T edits, on the edit prompt only, then scores all of them: Rel (teacher-forced token accuracy
on the edit prompt, also for the first and the last fifth of the stream, which shows forgetting), Gen (each edit's
first rephrase), Loc on neighbours (each record's first neighbour probe: CounterFact's own, or for ZsRE the edit's
prompt asked about a subject not edited in the stream, taken from the records after it; also apart for those that
name an edited subject, which a subject key lets in, and the others, with the former's count) and on unrelated prompts
(each record's first unrelated probe; agreement with the base model's argmax tokens), how often the memory answered
edit prompts, rephrases, neighbours and unrelated prompts, the generation scores (greedy answers to the edit prompt
and first rephrase that begin with the target, edited/base n-gram entropy of the edit prompts' answers, % of
answers that repeat the target), and the training cost (median seconds per edit, mean steps per batch). For full runs with locality, tuning and retention use `elder bench`; this script is
for comparing settings quickly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from elder.data import DataError
from elder.evaluation.datasets import load_benchmark, with_neighbours
from elder.evaluation.metrics import edited_subjects, generate_all, generation_scores, summarize_generation
from elder.methods.base import TokenPrediction
from elder.methods.elder import ElderMethod
from elder.models import load_base
from elder.settings import ConfigError


def mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def first_probes(records, kind: str) -> tuple[list[str], list[str]]:
    """(prompts, answers) of each record's first locality probe of this kind that has an answer."""
    probes = [next((p for p in r.locality if p.kind == kind and p.answer), None) for r in records]
    return [p.prompt for p in probes if p], [p.answer for p in probes if p]


def agreement(edited, base) -> float:
    """Mean over rows of the fraction of positions where the edited model's argmax equals the base model's."""
    return mean(mean(a == b for a, b in zip(e.predicted, n.predicted)) for e, n in zip(edited, base))


def where(keep, *columns) -> list[list]:
    """Each column's items where `keep` is true."""
    return [[item for item, k in zip(column, keep, strict=True) if k] for column in columns]


def run(base, tokenizer, name, settings: dict, records, others=(), generation_tokens: int = 32) -> dict:
    method = ElderMethod.create(base, tokenizer, name, settings)
    answer = lambda prompts, use_edits: [  # noqa: E731
        a.text for a in method.answer(prompts, generation_tokens, use_edits=use_edits)]
    try:
        start = time.perf_counter()
        results = method.edit([dataclasses.replace(r, rephrases=()) for r in records])
        wall = time.perf_counter() - start
        prompts: list[TokenPrediction] = method.predict([r.prompt for r in records], [r.target for r in records])
        paraphrased = [r for r in records if r.rephrases]
        rephrases = method.predict([r.rephrases[0] for r in paraphrased], [r.target for r in paraphrased])
        far = first_probes(records, "unrelated")
        unrelated, unrelated_base = method.predict(*far), method.predict(*far, use_edits=False)
        near = first_probes(with_neighbours(records, others), "neighbour")
        near_edited = method.predict(*near)
        near_base = method.predict(*near, use_edits=False)
        names = edited_subjects(records)  # a subject key lets these in: only the experts can keep their answers
        named = [names(prompt) for prompt in near[0]]
        generated = {}
        if generation_tokens:
            base_answers = generate_all(answer, [r.prompt for r in records], False)
            generated = summarize_generation(generation_scores(answer, records, lambda r: r.rephrases[:1],
                                                               base_answers))
    finally:
        method.close()
    fifth = max(1, len(prompts) // 5)
    batches = {}  # one entry per batch: its edits share the wall time and the step count
    for r in results:
        batches.setdefault((r.seconds, r.iterations), r.iterations)
    return {
        "settings": settings, "edits": len(records),
        "rel": mean(p.accuracy for p in prompts),
        "rel_first_fifth": mean(p.accuracy for p in prompts[:fifth]),
        "rel_last_fifth": mean(p.accuracy for p in prompts[-fifth:]),
        "gen": mean(p.accuracy for p in rephrases),
        "used_prompt": mean(p.used_memory for p in prompts),
        "used_rephrase": mean(p.used_memory for p in rephrases),
        "used_unrelated": mean(p.used_memory for p in unrelated),
        "used_neighbour": mean(p.used_memory for p in near_edited),
        "loc_neighbour": agreement(near_edited, near_base),
        "neighbours_naming_edited": sum(named),
        "loc_neighbour_naming": agreement(*where(named, near_edited, near_base)),
        "loc_neighbour_other": agreement(*where([not n for n in named], near_edited, near_base)),
        "loc_unrelated": agreement(unrelated, unrelated_base),
        **{f"generated_{k}": generated.get(k) for k in ("rel_gen", "gen_gen", "fluency_ratio", "repeated_target")},
        "learned_when_trained": mean(r.learned for r in results),
        "seconds_per_edit_median": statistics.median(r.seconds for r in results),
        "steps_per_batch_mean": mean(batches.values()),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="benchmark spec, e.g. zsre:PATH")
    parser.add_argument("--edits", type=int, default=200, help="T: edits in the stream")
    parser.add_argument("--config", action="append", required=True, help="JSON object of ELDER settings")
    parser.add_argument("--model", default=None, help="base model; default: the embedded SmolLM2-135M")
    parser.add_argument("--generation-tokens", type=int, default=32,
                        help="greedy tokens per answer for the generation scores (0: none)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = parser.parse_args()
    configs = []
    for text in args.config:
        settings = json.loads(text)
        if not isinstance(settings, dict):
            parser.error(f"--config must be a JSON object, got {text!r}")
        try:
            ElderMethod.config(settings)  # a bad setting fails before anything is trained
        except ConfigError as error:
            parser.error(f"--config {text}: {error}")
        configs.append(settings)
    records = list(load_benchmark(args.data, limit=args.edits).records)
    try:  # the neighbours' subjects: the records after the stream (none when the file ends with it)
        others = list(load_benchmark(args.data, offset=args.edits, skip_invalid=True).records)[:args.edits]
    except DataError:
        others = []
    base, tokenizer, name = load_base(args.model)
    print(f"model {name}; data {args.data}; first {len(records)} edits, edit prompts only")
    print(f"{'Rel':>6}{'first 1/5':>10}{'last 1/5':>9}{'Gen':>6}{'Loc nb':>7}{'naming/not (n)':>18}{'Loc unr':>8}"
          f"{'used: edit/reph/nb/unrel':>26}{'gen Rel/Gen':>12}{'fluency':>8}{'repeat':>7}{'s/edit':>7}{'steps':>6}"
          "  settings")
    rows = []
    for settings in configs:
        row = run(base, tokenizer, name, settings, records, others, args.generation_tokens)
        rows.append(row)
        used = (f"{row['used_prompt']:.2f}/{row['used_rephrase']:.2f}/{row['used_neighbour']:.2f}/"
                f"{row['used_unrelated']:.2f}")
        pct = lambda key: "n/a" if row[key] is None else f"{100 * row[key]:.1f}"  # noqa: E731
        named = (f"{100 * row['loc_neighbour_naming']:.1f}/{100 * row['loc_neighbour_other']:.1f} "
                 f"({row['neighbours_naming_edited']})")
        fluency = "n/a" if row["generated_fluency_ratio"] is None else f"{row['generated_fluency_ratio']:.2f}"
        print(f"{100 * row['rel']:>6.1f}{100 * row['rel_first_fifth']:>10.1f}{100 * row['rel_last_fifth']:>9.1f}"
              f"{100 * row['gen']:>6.1f}{100 * row['loc_neighbour']:>7.1f}{named:>18}{100 * row['loc_unrelated']:>8.1f}"
              f"{used:>26}"
              f"{pct('generated_rel_gen') + '/' + pct('generated_gen_gen'):>12}{fluency:>8}"
              f"{pct('generated_repeated_target'):>7}{row['seconds_per_edit_median']:>7.2f}"
              f"{row['steps_per_batch_mean']:>6.1f}  {json.dumps(settings)}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
