"""Seconds per edit of the baselines that train above a frozen band of layers, with the layers below their first
trained layer run once per edit and replayed (`train_targets(first_layer=...)`, the default) and with every layer
run at every step, measured in one run, the two alternating.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/replay.py \
        --data zsre:../shared/data/zsre_mend_train_1000.json --edits 6 --methods grace,memoir,melo,ft

Each method edits the same first T records on a fresh state, once each way, in rounds (replayed, every layer, ...);
the table gives the median seconds per edit of each way and their ratio, and whether the two ways learned the same
edits with the same step counts (they compute the same logits; tests/test_methods_contract.py checks the state).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from unittest import mock

from elder import forward
from elder.evaluation.datasets import load_benchmark
from elder.evaluation.harness import machine_facts
from elder.methods import registered
from elder.models import load_base


def timed_edits(name: str, base, tokenizer, model_name: str, records, replay: bool) -> tuple[float, list]:
    """(seconds per edit, [(steps, learned)]) of one fresh editor of `name` editing `records`."""
    every_layer = forward._replayed_logits
    patch = nullcontext() if replay else mock.patch.object(
        forward, "_replayed_logits", lambda model, batch, first: every_layer(model, batch, 0))
    method = registered()[name].create(base, tokenizer, model_name, {})
    try:
        with patch:
            start = time.perf_counter()
            results = method.edit(records)
            seconds = (time.perf_counter() - start) / len(records)
    finally:
        method.close()
    return seconds, [(r.iterations, r.learned) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="benchmark spec, e.g. zsre:PATH")
    parser.add_argument("--edits", type=int, default=6, help="edits per run")
    parser.add_argument("--methods", default="grace,memoir,melo,ft", help="comma-separated methods")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way, alternating")
    parser.add_argument("--model", default=None, help="base model; default: the embedded SmolLM2-135M")
    args = parser.parse_args()
    base, tokenizer, model_name = load_base(args.model)
    records = list(load_benchmark(args.data, limit=args.edits).records)
    print(json.dumps(machine_facts(base)))
    print(f"{len(records)} edits per run, {args.rounds} runs of each way")
    print("| method | s/edit, layers below replayed | s/edit, every layer every step | ratio "
          "| same steps and learned |")
    print("|---|---|---|---|---|")
    for name in args.methods.split(","):
        times: dict[bool, list[float]] = {True: [], False: []}
        outcomes: dict[bool, list] = {}
        for _ in range(args.rounds):
            for replay in (True, False):
                seconds, outcomes[replay] = timed_edits(name, base, tokenizer, model_name, records, replay)
                times[replay].append(seconds)
        fast, slow = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {name} | {fast:.2f} | {slow:.2f} | {slow / fast:.2f} | "
              f"{'yes' if outcomes[True] == outcomes[False] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
