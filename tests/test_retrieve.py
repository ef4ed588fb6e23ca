"""retrieve: the matched edit is put before the prompt; other prompts run unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from elder import EditRecord
from elder.methods import registered
from elder.methods.hooked import StateFormatError
from elder.settings import ConfigError

EDITS = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem"),
         EditRecord("mw", "The colour of Mirtavej is", " wox")]
UNRELATED = "A small boat drifted slowly"


def retrieve(**changes):
    return registered()["retrieve"].create(tiny_llama(), byte_tokenizer(), "tiny", {"threshold": 0.99, **changes})


def plain_answer(prompt: str, tokens: int) -> str:
    tokenizer, base = byte_tokenizer(), tiny_llama()
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                            pad_token_id=256)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_matched_prompt_is_answered_with_its_edit_before_it_and_others_run_unchanged():
    method = retrieve()
    method.edit(EDITS)
    answers = method.answer([EDITS[1].prompt, UNRELATED], 5)
    assert answers[0].used_memory and answers[0].edit_id == "mw" and answers[0].distance == pytest.approx(0, abs=1e-5)
    augmented = "New Fact: The colour of Mirtavej is wox.\nPrompt: The colour of Mirtavej is"  # IKE's layout
    assert answers[0].text == plain_answer(augmented, 5)
    assert not answers[1].used_memory and answers[1].text == plain_answer(UNRELATED, 5)
    (scored,) = method.predict([EDITS[1].prompt], [EDITS[1].target])
    assert scored.used_memory
    method.forget("mw")
    assert method.answer([EDITS[1].prompt], 5)[0].text == plain_answer(EDITS[1].prompt, 5)
    assert method.embedding_edits == ["zq"]


def test_a_prompt_whose_context_would_not_fit_the_model_runs_unchanged():
    method = retrieve(context="{prompt} {target}. " + "x" * 100 + "\n")
    method.edit(EDITS[:1])
    (answer,) = method.answer([EDITS[0].prompt], 3)
    assert not answer.used_memory and answer.text == plain_answer(EDITS[0].prompt, 3)


def test_the_sweep_scores_as_each_threshold_would():
    method = retrieve()
    method.edit(EDITS)
    prompts, targets = [EDITS[0].prompt, "Where does Pennimore live? In", UNRELATED], [" Quem", " x", " y"]
    for threshold, predict in method.threshold_sweep():
        method.cfg.threshold = threshold
        assert predict(prompts, targets) == method.predict(prompts, targets), threshold


def test_the_context_must_name_the_target_and_nothing_unknown():
    config = registered()["retrieve"].config
    with pytest.raises(ConfigError, match="target"):
        config({"context": "{prompt}\n"})
    with pytest.raises(ConfigError, match="only {prompt} and {target}"):
        config({"context": "{prompt} {target} {subject}\n"})


def test_a_state_whose_embeddings_name_other_edits_is_refused(tmp_path):
    method = retrieve()
    method.edit(EDITS[:1])
    method.save(tmp_path / "m")
    state = json.loads((tmp_path / "m" / "state.json").read_text())
    state["extra"]["embedding_edits"] = ["other"]
    (tmp_path / "m" / "state.json").write_text(json.dumps(state))
    with pytest.raises(StateFormatError, match="name different edits"):
        registered()["retrieve"].load(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")
