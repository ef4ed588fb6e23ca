"""A run's Markdown report and PNG plots, made from its summary and per-edit lines."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from elder.files import atomic_write, write_text  # noqa: E402

PLOTTED = (("rel", "Reliability"), ("gen", "Generalization"), ("loc", "Locality"))


def _mean3(scores: dict) -> float | None:
    """The mean of Rel, Gen and Loc (None when one is missing)."""
    values = [scores.get(k) for k in ("rel", "gen", "loc")]
    return None if None in values else sum(values) / 3


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _bytes(value) -> str:
    """A byte count in B, KB, MB or GB (powers of 1000)."""
    if value is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _mean_of(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if row[key] is not None]
    return sum(values) / len(values) if values else None


def _by_position(scores: list[dict], parts: int = 5) -> list[str]:
    """Final scores of the edits (`scores`: per edit, in stream order) by when they were made, in equal parts of the
    stream: forgetting at a glance."""
    if len(scores) < parts:
        return []
    lines = ["", "Final scores by position in the stream (earliest edits first):", "",
             "| edits | Rel | Gen | Loc | memory used on edit prompts |", "|---|---|---|---|---|"]
    size = len(scores) / parts
    for i in range(parts):
        chunk = scores[round(i * size):round((i + 1) * size)]
        rel, gen, loc, used = (_mean_of(chunk, key) for key in ("rel", "gen", "loc", "used_prompt"))
        lines.append(f"| {round(i * size) + 1}-{round((i + 1) * size)} | {_pct(rel)} | {_pct(gen)} | {_pct(loc)} | "
                     f"{_pct(used)} |")
    return lines


def markdown(summary: dict, scores: dict[str, list[dict]]) -> str:
    """The report: headline table, deferral, cost, inference time, retention and, where run, the curve (`scores`: per
    method, its per-edit final scores)."""
    s = summary["settings"]
    test = summary["test"]
    variant = (f"the edit prompt and the first {s['train_rephrases']:g} of its rephrases" if s["train_rephrases"]
               else "the edit prompt only")
    pending = summary.get("pending") or []
    lines = [f"# elder bench: {test['edits']} sequential edits of {s['data']}", "",
             *([f"Not finished yet: {', '.join(pending)} (this report is rewritten as each method finishes; "
                "`elder report RUN_DIR` writes it from the methods finished so far).", ""] if pending else []),
             f"Protocol `{s['protocol']}`; training on {variant}; "
             f"model {s['model'] or 'smollm2-135m (embedded)'}; machine: {summary['machine']['platform']}, "
             f"{summary['machine']['cpu_count']} CPUs, torch {summary['machine']['torch']}"
             + (f", {summary['machine']['cuda_device']}" if "cuda_device" in summary["machine"] else "") + ".", "",
             "Scores in % after all edits (final protocol). Rel/Gen: teacher-forced token accuracy of the target "
             "(EasyEdit's rewrite_acc/rephrase_acc); Loc: agreement with the base model's tokens on the locality "
             "prompts, all of them and split by kind: unrelated (another topic) and neighbours (the edit's question "
             "about another subject); EM: every target token right (= greedy generation equals the target).", "",
             "| method | Rel | Gen | Loc | mean of Rel, Gen, Loc | Loc unrelated | Loc neighbours | Rel EM | Gen EM | memory used: edits / rephrases / unrelated / neighbours | retention (edited/base) | s/edit median (p90) | bytes/edit | gen. time ratio: edits / unrelated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first = next(iter(summary["methods"].values()))
    u = first["unedited"]  # the same base model and records for every method
    lines.append(f"| base model, no edits | {_pct(u['rel'])} | {_pct(u['gen'])} | {_pct(u['loc'])} | "
                 f"{_pct(_mean3(u))} | {_pct(u.get('loc_unrelated'))} | {_pct(u.get('loc_neighbour'))} | "
                 f"{_pct(u['rel_em'])} | {_pct(u['gen_em'])} | | | | | |")
    for name, r in summary["methods"].items():
        f, c, inf = r["final"], r["cost"], r.get("inference", {})
        retention = r.get("general", {}).get("average", {}).get("ratio")
        used = " / ".join(_pct(f.get(k)) for k in ("used_prompt", "used_rephrase", "used_unrelated", "used_neighbour"))
        lines.append(
            f"| {name} | {_pct(f['rel'])} | {_pct(f['gen'])} | {_pct(f['loc'])} | {_pct(_mean3(f))} | "
            f"{_pct(f.get('loc_unrelated'))} | "
            f"{_pct(f.get('loc_neighbour'))} | {_pct(f['rel_em'])} | {_pct(f['gen_em'])} | {used} | "
            f"{_ratio(retention)} | {c['seconds_per_edit_median']:.2f} ({c['seconds_per_edit_p90']:.2f}) | "
            f"{_bytes(c.get('bytes_per_edit'))} | {_ratio(inf.get('edit_prompts', {}).get('ratio'))} / {_ratio(inf.get('unrelated_prompts', {}).get('ratio'))} |")
    lines += ["", "Every method's final Rel, Gen and Loc by when the edit was made (forgetting): "
              "[methods.png](methods.png)."]
    split = [(name, r["final"]) for name, r in summary["methods"].items()
             if r["final"].get("loc_neighbour_named") is not None]
    if split:
        lines += ["", "Loc on neighbours that name the subject of an edit in the stream (a subject-keyed memory lets "
                  "them in; some ask the edited fact itself, where a kept edit must change the answer: "
                  "benchmarks/conflicts.py) and on the others: "
                  + "; ".join(f"{name} {_pct(f['loc_neighbour_named'])} / {_pct(f.get('loc_neighbour_unnamed'))}"
                              for name, f in split) + "."]
    generated = {name: r["generation"] for name, r in summary["methods"].items() if "generation" in r}
    if generated:
        lines += ["", f"Free greedy answers ({s.get('generation_tokens')} tokens): Rel/Gen is the % of answers to the "
                  "edit prompt / held-out rephrases that begin with the target; fluency is ROME's n-gram entropy of "
                  "the answers to the edit prompts, edited and base model; repeated target: % of edited answers "
                  "that state the target twice in a row (\"Lima Lima\").", "",
                  "| method | Rel (generated) | Gen (generated) | fluency edited | fluency base | edited/base | "
                  "repeated target |", "|---|---|---|---|---|---|---|"]
        for name, g in generated.items():
            lines.append(f"| {name} | {_pct(g['rel_gen'])} | {_pct(g['gen_gen'])} | {_ratio(g['fluency'])} | "
                         f"{_ratio(g['fluency_base'])} | {_ratio(g['fluency_ratio'])} | "
                         f"{_pct(g['repeated_target'])} |")
    for name, r in summary["methods"].items():
        c = r["cost"]
        lines += ["", f"## {name}", "",
                  f"Cost: {c['seconds_total']:.0f} s of edit training, iterations per batch median "
                  f"{c['iterations_median']:g} (mean {c['iterations_mean']:.1f}), "
                  f"{_pct(c['learned_when_trained'])}% learned when trained, peak RSS {c['peak_rss_mb']:.0f} MB"
                  + (f", peak CUDA {c['peak_cuda_mb']:.0f} MB" if c["peak_cuda_mb"] else "") + "."
                  + (f" Saved state: {_bytes(c['state_bytes'])} after the edits, "
                     f"{_bytes(c['state_bytes_before_edits'])} before any ({_bytes(c['bytes_per_edit'])} added per edit)."
                     if c.get("state_bytes_before_edits") is not None else "")]
        if "wall_seconds_this_invocation" in r:
            laps = r["wall_seconds_this_invocation"]
            lines.append("Wall time of the last invocation, by phase (a resumed run counts only what it redid): "
                         + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in laps.items())
                         + f"; total {sum(laps.values()):.0f} s.")
        if "immediate" in r:
            i = r["immediate"]
            lines.append(f"Immediate protocol (each edit scored right after it): Rel {_pct(i['rel'])}, "
                         f"Gen {_pct(i['gen'])}, Loc {_pct(i['loc'])}.")
        if "tuning" in r:
            t = r["tuning"]
            lines.append(f"Tuned {t['setting']} = {t['chosen'][t['setting']]:g} on {t['validation_edits']} "
                         f"validation edits ({t['objective']}).")
        lines += _by_position(scores[name])
        if "general" in r:
            lines += ["", "| task | metric | base | edited | edited/base |", "|---|---|---|---|---|"]
            for task, row in r["general"]["tasks"].items():
                lines.append(f"| {task} | {row['metric']} | {_pct(row['base'])} | {_pct(row['edited'])} | "
                             f"{_ratio(row['ratio'])} |")
            a = r["general"]["average"]
            lines.append(f"| average | | {_pct(a['base'])} | {_pct(a['edited'])} | {_ratio(a['ratio'])} |")
        if "curve" in r:
            lines += ["", "| edits | Rel | Gen | Loc | memory used on unrelated |", "|---|---|---|---|---|"]
            lines += [f"| {p['edits']} | {_pct(p['rel'])} | {_pct(p['gen'])} | {_pct(p['loc'])} | "
                      f"{_pct(p['used_locality'])} |" for p in r["curve"]]
    return "\n".join(lines) + "\n"


def _scores(folder: Path) -> list[dict]:
    """A method's per-edit final scores, in stream order."""
    return [json.loads(t) for t in (folder / "scores.jsonl").read_text().splitlines() if t.strip()]


