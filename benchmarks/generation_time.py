"""Greedy generation time of ELDER under several settings, each over the base model's, measured in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation_time.py \
        --data counterfact:../shared/data/counterfact_mend_train_10000.json --edits 40 \
        --config '{}' --config '{"expert_positions": "answer"}'

Each --config (a JSON object of settings on top of `fast`) trains the same first T edits on a fresh memory, then
times answers of `--tokens` tokens to 16 edit prompts (the memory used), 16 unrelated prompts (deferred) and a
mixed batch of 8 of each (as a service meets them), alternating edited and base runs (benchmarks/speed.py's
`time_generation`), and prints edited/base per config.
"""

from __future__ import annotations

import argparse
import json

from speed import time_generation

from elder import ElderConfig, ElderModel, apply_edits
from elder.evaluation.datasets import load_benchmark
from elder.evaluation.harness import machine_facts
from elder.models import load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="benchmark spec, e.g. zsre:PATH")
    parser.add_argument("--edits", type=int, default=40, help="edits trained under each config")
    parser.add_argument("--config", action="append", required=True, help="JSON object of settings over `fast`")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per answer")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each kind, alternating")
    parser.add_argument("--model", default=None, help="base model; default: the embedded SmolLM2-135M")
    args = parser.parse_args()
    base, tokenizer, name = load_base(args.model)
    records = list(load_benchmark(args.data, limit=args.edits).records)
    edited = [r.prompt for r in records][:16]
    unrelated = [p.prompt for r in records for p in r.locality][:16]
    print(json.dumps(machine_facts(base)))
    print(f"{len(records)} edits, {args.tokens} new tokens, {args.repeats} timed runs of each kind")
    print("| settings over `fast` | edit prompts: edited/base (memory used) | unrelated: edited/base (memory used) | "
          "mixed: edited/base (memory used) |")
    print("|---|---|---|---|")
    for text in args.config:
        model = ElderModel(base, tokenizer, ElderConfig.preset("fast", **json.loads(text)), name)
        apply_edits(model, records, progress=False)
        on = time_generation(model, edited, args.repeats, args.tokens)
        off = time_generation(model, unrelated, args.repeats, args.tokens)
        mixed = time_generation(model, [p for pair in zip(edited[:8], unrelated[:8]) for p in pair], args.repeats,
                                args.tokens)
        print(f"| `{text}` | " + " | ".join(f"{t['ratio']:.2f} ({t['memory_used']:.2f})" for t in (on, off, mixed))
              + " |", flush=True)
        base = model.detach()


if __name__ == "__main__":
    main()
