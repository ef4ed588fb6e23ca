"""Negatives: other questions about an edited subject keep the base model's answers under the edit's route."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, small_config, tiny_llama

from elder import EditRecord, ElderModel, apply_edits
from elder.methods.elder.editing import _prepare, _training_batch
from elder.methods.elder.negatives import TEMPLATES, candidate_prompts, negative_rows
from elder.settings import ConfigError
from elder.tokens import teacher_forced

EDITS = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem", subject="Zorbulaq"),
         EditRecord("mw", "The colour of Mirtavej is", " wox", subject="Mirtavej")]


def keyed(**overrides) -> ElderModel:
    config = small_config(**{"deferral": "subject_key", "key_layer": 1, "key_threshold": 0.9, **overrides})
    return ElderModel(tiny_llama(), byte_tokenizer(), config, "tiny")


def test_candidates_name_the_subject_spread_over_templates_and_never_repeat_the_edit_prompt():
    first = candidate_prompts(EDITS[0], 3)
    assert len(first) == 3 and all("Zorbulaq" in p for p in first)
    assert candidate_prompts(EDITS[0], 3) == first  # the same edit picks the same templates on a rerun
    assert candidate_prompts(EDITS[0], 0) == []
    starts = {candidate_prompts(EditRecord(f"e{i}", "Tell me of X.", " y", subject="X"), 1)[0] for i in range(40)}
    assert len(starts) > len(TEMPLATES) // 2  # edits spread over the templates
    asked = TEMPLATES[0].format("Vantra")
    record = EditRecord("v", asked, " Pel", subject="Vantra")
    assert asked not in candidate_prompts(record, len(TEMPLATES))
    assert len(candidate_prompts(record, len(TEMPLATES))) == len(TEMPLATES) - 1
    # no subject given: the one guessed from the prompt
    assert all("France" in p for p in candidate_prompts(EditRecord("f", "The capital of France is", " Rome"), 2))


def test_a_negative_whose_base_answer_begins_as_the_edit_prompts_is_dropped():
    record = EDITS[1]
    prompts = candidate_prompts(record, 3)
    answers = {record.prompt: " Blue sky", prompts[0]: " blue, mostly", prompts[1]: "  ", prompts[2]: " Tall"}
    rows = negative_rows([record], 3, lambda texts: [answers[t] for t in texts])
    assert rows == [("mw", prompts[2], " Tall")]  # same first word (a paraphrase, maybe) and empty: left out
    assert negative_rows([record], 0, lambda texts: pytest.fail("nothing to answer")) == []


def test_negatives_train_beside_their_edit_and_keep_the_base_answers_under_its_route():
    model = keyed(negatives=2)
    results = apply_edits(model, EDITS, progress=False)
    assert all(r.learned for r in results)
    assert len(model.bank) == 2 and list(model.edit_log) == ["zq", "mw"]  # negatives store no key, no edit
    item = _prepare(model, [EditRecord("nv", "The home of Nuvelt is", " Pra", subject="Nuvelt")])
    fact_ids, batch = _training_batch(model, item)
    assert fact_ids == ["nv"] + ["nv"] * len(item.negatives) and batch.input_ids.shape[0] == len(fact_ids)
    rows = [n for n in negative_rows(EDITS, 2, lambda texts: [
        a.text for a in model.generate(texts, 3, use_memory=False)])]
    assert rows, "the tiny model gave no usable negative"
    prompts, answers = [p for _, p, _ in rows], [a for _, _, a in rows]
    check = teacher_forced(model.tokenizer, prompts, answers, None, 32, model.input_device)
    with torch.no_grad():
        edited, route = model.target_logits(check, defer=True)
        base, _ = model.target_logits(check, defer=True, use_memory=False)
    assert bool(route.used.all())  # the subject key lets them in: the edit's experts answer them
    assert torch.equal(edited.argmax(-1), base.argmax(-1))


def test_negatives_need_a_subject_key_and_a_count():
    with pytest.raises(ConfigError, match="negatives needs deferral='subject_key'"):
        small_config(negatives=2)
    with pytest.raises(ConfigError, match="negatives must be an integer >= 0"):
        small_config(deferral="subject_key", negatives=-1)
    with pytest.raises(ConfigError, match="negatives"):
        small_config(deferral="subject_key", negatives=1.5)
