"""The ELDER mechanism on tiny random models: targets, routing, deferral, generation, editing, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config, tiny_gpt2, tiny_llama

from elder import (
    ConfigError,
    EditRecord,
    ElderConfig,
    ElderModel,
    InputError,
    MethodError,
    NonFiniteLossError,
    apply_edits,
    forget,
)
from elder.methods.elder.targets import _band
from elder.tokens import prompt_batch, teacher_forced

EDITS = [EditRecord("a", "Q: color of sky?", "violet"), EditRecord("b", "Q: best pet?", "a red fox")]


def answers(model: ElderModel, prompts: list[str], tokens: int = 10, use_memory: bool = True) -> list[str]:
    return [a.text for a in model.generate(prompts, max_new_tokens=tokens, use_memory=use_memory)]


def test_default_band_sits_in_the_upper_middle_like_the_paper():
    assert _band(32, ElderConfig()) == (21, 6)  # LLaMA2-7B: layers 21-26, query at 20
    assert _band(30, ElderConfig()) == (20, 6)  # SmolLM2-135M
    assert _band(4, ElderConfig()) == (1, 3)


def test_targets_resolve_from_the_module_tree(tokenizer):
    model = ElderModel(tiny_llama(), tokenizer, small_config())
    assert model.targets.module_paths == ("model.layers.3.mlp.down_proj", "model.layers.4.mlp.down_proj")
    assert model.targets.query_path == "model.layers.2.mlp.down_proj"
    gpt2 = ElderModel(tiny_gpt2(), tokenizer, small_config(first_layer=2, num_layers=2))
    assert gpt2.targets.module_paths == ("transformer.h.2.mlp.c_fc", "transformer.h.3.mlp.c_fc")
    explicit = ElderModel(tiny_llama(), tokenizer, small_config(module_paths=("model.layers.5.mlp.up_proj",)))
    assert explicit.targets.query_path == "model.layers.4.mlp.up_proj"


@pytest.mark.parametrize("settings, message", [
    ({"module_paths": ("model.layers.3.mlp.nope",)}, "no module 'model.layers.3.mlp.nope'"),
    ({"first_layer": 5, "num_layers": 3}, "outside a model of 6 layers"),
    ({"target_module": "self_attn.rotary"}, "no module"),
    ({"query_module": "model.layers.4.mlp.down_proj"}, "must come before"),
])
def test_bad_targets_are_named(tokenizer, settings, message):
    with pytest.raises(ConfigError, match=message):
        ElderModel(tiny_llama(), tokenizer, small_config(**settings))


def test_config_rejects_fewer_experts_than_top_k():
    with pytest.raises(ConfigError, match="top_k"):
        ElderConfig(num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="unknown setting"):
        ElderConfig().replace(nonsense=1)
    with pytest.raises(ConfigError, match="stop_probability"):
        ElderConfig(stop_probability=1.0)


def _memory_on_one_prompt(tokenizer, edited: str) -> ElderModel:
    """A model whose bank holds exactly the live code of `edited`, with non-zero experts, epsilon 1 (exact match)."""
    model = ElderModel(tiny_llama(), tokenizer, small_config(epsilon=1.0))
    with torch.no_grad():
        for adapter in model.adapters:
            adapter.lora_B.normal_(0, 1.0)
            adapter.router.weight.normal_(0, 5.0)  # sharp routers: different prompts get different codes
        ids, mask = prompt_batch(tokenizer, [edited], None)
        with model.routing(None, defer=False) as session:
            model.base(input_ids=ids, attention_mask=mask)
    model.bank.add(["edited"], session.route.codes)
    return model


def test_deferred_rows_equal_the_base_model_bit_for_bit_in_a_mixed_batch(tokenizer):
    edited, unrelated = "The capital of Peru is", "zzzz 12345 qqqq"
    model = _memory_on_one_prompt(tokenizer, edited)
    ids, mask = prompt_batch(tokenizer, [edited, unrelated, edited], None)
    with torch.no_grad():
        base_logits = model.base(input_ids=ids, attention_mask=mask).logits
        with model.routing(None, defer=True) as session:
            edited_logits = model.base(input_ids=ids, attention_mask=mask).logits
    assert session.route.used.tolist() == [True, False, True]
    assert torch.equal(edited_logits[1], base_logits[1])
    assert not torch.allclose(edited_logits[0], base_logits[0])
    assert torch.equal(edited_logits[0], edited_logits[2])


def test_empty_bank_defers_everything(tokenizer):
    model = ElderModel(tiny_llama(), tokenizer, small_config())
    prompts = ["hello there", "another prompt"]
    assert [a.used_memory for a in model.generate(prompts)] == [False, False]
    assert answers(model, prompts) == answers(model, prompts, use_memory=False)


def test_router_runs_once_per_generation_and_the_route_is_kept(tokenizer, monkeypatch):
    model = _memory_on_one_prompt(tokenizer, "The capital of Peru is")
    calls = []
    real_route = model.route
    monkeypatch.setattr(model, "route", lambda q, defer, *rest: calls.append(len(q)) or real_route(q, defer, *rest))
    out = model.generate(["The capital of Peru is", "zzzz 12345 qqqq"], max_new_tokens=12)
    assert calls == [2]
    assert [a.used_memory for a in out] == [True, False]
    base = answers(model, ["The capital of Peru is", "zzzz 12345 qqqq"], tokens=12, use_memory=False)
    assert out[1].text == base[1]  # the deferred prompt's generation is the base model's, token for token
    assert out[0].text != base[0]


def test_edits_are_learned_and_long_answers_stay_edited(tokenizer):
    model = ElderModel(tiny_llama(), tokenizer, small_config())
    results = apply_edits(model, EDITS, progress=False)
    assert all(r.learned for r in results) and all(r.seconds > 0 for r in results)
    got = model.generate([e.prompt for e in EDITS], max_new_tokens=14)
    for edit, answer in zip(EDITS, got):
        assert answer.used_memory
        assert answer.text.strip().startswith(edit.target)  # every one of the target.s 7-10 tokens, through the KV cache


def target_probabilities(model: ElderModel, edits: list[EditRecord]) -> torch.Tensor:
    batch = teacher_forced(model.tokenizer, [e.prompt for e in edits], [e.target for e in edits], None, 32)
    with torch.no_grad():
        logits, _ = model.target_logits(batch, defer=False)
    return logits.softmax(-1).gather(-1, batch.target_ids[:, None])[:, 0]


def sharp_llama() -> torch.nn.Module:
    """The tiny LLaMA with a scaled output layer: its random logits are otherwise too flat for any sharp answer."""
    base = tiny_llama()
    with torch.no_grad():
        base.lm_head.weight.mul_(30)
    return base


def test_stop_probability_trains_past_the_argmax_to_the_margin(tokenizer):
    plain = ElderModel(sharp_llama(), tokenizer, small_config())
    plain_steps = apply_edits(plain, EDITS, progress=False)[0].iterations
    assert float(target_probabilities(plain, EDITS).min()) < 0.9  # argmax alone stops short of the margin
    margin = ElderModel(sharp_llama(), tokenizer, small_config(stop_probability=0.9))
    results = apply_edits(margin, EDITS, progress=False)
    assert all(r.learned for r in results) and plain_steps < results[0].iterations < 200
    assert float(target_probabilities(margin, EDITS).min()) >= 0.9


def test_routed_checks_the_top_k_and_the_logit_margin():
    from elder.methods.elder.editing import _routed
    scores = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])
    assert _routed(scores, torch.tensor([[[0, 1]]])) and not _routed(scores, torch.tensor([[[0, 2]]]))
    assert _routed(scores, torch.tensor([[[0, 1]]]), margin=0.5)  # log(0.3 / 0.15) = 0.69
    assert not _routed(scores, torch.tensor([[[0, 1]]]), margin=1.0)


def test_settle_routes_trains_only_the_routers_until_the_batch_routes_to_its_presets(tokenizer):
    from elder.methods.elder.editing import ROUTE_MARGIN, SETTLE_STEPS, _routed, _settle_routes
    model = ElderModel(tiny_llama(), tokenizer, small_config(settle_routes=True))
    batch = teacher_forced(tokenizer, [e.prompt for e in EDITS], [e.target for e in EDITS], None, 32)
    query = model.run_prefix(batch).query
    presets = torch.stack([model.preset_for(e.id) for e in EDITS])
    assert not _routed(model.router_scores(query), presets)  # the random routers pick other experts
    experts = [p.detach().clone() for a in model.adapters for p in (a.lora_A, a.lora_B)]
    routers = [p for a in model.adapters for p in a.router.parameters()]
    steps = _settle_routes(model, query, presets, None, routers)
    assert 0 < steps < SETTLE_STEPS and _routed(model.router_scores(query), presets, ROUTE_MARGIN)
    assert all(torch.equal(before, p) for before, p in zip(experts, (p for a in model.adapters
                                                                       for p in (a.lora_A, a.lora_B))))
    new = EditRecord("c", "Q: sky?", "teal")
    assert apply_edits(model, [new], progress=False)[0].learned
    new_query = model.run_prefix(teacher_forced(tokenizer, [new.prompt], [new.target], None, 32)).query
    assert _routed(model.router_scores(new_query), model.preset_for("c")[None])


def test_anchors_are_capped_at_a_reproducible_sample_of_earlier_edits(tokenizer, monkeypatch):
    import elder.methods.elder.editing as editing
    model = ElderModel(tiny_llama(), tokenizer, small_config(iterations=1))
    apply_edits(model, [EditRecord(f"e{i}", f"Q{i}: sky?", "violet") for i in range(5)], progress=False)
    queries, presets = editing._anchors(model)
    assert len(queries) == 5 and torch.equal(queries, model.bank.queries)
    monkeypatch.setattr(editing, "ANCHOR_LIMIT", 3)
    queries, presets = editing._anchors(model)
    assert len(queries) == 3 and torch.equal(queries, editing._anchors(model)[0])  # the same sample for this batch
    rows = [next(i for i, q in enumerate(model.bank.queries) if torch.equal(q, row)) for row in queries]
    assert len(set(rows)) == 3
    assert all(torch.equal(p, model.presets[model.bank.ids[i]]) for p, i in zip(presets, rows))


def test_forget_makes_an_edit_defer_again(tokenizer):
    model = ElderModel(tiny_llama(), tokenizer, small_config())
    apply_edits(model, EDITS, progress=False)
    forget(model, "a")
    assert "a" not in model.edit_log and "a" not in model.bank.ids
    assert model.generate([EDITS[0].prompt])[0].used_memory is False
    with pytest.raises(MethodError, match="'a'"):
        forget(model, "a")


def test_paraphrase_variant_trains_rephrases_with_the_edit_preset(tokenizer):
    record = EditRecord("p", "Q: sky?", "green", rephrases=("Q: the sky?", "Q: sky colour?"))
    model = ElderModel(tiny_llama(), tokenizer, small_config(paraphrase_split=0.5))
    apply_edits(model, [record], progress=False)
    assert model.bank.ids == ["p", "p"]  # the edit prompt and the first of its two rephrases
    assert list(model.presets) == ["p"]


def test_bad_input_changes_nothing(tokenizer):
    model = ElderModel(tiny_llama(), tokenizer, small_config())
    apply_edits(model, EDITS[:1], progress=False)
    state = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    too_long = EditRecord("long", "word " * 40, "x")
    with pytest.raises(InputError, match="does not fit the model's context of 128"):
        apply_edits(model, [EDITS[1], too_long], progress=False)
    with pytest.raises(ValueError, match="already in the memory"):
        apply_edits(model, [EDITS[0]], progress=False)
    with pytest.raises(InputError, match="empty prompt"):
        model.generate(["   "])
    assert model.bank.ids == ["a"] and list(model.edit_log) == ["a"]
    assert all(torch.equal(v, model.adapters.state_dict()[k]) for k, v in state.items())


def test_non_finite_loss_rolls_the_batch_back(tokenizer):
    model = ElderModel(tiny_llama(), tokenizer, small_config(guide_weight=float("inf")))
    state = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="rolled back"):
        apply_edits(model, EDITS, progress=False)
    assert all(torch.equal(v, model.adapters.state_dict()[k]) for k, v in state.items())
    assert len(model.bank) == 0 and not model.edit_log


def test_two_edited_models_live_in_one_process(tokenizer):
    first = ElderModel(tiny_llama(), tokenizer, small_config())
    second = ElderModel(tiny_llama(), tokenizer, small_config())
    apply_edits(first, EDITS[:1], progress=False)
    assert first.generate([EDITS[0].prompt])[0].used_memory
    assert not second.generate([EDITS[0].prompt])[0].used_memory
    with pytest.raises(ValueError, match="already carries"):
        ElderModel(first.base, tokenizer, small_config())
    base = first.detach()
    ElderModel(base, tokenizer, small_config())  # a detached base takes a new memory


def test_gpt2_conv1d_layers_edit(tokenizer):
    model = ElderModel(tiny_gpt2(), tokenizer, small_config(first_layer=2, num_layers=2))
    results = apply_edits(model, EDITS, progress=False)
    assert all(r.learned for r in results)
    assert model.generate([EDITS[1].prompt], max_new_tokens=12)[0].text.strip().startswith(EDITS[1].target)


def test_bf16_base_keeps_fp32_adapters(tokenizer):
    model = ElderModel(tiny_llama().to(torch.bfloat16), tokenizer, small_config(lr=2e-2))
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    apply_edits(model, EDITS[:1], progress=False)
    answer = model.generate([EDITS[0].prompt], max_new_tokens=12)[0]
    assert answer.used_memory and answer.text.strip().startswith(EDITS[0].target)


def test_device_map_loaded_base(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    tiny_llama().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"})
    model = ElderModel(base, tokenizer, small_config())
    apply_edits(model, EDITS[:1], progress=False)
    assert model.generate([EDITS[0].prompt], max_new_tokens=12)[0].text.strip().startswith(EDITS[0].target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_base(tokenizer):
    model = ElderModel(tiny_llama().to("cuda", torch.float16), tokenizer, small_config(lr=2e-2))
    apply_edits(model, EDITS[:1], progress=False)
    assert model.generate([EDITS[0].prompt], max_new_tokens=12)[0].text.strip().startswith(EDITS[0].target)


@pytest.mark.parametrize("make, settings", [
    (tiny_llama, {}),
    (tiny_gpt2, {"first_layer": 2, "num_layers": 2}),
    (tiny_llama, {"query_module": "model.layers.3.self_attn.o_proj"}),  # query read inside the band
])
def test_replayed_frozen_layers_give_the_full_forward_logits(tokenizer, make, settings):
    model = ElderModel(make(), tokenizer, small_config(**settings))
    with torch.no_grad():
        for adapter in model.adapters:
            adapter.lora_B.normal_(0, 1.0)
    batch = teacher_forced(tokenizer, ["Q: sky?", "Q: a much longer prompt?"], ["violet", "no"], 128, 32)
    full, full_route = model.target_logits(batch, defer=False)
    prefix = model.run_prefix(batch)
    assert prefix is not None and (prefix.query is None) == ("query_module" in settings)
    replayed, route = model.target_logits(batch, defer=False, prefix=prefix)
    torch.testing.assert_close(replayed, full)
    assert torch.equal(route.codes, full_route.codes)
    layers = model.base.get_submodule(model.targets.layers_path)
    assert not any(type(layer).__name__ == "_Replay" for layer in layers)  # the real layers are back
