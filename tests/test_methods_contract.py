"""The contract every registered editing method keeps, on tiny random models: one suite, parametrised over the
registry, so a new method is held to the same behaviour as ELDER the moment it is registered."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, tiny_gpt2, tiny_llama

from elder import EditRecord, ElderError, InputError, forward
from elder.methods import (
    EditingMethod,
    EditsInContext,
    Forgets,
    MethodError,
    TunesThreshold,
    method_of_folder,
    registered,
)
from elder.settings import ConfigError

# Settings with which each method learns a tiny model's edits quickly. Every registered method needs an entry:
# a method without one fails `test_every_method_has_tiny_settings` rather than escaping the suite.
TINY = {
    "elder": {"preset": "fast", "first_layer": 3, "num_layers": 2, "num_experts": 8, "rank": 4, "lr": 3e-2,
              "router_lr": 5e-2, "iterations": 200, "batch_size": 2, "key_layer": 1, "key_threshold": 0.9},
    "ft": {"lr": 1e-2, "steps": 200, "stop_loss": 1e-3, "batch_size": 2},
    "lora": {"lr": 2e-2, "steps": 200, "stop_loss": 1e-3, "batch_size": 2},
    "grace": {"layer": 2, "radius": 1e-4, "lr": 0.5, "steps": 200, "stop_loss": 1e-3},
    "memoir": {"layer": 5, "active": 6, "lr": 5e-2, "steps": 200, "stop_loss": 1e-3, "threshold": 0.9},
    "retrieve": {"threshold": 0.99},
    "melo": {"radius": 1e-3, "rank": 4, "alpha": 4.0, "lr": 5e-2, "steps": 200, "stop_loss": 1e-3, "batch_size": 2},
    "alphaedit": {"first_layer": 1, "num_layers": 3, "stats_tokens": 400, "v_steps": 100, "v_lr": 0.5, "fact_token": "last",
                  "clamp_norm_factor": 4.0, "v_weight_decay": 1e-3, "l2": 1e-6, "nullspace_threshold": 1e-3},
    "wise": {"layer": 3, "lr": 20.0, "steps": 200, "context_templates": 2, "shard_edits": 1, "alpha": 0.05, "beta": 1.0,
             "gamma": 0.5, "norm_constraint": 50.0, "act_ratio": 0.95},
}
# The same, for GPT-2-shaped blocks (4 layers).
TINY_GPT2 = {
    "elder": {**TINY["elder"], "first_layer": 2, "num_layers": 2},
    "ft": TINY["ft"],
    "lora": {**TINY["lora"], "modules": ("mlp.c_fc",)},  # the tiny GPT-2's c_attn alone learns too slowly
    "grace": {**TINY["grace"], "layer": 1},
    "memoir": {**TINY["memoir"], "layer": 2, "active": 6},
    "retrieve": TINY["retrieve"],
    "melo": {**TINY["melo"], "first_layer": 2},
    "alphaedit": {**TINY["alphaedit"], "first_layer": 0},
    "wise": {**TINY["wise"], "layer": 2},
}

EDITS = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem", subject="Zorbulaq"),
         EditRecord("mw", "The colour of Mirtavej is", " wox", subject="Mirtavej")]
UNRELATED = ["Where does Pennimore live? In", "The colour of Habrosk is"]
# GRACE's value replaces the layer's output at one position: on a random 6-layer model the later tokens of a target
# barely depend on it (measured: no target of several tokens learned in 400 steps at any layer, lr 0.2 to 1.0; on
# SmolLM2 such targets are learned in about 5 steps), so its suite edits one-token targets.
ONE_TOKEN = [EditRecord("zq", "Where does Zorbulaq live? In ", "Q", subject="Zorbulaq"),
             EditRecord("mw", "The colour of Mirtavej is ", "w", subject="Mirtavej")]
ONE_TOKEN_UNRELATED = ["Where does Pennimore live? In ", "The colour of Habrosk is "]


# MEMOIR on the tiny GPT-2: the two edit prompts' masks share 33-100% of their features at every layer and k tried
# (1 to 32 of 128), and the second edit's training overwrote the first's later target tokens (measured); one-token
# targets survive it.
ONE_TOKEN_GPT2 = ("grace", "memoir")


# AlphaEdit adds its vector at one position too (the prompt's last token in this suite, fact_token='last').
ONE_TOKEN_ALWAYS = ("grace", "alphaedit")


# WISE's activation score is a mean over the prompt's tokens: on the random model a prompt of an edit's template
# scores as the edit does (measured: "The colour of Habrosk is" at 0.996 of the "Mirtavej" edit's floor), so its
# unrelated prompts are of other shapes.
OTHER_SHAPES = ["Seven plus five equals", "My favourite fruit is the"]


def edits_for(name: str, gpt2: bool = False) -> tuple[list[EditRecord], list[str]]:
    one_token = name in ONE_TOKEN_ALWAYS or (gpt2 and name in ONE_TOKEN_GPT2)
    if name == "wise":
        return EDITS, OTHER_SHAPES
    return (ONE_TOKEN, ONE_TOKEN_UNRELATED) if one_token else (EDITS, UNRELATED)
METHODS = sorted(registered())


def create(name: str, base=None, **changes) -> EditingMethod:
    return registered()[name].create(base if base is not None else tiny_llama(), byte_tokenizer(), "tiny",
                                     {**TINY[name], **changes})


def base_argmax(base, prompt: str, target: str) -> tuple[int, ...]:
    tokenizer = byte_tokenizer()
    ids = tokenizer(prompt + target).input_ids
    cut = len(tokenizer(prompt).input_ids)
    with torch.no_grad():
        return tuple(base(torch.tensor([ids])).logits[0, cut - 1:-1].argmax(-1).tolist())


def base_answer(base, prompt: str, tokens: int) -> str:
    tokenizer = byte_tokenizer()
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                            pad_token_id=256)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Caches a method writes (AlphaEdit's key statistics) go to a folder of this test session, not the user's."""
    monkeypatch.setenv("ELDER_CACHE", str(tmp_path_factory.getbasetemp() / "elder-cache"))


