"""Speed and memory of ELDER editing and inference, every number from one run on one machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --data zsre:../shared/data/zsre_wise_edit_1037.json

Prints seconds per edit (median, p90) for the `fast` and `paper` presets and for a plain implementation of the same
loop that runs the whole model and the full vocabulary projection at every step; the edited model's generation time
over the base model's, on edited prompts (memory used) and unrelated ones (deferred); peak memory, memory per stored
edit; and the code-bank lookup time at 1k, 10k and 100k stored codes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time

import torch

from elder import ElderConfig, ElderModel, apply_edits
from elder.evaluation.datasets import load_benchmark
from elder.evaluation.harness import machine_facts
from elder.methods.elder.codebank import CodeBank
from elder.models import load_base
from elder.tokens import TeacherForced


class PlainElderModel(ElderModel):
    """The same mechanism and loop as research code would run it: every layer and every position, every step."""

    def run_prefix(self, batch: TeacherForced):
        return None

    def target_logits(self, batch, defer, prefix=None, use_memory=True, forced=None):
        with self.routing(batch.query_positions, defer, forced=forced) as session:
            logits = self.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return logits[batch.rows, batch.cols], session.route


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered) + 0.999) - 1)]


def time_edits(cls, base, tokenizer, name, config: ElderConfig, records) -> dict:
    model = cls(base, tokenizer, config, name)
    params = sum(p.numel() for p in model.trainable_parameters())
    start = time.perf_counter()
    results = apply_edits(model, records, progress=False)
    wall = time.perf_counter() - start
    assert sum(p.numel() for p in model.trainable_parameters()) == params  # edits never add parameters
    seconds = [r.seconds for r in results]
    out = {"edits": len(records), "median_s": statistics.median(seconds), "p90_s": p90(seconds),
           "wall_s_per_edit": wall / len(records), "iterations_mean": statistics.fmean(r.iterations for r in results),
           "learned": statistics.fmean(float(r.learned) for r in results), "trainable_params": params}
    return out, model


def time_generation(model: ElderModel, prompts: list[str], repeats: int, tokens: int) -> dict:
    model.generate(prompts[:1], 1)  # warm-up
    times = {True: [], False: []}
    for repeat in range(repeats):
        for use_memory in ((False, True) if repeat % 2 == 0 else (True, False)):  # alternate: drift cancels
            start = time.perf_counter()
            answers = model.generate(prompts, tokens, use_memory=use_memory)
            times[use_memory].append(time.perf_counter() - start)
    base, edited = statistics.median(times[False]), statistics.median(times[True])
    return {"prompts": len(prompts), "base_s": base, "edited_s": edited, "ratio": edited / base,
            "memory_used": statistics.fmean(float(a.used_memory) for a in answers)}


def time_lookup(size: int, layers: int, experts: int, top_k: int, repeats: int = 200) -> float:
    generator = torch.Generator().manual_seed(size)
    picks = torch.rand(size + 1, layers, experts, generator=generator).topk(top_k, dim=-1).indices
    codes = torch.zeros(size + 1, layers, experts, dtype=torch.bool).scatter_(-1, picks, True).flatten(1)
    bank = CodeBank(layers * experts)
    bank.add([str(i) for i in range(size)], codes[:size])
    query = codes[size:]
    bank.min_distance(query)  # builds the cached matrix, as the first routed prompt does
    start = time.perf_counter()
    for _ in range(repeats):
        bank.min_distance(query)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="benchmark spec, e.g. zsre:PATH")
    parser.add_argument("--edits", type=int, default=40, help="edits timed for each preset")
    parser.add_argument("--plain-edits", type=int, default=8, help="edits timed for the plain implementation")
    parser.add_argument("--model", default=None, help="base model; default: the embedded SmolLM2-135M")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="fast preset override K=V")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, _, v in (pair.partition("=") for pair in args.overrides)}

    records = list(load_benchmark(args.data, limit=max(args.edits, args.plain_edits)).records)
    base, tokenizer, name = load_base(args.model)
    fast = ElderConfig.preset("fast", **overrides)
    results = {"machine": machine_facts(base), "data": args.data, "fast_settings": fast.to_dict()}
    results["paper"], model = time_edits(ElderModel, base, tokenizer, name, ElderConfig.preset("paper"),
                                         records[:args.edits])
    model.detach()
    results["plain"], model = time_edits(PlainElderModel, base, tokenizer, name, fast, records[:args.plain_edits])
    model.detach()
    results["fast"], model = time_edits(ElderModel, base, tokenizer, name, fast, records[:args.edits])
    edited = [r.prompt for r in records[:args.edits]][:16]
    unrelated = [p.prompt for r in records[:args.edits] for p in r.locality][:16]
    results["generation_edited"] = time_generation(model, edited, repeats=9, tokens=16)
    results["generation_unrelated"] = time_generation(model, unrelated, repeats=9, tokens=16)
    results["memory"] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         "adapter_mb": sum(p.numel() * p.element_size() for p in model.trainable_parameters()) / 2**20,
                         "bank_bytes_per_edit": model.bank.nbytes() / len(model.bank),
                         "code_bytes_per_edit": math.ceil(model.bank.code_bits / 8)}
    layers, experts, top_k = len(model.adapters), fast.num_experts, fast.top_k
    results["lookup_ms"] = {size: time_lookup(size, layers, experts, top_k) for size in (1_000, 10_000, 100_000)}

    fast_r, paper_r, plain_r = results["fast"], results["paper"], results["plain"]
    print(f"machine: {results['machine']['platform']}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"model {name}; data {args.data}")
    print(f"{'loop':<8}{'edits':>6}{'median s/edit':>15}{'p90 s/edit':>12}{'iters/batch':>13}{'learned':>9}")
    for label, r in (("fast", fast_r), ("paper", paper_r), ("plain", plain_r)):
        print(f"{label:<8}{r['edits']:>6}{r['median_s']:>15.3f}{r['p90_s']:>12.3f}{r['iterations_mean']:>13.1f}"
              f"{r['learned']:>9.2f}")
    per_step = lambda r: r["median_s"] / r["iterations_mean"]  # noqa: E731
    print(f"fast vs plain (same settings): {plain_r['median_s'] / fast_r['median_s']:.1f}x faster per edit, "
          f"{per_step(plain_r) / per_step(fast_r):.1f}x per step; fast vs paper: "
          f"{paper_r['median_s'] / fast_r['median_s']:.1f}x faster per edit")
    for kind in ("edited", "unrelated"):
        g = results[f"generation_{kind}"]
        print(f"generation, {kind} prompts ({g['prompts']}, memory used on {100 * g['memory_used']:.0f}%): "
              f"edited/base time = {g['ratio']:.3f} ({g['edited_s']:.3f} s vs {g['base_s']:.3f} s)")
    m = results["memory"]
    print(f"peak RSS {m['peak_rss_mb']:.0f} MB; adapters {m['adapter_mb']:.1f} MB, fixed "
          f"({fast_r['trainable_params']} trainable parameters before and after editing); code bank "
          f"{m['bank_bytes_per_edit']:.0f} bytes per stored edit as kept in memory ({m['code_bytes_per_edit']:.0f} "
          f"bytes of packed code bits, the rest the fp16 subject key under subject_key deferral, or the int8 query "
          f"and its scale kept for refresh_codes/anchor_routes under code deferral)")
    print("code lookup per prompt: " + ", ".join(f"{size:,} codes {ms:.3f} ms" for size, ms in results["lookup_ms"].items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
