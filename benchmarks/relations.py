"""Can the question be told apart from the subject? A diagnostic for a relation test on top of the subject key.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/relations.py --records 400

A subject key lets in every prompt about an edited subject, also one that asks another question ("The language
spoken in France is" after "The capital of France is -> Rome"). This script measures whether a prompt's state at
its last token tells "the same question in other words" (the record's paraphrases) from "another question about the
same subject" (another relation's template of CounterFact filled with the record's subject). It uses the reduced
CounterFact records of `counterfact_rome_3802.json` whose subjects are not in `counterfact_rome_full_864.json` (the
test file), and prints, per layer (the residual stream at the last prompt token, and ELDER's routing query), the
share of each kind whose cosine similarity to the edit prompt's state, centred on the mean edit prompt, reaches each
threshold. A last row asks the same of the base model's next-token distribution after the prompt (does the model
expect the same kind of answer?), by the Bhattacharyya coefficient of the two distributions.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from elder import ElderConfig, ElderModel, load_base
from elder.modules import get_module

THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def probes(records: list[dict], seed: int = 0) -> list[tuple[str, list[str], list[str]]]:
    """(edit prompt, paraphrases, other-relation prompts about the same subject) per record."""
    rng = random.Random(seed)
    templates: dict[str, list[str]] = {}
    for r in records:
        templates.setdefault(r["requested_rewrite"]["relation_id"], []).append(r["requested_rewrite"]["prompt"])
    out = []
    for r in records:
        rewrite = r["requested_rewrite"]
        others = [rel for rel in templates if rel != rewrite["relation_id"]]
        picked = [rng.choice(templates[rel]) for rel in rng.sample(others, 2)]
        subject = rewrite["subject"]
        out.append((rewrite["prompt"].format(subject), list(r["paraphrase_prompts"]),
                    [t.format(subject) for t in picked]))
    return out


def last_states(model: ElderModel, prompts: list[str], layers: list[int]) -> dict[str, torch.Tensor]:
    """Per layer, the residual stream entering it at each prompt's last token, ELDER's query there, and the base
    model's next-token distribution after the prompt."""
    tokenizer = model.tokenizer
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        module = get_module(model.base, f"{model.targets.layers_path}.{layer}")
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, layer=layer: captured.__setitem__(
                f"layer {layer}", (args[0] if args else kwargs["hidden_states"])[:, -1].float()), with_kwargs=True))
    query = get_module(model.base, model.targets.query_path)
    handles.append(query.register_forward_pre_hook(lambda m, args: captured.__setitem__("query", args[0][:, -1].float())))
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    try:
        captured["answer distribution"] = torch.softmax(model.base(**batch).logits[:, -1].float(), -1)
    finally:
        for handle in handles:
            handle.remove()
    return dict(captured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--layers", default="4,8,12,16,19")
    args = parser.parse_args()
    test = json.load(open("../shared/data/counterfact_rome_full_864.json", encoding="utf-8"))
    tested = {r["requested_rewrite"]["subject"] for r in test}
    every = json.load(open("../shared/data/counterfact_rome_3802.json", encoding="utf-8"))
    records = [r for r in every if r.get("reduced") and r["requested_rewrite"]["subject"] not in tested]
    cases = probes(records[:args.records])
    base, tokenizer, name = load_base()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = ElderModel(base, tokenizer, ElderConfig.preset("fast"), name)
    layers = [int(x) for x in args.layers.split(",")]
    kinds = {"edit": [c[0] for c in cases], "paraphrase": [p for c in cases for p in c[1]],
             "other question": [p for c in cases for p in c[2]]}
    owner = {"paraphrase": [i for i, c in enumerate(cases) for _ in c[1]],
             "other question": [i for i, c in enumerate(cases) for _ in c[2]]}
    states: dict[str, dict[str, torch.Tensor]] = {}
    with torch.inference_mode():
        for kind, prompts in kinds.items():
            parts = [last_states(model, prompts[i:i + 32], layers) for i in range(0, len(prompts), 32)]
            states[kind] = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    print(f"{len(cases)} records; similarity to the edit prompt's state (centred on the mean edit prompt), share (%)"
          " reaching each threshold")
    print("| state | prompts | " + " | ".join(f">= {t}" for t in THRESHOLDS) + " |")
    print("|---|---|" + "---|" * len(THRESHOLDS))
    for key in states["edit"]:
        if key == "answer distribution":  # Bhattacharyya coefficient: sum of sqrt(p q)
            unit = torch.sqrt
        else:
            center = states["edit"][key].mean(0)
            unit = lambda x, center=center: torch.nn.functional.normalize(x - center, dim=-1)  # noqa: E731
        edits = unit(states["edit"][key])
        for kind in ("paraphrase", "other question"):
            sims = (unit(states[kind][key]) * edits[owner[kind]]).sum(-1)
            row = " | ".join(f"{100 * (sims >= t).float().mean():.1f}" for t in THRESHOLDS)
            print(f"| {key} | {kind} ({len(sims)}) | {row} |", flush=True)
    model.detach()


if __name__ == "__main__":
    main()