def skip_in_context(method: EditingMethod) -> None:
    """A method that puts edits in the prompt cannot make a random model answer them (tests/test_retrieve.py
    checks it on what it does instead: the base model's answer to the prompt with the edit before it)."""
    if isinstance(method, EditsInContext):
        pytest.skip(f"{method.name} edits in context: a random model does not read its context")


def test_every_method_has_tiny_settings():
    assert set(TINY) == set(registered()) == set(TINY_GPT2)


@pytest.mark.parametrize("name", METHODS)
def test_edits_are_learned_and_answered(name):
    EDITS, UNRELATED = edits_for(name)  # noqa: N806
    method = create(name)
    skip_in_context(method)
    results = method.edit(EDITS)
    assert [r.id for r in results] == [e.id for e in EDITS] and all(r.learned for r in results)
    assert method.edited_ids == [e.id for e in EDITS]
    assert [p.accuracy for p in method.predict([e.prompt for e in EDITS], [e.target for e in EDITS])] == [1.0, 1.0]
    answers = method.answer([e.prompt for e in EDITS], max_new_tokens=6)
    assert [a.text[:len(e.target)] for a, e in zip(answers, EDITS)] == [e.target for e in EDITS]
    assert all(a.used_memory for a in answers)


@pytest.mark.parametrize("name", METHODS)
def test_an_unedited_call_is_the_base_model(name):
    EDITS, UNRELATED = edits_for(name)  # noqa: N806
    base = tiny_llama()
    method = create(name, base)
    method.edit(EDITS)
    prompt, target = EDITS[0].prompt, EDITS[0].target
    (prediction,) = method.predict([prompt], [target], use_edits=False)
    assert prediction.predicted == base_argmax(tiny_llama(), prompt, target)
    (answer,) = method.answer([prompt], max_new_tokens=6, use_edits=False)
    assert answer.text == base_answer(tiny_llama(), prompt, 6) and answer.used_memory is False


