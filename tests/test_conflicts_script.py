"""benchmarks/conflicts.py: neighbour probes that ask a fact edited in the same stream, on hand-made files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "conflicts.py"


def mend_record(i: int, subject: str, prompt: str, old: str, probe: str, probe_answer: str) -> dict:
    return {"case_id": i, "prompt": prompt, "target_new": "X", "subject": subject, "ground_truth": old,
            "rephrase_prompt": prompt, "locality_prompt": probe, "locality_ground_truth": probe_answer}


def rome_record(i: int, subject: str, relation: str, old: str, probes: list[str]) -> dict:
    return {"case_id": i, "requested_rewrite": {"prompt": "{} is made by", "relation_id": relation, "subject": subject,
                                                "target_new": {"str": "X"}, "target_true": {"str": old}},
            "paraphrase_prompts": [], "neighborhood_prompts": probes}


def run(path: Path, *edits: int) -> list[list[str]]:
    args = [sys.executable, str(SCRIPT), "--data", f"counterfact:{path}"]
    for t in edits:
        args += ["--edits", str(t)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines()[2:]]


def test_mend_split_conflicts_are_probes_naming_an_edited_subject_with_its_old_answer(tmp_path):
    records = [
        mend_record(0, "Zeta", "Zeta is made by", "Acme", "Dodge Charger is made by", "Dodge"),  # asks record 1's fact
        mend_record(1, "Dodge Charger", "Dodge Charger, made by", "Dodge", "Omega is a", "pope"),  # Omega: record 4
        mend_record(2, "Kevin", "Kevin speaks", "French", "Zeta is located in", "Asia"),  # Zeta: another fact
        mend_record(3, "Ur", "Ur is in", "Asia", "Kevin Durant plays", "basketball"),  # "Kevin" is named, other fact
        mend_record(4, "Omega", "Omega is a", "pope", "Zetaland is in", "Europe"),  # not a whole-word run of Zeta
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    rows = run(path, 2, 5)
    # T = 2: record 0's probe names Dodge Charger (edited by record 1) with its old answer: a conflict
    assert rows[0][:4] == ["2", "2", "1", "1"]
    assert rows[0][4] == "50.0"
    # T = 5: + record 1's probe asks Omega's edited fact, records 2 and 3 name edited subjects but ask other facts,
    # record 4's "Zetaland" names no edited subject
    assert rows[1][:4] == ["5", "5", "4", "2"]


def test_rome_records_compare_relations(tmp_path):
    records = [rome_record(0, "Zeta", "P1", "Acme", ["Kodak is made by", "Nokia is made by"]),
               rome_record(1, "Kodak", "P1", "Eastman", ["Ur is made by"]),  # record 0 asks Kodak's relation P1
               rome_record(2, "Nokia", "P2", "Acme", [])]  # same old answer as record 0's probe, another relation
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    assert run(path, 3)[0][:4] == ["3", "3", "2", "1"]


def test_rome_records_report_how_the_old_answer_proxy_agrees_with_relations(tmp_path):
    records = [rome_record(0, "Zeta", "P1", "Acme", ["Kodak is made by", "Nokia is made by"]),
               rome_record(1, "Kodak", "P1", "Acme", []),  # same relation and old answer: found by both
               rome_record(2, "Nokia", "P2", "Acme", [])]  # same old answer, another relation: a false proxy hit
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    out = subprocess.run([sys.executable, str(SCRIPT), "--data", f"counterfact:{path}", "--edits", "3"],
                         capture_output=True, text=True, check=True).stdout
    assert "T = 3: the old-answer proxy finds 2 conflicts, 1 of them with the same relation" in out
    records[1]["requested_rewrite"]["relation_id"] = "P3"  # now neither proxy hit shares its relation
    path.write_text(json.dumps(records))
    out = subprocess.run([sys.executable, str(SCRIPT), "--data", f"counterfact:{path}", "--edits", "3"],
                         capture_output=True, text=True, check=True).stdout
    assert "T = 3: the old-answer proxy finds 2 conflicts, 0 of them with the same relation" in out


def test_a_malformed_record_is_one_line_naming_it(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([mend_record(0, "Zeta", "Zeta is made by", "Acme", "Ur is in", "Asia"),
                                {"case_id": 1, "prompt": "Ur is in"}]))
    result = subprocess.run([sys.executable, str(SCRIPT), "--data", f"counterfact:{path}", "--edits", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "record 1 is not a CounterFact record" in result.stderr
    assert "Traceback" not in result.stderr


def test_other_data_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--data", "zsre:x.json", "--edits", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "counterfact:PATH" in result.stderr
