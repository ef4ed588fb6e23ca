"""The main job on the embedded default: counterfactual capitals edited into SmolLM2-135M, before and after."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from elder.config import ElderConfig
from elder.demo_facts import demo_edits, demo_unrelated_prompts
from elder.editing import apply_edits
from elder.mechanism import ElderModel
from elder.models import load_base
from elder.persistence import save_memory


def _hit(text: str, target: str) -> bool:
    return text.strip().startswith(target)


def run_demo(facts: int, out: Path | None, config: ElderConfig, echo: Callable[[str], None] = print) -> bool:
    """Edit `facts` capitals with these settings; True when every edit answers and every unrelated prompt holds."""
    base, tokenizer, name = load_base()
    model = ElderModel(base, tokenizer, config, name)
    records = demo_edits(facts)
    prompts = [r.prompt for r in records]
    rephrases = [r.rephrases[0] for r in records]
    unrelated = demo_unrelated_prompts()
    before = model.generate(prompts + rephrases + unrelated, max_new_tokens=8, use_memory=False)
    start = time.perf_counter()
    results = apply_edits(model, records, progress=True)
    elapsed = time.perf_counter() - start
    after = model.generate(prompts + rephrases + unrelated, max_new_tokens=8)
    n = len(records)
    echo(f"\n{n} counterfactual edits on {name} in {elapsed:.1f} s ({elapsed / n:.2f} s/edit, "
         f"{sum(r.learned for r in results)} learned when trained)\n")
    sections = [("edited prompts", 0, n), ("paraphrases (never trained on)", n, 2 * n),
                ("unrelated prompts", 2 * n, len(after))]
    for title, lo, hi in sections:
        echo(f"== {title}")
        for i in range(lo, hi):
            record = records[i % n] if i < 2 * n else None
            tag = "memory  " if after[i].used_memory else "deferred"
            want = f"  (target {record.target})" if record else ""
            echo(f"  [{tag}] {after[i].prompt}\n      before: {before[i].text.strip()[:40]!r}\n"
                 f"      after:  {after[i].text.strip()[:40]!r}{want}")
    reliable = sum(_hit(after[i].text, records[i].target) for i in range(n))
    general = sum(_hit(after[n + i].text, records[i].target) for i in range(n))
    kept = sum(after[i].text == before[i].text for i in range(2 * n, len(after)))
    echo(f"\nedited prompts answering their new target: {reliable}/{n}")
    echo(f"paraphrases answering the new target:       {general}/{n}")
    echo(f"unrelated prompts answering as before:      {kept}/{len(unrelated)}")
    if out is not None:
        save_memory(model, out)
        echo(f"memory saved to {out}")
    return reliable == n and kept == len(unrelated)