@pytest.mark.parametrize("name", METHODS)
def test_a_mixed_batch_is_routed_row_by_row(name):
    EDITS, UNRELATED = edits_for(name)  # noqa: N806
    method = create(name)
    if not isinstance(method, TunesThreshold):
        pytest.skip(f"{name} does not defer: every input goes through its edits")
    method.edit(EDITS)
    prompts = [EDITS[0].prompt, UNRELATED[0], EDITS[1].prompt, UNRELATED[1]]
    answers = method.answer(prompts, max_new_tokens=6)
    assert [a.used_memory for a in answers] == [True, False, True, False]
    plain = [base_answer(tiny_llama(), p, 6) for p in UNRELATED]
    assert [answers[1].text, answers[3].text] == plain
    predictions = method.predict(prompts, [" x"] * 4)
    assert [p.used_memory for p in predictions] == [True, False, True, False]
    assert predictions[1].predicted == base_argmax(tiny_llama(), UNRELATED[0], " x")


@pytest.mark.parametrize("name", METHODS)
def test_a_saved_state_loads_back_to_the_same_answers(name, tmp_path):
    EDITS, UNRELATED = edits_for(name)  # noqa: N806
    method = create(name)
    method.edit(EDITS)
    method.save(tmp_path / "m")
    cls = registered()[name]
    assert cls.recognises(tmp_path / "m") and method_of_folder(tmp_path / "m") is cls
    restored = cls.load(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")
    assert restored.held_edits == method.held_edits and restored.settings == method.settings
    prompts = [e.prompt for e in EDITS] + UNRELATED
    assert [a.text for a in restored.answer(prompts, 5)] == [a.text for a in method.answer(prompts, 5)]
    targets = [e.target for e in EDITS] + [" x", " x"]
    assert restored.predict(prompts, targets) == method.predict(prompts, targets)
    # saving again over the folder keeps it loadable (the new state replaces the old in one step)
    restored.edit([EditRecord("nw", "The sound of Quillaby is", " brum", subject="Quillaby")])
    restored.save(tmp_path / "m")
    assert cls.load(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny").edited_ids == ["zq", "mw", "nw"]


@pytest.mark.parametrize("name", METHODS)
def test_a_damaged_or_foreign_state_is_a_one_line_error(name, tmp_path):
    EDITS, UNRELATED = edits_for(name)  # noqa: N806
    cls = registered()[name]
    method = create(name)
    method.edit(EDITS[:1])
    method.save(tmp_path / "m")
    state = tmp_path / "m" / cls.state_file
    state.write_text(state.read_text()[: len(state.read_text()) // 2])
    with pytest.raises(ElderError) as error:
        cls.load(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")
    assert "\n" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ElderError):
        cls.load(tmp_path / "empty", tiny_llama(), byte_tokenizer(), "tiny")
    with pytest.raises(MethodError):
        method_of_folder(tmp_path / "empty")


@pytest.mark.parametrize("name", METHODS)
def test_bad_input_is_refused_with_its_reason(name):
    EDITS, UNRELATED = edits_for(name)  # noqa: N806
    method = create(name)
    with pytest.raises(InputError, match="empty prompt"):
        method.predict([" "], ["x"])
    with pytest.raises(InputError, match="empty target"):
        method.predict(["Q: sky?"], [" "])
    with pytest.raises(InputError, match="context"):
        method.answer(["word " * 200], max_new_tokens=2)
    with pytest.raises(ElderError):
        method.predict(["a", "b"], ["x"])
    method.edit(EDITS[:1])
    with pytest.raises(MethodError, match="zq"):
        method.edit(EDITS[:1])
    assert method.edited_ids == ["zq"]


@pytest.mark.parametrize("name", METHODS)
def test_bad_settings_are_refused_before_a_model_is_touched(name):
    cls = registered()[name]
    with pytest.raises(ConfigError, match="nope"):
        cls.config({"nope": 1})
    some_field = next(iter(cls.config_class.help()))
    with pytest.raises(ConfigError, match=some_field):
        cls.config({some_field: object()})


@pytest.mark.parametrize("name", METHODS)
def test_close_gives_back_the_base_model_untouched(name):
    EDITS, UNRELATED = edits_for(name)  # noqa: N806
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    method = create(name, base)
    method.edit(EDITS)
    assert method.close() is base
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    # the base model can carry a new editor at once
    again = create(name, base)
    assert again.answer([EDITS[0].prompt], 4, use_edits=True)[0].text == base_answer(tiny_llama(), EDITS[0].prompt, 4)


@pytest.mark.parametrize("name", METHODS)
def test_a_forgotten_edit_answers_as_the_base_model(name):
    EDITS, UNRELATED = edits_for(name)  # noqa: N806
    method = create(name)
    if not isinstance(method, Forgets):
        pytest.skip(f"{name} cannot forget an edit")
    skip_in_context(method)
    method.edit(EDITS)
    method.forget("zq")
    assert method.edited_ids == ["mw"]
    (answer,) = method.answer([EDITS[0].prompt], 6)
    assert answer.text == base_answer(tiny_llama(), EDITS[0].prompt, 6)
    assert method.answer([EDITS[1].prompt], 6)[0].text.startswith(EDITS[1].target)
    with pytest.raises(MethodError, match="zq"):
        method.forget("zq")


@pytest.mark.parametrize("name", METHODS)
def test_gpt2_blocks_are_edited_too(name):
    EDITS, UNRELATED = edits_for(name, gpt2=True)  # noqa: N806
    method = registered()[name].create(tiny_gpt2(), byte_tokenizer(), "tiny-gpt2", TINY_GPT2[name])
    skip_in_context(method)
    assert all(r.learned for r in method.edit(EDITS))
    answers = method.answer([e.prompt for e in EDITS], max_new_tokens=6)
    assert [a.text[:len(e.target)] for a, e in zip(answers, EDITS)] == [e.target for e in EDITS]


def test_baselines_find_their_default_modules_in_both_block_shapes():
    assert registered()["ft"].create(tiny_llama(), byte_tokenizer(), "t", {}).path == "model.layers.4.mlp.down_proj"
    assert registered()["ft"].create(tiny_gpt2(), byte_tokenizer(), "t", {}).path == "transformer.h.3.mlp.c_proj"
    lora = registered()["lora"]
    assert lora.create(tiny_llama(), byte_tokenizer(), "t", {}).paths[:2] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert lora.create(tiny_gpt2(), byte_tokenizer(), "t", {}).paths[0] == "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize("name", ["ft", "grace", "melo", "memoir"])
@pytest.mark.parametrize("gpt2", [False, True])
def test_training_above_replayed_layers_ends_where_running_every_layer_does(name, gpt2, monkeypatch):
    # these methods train nothing below their first layer, so train_targets runs those layers once and replays them;
    # the trained state must be the one a run of every layer at every step reaches (MELO's keys, read in a layer
    # below its blocks, included)
    settings = TINY_GPT2[name] if gpt2 else TINY[name]
    model = tiny_gpt2 if gpt2 else tiny_llama
    edits, _ = edits_for(name, gpt2)
    replayed = registered()[name].create(model(), byte_tokenizer(), "tiny", settings)
    replayed_results = replayed.edit(edits)
    every_layer = forward._replayed_logits
    monkeypatch.setattr(forward, "_replayed_logits", lambda m, batch, first: every_layer(m, batch, 0))
    full = registered()[name].create(model(), byte_tokenizer(), "tiny", settings)
    full_results = full.edit(edits)
    assert [(r.iterations, r.learned) for r in replayed_results] == [(r.iterations, r.learned) for r in full_results]
    for key, tensor in full._tensors().items():
        assert torch.allclose(replayed._tensors()[key], tensor, atol=1e-5), key
