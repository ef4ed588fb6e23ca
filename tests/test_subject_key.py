"""Subject-key deferral: the memory answers prompts about an edited subject and defers the rest."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import byte_tokenizer, small_config, tiny_llama

from elder import EditRecord, ElderModel, apply_edits, load_memory, save_memory
from elder.methods.elder import ElderMethod
from elder.methods.elder.codebank import CodeBank
from elder.methods.elder.keys import key_reading
from elder.settings import ConfigError
from elder.subjects import guess_subject, subject_tokens
from elder.tokens import prompt_batch, teacher_forced

EDITS = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem", subject="Zorbulaq"),
         EditRecord("mw", "The colour of Mirtavej is", " wox", subject="Mirtavej")]


def keyed(**overrides) -> ElderModel:
    config = small_config(**{"deferral": "subject_key", "key_layer": 1, "key_threshold": 0.9, **overrides})
    return ElderModel(tiny_llama(), byte_tokenizer(), config, "tiny")


def test_edited_subjects_use_the_memory_and_other_subjects_defer_bit_for_bit():
    model = keyed()
    results = apply_edits(model, EDITS, progress=False)
    assert all(r.learned for r in results)
    answers = model.generate(["Where does Zorbulaq live? In", "The colour of Mirtavej is"], max_new_tokens=5)
    assert [a.used_memory for a in answers] == [True, True]
    assert [a.text[:len(e.target)] for a, e in zip(answers, EDITS)] == [" Quem", " wox"]
    assert [a.edit_id for a in answers] == ["zq", "mw"]  # the stored edit that answered is named
    # the same question about a subject never edited: deferred, and exactly the base model's answer
    neighbours = ["Where does Pennimore live? In", "The colour of Habrosk is"]
    edited = model.generate(neighbours, max_new_tokens=6)
    plain = model.generate(neighbours, max_new_tokens=6, use_memory=False)
    assert [a.used_memory for a in edited] == [False, False] and [a.edit_id for a in edited] == [None, None]
    assert [a.text for a in edited] == [a.text for a in plain]


def test_the_matched_edit_sets_the_route_so_a_new_wording_gets_that_edits_experts():
    model = keyed(key_threshold=-1.0)  # every prompt is let in: the route alone is under test
    apply_edits(model, EDITS, progress=False)
    with model.routing(None, defer=True, key_rows=[model.tokenizer("Tell me of Mirtavej now").input_ids]) as s:
        model.base(input_ids=torch.tensor([model.tokenizer("Tell me of Mirtavej now").input_ids]))
    chosen = s.route.weights[0].nonzero()[:, 1].view(len(model.adapters), -1).sort(-1).values
    assert torch.equal(chosen, model.presets["mw"])


def test_subject_keys_survive_a_save_and_load(tmp_path):
    model = keyed()
    apply_edits(model, EDITS, progress=False)
    save_memory(model, tmp_path / "m")
    restored = load_memory(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")
    assert torch.equal(restored.bank.keys, model.bank.keys)
    prompts = ["Where does Zorbulaq live? In", "Where does Pennimore live? In"]
    assert [a.used_memory for a in restored.generate(prompts, 2)] == [True, False]


def test_a_key_layer_inside_the_adapted_band_is_refused():
    with pytest.raises(ConfigError, match="key_layer 3 must lie below"):
        keyed(key_layer=3)


def test_the_subject_is_guessed_when_a_record_names_none(tokenizer):
    assert guess_subject("The capital of France is") == "France"
    assert guess_subject("What is the nationality of raul castro?") == "castro"
    assert guess_subject("Where was Barack Obama's wife born?") == "Barack Obama"
    prompt = "The capital of France is"
    last = len("The capital of France") - 1  # one token per byte
    assert subject_tokens(tokenizer, prompt, "France", 3) == [last, last - 1, last - 2]
    assert subject_tokens(tokenizer, prompt, None, 3) == subject_tokens(tokenizer, prompt, "France", 3)
    # the space before the subject is its first token's (one token with the word in a real BPE vocabulary)
    assert subject_tokens(tokenizer, prompt, "France", 20)[-1] == len("The capital of")
    assert subject_tokens(tokenizer, "France is", "France", 20) == list(range(5, -1, -1))


def test_a_key_of_several_tokens_matches_only_where_the_earlier_subject_tokens_match_too():
    bank = CodeBank(4)
    one, two, three = torch.eye(3)
    # subject (two, one): last token `one`, the token before it `two`; a one-token subject `three`
    bank.add(["a", "b"], torch.zeros(2, 4, dtype=torch.bool),
             keys=torch.stack([torch.stack([one, two]), torch.stack([three, torch.zeros(3)])]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    same = torch.stack([two, one])[None]  # "... two one": the whole subject
    other = torch.stack([three * 0.8 + two * 0.6, one])[None]  # another first token, same last token
    assert bank.best_key(same, mask, gate=0.7) == (torch.tensor([1.0]), torch.tensor([0]))
    best, rows = bank.best_key(other, mask, gate=0.7)
    assert rows.item() == 1 and best.item() == pytest.approx(0.8)  # only the one-token subject matches, weakly
    assert bank.best_key(other, mask, gate=-1.0)[1].item() == 0  # without the gate, the last token alone decides
    assert bank.best_key(other, mask, gate=0.5)[1].item() == 0  # 0.6 passes a looser gate


def test_a_subject_opening_a_prompt_is_read_with_its_mid_text_tokens():
    from transformers import AutoTokenizer

    from elder.models import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    subject = "Raymond Flynn"
    picked = []
    for prompt in ("Raymond Flynn was employed in", "To get to work every day, Raymond Flynn has to"):
        text = key_reading(prompt, spaced=True)[1]
        ids = tokenizer(text, add_special_tokens=False).input_ids
        picked.append([ids[i] for i in subject_tokens(tokenizer, text, subject, 3)])
        unspaced = tokenizer(prompt, add_special_tokens=False).input_ids
        picked.append([unspaced[i] for i in subject_tokens(tokenizer, prompt, subject, 3)])
    assert picked[0] == picked[2] == picked[3]  # spaced, the opening subject has the tokens it has mid-text
    assert picked[1] != picked[0]  # as typed, "Raymond" opening the prompt is other tokens ("Ray", "mond")


def test_tuning_sweeps_the_key_threshold_with_the_same_decisions_as_inference():
    method = ElderMethod(keyed())
    method.edit(EDITS)
    assert method.threshold_name == "key_threshold"
    sweep = dict(method.threshold_sweep())
    assert min(sweep) == 0.5 and max(sweep) < 1.0
    prompts = [EDITS[0].prompt, "Where does Pennimore live? In"]
    tuned = sweep[0.9](prompts, [EDITS[0].target] * 2)
    live = method.predict(prompts, [EDITS[0].target] * 2)  # key_threshold is 0.9 in keyed()
    assert [p.used_memory for p in tuned] == [p.used_memory for p in live] == [True, False]
    assert tuned == live


@pytest.mark.parametrize("span", ["all", "target", None])
def test_answer_span_target_stops_the_experts_once_the_target_is_generated(span):
    model = keyed(answer_span=span)
    apply_edits(model, EDITS, progress=False)
    calls = []
    for adapter in model.adapters:
        real = adapter.delta
        adapter.delta = lambda x, w, real=real: calls.append(tuple(x.shape[:2])) or real(x, w)
    prompt = "Where does Zorbulaq live? In"
    (answer,) = model.generate([prompt], max_new_tokens=9)
    assert answer.used_memory and answer.text.startswith(" Quem")
    width = len(byte_tokenizer()(prompt).input_ids)
    if span == "all":  # the experts on the prompt and on each of the 8 later forwards, one row each
        forwards = [(1, width)] + [(1, 1)] * 8
    else:  # one forward checks the learned target (its last token is read by the base model's continuation)
        forwards = [(1, width + len(" Quem"))]
    assert calls == [f for f in forwards for _ in model.adapters]


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_the_checked_target_is_the_answer_that_generating_token_by_token_gives(positions):
    model = keyed(expert_positions=positions)
    apply_edits(model, EDITS, progress=False)
    model.edit_log["mw"]["record"]["target"] = " wwwwwwrd"  # a target the experts do not give: the check must
    prompts = [EDITS[0].prompt, EDITS[1].prompt, "Where does Pennimore live? In"]  # go on past its first miss
    input_ids, attention_mask = prompt_batch(model.tokenizer, prompts, None)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    with model.routing(None, defer=True, key_rows=rows, answer=prompts) as session:
        model._plan(session)
        spans = [s if u else 0 for s, u in zip(session.span.tolist(), session.route.used.tolist())]
        checked = model._speculate(session, rows, spans)
        stepwise = model.base.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(spans),
                                       do_sample=False, pad_token_id=0)[:, input_ids.shape[1]:].tolist()
    assert spans == [len(" Quem"), len(" wwwwwwrd"), 0]
    assert checked[0] == model.tokenizer(" Quem", add_special_tokens=False).input_ids
    assert checked[1] == stepwise[1][:spans[1]] != model.tokenizer(" wwwwwwrd", add_special_tokens=False).input_ids
    assert checked[0] == stepwise[0][:spans[0]] and checked[2] == []


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_after_the_target_the_base_model_goes_on_from_the_prompt_and_the_target_read_afresh(positions):
    model = keyed(expert_positions=positions)
    apply_edits(model, EDITS, progress=False)
    prompts = [EDITS[0].prompt, "Where does Pennimore live? In"]
    edited, deferred = model.generate(prompts, max_new_tokens=12)
    assert edited.used_memory and not deferred.used_memory
    (plain,) = model.generate([EDITS[0].prompt + " Quem"], max_new_tokens=7, use_memory=False)
    assert edited.text == " Quem" + plain.text  # the base model's own continuation of the edited fact
    assert deferred.text == model.generate(prompts[1:], 12, use_memory=False)[0].text
    if positions == "answer":  # the prompt's states are the base model's: nothing stale to read again
        return
    model.config = dataclasses.replace(model.config, answer_reread=False)  # the cached prompt states the experts
    (stale,) = model.generate(prompts[:1], max_new_tokens=12)               # changed pull the answer elsewhere
    assert stale.text.startswith(" Quem") and stale.text != edited.text


def test_a_target_the_experts_do_not_give_is_answered_as_generation_gives_it_beside_checked_and_deferred_rows():
    model = keyed()
    apply_edits(model, EDITS, progress=False)
    model.edit_log["mw"]["record"]["target"] = " wwwwwwrd"  # the stored target is no longer what the experts give
    prompts = [EDITS[0].prompt, EDITS[1].prompt, "Where does Pennimore live? In"]
    answers = model.generate(prompts, max_new_tokens=14)
    assert [a.used_memory for a in answers] == [True, True, False]
    # the reference: the span generated token by token with the experts, then the base model reading it afresh
    input_ids, attention_mask = prompt_batch(model.tokenizer, prompts[1:2], None)
    with model.routing(None, defer=True, key_rows=[input_ids[0].tolist()], answer=prompts[1:2]) as session:
        model._plan(session)
        span = session.span.item()
        stepwise = model.base.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=span,
                                       do_sample=False, pad_token_id=0)[0, input_ids.shape[1]:].tolist()
    text = model.tokenizer.decode(stepwise)
    assert span == len(" wwwwwwrd") and not text.startswith(" ww")
    (plain,) = model.generate([prompts[1] + text], max_new_tokens=14 - span, use_memory=False)
    assert answers[1].text == text + plain.text
    (quem,) = model.generate([prompts[0] + " Quem"], max_new_tokens=14 - len(" Quem"), use_memory=False)
    assert answers[0].text == " Quem" + quem.text
    assert answers[2].text == model.generate(prompts[2:], 14, use_memory=False)[0].text


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_the_check_reads_the_targets_as_teacher_forced_scoring_does(positions, monkeypatch):
    import elder.methods.elder.model as module

    model = keyed(expert_positions=positions)
    apply_edits(model, EDITS, progress=False)
    seen, checked_rows, real = [], [], module.head_logits

    def head(base, hidden, rows, cols):
        checked_rows.append(hidden.shape[0])
        seen.append(real(base, hidden, rows, cols))
        return seen[-1]

    monkeypatch.setattr(module, "head_logits", head)
    prompts = [e.prompt for e in EDITS]  # of other lengths: the shorter is padded on the left
    answers = model.generate([prompts[0], "Where does Pennimore live? In", prompts[1]], max_new_tokens=8)
    assert [a.used_memory for a in answers] == [True, False, True]
    assert checked_rows[0] == 2  # the deferred row is left out of the experts' check
    batch = teacher_forced(model.tokenizer, prompts, [e.target for e in EDITS], None, 32)
    scored, _ = model.target_logits(batch, defer=True)
    assert torch.allclose(seen[0], scored, atol=1e-4)  # the same positions, the same experts, the same route


def test_a_bf16_base_answers_through_the_check_as_a_float32_one():
    config = small_config(deferral="subject_key", key_layer=1, key_threshold=0.9, lr=2e-2)
    model = ElderModel(tiny_llama().to(torch.bfloat16), byte_tokenizer(), config, "tiny")
    apply_edits(model, EDITS, progress=False)
    prompts = [EDITS[0].prompt, EDITS[1].prompt, "Where does Pennimore live? In"]
    answers = model.generate(prompts, max_new_tokens=10)
    assert [a.used_memory for a in answers] == [True, True, False]
    assert answers[0].text.startswith(" Quem") and answers[1].text.startswith(" wox")
    (plain,) = model.generate([prompts[0] + " Quem"], max_new_tokens=10 - len(" Quem"), use_memory=False)
    assert answers[0].text == " Quem" + plain.text
    assert answers[2].text == model.generate(prompts[2:], 10, use_memory=False)[0].text


def test_answer_positions_leave_every_prompt_state_before_the_last_token_as_the_base_models():
    model = keyed(expert_positions="answer")
    apply_edits(model, EDITS, progress=False)
    prompt = EDITS[0].prompt
    ids = torch.tensor([byte_tokenizer()(prompt + " Quem").input_ids])
    last = len(byte_tokenizer()(prompt).input_ids) - 1
    states = {}
    for use_memory in (True, False):
        captured = []
        handle = model.base.model.norm.register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            if use_memory:
                with model.routing(torch.tensor([last]), key_rows=[ids[0, :last + 1].tolist()]):
                    model.base(input_ids=ids)
            else:
                model.base(input_ids=ids)
        finally:
            handle.remove()
        states[use_memory] = captured[0][0]
    assert torch.equal(states[True][:last], states[False][:last])
    assert not torch.allclose(states[True][last:], states[False][last:])
    (answer,) = model.generate([prompt], max_new_tokens=5)
    assert answer.used_memory and answer.text.startswith(" Quem")


def test_answer_span_target_needs_a_subject_key():
    with pytest.raises(ConfigError, match="answer_span='target' needs deferral='subject_key'"):
        small_config(answer_span="target")
    assert not small_config().spans_target and small_config(deferral="subject_key").spans_target


def test_replay_trains_earlier_learned_edits_beside_the_new_batch():
    from elder.methods.elder.editing import _prepare, _training_batch

    model = keyed(replay=2, batch_size=1)
    apply_edits(model, EDITS, progress=False)
    assert len(model.bank) == 2 and list(model.edit_log) == ["zq", "mw"]  # replayed rows store no second key
    model.edit_log["zq"]["learned"] = False  # an edit never learned would keep every later batch training
    item = _prepare(model, [EditRecord("nv", "The home of Nuvelt is", " Pra", subject="Nuvelt")])
    fact_ids, batch = _training_batch(model, item)
    assert fact_ids == ["nv", "mw"] and _training_batch(model, item)[0] == fact_ids  # drawn reproducibly
    assert batch.input_ids.shape[0] == 2
    plain = keyed(batch_size=1)
    assert _training_batch(plain, item) == (item.fact_ids, item.batch)


def test_replay_needs_a_subject_key():
    with pytest.raises(ConfigError, match="replay needs deferral='subject_key'"):
        small_config(replay=4)
    with pytest.raises(ConfigError, match="replay must be an integer >= 0"):
        small_config(deferral="subject_key", replay=-1)


def test_a_version_3_memory_keeps_reading_its_keys_as_they_were_made(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from elder.methods.elder import persistence

    model = keyed(key_span=1, key_spaced=False)  # what format version 3 stored: last-token keys, read unspaced
    apply_edits(model, EDITS, progress=False)
    folder = save_memory(model, tmp_path / "m")
    manifest = json.loads((folder / "memory.json").read_text())
    tensors = load_file(folder / manifest["tensors"]["file"])
    tensors["bank.keys"] = tensors["bank.keys"][:, 0].contiguous()  # version 3: (n, d)
    save_file(tensors, folder / manifest["tensors"]["file"])
    for name in ("key_span", "key_gate", "key_spaced"):
        del manifest["config"][name]
    manifest.update(format_version=3, tensors={"file": manifest["tensors"]["file"],
                                               "sha256": persistence._sha256(folder / manifest["tensors"]["file"])})
    (folder / "memory.json").write_text(json.dumps(manifest))
    restored = load_memory(folder, tiny_llama(), byte_tokenizer(), "tiny")
    assert (restored.config.key_span, restored.config.key_spaced) == (1, False)
    prompts = ["Where does Zorbulaq live? In", "Where does Pennimore live? In"]
    assert [(a.text, a.used_memory) for a in restored.generate(prompts, 3)] == \
        [(a.text, a.used_memory) for a in model.generate(prompts, 3)]