def _binned(scores: list[dict], key: str, bins: int) -> tuple[list[float], list[float]]:
    """(middle position, mean in %) of `key` over `bins` consecutive stretches of the stream."""
    xs, ys = [], []
    width = max(1, len(scores) // bins)
    for start in range(0, len(scores), width):
        values = [s[key] for s in scores[start:start + width] if s[key] is not None]
        if values:
            xs.append(start + len(scores[start:start + width]) / 2)
            ys.append(100 * sum(values) / len(values))
    return xs, ys


def plot_methods(out: Path, scores: dict[str, list[dict]], bins: int = 20) -> Path | None:
    """One PNG of every method's final Rel, Gen and Loc (`scores`: per method, its per-edit final scores) by when
    the edit was made, side by side."""
    if not any(scores.values()):
        return None
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 4), sharey=True)
    for ax, (key, label) in zip(axes, PLOTTED, strict=True):
        for name, rows in scores.items():
            ax.plot(*_binned(rows, key, bins), marker="o", markersize=3, label=name)
        ax.set(xlabel="edit position in the stream (earliest first)", title=label, ylim=(0, 102))
    axes[0].set_ylabel("% after all edits")
    axes[-1].legend(fontsize="small")
    return _save(fig, out / "methods.png")


def plot_method(folder: Path, name: str, scores: list[dict], curve: list[dict] | None, bins: int = 20) -> list[Path]:
    """PNG plots of one method's metrics (`scores`: its per-edit final scores) against the number of edits."""
    written = []
    if scores:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in PLOTTED:
            ax.plot(*_binned(scores, key, bins), marker="o", label=label)
        ax.set(xlabel="edit position in the stream (earliest first)", ylabel="% after all edits", ylim=(0, 102),
               title=f"{name}: final scores by when the edit was made")
        ax.legend()
        written.append(_save(fig, folder / "final_by_position.png"))
    if curve:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in PLOTTED + (("used_locality", "memory used on unrelated"),):
            ax.plot([p["edits"] for p in curve], [100 * p[key] if p[key] is not None else None for p in curve],
                    marker="o", label=label)
        ax.set(xlabel="edits applied", ylabel="% over all edits so far", ylim=(0, 102), title=f"{name}: curve")
        ax.legend()
        written.append(_save(fig, folder / "curve.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def write_report(out: Path, summary: dict) -> Path:
    """Write report.md and every method's plots into the run folder."""
    scores = {name: _scores(out / name) for name in summary["methods"]}  # each method's lines, read once
    for name, result in summary["methods"].items():
        plot_method(out / name, name, scores[name], result.get("curve"))
    plot_methods(out, scores)
    return write_text(out / "report.md", markdown(summary, scores))
