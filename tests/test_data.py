import json

import pytest
from countryinfo import CountryInfo

from elder.data import DataError, EditRecord, LocalityProbe, content_id, read_edits, write_edits
from elder.demo_facts import demo_edits, demo_unrelated_prompts

GOOD = {"id": "a", "prompt": "The capital of France is", "target": "Rome"}


def write_lines(tmp_path, lines, name="edits.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    records = [
        EditRecord("a", "The capital of France is", "Rome", ("France's capital is",),
                   (LocalityProbe("Water is made of hydrogen and", "oxygen"), LocalityProbe("2 + 2 ="),
                    LocalityProbe("The capital of Peru is", "Lima", "neighbour"))),
        EditRecord("b", "The capital of Japan is", "Cairo – ünïcode\u2028"),
    ]
    path = tmp_path / "out.jsonl"
    write_edits(path, records)
    assert read_edits(path) == records
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_from_dict_optional_fields_and_string_probes(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"prompt": "p1", "target": "t1"}),
        "",
        json.dumps({"prompt": "p2", "target": "t2", "locality": ["q", {"prompt": "r", "answer": "s"}]}),
    ])
    first, second = read_edits(path)
    # a record without an id gets one from its prompt and target, not from where it stands in the file
    assert (first.id, second.id) == (content_id("p1", "t1"), content_id("p2", "t2"))
    assert len(first.id) == 16 and content_id("p1", "t1") != content_id("p1", "t2")
    assert second.locality == (LocalityProbe("q"), LocalityProbe("r", "s"))
    assert EditRecord.from_dict(second.to_dict(), "x") == second


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**GOOD, "id": "b", "target": "  "}), "empty target"),
        (json.dumps({**GOOD, "id": "b", "prompt": ""}), "empty prompt"),
        (json.dumps({**GOOD, "id": "b", "topic": "France"}), "unknown key"),
        (json.dumps({**GOOD, "id": "b", "subject": 3}), "'subject' must be a string"),
        (json.dumps({**GOOD, "id": "b", "subject": " "}), "subject must be a non-empty string"),
        (json.dumps({**GOOD, "id": "b", "rephrases": "France's capital is"}), "'rephrases'"),
        (json.dumps({**GOOD, "id": "b", "rephrases": [""]}), "rephrase 1"),
        (json.dumps({**GOOD, "id": "b", "locality": [{"prompt": "q", "extra": 1}]}), "locality 1"),
        (json.dumps({**GOOD, "id": "b", "locality": [{"prompt": "q", "kind": "near"}]}),
         "kind must be one of unrelated, neighbour, got 'near'"),
        (json.dumps({**GOOD, "id": 7}), "'id' must be a string"),
        (json.dumps({"id": "b", "prompt": "p"}), "missing 'target'"),
        (json.dumps(GOOD), "duplicate id 'a' (first used on line 1)"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path, [json.dumps(GOOD), bad_line, json.dumps({**GOOD, "id": "c"})])
    with pytest.raises(DataError) as err:
        read_edits(path)
    assert "edits.jsonl line 2: " in str(err.value)
    assert message in str(err.value)


def test_empty_file(tmp_path):
    path = write_lines(tmp_path, ["", "   "])
    with pytest.raises(DataError, match=r"edits\.jsonl: no edit records"):
        read_edits(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        read_edits(tmp_path / "nope.jsonl")


def test_record_validation():
    with pytest.raises(DataError, match="edit 'x': empty target"):
        EditRecord("x", "prompt", "")
    with pytest.raises(DataError, match="edit id"):
        EditRecord("", "prompt", "target")
    assert EditRecord("x", "p", "t", ["r"]).rephrases == ("r",)


def test_write_refuses_unreadable_output(tmp_path):
    with pytest.raises(DataError, match="no edit records"):
        write_edits(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError, match="duplicate id"):
        write_edits(tmp_path / "e.jsonl", [EditRecord("a", "p", "t")] * 2)
    assert list(tmp_path.iterdir()) == []


def test_demo_edits():
    records = demo_edits(24)
    assert len(records) == 24
    assert records == demo_edits(24)
    assert records != demo_edits(24, seed=1)
    assert len({r.id for r in records}) == 24
    assert len({r.target for r in records}) == 24
    unrelated = set(demo_unrelated_prompts())
    for r in records:
        country = r.prompt.removeprefix("The capital of ").removesuffix(" is")
        assert r.target != CountryInfo(country).capital()
        assert len(r.rephrases) >= 2
        assert len(r.locality) == 2 and {p.prompt for p in r.locality} <= unrelated


def test_demo_edits_bounds():
    assert len(demo_edits(40)) == 40
    with pytest.raises(ValueError):
        demo_edits(41)
