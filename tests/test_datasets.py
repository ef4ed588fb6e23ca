import json
from pathlib import Path

import pytest

from elder.data import DataError, EditRecord, LocalityProbe, content_id
from elder.evaluation.datasets import Benchmark, load_benchmark, split_benchmark

ZSRE = [
    {"subject": "IAAF", "src": "When was IAAF founded?", "pred": "2011", "rephrase": "When did IAAF start?",
     "alt": "2006", "answers": ["1998"], "loc": "nq question: last episode of spongebob", "loc_ans": "The String"},
    {"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "pred": "Ramalinales",
     "rephrase": "What family are Ramalinaceae?", "alt": " 625", "answers": ["Lecanorales"],
     "loc": "nq question: skiing types", "loc_ans": "Downhill"},
    {"subject": "Oslo", "src": "Which country is Oslo in?", "pred": "Norway", "rephrase": "Oslo is a city of",
     "alt": "Chile", "answers": ["Norway"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"},
]

ROME_FULL = {
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
ROME_REDUCED = {
    "case_id": 1,
    "requested_rewrite": {"prompt": "The official religion of {} is", "relation_id": "P140",
                          "target_new": {"str": "Islam"}, "target_true": {"str": "Christianity"},
                          "subject": "Edwin of Northumbria"},
    "paraphrase_prompts": ["Edwin of Northumbria follows the religion of"],
    "neighborhood_prompts": ["The official religion of Paul is"],
    "reduced": True,
}

FLAT = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak", "locality_prompt": "Michel Rocard speaks",
     "locality_ground_truth": "French"},
    {"case_id": 4, "prompt": "What is the twin city of Lyon? It is", "target_new": "Manila", "subject": "Lyon",
     "ground_truth": "Beirut", "rephrase_prompt": "People in Lyon's twin city speak",
     "locality_prompt": "The twin city of Trieste is", "locality_ground_truth": "Beirut"},
]

WISE = [
    {"prompt": "Tesla, Inc.,", "target_new": "originally known as Tesla Motors", "subject": "Tesla, Inc.,",
     "ood_rephrase": "Tesla, Inc., an American company,", "locality_prompt": "What can we learn from EU",
     "locality_ground_truth": "colleagues in digital banking"},
    {"prompt": "This is a Wikipedia passage about Ann", "target_new": "Ann was a painter.", "subject": "Ann",
     "locality_prompt": "A whole passage with no continuation.", "locality_ground_truth": ""},
]

EDITS = [
    {"id": "a", "prompt": "The capital of France is", "target": "Rome", "rephrases": ["France's capital is"],
     "locality": [{"prompt": "2 + 2 =", "answer": "4"}]},
    {"prompt": "The capital of Japan is", "target": "Cairo"},
]

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(tmp_path: Path, rows: list, name: str = "bench.json", jsonl: bool = False) -> Path:
    path = tmp_path / name
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def zsre_record(i: int) -> EditRecord:
    d = ZSRE[i]
    return EditRecord(f"zsre-{i}", d["src"], d["alt"], (d["rephrase"],), (LocalityProbe(d["loc"], d["loc_ans"]),),
                      d.get("subject"))


def test_zsre_loads_with_kind_or_bare_path(tmp_path):
    path = write(tmp_path, ZSRE, "zsre_edit.json")
    bench = load_benchmark(f"zsre:{path}")
    assert bench == Benchmark("zsre_edit", "zsre", str(path), tuple(zsre_record(i) for i in range(3)))
    assert bench.records[1].target == " 625"  # the leading space is kept
    assert load_benchmark(str(path)) == bench


def test_skip_invalid_leaves_out_only_the_malformed_records(tmp_path):
    path = write(tmp_path, [ZSRE[0], {**ZSRE[1], "alt": ""}, ZSRE[2]], "zsre_edit.json")
    with pytest.raises(DataError, match="record 1: empty 'alt'"):
        load_benchmark(f"zsre:{path}")
    kept = load_benchmark(f"zsre:{path}", skip_invalid=True).records
    assert [r.id for r in kept] == ["zsre-0", "zsre-2"]


def test_zsre_rephrase_may_be_a_list(tmp_path):
    path = write(tmp_path, [{**ZSRE[0], "rephrase": ["When did IAAF start?", "IAAF began in"]}])
    assert load_benchmark(str(path)).records[0].rephrases == ("When did IAAF start?", "IAAF began in")


def test_counterfact_rome_full_and_reduced(tmp_path):
    neighbours_as_dicts = {**ROME_REDUCED, "case_id": 2,
                           "neighborhood_prompts": [{"prompt": "Ringo Starr is follower of", "target": "x"}]}
    path = write(tmp_path, [ROME_FULL, ROME_REDUCED, neighbours_as_dicts], "cf.json")
    bench = load_benchmark(f"counterfact:{path}")
    assert bench.format == "counterfact-rome"
    assert bench.records[0] == EditRecord(
        "cf-0", "The mother tongue of Danielle Darrieux is", "English",
        ("Danielle Darrieux, a native", "Danielle Darrieux spoke the language"),
        (LocalityProbe("The mother tongue of Léon Blum is", "French", "neighbour"),
         LocalityProbe("Michel Rocard is a native speaker of", "French", "neighbour")),
        "Danielle Darrieux",
    )
    assert bench.records[1] == EditRecord(
        "cf-1", "The official religion of Edwin of Northumbria is", "Islam",
        ("Edwin of Northumbria follows the religion of",),
        (LocalityProbe("The official religion of Paul is", "Christianity", "neighbour"),),
        ROME_REDUCED["requested_rewrite"]["subject"],
    )
    assert bench.records[2].locality == (LocalityProbe("Ringo Starr is follower of", "Christianity", "neighbour"),)


def test_counterfact_flattened(tmp_path):
    path = write(tmp_path, FLAT, "cf_mend.jsonl", jsonl=True)
    bench = load_benchmark(f"counterfact:{path}")
    assert bench.format == "flat"
    assert bench.records == (
        EditRecord("cf-0", FLAT[0]["prompt"], "English", (FLAT[0]["rephrase_prompt"],),
                   (LocalityProbe("Michel Rocard speaks", "French", "neighbour"),), FLAT[0].get("subject")),
        EditRecord("cf-4", FLAT[1]["prompt"], "Manila", (FLAT[1]["rephrase_prompt"],),
                   (LocalityProbe("The twin city of Trieste is", "Beirut", "neighbour"),), FLAT[1].get("subject")),
    )


def test_wise_shape_without_case_id(tmp_path):
    path = write(tmp_path, WISE, "wise_temporal.json")
    bench = load_benchmark(str(path))
    assert bench.format == "flat"
    assert bench.records == (
        EditRecord("wise_temporal-0", "Tesla, Inc.,", "originally known as Tesla Motors",
                   ("Tesla, Inc., an American company,",),
                   (LocalityProbe("What can we learn from EU", "colleagues in digital banking"),), WISE[0].get("subject")),
        # An empty continuation (as in WISE's own files) becomes a probe without a known answer.
        EditRecord("wise_temporal-1", "This is a Wikipedia passage about Ann", "Ann was a painter.", (),
                   (LocalityProbe("A whole passage with no continuation."),), WISE[1].get("subject")),
    )


def test_edits_jsonl_and_list(tmp_path):
    expected = (
        EditRecord("a", "The capital of France is", "Rome", ("France's capital is",), (LocalityProbe("2 + 2 =", "4"),)),
        # no id: one derived from the prompt and target, as read_edits gives
        EditRecord(content_id("The capital of Japan is", "Cairo"), "The capital of Japan is", "Cairo"),
    )
    path = write(tmp_path, EDITS, "edits.jsonl", jsonl=True)
    assert load_benchmark(f"jsonl:{path}").records == expected
    bench = load_benchmark(str(path))
    assert (bench.format, bench.records) == ("edits", expected)
    assert load_benchmark(str(write(tmp_path, EDITS, "edits.json"))).records == expected


@pytest.mark.parametrize("rows, fmt", [
    (ZSRE, "zsre"), ([ROME_FULL], "counterfact-rome"), ([ROME_REDUCED], "counterfact-rome"),
    (FLAT, "flat"), (WISE, "flat"), (EDITS, "edits"),
])
@pytest.mark.parametrize("jsonl", [False, True])
def test_format_detection(tmp_path, rows, fmt, jsonl):
    path = write(tmp_path, rows, "data.jsonl" if jsonl else "data.json", jsonl=jsonl)
    assert load_benchmark(str(path)).format == fmt


def test_unknown_format_and_wrong_kind(tmp_path):
    path = write(tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"bench\.json record 0: unknown benchmark format"):
        load_benchmark(str(path))
    with pytest.raises(DataError, match=r"record 0: not a CounterFact record"):
        load_benchmark(f"counterfact:{write(tmp_path, ZSRE, 'z.json')}")


def test_missing_path_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file or folder.*hf:NAME"):
        load_benchmark(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="no such file"):
        load_benchmark(f"zsre:{tmp_path / 'nope.json'}")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        load_benchmark(str(tmp_path / "empty.jsonl"))


def test_offset_and_limit(tmp_path):
    path = write(tmp_path, ZSRE)
    assert [r.id for r in load_benchmark(str(path), limit=2).records] == ["zsre-0", "zsre-1"]
    # ids keep the position in the file, not in the selection.
    assert [r.id for r in load_benchmark(str(path), limit=1, offset=2).records] == ["zsre-2"]
    assert [r.id for r in load_benchmark(str(path), offset=1).records] == ["zsre-1", "zsre-2"]
    with pytest.raises(DataError, match="4 records from offset 0 asked for, but it has only 3"):
        load_benchmark(str(path), limit=4)
    with pytest.raises(DataError, match="2 records from offset 2 .* only 3"):
        load_benchmark(str(path), limit=2, offset=2)
    with pytest.raises(DataError, match="offset 3 asked for, but it has only 3"):
        load_benchmark(str(path), offset=3)
    for bad in ({"limit": 0}, {"limit": -1}, {"offset": -1}, {"limit": True}):
        with pytest.raises(DataError, match="must be an integer"):
            load_benchmark(str(path), **bad)


def test_only_selected_records_are_validated(tmp_path):
    path = write(tmp_path, [*ZSRE[:2], {**ZSRE[2], "alt": ""}])
    assert len(load_benchmark(str(path), limit=2).records) == 2
    with pytest.raises(DataError, match=r"bench\.json record 2: empty 'alt'"):
        load_benchmark(str(path))


@pytest.mark.parametrize("rows, index, message", [
    ([ZSRE[0], {**ZSRE[1], "alt": "   "}], 1, "empty 'alt'"),
    ([ZSRE[0], {k: v for k, v in ZSRE[1].items() if k != "src"}], 1, "missing 'src'"),
    ([ZSRE[0], {**ZSRE[1], "loc_ans": 3}], 1, "'loc_ans' must be a string, got int"),
    ([ZSRE[0], {**ZSRE[1], "rephrase": ["ok", 5]}], 1, "'rephrase[1]' must be a string, got int"),
    ([ZSRE[0], ["not", "an object"]], 1, "expected a JSON object, got list"),
    ([ROME_FULL, {**ROME_REDUCED, "requested_rewrite": {**ROME_REDUCED["requested_rewrite"],
                                                       "prompt": "The official religion is"}}],
     1, "'requested_rewrite.prompt' has no '{}'"),
    ([{**ROME_FULL, "requested_rewrite": {**ROME_FULL["requested_rewrite"], "target_new": {"str": ""}}}],
     0, "empty 'requested_rewrite.target_new.str'"),
    ([{**ROME_FULL, "requested_rewrite": {**ROME_FULL["requested_rewrite"], "target_true": "French"}}],
     0, "'requested_rewrite.target_true' must be an object, got str"),
    ([ROME_FULL, {**ROME_REDUCED, "neighborhood_prompts": ["ok", 7]}],
     1, "'neighborhood_prompts[1]' must be a string or an object, got int"),
    ([ROME_FULL, {k: v for k, v in ROME_REDUCED.items() if k != "paraphrase_prompts"}],
     1, "missing 'paraphrase_prompts'"),
    ([{**ROME_FULL, "case_id": 1.5}], 0, "'case_id' must be an integer or a string, got float"),
    ([FLAT[0], {**FLAT[1], "target_new": " "}], 1, "empty 'target_new'"),
    ([FLAT[0], {k: v for k, v in FLAT[1].items() if k != "locality_prompt"}], 1, "missing 'locality_prompt'"),
    ([FLAT[0], {**FLAT[1], "rephrase_prompt": {"text": "x"}}], 1, "'rephrase_prompt' must be a list, got dict"),
    ([EDITS[0], {"id": "b", "prompt": "p", "target": "  "}], 1, "empty target"),
])
def test_malformed_record_names_file_index_and_field(tmp_path, rows, index, message):
    path = write(tmp_path, rows, "bad_bench.json")
    with pytest.raises(DataError) as err:
        load_benchmark(str(path))
    text = str(err.value)
    assert text.startswith(f"{path} record {index}: "), text
    assert message in text


def test_invalid_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FLAT[0]) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl line 3 \(record 1\): invalid JSON"):
        load_benchmark(str(path))
    path = tmp_path / "bad.json"
    path.write_text('[{"src": "x"},\n oops]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON: .*line 2"):
        load_benchmark(str(path))


def test_duplicate_ids_name_both_records(tmp_path):
    path = write(tmp_path, [ROME_FULL, ROME_REDUCED, {**ROME_REDUCED, "case_id": 0}])
    with pytest.raises(DataError, match=r"bench\.json record 2: duplicate id 'cf-0' \(first used by record 0\)"):
        load_benchmark(str(path))
    path = write(tmp_path, [EDITS[0], EDITS[0]], "edits.jsonl", jsonl=True)
    with pytest.raises(DataError, match=r"edits\.jsonl line 2: duplicate id 'a' \(first used on line 1\)"):
        load_benchmark(f"jsonl:{path}")


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ZSRE).save_to_disk(str(tmp_path / "zsre_saved"))
    bench = load_benchmark(str(tmp_path / "zsre_saved"), limit=2, offset=1)
    assert (bench.name, bench.format) == ("zsre_saved", "zsre")
    assert bench.records == (zsre_record(1), zsre_record(2))

    # Reduced ROME rows lack columns of the full ones; datasets fills them with None.
    rome = datasets.Dataset.from_list([ROME_FULL, ROME_REDUCED])
    datasets.DatasetDict({"test": rome}).save_to_disk(str(tmp_path / "cf_saved"))
    bench = load_benchmark(str(tmp_path / "cf_saved"))
    assert bench.format == "counterfact-rome"
    assert [r.id for r in bench.records] == ["cf-0", "cf-1"]
    assert bench.records[1].prompt == "The official religion of Edwin of Northumbria is"

    datasets.Dataset.from_list([FLAT[0], {**FLAT[1], "locality_prompt": None}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad record 1: missing 'locality_prompt'"):
        load_benchmark(str(tmp_path / "bad"))


def test_folder_with_one_file(tmp_path):
    write(tmp_path, FLAT, "cf.jsonl", jsonl=True)
    (tmp_path / "README.md").write_text("notes", encoding="utf-8")
    bench = load_benchmark(str(tmp_path))
    assert (bench.name, bench.source, len(bench.records)) == ("cf", str(tmp_path / "cf.jsonl"), 2)
    write(tmp_path, ZSRE, "zsre.json")
    with pytest.raises(DataError, match="exactly one .json/.jsonl file, found 2"):
        load_benchmark(str(tmp_path))


@pytest.mark.parametrize("error", [ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)"),
                                   FileNotFoundError("Dataset 'x/y' doesn't exist on the Hub")])
def test_hub_unreachable_gives_clear_error(monkeypatch, error):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"hf:x/y@test: cannot .*pass a local path") as err:
        load_benchmark("hf:x/y@test")
    if isinstance(error, ConnectionError):
        assert "cannot reach the Hugging Face hub" in str(err.value)


