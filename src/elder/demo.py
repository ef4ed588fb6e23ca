"""The main job on the embedded default: counterfactual capitals edited into SmolLM2-135M, before and after."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from elder.demo_facts import demo_edits, demo_unrelated_prompts
from elder.methods import get_method
from elder.models import load_base


def _hit(text: str, target: str) -> bool:
    return text.strip().startswith(target)


def run_demo(facts: int, out: Path | None, method: str = "elder", settings: Mapping | None = None,
             echo: Callable[[str], None] = print) -> bool:
    """Edit `facts` capitals with a method and its settings; True when every edit answers and every unrelated
    prompt holds."""
    cls = get_method(method)
    cls.config(settings or {})  # a bad setting fails before the model loads
    base, tokenizer, name = load_base()
    editor = cls.create(base, tokenizer, name, settings or {})
    records = demo_edits(facts)
    prompts = [r.prompt for r in records]
    rephrases = [r.rephrases[0] for r in records]
    unrelated = demo_unrelated_prompts()
    before = editor.answer(prompts + rephrases + unrelated, max_new_tokens=8, use_edits=False)
    start = time.perf_counter()
    results = []
    with tqdm(total=len(records), desc="editing", unit="edit") as bar:
        for lo in range(0, len(records), editor.batch_size):
            results += editor.edit(records[lo:lo + editor.batch_size])
            bar.update(len(records[lo:lo + editor.batch_size]))
    elapsed = time.perf_counter() - start
    after = editor.answer(prompts + rephrases + unrelated, max_new_tokens=8)
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
        editor.save(out)
        echo(f"memory saved to {out}")
    return reliable == n and kept == len(unrelated)
