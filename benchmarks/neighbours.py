"""Five edits, then the same questions about other subjects, paraphrases and unrelated prompts: which ones the
memory answers, at what key distance, and what the base model says.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/neighbours.py [--set KEY=VALUE ...]

The settings are the `fast` preset plus the overrides (JSON values), e.g. --set deferral='"subject_key"'.
"""

from __future__ import annotations

import argparse
import json

from elder import EditRecord, ElderConfig, ElderModel, apply_edits, load_base

EDITS = [EditRecord("fr", "The capital of France is", "Rome", subject="France"),
         EditRecord("a", "The CEO of Apple is", "Elon Musk"),
         EditRecord("b", "The Eiffel Tower is located in", "London"),
         EditRecord("c", "Barack Obama was born in", "Canada"),
         EditRecord("d", "The author of Hamlet is", "Charles Dickens")]
PROBES = [("edit", "The capital of France is"), ("paraphrase", "France's capital city is"),
          ("paraphrase", "The capital city of France is called"), ("paraphrase", "Apple's chief executive is"),
          ("paraphrase", "Where is the Eiffel Tower? It is in"), ("paraphrase", "Hamlet was written by"),
          ("neighbour", "The capital of Germany is"), ("neighbour", "The capital of Japan is"),
          ("neighbour", "The capital of Italy is"), ("neighbour", "The CEO of Microsoft is"),
          ("neighbour", "Michelle Obama was born in"), ("neighbour", "The author of Macbeth is"),
          ("same subject, other question", "The language spoken in France is"),
          ("unrelated", "Water is made of hydrogen and")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=JSON_VALUE")
    args = parser.parse_args()
    overrides = {}
    for pair in args.overrides:
        key, _, value = pair.partition("=")
        overrides[key] = json.loads(value)
    base, tokenizer, name = load_base()
    model = ElderModel(base, tokenizer, ElderConfig.preset("fast", **overrides), name)
    apply_edits(model, EDITS, progress=False)
    prompts = [p for _, p in PROBES]
    plain = model.generate(prompts, 6, use_memory=False)
    print(f"settings: fast + {json.dumps(overrides)}")
    for (kind, _), edited, unedited in zip(PROBES, model.generate(prompts, 6), plain):
        state = "memory  " if edited.used_memory else "deferred"
        print(f"{kind:29} {edited.prompt!r:40} {state} {edited.distance:6.3f} {edited.text!r:24} "
              f"base {unedited.text!r}")


if __name__ == "__main__":
    main()
