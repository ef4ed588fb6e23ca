"""Issue 10: no edit is lost, silently changed or applied twice, whatever the user types."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, small_config, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from elder import ElderConfig, ElderModel
from elder.cli import _settings, app
from elder.data import DataError, EditRecord, content_id, read_edits, write_edits
from elder.methods.elder import ElderMethod
from elder.methods.elder.persistence import MemoryBusyError, _manifest_checksum, memory_lock
from elder.settings import ConfigError, field_kinds

SETTINGS = ["--set", "first_layer=3", "--set", "num_layers=2", "--set", "num_experts=8", "--set", "rank=4",
            "--set", "lr=0.03", "--set", "iterations=200", "--set", "batch_size=2", "--preset", "fast"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(result) -> bool:
    """Exactly one line of error (progress bars of model loading aside), and no traceback."""
    shown = [line for line in result.output.splitlines() if line.strip() and "it/s]" not in line]
    return [line.startswith("error: ") for line in shown] == [True] and "Traceback" not in result.output


def lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def memory(tiny_dir, tmp_path):
    edits = lines(tmp_path / "edits.jsonl", [{"id": "a", "prompt": "Q: sky?", "target": "violet"},
                                             {"id": "b", "prompt": "Q: pet?", "target": "fox"}])
    out = tmp_path / "memory"
    result = run("edit", edits, "--out", out, "--model", tiny_dir, *SETTINGS)
    assert result.exit_code == 0, result.output
    return out


def held(folder) -> dict:
    return json.loads((folder / "memory.json").read_text())["edits"]


def test_demo_refuses_a_folder_that_holds_a_memory(memory):
    before = (memory / "memory.json").read_bytes()
    result = run("demo", "--facts", "1", "--out", memory)
    assert result.exit_code == 2 and "already holds a memory" in result.output
    assert (memory / "memory.json").read_bytes() == before


def test_a_folder_with_tensors_but_no_manifest_is_left_alone(memory, tiny_dir, tmp_path):
    (memory / "memory.json").unlink()
    tensors = sorted(memory.glob("adapters-*.safetensors"))
    edits = lines(tmp_path / "new.jsonl", [{"id": "c", "prompt": "Q: sea?", "target": "dry"}])
    for extra in (["--resume"], []):
        result = run("edit", edits, "--out", memory, "--model", tiny_dir, *extra)
        assert result.exit_code == 2 and "no memory.json" in result.output, result.output
    assert sorted(memory.glob("adapters-*.safetensors")) == tensors and tensors


def test_records_without_ids_keep_their_ids_when_a_line_is_inserted(tiny_dir, tmp_path):
    first = [{"prompt": "Q: sky?", "target": "violet"}, {"prompt": "Q: pet?", "target": "fox"}]
    edits = lines(tmp_path / "edits.jsonl", first)
    out = tmp_path / "m"
    assert run("edit", edits, "--out", out, "--model", tiny_dir, *SETTINGS).exit_code == 0
    lines(edits, [{"prompt": "Q: sea?", "target": "dry"}, *first])  # a new fact on top
    result = run("edit", edits, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "2 of the file's already held (skipped), 0 replaced, 1 to apply" in result.output
    log = held(out)
    assert sorted(log) == sorted(content_id(r["prompt"], r["target"]) for r in [*first, {"prompt": "Q: sea?",
                                                                                         "target": "dry"}])
    assert [log[i]["record"]["target"] for i in log] == ["violet", "fox", "dry"]  # each applied once, in order


def test_the_same_edit_twice_in_one_file_is_named_with_both_lines(tmp_path):
    edits = lines(tmp_path / "e.jsonl", [{"prompt": "Q: a?", "target": "b"}, {"prompt": "Q: c?", "target": "d"},
                                         {"prompt": "Q: a?", "target": "b"}])
    with pytest.raises(DataError, match="line 3: the same edit .* as line 1"):
        read_edits(edits)


def test_a_second_writer_is_refused_while_the_first_holds_the_memory(memory, tmp_path):
    edits = lines(tmp_path / "new.jsonl", [{"id": "c", "prompt": "Q: sea?", "target": "dry"}])
    with memory_lock(memory):
        result = run("edit", edits, "--out", memory, "--resume")
        with pytest.raises(MemoryBusyError):
            with memory_lock(memory):
                pass
    assert result.exit_code == 2 and "being written by another elder process" in result.output
    assert sorted(held(memory)) == ["a", "b"]
    assert run("edit", edits, "--out", memory, "--resume").exit_code == 0  # released: the next writer goes on
    assert sorted(held(memory)) == ["a", "b", "c"]


def test_a_held_id_with_another_target_is_refused_unless_replaced(memory, tmp_path):
    edits = lines(tmp_path / "new.jsonl", [{"id": "a", "prompt": "Q: sky?", "target": "green"},
                                           {"id": "c", "prompt": "Q: sea?", "target": "dry"}])
    result = run("edit", edits, "--out", memory, "--resume")
    assert result.exit_code == 2 and "1 edits have an id the memory holds" in result.output and "'a'" in result.output
    assert sorted(held(memory)) == ["a", "b"] and held(memory)["a"]["record"]["target"] == "violet"
    result = run("edit", edits, "--out", memory, "--resume", "--replace")
    assert result.exit_code == 0, result.output
    assert "1 replaced, 2 to apply" in result.output
    log = held(memory)
    assert sorted(log) == ["a", "b", "c"] and log["a"]["record"]["target"] == "green"
    answer = json.loads(run("ask", "--memory", memory, "--json", "--max-new-tokens", "6", "Q: sky?").stdout
                        .strip().splitlines()[-1])
    assert answer["answer"].strip().startswith("green"), answer


@pytest.mark.parametrize("change", ["alpha", "epsilon", "drop an edit"])
def test_a_hand_edited_manifest_is_refused(memory, change, tmp_path):
    path = memory / "memory.json"
    manifest = json.loads(path.read_text())
    if change == "drop an edit":
        del manifest["edits"]["a"]
    else:
        manifest["config"][change] = 99.0
    path.write_text(json.dumps(manifest))
    result = run("ask", "--memory", memory, "Q: sky?")
    assert result.exit_code == 2 and "changed after it was saved" in result.output
    edits = lines(tmp_path / "e.jsonl", [{"id": "a", "prompt": "Q: sky?", "target": "violet"}])
    assert run("edit", edits, "--out", memory, "--resume").exit_code == 2  # nothing is applied twice


def test_a_manifest_setting_that_disagrees_with_the_tensors_is_named(memory):
    path = memory / "memory.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["num_experts"] = 16
    manifest["checksum"] = _manifest_checksum(manifest)  # as if written by a tool that knows the format
    path.write_text(json.dumps(manifest))
    result = run("ask", "--memory", memory, "Q: sky?")
    assert result.exit_code == 2, result.output
    assert "the manifest says num_experts=16, but its tensors hold 8 experts per layer" in result.output
    assert one_error(result)


def test_set_values_are_read_against_the_settings_types(tiny_dir, tmp_path):
    edits = lines(tmp_path / "e.jsonl", [{"id": "a", "prompt": "Q: sky?", "target": "violet"}])
    for bad, words in [("lr=abc", "lr takes a number"), ("epsilon=abc", "epsilon takes a number"),
                       ("seed=abc", "seed takes an integer"), ("early_stop=maybe", "early_stop takes true or false")]:
        result = run("edit", edits, "--out", tmp_path / "m", "--model", tiny_dir, "--set", bad)
        assert result.exit_code == 2 and words in result.output, result.output
        assert one_error(result)
    result = run("edit", edits, "--out", tmp_path / "m", "--model", tiny_dir, *SETTINGS, "--set", "early_stop=off",
                 "--set", "refresh_codes=no")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "memory.json").read_text())["config"]
    assert config["early_stop"] is False and config["refresh_codes"] is False
    assert _settings(ElderMethod, None, ["module_paths=a.b.c"]) == {"module_paths": ("a.b.c",)}
    assert _settings(ElderMethod, None, ["module_paths=a.b,c.d"]) == {"module_paths": ("a.b", "c.d")}
    result = run("edit", edits, "--out", tmp_path / "p", "--model", tiny_dir, "--set", "module_paths=a.b.c")
    assert result.exit_code == 2 and "a.b.c" in result.output and "'a'" not in result.output, result.output


def test_out_naming_a_file_is_refused_before_training(tiny_dir, tmp_path):
    edits = lines(tmp_path / "e.jsonl", [{"id": "a", "prompt": "Q: sky?", "target": "violet"}])
    target = tmp_path / "file.txt"
    target.write_text("mine")
    result = run("edit", edits, "--out", target, "--model", tiny_dir, *SETTINGS)
    assert result.exit_code == 2 and "is a file" in result.output and "applied" not in result.output
    assert target.read_text() == "mine"


def test_bad_devices_and_missing_models_are_one_line_errors(tiny_dir):
    for device, words in [("nonsense", "unknown device 'nonsense'")] + (
            [] if torch.cuda.is_available() else [("cuda", "no CUDA GPU")]):
        result = run("ask", "--model", tiny_dir, "--device", device, "hi")
        assert result.exit_code == 2 and words in result.output, result.output
        assert one_error(result)
    result = run("ask", "--model", "./no/such/folder", "hi")
    assert result.exit_code == 2 and "no such folder" in result.output
    result = run("ask", "--model", "someone/not-cached-here", "hi")
    assert result.exit_code == 2 and "offline" in result.output and one_error(result)


def test_ask_refuses_a_non_positive_token_count(tiny_dir):
    for count in ("0", "-3"):
        result = run("ask", "--model", tiny_dir, "--max-new-tokens", count, "hi")
        assert result.exit_code == 2 and "max-new-tokens" in result.output


def test_a_non_utf8_edits_file_is_reported_with_its_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "Q: x?", "target": "y"}\n'
                     b'{"id": "b", "prompt": "Q: \xff?", "target": "z"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        read_edits(path)


def test_temporary_files_of_a_killed_run_are_removed_on_the_next_open(memory, tmp_path):
    for name in (".adapters-dead.tmp", ".memory.json-dead.tmp"):
        (memory / name).write_bytes(b"half")
    edits = lines(tmp_path / "e.jsonl", [{"id": "a", "prompt": "Q: sky?", "target": "violet"}])
    assert run("edit", edits, "--out", memory, "--resume").exit_code == 0
    assert not list(memory.glob(".*.tmp"))


def test_routing_with_a_supplied_query_uses_it():
    model = ElderModel(tiny_llama(), byte_tokenizer(), small_config(), "tiny")
    ids = torch.tensor([model.tokenizer("Q: sky?").input_ids])
    with model.routing(torch.tensor([ids.shape[1] - 1])) as read:
        model.base(input_ids=ids)
    with model.routing(query=read.route.query) as supplied:
        model.base(input_ids=ids)
    assert torch.equal(supplied.route.codes, read.route.codes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode),
                          st.dictionaries(st.sampled_from(["id", "prompt", "target", "subject", "rephrases",
                                                           "locality", "x"]),
                                          st.one_of(st.none(), st.text(max_size=8), st.integers(),
                                                    st.lists(st.text(max_size=5), max_size=2)), max_size=5)
                          .map(lambda d: json.dumps(d).encode())), max_size=4))
def test_the_jsonl_reader_never_ends_in_a_traceback(tmp_path, chunks):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(chunks))
    try:
        records = read_edits(path)
    except DataError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error).strip()
    else:
        assert all(isinstance(r, EditRecord) and r.prompt.strip() and r.target.strip() for r in records)
        write_edits(tmp_path / "again.jsonl", records)
        assert read_edits(tmp_path / "again.jsonl") == records


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(field_kinds(ElderConfig)) + ["nope", ""]),
       st.one_of(st.text(max_size=12), st.sampled_from(["true", "off", "1e-3", "none", "[\"a\"]", "a,b", "nan",
                                                        "inf", "-0", "1_0", "\"x\""])))
def test_the_set_parser_never_ends_in_a_traceback(name, text):
    try:
        overrides = _settings(ElderMethod, None, [f"{name}={text}"])
    except ConfigError:
        return
    try:
        small_config(**overrides)
    except ConfigError:
        pass  # a value of the right type that is out of range: refused by the config, with its name
