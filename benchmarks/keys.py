"""Which prompts a bank of T subject keys lets into the memory, with no training: keys come from frozen layers, so
whether a prompt uses the memory depends on the stored keys alone, and a deferral design can be compared in minutes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/keys.py \
        --data counterfact:../shared/data/counterfact_mend_train_10000.json --edits 1000 \
        --config '{}' --config '{"key_span": 1}'

For each configuration (the `fast` preset plus the given settings: key_layer, key_span, key_gate, key_spaced) the
first T records' keys are stored, and every edit prompt, rephrase and locality probe (by kind: unrelated,
neighbour; ZsRE's neighbours are made as `elder bench` makes them, from the file's other records) is matched
against them. The table gives the share (%) whose best match reaches each key_threshold; neighbours are split
into those that name a subject edited in the stream (the memory is right to know that subject) and the others
(a false match).
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from elder import ElderConfig, ElderModel, load_base
from elder.evaluation.datasets import load_benchmark, with_neighbours
from elder.methods.elder.keys import normalise
from elder.tokens import encode_prompt

THRESHOLDS = (0.9, 0.925, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99)


def probe_sets(records) -> dict[str, list[str]]:
    """The prompts of each kind, and the neighbours split by whether they name an edited subject."""
    subjects = {r.subject for r in records if r.subject}
    sets = {"edits": [r.prompt for r in records], "rephrases": [p for r in records for p in r.rephrases],
            "unrelated": [], "neighbours naming an edited subject": [], "other neighbours": []}
    for r in records:
        for probe in r.locality:
            if probe.kind == "unrelated":
                sets["unrelated"].append(probe.prompt)
            elif any(s in probe.prompt for s in subjects):
                sets["neighbours naming an edited subject"].append(probe.prompt)
            else:
                sets["other neighbours"].append(probe.prompt)
    return {k: v for k, v in sets.items() if v}


def best_similarity(model: ElderModel, prompts: list[str]) -> torch.Tensor:
    """Each prompt's best key similarity to the model's bank, as routing reads it (-inf: no key passes the gate)."""
    states, mask = model._key_states([encode_prompt(model.tokenizer, p, model.context_limit) for p in prompts])
    best, _ = model.bank.best_key(normalise(states, model.key_center), mask, model.config.key_gate)
    return best


def store_keys(model: ElderModel, records, batch: int = 32) -> None:
    """The records' subject keys, stored in the model's bank as editing stores them (codes unused here)."""
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        keys = model.subject_keys([r.prompt for r in chunk], [r.subject for r in chunk])
        model.bank.add([r.id for r in chunk], torch.zeros(len(chunk), model.bank.code_bits, dtype=torch.bool),
                       keys=keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--config", action="append", default=[], help="JSON settings on top of fast")
    args = parser.parse_args()
    records = load_benchmark(args.data, limit=args.edits, offset=args.offset).records
    if not any(p.kind == "neighbour" for r in records for p in r.locality):
        every = load_benchmark(args.data, skip_invalid=True).records
        ids = {r.id for r in records}
        records = with_neighbours(records, [r for r in every if r.id not in ids])
    sets = probe_sets(records)
    base, tokenizer, name = load_base()
    print(f"{args.data}: {len(records)} stored keys; " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    print("| settings | prompts | " + " | ".join(f">= {t}" for t in THRESHOLDS) + " |")
    print("|---|---|" + "---|" * len(THRESHOLDS))
    with torch.inference_mode():
        for text in args.config or ["{}"]:
            model = ElderModel(base, tokenizer, ElderConfig.preset("fast", **json.loads(text)), name)
            store_keys(model, records)
            for kind, prompts in sets.items():
                best = torch.cat([best_similarity(model, prompts[i:i + 32])
                                  for i in tqdm(range(0, len(prompts), 32), desc=kind, leave=False)])
                row = " | ".join(f"{100 * (best >= t).float().mean():.1f}" for t in THRESHOLDS)
                print(f"| {text} | {kind} ({len(prompts)}) | {row} |", flush=True)
            model.detach()


if __name__ == "__main__":
    main()
