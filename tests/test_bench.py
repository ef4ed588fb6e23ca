"""The benchmark harness: metrics against hand-computed values, ELDER behind the method interface, resume, report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import byte_tokenizer, small_config, tiny_llama
from typer.testing import CliRunner

from elder.cli import app
from elder.data import DataError, EditRecord, LocalityProbe, held_out, write_edits
from elder.evaluation.datasets import with_neighbours
from elder.evaluation import harness
from elder.evaluation.harness import BenchSettings, RunError, run_bench
from elder.evaluation.metrics import (
    begins_with,
    generation_scores,
    ngram_entropy,
    repeats,
    score_edits,
    summarize,
    summarize_generation,
)
from elder.methods import TokenPrediction, get_method, registered
from elder.methods.elder import ElderMethod

ELDER_SETTINGS = {"preset": "fast", **{k: v for k, v in small_config().to_dict().items()
                                       if k in ("first_layer", "num_layers", "num_experts", "rank", "lr", "router_lr",
                                                "iterations", "epsilon", "batch_size", "guide_weight")}}
FACTS = [("Q: sky?", "violet"), ("Q: pet?", "a red fox"), ("Q: sea?", "green"), ("Q: sun?", "blue"),
         ("Q: tree?", "a rock"), ("Q: moon?", "cheese")]


def records() -> list[EditRecord]:
    return [EditRecord(f"e{i}", p, t, (p.replace("Q:", "Question:"),), (LocalityProbe(f"Z{i}: other?", "same"),))
            for i, (p, t) in enumerate(FACTS)]


def test_metrics_match_hand_computed_values():
    table = {  # prompt -> (predicted, target, used_memory)
        "p1": ((1, 2, 3), (1, 2, 4), True), "q1": ((1, 2, 4), (1, 2, 4), False), "l1": ((7, 8), (7, 8), True),
        "p2": ((5,), (5,), True), "l2": ((6,), (6,), False), "l3": ((4, 4), (4, 4), False),
    }
    predict = lambda prompts, targets: [TokenPrediction(*table[p]) for p in prompts]  # noqa: E731
    data = [EditRecord("a", "p1", "x", ("q1",), (LocalityProbe("l1", "y"),)),
            EditRecord("b", "p2", "x", (), (LocalityProbe("l2", "y"), LocalityProbe("l3", "y")))]
    base = [(7, 9), (6,), (4, 4)]  # the base model's tokens on l1, l2, l3
    first, second = score_edits(predict, data, lambda r: r.rephrases, base)
    assert (first.rel, first.rel_em, first.gen, first.gen_em, first.loc) == (2 / 3, 0.0, 1.0, 1.0, 0.5)
    assert (first.used_prompt, first.used_rephrase, first.used_locality) == (1.0, 0.0, 1.0)
    assert (second.rel, second.gen, second.loc, second.used_locality, second.used_rephrase) == (1.0, None, 1.0, 0.0, None)
    summary = summarize([first, second])
    assert summary["rel"] == pytest.approx(5 / 6) and summary["rel_em"] == 0.5
    assert summary["gen"] == 1.0 and summary["loc"] == 0.75 and summary["used_locality"] == 0.5
    with pytest.raises(ValueError, match="more rows"):
        score_edits(predict, data, lambda r: r.rephrases, base + [(1,)])


def test_locality_is_split_by_probe_kind():
    table = {"p": ((1,), (1,), True), "u1": ((7,), (7,), False), "n1": ((5, 5), (5, 5), True),
             "u2": ((3,), (3,), True)}
    predict = lambda prompts, targets: [TokenPrediction(*table[p]) for p in prompts]  # noqa: E731
    probes = (LocalityProbe("u1", "y"), LocalityProbe("n1", "y", "neighbour"), LocalityProbe("u2", "y"))
    base = [(7,), (5, 6), (4,)]  # u1 agrees, n1 half, u2 not at all; kinds interleaved in record order
    (score,) = score_edits(predict, [EditRecord("a", "p", "x", (), probes)], lambda r: (), base, progress=None)
    assert (score.loc_unrelated, score.loc_neighbour, score.loc) == (0.5, 0.5, 0.5)
    assert (score.used_unrelated, score.used_neighbour, score.used_locality) == (0.5, 1.0, 2 / 3)
    assert summarize([score])["loc_neighbour"] == 0.5


def test_neighbours_naming_an_edited_subject_are_scored_apart():
    table = {"Ann likes": ((1,), (1,), True), "Bob likes": ((1,), (1,), True), "Cy likes": ((5,), (5,), False)}
    predict = lambda prompts, targets: [TokenPrediction(*table[p]) for p in prompts]  # noqa: E731
    records = [EditRecord("a", "Ann likes", "x", (), (LocalityProbe("Bob likes", "y", "neighbour"),), subject="Ann"),
               EditRecord("b", "Bob likes", "x", (), (LocalityProbe("Cy likes", "y", "neighbour"),), subject="Bob")]
    base = [(2,), (5,)]  # "Bob likes" names edit b's subject and changed; "Cy likes" names none and did not
    first, second = score_edits(predict, records, lambda r: (), base, progress=None)
    assert (first.loc_neighbour_named, first.loc_neighbour_unnamed, first.loc_neighbour) == (0.0, None, 0.0)
    assert (second.loc_neighbour_named, second.loc_neighbour_unnamed) == (None, 1.0)
    summary = summarize([first, second])
    assert (summary["loc_neighbour_named"], summary["loc_neighbour_unnamed"], summary["loc_neighbour"]) == (0.0, 1.0, 0.5)


def test_made_neighbours_ask_the_question_about_a_subject_outside_the_stream():
    stream = [EditRecord("a", "Who founded Acme?", "Bob", subject="Acme"),
              EditRecord("b", "Who founded Zeta?", "Al", subject="Zeta"),
              EditRecord("c", "Where is Ur?", "Iraq", (), (LocalityProbe("Where is Kish?", "Iraq", "neighbour"),), "Ur"),
              EditRecord("d", "No subject here", "x")]
    pool = [EditRecord("p", "q", "t", subject="Zeta"), EditRecord("q", "q", "t", subject="Nokia"),
            EditRecord("r", "q", "t", subject="Kodak")]
    made = with_neighbours(stream, pool)
    assert made[0].locality == (LocalityProbe("Who founded Nokia?", "Bob", "neighbour"),)  # Zeta is edited here
    assert made[1].locality == (LocalityProbe("Who founded Kodak?", "Al", "neighbour"),)
    assert made[2] == stream[2] and made[3] == stream[3]  # has neighbours already; names no subject
    assert with_neighbours(stream, []) == tuple(stream)


def test_bench_splits_get_neighbours_from_records_outside_them(tmp_path):
    from elder.evaluation.harness import _splits

    data = tmp_path / "facts.jsonl"
    write_edits(data, [EditRecord(f"r{i}", f"Who founded S{i}?", "Bob", subject=f"S{i}") for i in range(6)])
    test, validation = _splits(BenchSettings(data=f"jsonl:{data}", edits=3, validation=1))
    assert [r.locality[0].prompt for r in test] == ["Who founded S4?", "Who founded S5?", "Who founded S4?"]
    assert validation[0].locality[0].prompt == "Who founded S4?"
    plain, _ = _splits(BenchSettings(data=f"jsonl:{data}", edits=3, validation=1, neighbours=False))
    assert all(not r.locality for r in plain)


def test_validation_records_sharing_a_test_prompt_are_passed_over(tmp_path):
    from elder.evaluation.harness import _splits

    stream, other = tmp_path / "stream.jsonl", tmp_path / "other.jsonl"
    write_edits(stream, [EditRecord(f"t{i}", f"Who founded S{i}?", "Bob", subject=f"S{i}") for i in range(3)])
    write_edits(other, [EditRecord("v0", "Who founded S1?", "Al", subject="S1")]
                + [EditRecord(f"v{i}", f"Who founded V{i}?", "Al", subject=f"V{i}") for i in range(1, 5)])
    settings = BenchSettings(data=f"jsonl:{stream}", edits=3, validation=2, validation_data=f"jsonl:{other}")
    _, validation = _splits(settings)
    assert [r.id for r in validation] == ["v1", "v2"]
    assert [r.locality[0].prompt for r in validation] == ["Who founded V3?", "Who founded V4?"]
    with pytest.raises(DataError, match="only 4 of the validation data's edit prompts are outside"):
        _splits(dataclasses.replace(settings, validation=5))


def test_generation_judges_free_answers():
    assert begins_with(" rome, the capital", "Rome") and not begins_with(" It is Rome", "Rome")
    assert repeats(" Lima Lima.", "Lima") and repeats(" Moscow, moscow", "Moscow")
    assert not repeats(" Lima, Peru. The answer is Lima.", "Lima")
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * 0.9183 + 4 / 3 * 1.0) / 2, abs=1e-4)
    assert ngram_entropy("one") == 0.0
    answers = {"Q1": " Lima Lima Lima", "R1": " It is Lima", "Q2": " Oslo is cold"}
    answer = lambda prompts, use_edits: [answers[p] for p in prompts]  # noqa: E731
    data = [EditRecord("a", "Q1", "Lima", ("R1",)), EditRecord("b", "Q2", "Oslo")]
    first, second = generation_scores(answer, data, lambda r: r.rephrases, [" a b c d", " a b c d"])
    assert (first.rel_gen, first.gen_gen, first.repeated_target) == (1.0, 0.0, 1.0)
    assert (second.rel_gen, second.gen_gen, second.repeated_target) == (1.0, None, 0.0)
    summary = summarize_generation([first, second])
    assert summary["fluency_base"] == pytest.approx(ngram_entropy(" a b c d"))
    assert summary["fluency_ratio"] == pytest.approx(summary["fluency"] / summary["fluency_base"])
    with pytest.raises(ValueError, match="1 base answers for 2 records"):
        generation_scores(answer, data, lambda r: r.rephrases, [" a"])


def test_held_out_rephrases_follow_the_training_split():
    record = EditRecord("a", "p", "t", ("r1", "r2", "r3"))
    assert held_out(record, 0.0) == ((), ("r1", "r2", "r3"))
    assert held_out(record, 0.5) == (("r1",), ("r2", "r3"))
    assert held_out(EditRecord("b", "p", "t", ("r1",)), 0.5) == ((), ("r1",))


def test_elder_method_scores_equal_a_plain_forward(tokenizer):
    base = tiny_llama()
    method = ElderMethod.create(base, tokenizer, "tiny", ELDER_SETTINGS)
    prompt, target = "Q: sky?", "violet"
    ids = tokenizer(prompt + " " + target).input_ids
    cut = len(tokenizer(prompt).input_ids)
    with torch.no_grad():
        logits = base(torch.tensor([ids])).logits[0]
    expected = tuple(logits[cut - 1:-1].argmax(-1).tolist())
    logp = torch.log_softmax(logits[cut - 1:-1], -1).gather(-1, torch.tensor(ids[cut:])[:, None]).sum().item()
    (prediction,) = method.predict([prompt], [target], use_edits=False)
    assert prediction.predicted == expected and prediction.target == tuple(ids[cut:])
    assert method.loglikelihood([prompt], [target], use_edits=False)[0] == pytest.approx(logp, abs=1e-4)


def test_exact_match_is_greedy_generation_equal_to_the_target(tokenizer):
    method = ElderMethod.create(tiny_llama(), tokenizer, "tiny", ELDER_SETTINGS)
    data = records()[:2]
    assert all(r.learned for r in method.edit(data))
    for record, prediction in zip(data, method.predict([r.prompt for r in data], [r.target for r in data])):
        (answer,) = method.answer([record.prompt], max_new_tokens=len(prediction.target))
        assert (prediction.accuracy == 1.0) == (answer.text == " " + record.target)
        assert prediction.used_memory and answer.used_memory


def test_registry_finds_methods_by_name():
    assert get_method("elder") is ElderMethod and "elder" in registered()
    with pytest.raises(ValueError, match="unknown editing method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown editing method"):
        BenchSettings(data="x", edits=1, methods=("elder", "nope"))


@pytest.fixture
def bench_setup(tmp_path):
    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    data = tmp_path / "edits.jsonl"
    write_edits(data, records())
    return model, data


def settings_for(model, data, **changes) -> BenchSettings:
    values = dict(data=f"jsonl:{data}", edits=6, model=str(model), method_settings={"elder": ELDER_SETTINGS},
                  checkpoint_every=2, timing_prompts=2)
    return BenchSettings(**{**values, **changes})


def test_an_interrupted_run_resumes_to_the_same_result(bench_setup, tmp_path, monkeypatch):
    model, data = bench_setup
    straight = run_bench(settings_for(model, data), tmp_path / "straight", progress=False, echo=lambda s: None)

    calls = {"n": 0}
    real_edit = ElderMethod.edit

    def edit_then_crash(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch: edits 0-3 are saved, edits 4-5 are not
            raise KeyboardInterrupt
        return real_edit(self, batch)

    monkeypatch.setattr(ElderMethod, "edit", edit_then_crash)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_bench(settings_for(model, data), out, progress=False, echo=lambda s: None)
    assert len((out / "elder" / "edits.jsonl").read_text().splitlines()) == 4
    with open(out / "elder" / "edits.jsonl", "a") as f:
        f.write('{"index": 4, "id": "e4", "seco')  # a line cut short by the crash
    monkeypatch.setattr(ElderMethod, "edit", real_edit)
    resumed = run_bench(settings_for(model, data), out, progress=False, echo=lambda s: None)
    lines = [json.loads(t) for t in (out / "elder" / "edits.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(6))
    assert resumed["methods"]["elder"]["final"] == straight["methods"]["elder"]["final"]
    assert (out / "elder" / "scores.jsonl").read_text() == (tmp_path / "straight" / "elder" / "scores.jsonl").read_text()
    with pytest.raises(RunError, match="other settings"):
        run_bench(settings_for(model, data, edits=5), out, progress=False, echo=lambda s: None)


def test_immediate_and_curve_protocols_are_written(bench_setup, tmp_path):
    model, data = bench_setup
    immediate = run_bench(settings_for(model, data, protocol="immediate"), tmp_path / "i", progress=False,
                          echo=lambda s: None)
    lines = [json.loads(t) for t in (tmp_path / "i" / "elder" / "edits.jsonl").read_text().splitlines()]
    assert all(line["immediate"]["rel"] is not None for line in lines)
    assert immediate["methods"]["elder"]["immediate"]["edits"] == 6
    curve = run_bench(settings_for(model, data, protocol="curve", curve_every=2), tmp_path / "c", progress=False,
                      echo=lambda s: None)
    assert [p["edits"] for p in curve["methods"]["elder"]["curve"]] == [2, 4, 6]
    assert curve["methods"]["elder"]["curve"][-1]["rel"] == curve["methods"]["elder"]["final"]["rel"]
    assert (tmp_path / "c" / "elder" / "curve.png").read_bytes().startswith(b"\x89PNG")


def test_tuning_uses_only_the_validation_split(bench_setup, tmp_path):
    model, data = bench_setup
    code = {"elder": {**ELDER_SETTINGS, "deferral": "code", "replay": 0, "block_edits": 0}}
    summary = run_bench(settings_for(model, data, edits=4, validation=2, tune=True, method_settings=code),
                        tmp_path / "t", progress=False, echo=lambda s: None)
    tuning = summary["methods"]["elder"]["tuning"]
    assert tuning["validation_edits"] == 2 and tuning["setting"] == "epsilon"
    assert [row["value"] for row in tuning["table"]] == [1.0, 3.0, 5.0, 7.0, 9.0]  # L=2, k=2: distances 0..8
    assert summary["methods"]["elder"]["settings"]["epsilon"] == tuning["chosen"]["epsilon"]
    assert summary["test"]["last_id"] == "e3"  # validation records e4, e5 never enter the test stream


def test_tuning_sets_the_key_threshold_under_subject_key_deferral(bench_setup, tmp_path):
    model, data = bench_setup
    keyed = {"elder": {**ELDER_SETTINGS, "deferral": "subject_key", "key_layer": 1}}
    summary = run_bench(settings_for(model, data, edits=4, validation=2, tune=True, method_settings=keyed),
                        tmp_path / "k", progress=False, echo=lambda s: None)
    tuning = summary["methods"]["elder"]["tuning"]
    assert tuning["setting"] == "key_threshold"
    assert [row["value"] for row in tuning["table"]][:3] == [0.99, 0.98, 0.97]  # strictest first
    assert summary["methods"]["elder"]["settings"]["key_threshold"] == tuning["chosen"]["key_threshold"]
    objective = lambda row: (row["rel"] + row["gen"] + row["loc"]) / 3  # noqa: E731
    best = [row["value"] for row in tuning["table"] if objective(row) == max(map(objective, tuning["table"]))]
    assert len(best) > 1  # a tie, as on a small validation memory
    assert tuning["chosen"]["key_threshold"] == max(best)  # the strictest of the equally good thresholds


def test_several_methods_run_on_one_stream_and_only_those_with_a_threshold_are_tuned(bench_setup, tmp_path):
    model, data = bench_setup
    quick = {"lr": 1e-2, "steps": 100, "stop_loss": 1e-3}
    summary = run_bench(settings_for(model, data, edits=4, validation=2, tune=True, methods=("elder", "ft", "lora"),
                                     method_settings={"elder": ELDER_SETTINGS, "ft": quick, "lora": quick}),
                        tmp_path / "m", progress=False, echo=lambda s: None)
    assert list(summary["methods"]) == ["elder", "ft", "lora"]
    assert "tuning" in summary["methods"]["elder"] and "tuning" not in summary["methods"]["ft"]
    for name in ("ft", "lora"):
        result = summary["methods"][name]
        assert result["settings"]["lr"] == 1e-2 and result["final"]["rel"] is not None
        assert len((tmp_path / "m" / name / "scores.jsonl").read_text().splitlines()) == 4
    report = (tmp_path / "m" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in ("elder", "ft", "lora"))
    table = report[report.index("| method | Rel | Gen | Loc | mean"):].split("\n\n")[0].splitlines()
    assert len(table) == 6 and len({row.count("|") for row in table}) == 1  # header, rule, base model, 3 methods
    for row in table[2:]:
        rel, gen, loc, mean = (float(cell) for cell in row.split("|")[2:6])
        assert abs(mean - (rel + gen + loc) / 3) <= 0.1
    # bytes each edit adds to the saved state: ft and lora grow by their edit log only, elder by its codes and keys
    costs = {name: summary["methods"][name]["cost"] for name in ("elder", "ft", "lora")}
    for name, cost in costs.items():
        assert cost["state_bytes"] == sum(p.stat().st_size for p in (tmp_path / "m" / name / "memory").iterdir())
        assert cost["bytes_per_edit"] == (cost["state_bytes"] - cost["state_bytes_before_edits"]) / 4
        assert 0 < cost["bytes_per_edit"] < cost["state_bytes"]
    assert costs["elder"]["bytes_per_edit"] > costs["ft"]["bytes_per_edit"]
    assert "bytes/edit" in report and "added per edit" in report
    assert (tmp_path / "m" / "methods.png").read_bytes().startswith(b"\x89PNG") and "(methods.png)" in report


def test_a_run_grows_by_methods_added_after_the_ones_it_holds(bench_setup, tmp_path, monkeypatch):
    model, data = bench_setup
    quick = {"lr": 1e-2, "steps": 100, "stop_loss": 1e-3}
    first = settings_for(model, data, edits=2, methods=("ft",), method_settings={"ft": quick})
    before = run_bench(first, tmp_path / "g", progress=False, echo=lambda s: None)
    scores = (tmp_path / "g" / "ft" / "scores.jsonl").read_text()

    def no_edits(self, records):
        raise AssertionError("a method the run holds is edited again")

    monkeypatch.setattr(registered()["ft"], "edit", no_edits)
    timed = harness._inference_time

    def timed_once(method, *args, **kwargs):  # a resumed method keeps the timing of the run that edited it
        assert method.name != "ft", "a method the run holds is timed again"
        return timed(method, *args, **kwargs)

    monkeypatch.setattr(harness, "_inference_time", timed_once)
    grown = run_bench(settings_for(model, data, edits=2, methods=("ft", "lora"),
                                   method_settings={"ft": quick, "lora": quick}), tmp_path / "g", progress=False,
                      echo=lambda s: None)
    assert list(grown["methods"]) == ["ft", "lora"]
    assert {k: grown["methods"]["ft"][k] for k in ("final", "inference")} == \
        {k: before["methods"]["ft"][k] for k in ("final", "inference")}
    assert (tmp_path / "g" / "ft" / "scores.jsonl").read_text() == scores
    assert json.loads((tmp_path / "g" / "settings.json").read_text())["methods"] == ["ft", "lora"]
    for changed in (dict(methods=("lora", "ft"), method_settings={"ft": quick, "lora": quick}),  # not after them
                    dict(methods=("ft", "lora"), method_settings={"ft": {**quick, "lr": 2e-2}}),  # ft's settings
                    dict(methods=("ft", "lora", "grace"), method_settings={"ft": quick}, edits=3)):  # the stream
        with pytest.raises(RunError, match="other settings"):
            run_bench(settings_for(model, data, **{"edits": 2, **changed}), tmp_path / "g", progress=False,
                      echo=lambda s: None)


def test_cli_bench_writes_the_report(bench_setup, tmp_path):
    model, data = bench_setup
    out = tmp_path / "run"
    args = ["bench", "--data", f"jsonl:{data}", "--edits", "4", "--out", out, "--model", model,
            "--checkpoint-every", "2"]
    for key, value in ELDER_SETTINGS.items():
        if key != "preset":
            args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "| elder |" in report and "s/edit" in report and "Loc neighbours" in report
    assert "fluency edited" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["elder"]["inference"]["edit_prompts"]["ratio"] > 0
    generation = summary["methods"]["elder"]["generation"]
    assert generation["edits"] == 4 and 0 <= generation["rel_gen"] <= 1 and generation["fluency_base"] >= 0
    lines = [json.loads(t) for t in (out / "elder" / "generations.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["e0", "e1", "e2", "e3"]
    assert len(json.loads((out / "base" / "answers.json").read_text())) == 4
    assert (out / "elder" / "final_by_position.png").exists()
    bad = CliRunner().invoke(app, ["bench", "--data", f"jsonl:{data}", "--out", str(tmp_path / "x"),
                                   "--protocol", "sometimes"])
    assert bad.exit_code == 2 and "unknown protocol 'sometimes'" in bad.output


def test_bad_settings_or_data_fail_before_the_run_folder_is_claimed(bench_setup, tmp_path):
    model, data = bench_setup
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown setting"):
        run_bench(settings_for(model, data, method_settings={"elder": {"nonsense": 1}}), out, progress=False)
    with pytest.raises(ValueError, match="records"):
        run_bench(settings_for(model, data, edits=50), out, progress=False)
    assert not out.exists()
    run_bench(settings_for(model, data, edits=2), out, progress=False, echo=lambda s: None)  # the folder is free


def test_the_report_shows_each_method_as_it_finishes_and_elder_report_writes_it_after_a_stop(bench_setup, tmp_path,
                                                                                              monkeypatch):
    model, data = bench_setup
    quick = {"lr": 1e-2, "steps": 100, "stop_loss": 1e-3}
    settings = settings_for(model, data, edits=2, methods=("ft", "lora"), method_settings={"ft": quick, "lora": quick})
    out = tmp_path / "run"
    real = harness._run_method

    def stop_at_lora(name, *args, **kwargs):
        if name == "lora":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(harness, "_run_method", stop_at_lora)
    with pytest.raises(KeyboardInterrupt):
        run_bench(settings, out, progress=False, echo=lambda s: None)
    written = (out / "report.md").read_text()
    assert "| ft |" in written and "| lora |" not in written and "Not finished yet: lora" in written
    (out / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").read_text() == written
    monkeypatch.setattr(harness, "_run_method", real)
    run_bench(settings, out, progress=False, echo=lambda s: None)
    finished = (out / "report.md").read_text()
    assert "| ft |" in finished and "| lora |" in finished and "Not finished" not in finished
    (tmp_path / "claimed" / "ft").mkdir(parents=True)
    (tmp_path / "claimed" / "settings.json").write_text((out / "settings.json").read_text())
    (out / "lora" / "summary.json").write_text('{"final": ')  # cut short
    for folder, reason in ((tmp_path / "nothing", "holds no readable run"), (tmp_path / "claimed", "has finished yet"),
                           (out, "summary.json is damaged")):
        refused = CliRunner().invoke(app, ["report", str(folder)])
        assert refused.exit_code != 0 and reason in refused.output, refused.output


def test_elder_report_join_makes_one_report_of_runs_of_one_stream(bench_setup, tmp_path):
    model, data = bench_setup
    quick = {"lr": 1e-2, "steps": 100, "stop_loss": 1e-3}
    for name in ("ft", "lora"):  # the same stream, one method each: two sessions' runs
        run_bench(settings_for(model, data, edits=2, methods=(name,), method_settings={name: quick}),
                  tmp_path / name, progress=False, echo=lambda s: None)
    out = tmp_path / "joined"
    result = CliRunner().invoke(app, ["report", str(out), "--join", str(tmp_path / "ft"),
                                      "--join", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    joined = (out / "report.md").read_text()
    for name in ("ft", "lora"):
        row = next(line for line in joined.splitlines() if line.startswith(f"| {name} |"))
        alone = (tmp_path / name / "report.md").read_text()
        assert row in alone.splitlines()  # the method's row as its own run reported it
        assert not (out / name / "memory").exists() and (out / name / "scores.jsonl").is_file()
    assert json.loads((out / "settings.json").read_text())["methods"] == ["ft", "lora"]
    with pytest.raises(RunError, match="cannot be run"):  # a joined folder holds no memory to resume from
        run_bench(settings_for(model, data, edits=2, methods=("ft", "lora"),
                               method_settings={"ft": quick, "lora": quick}), out, progress=False, echo=lambda s: None)
    run_bench(settings_for(model, data, edits=3, methods=("ft",), method_settings={"ft": quick}),
              tmp_path / "longer", progress=False, echo=lambda s: None)
    for joins, reason in (([tmp_path / "ft", tmp_path / "longer"], "ran another stream than"),
                          ([tmp_path / "ft", tmp_path / "ft"], "finished in both"),
                          ([tmp_path / "nothing"], "holds no readable run")):
        args = ["report", str(tmp_path / "other")] + [a for j in joins for a in ("--join", str(j))]
        refused = CliRunner().invoke(app, args)
        assert refused.exit_code != 0 and reason in refused.output, refused.output
        assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other-*"))
    refused = CliRunner().invoke(app, ["report", str(out), "--join", str(tmp_path / "ft")])
    assert refused.exit_code != 0 and "not an empty folder" in refused.output
    assert (out / "report.md").read_text() == joined  # nothing already written is touched