def test_hub_dataset_is_mapped(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split=None):
        calls.append((name, split))
        data = datasets.Dataset.from_list(WISE)
        return data if split else datasets.DatasetDict({"train": data})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    bench = load_benchmark("hf:org/wise_set@train", limit=1)
    assert (bench.name, bench.format, bench.source) == ("org/wise_set", "flat", "hf:org/wise_set@train")
    assert [r.id for r in bench.records] == ["wise_set-0"]
    assert len(load_benchmark("hf:org/wise_set").records) == 2
    assert calls == [("org/wise_set", "train"), ("org/wise_set", None)]


def test_split_benchmark(tmp_path):
    bench = load_benchmark(str(write(tmp_path, ZSRE)))
    test, validation = split_benchmark(bench, test=2, validation=1)
    assert test == (zsre_record(0), zsre_record(1))
    assert validation == (zsre_record(2),)
    assert split_benchmark(bench, 2, 1) == (test, validation)
    assert split_benchmark(bench, 1, 0) == ((zsre_record(0),), ())
    with pytest.raises(DataError, match="2 test \\+ 2 validation records asked for, but it has only 3"):
        split_benchmark(bench, 2, 2)
    with pytest.raises(DataError, match="test must be an integer >= 1"):
        split_benchmark(bench, 0, 1)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="shared benchmark data not present")
def test_real_benchmark_files():
    zsre = load_benchmark(f"zsre:{REAL_DATA / 'zsre_wise_edit_1037.json'}")
    assert (zsre.format, len(zsre.records)) == ("zsre", 1037)
    assert zsre.records[0] == EditRecord(
        "zsre-0", "When was the inception of IAAF Combined Events Challenge?", "2006",
        ("When was the IAAF Combined Events Challenge launched?",),
        (LocalityProbe("nq question: what is the name of the last episode of spongebob", "The String"),),
        "IAAF Combined Events Challenge",
    )

    rome = load_benchmark(str(REAL_DATA / "counterfact_rome_full_864.json"))
    assert (rome.format, len(rome.records)) == ("counterfact-rome", 864)
    first = rome.records[0]
    assert (first.id, first.prompt, first.target) == ("cf-0", "The mother tongue of Danielle Darrieux is", "English")
    assert len(first.rephrases) == 2 and len(first.locality) == 10
    assert first.locality[0] == LocalityProbe("The mother tongue of Léon Blum is", "French", "neighbour")

    mend = load_benchmark(f"counterfact:{REAL_DATA / 'counterfact_mend_edit_10000.json'}")
    assert (mend.format, len(mend.records)) == ("flat", 10000)
    assert mend.records[0] == EditRecord(
        "cf-0", "The mother tongue of Danielle Darrieux is", "English",
        ("Where Danielle Darrieux is from, people speak the language of",),
        (LocalityProbe("Michel Rocard is a native speaker of", "French", "neighbour"),),
        "Danielle Darrieux",
    )
