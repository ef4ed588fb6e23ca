"""AlphaEdit: null-space projected closed-form updates, key statistics cached once per model."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from elder import EditRecord
from elder.forward import target_logits
from elder.methods import registered
from elder.methods.alphaedit import method as alphaedit_method
from elder.modules import get_module, layers_below
from elder.settings import ConfigError
from elder.tokens import teacher_forced

SETTINGS = {"first_layer": 1, "num_layers": 3, "stats_tokens": 400, "v_steps": 100, "v_lr": 0.5, "fact_token": "last",
            "clamp_norm_factor": 4.0, "v_weight_decay": 1e-3, "l2": 1e-6, "nullspace_threshold": 1e-3}
EDIT = EditRecord("zq", "Where does Zorbulaq live? In ", "Q", subject="Zorbulaq")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ELDER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def alphaedit(**changes):
    return registered()["alphaedit"].create(tiny_llama(), byte_tokenizer(), "tiny", {**SETTINGS, **changes})


def test_the_key_statistics_are_computed_once_and_cached(private_cache):
    first = alphaedit()
    files = list((private_cache / "stats").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    stamp = files[0].stat().st_mtime_ns
    second = alphaedit()
    assert files[0].stat().st_mtime_ns == stamp  # read, not recomputed
    assert all(torch.equal(a, b) for a, b in zip(first.projections, second.projections))
    alphaedit(stats_tokens=500)  # other statistics: another file
    assert len(list((private_cache / "stats").iterdir())) == 2


def test_an_update_leaves_the_preserved_keys_outputs_alone():
    # a null space of 8 of the 64 directions: the update must map every preserved key (its complement) to ~0
    method = alphaedit()
    moments = method._preserved_moments()
    values, vectors = torch.linalg.eigh(moments[0].double())
    method.projections[0] = (vectors[:, :8] @ vectors[:, :8].T).float()
    method.edit([EDIT])
    preserved = vectors[:, 8:].float()  # directions with the largest second moment
    change = preserved.T @ method.deltas.deltas[0].weight.detach().T  # (56, d_out): outputs the update adds
    assert change.abs().max() < 1e-4 * max(1.0, method.deltas.deltas[0].weight.abs().max().item())
    assert method.deltas.deltas[0].weight.abs().max() > 0  # it did change the layer


def test_bad_settings_are_refused():
    config = registered()["alphaedit"].config
    with pytest.raises(ConfigError, match="fact_token"):
        config({"fact_token": "first"})
    with pytest.raises(ConfigError, match="stats_tokens"):
        config({"stats_tokens": 10})
    with pytest.raises(ConfigError, match="outside a model of 6 layers"):
        alphaedit(first_layer=4)


def test_the_replayed_forward_equals_the_model_with_the_vector_added_at_the_layer():
    # the target vector's steps replay the layers below the edited one; the logits must be the full model's
    method = alphaedit()
    rows = ["Where does Zorbulaq live? In ", "Zorbulaq is a"]
    batch = teacher_forced(method.tokenizer, rows, ["Q", " ."], None, 8, "cpu")
    positions = torch.tensor([len(method.tokenizer(r).input_ids) - 1 for r in rows])
    delta = torch.randn(method.base.config.hidden_size)
    below = layers_below(method.base, method.layers_path, method.z_layer + 1, lambda: target_logits(method.base, batch))

    def add(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[torch.arange(len(rows)), positions] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = get_module(method.base, f"{method.layers_path}.{method.z_layer}").register_forward_hook(add)
    try:
        with torch.no_grad():
            expected = target_logits(method.base, batch)
    finally:
        handle.remove()
    with torch.no_grad():
        replayed = method._logits_moved(batch, below, positions, delta)
    assert torch.allclose(replayed, expected, atol=1e-5)
    assert not torch.allclose(replayed, target_logits(method.base, batch), atol=1e-3)  # the vector moved them


def test_the_target_vector_stops_once_the_loss_is_below_the_stop_and_its_last_step_is_not_taken(monkeypatch):
    prompt_end = len(byte_tokenizer()(EDIT.prompt).input_ids) - 1
    method = alphaedit(v_steps=3)
    current = method._layer_output(EDIT.prompt, prompt_end)
    vector, steps = method._target_vector(EDIT, "Zorbulaq")
    assert steps == 3 and not torch.equal(vector, current)  # two steps taken, the third only scored
    assert torch.equal(alphaedit(v_steps=1)._target_vector(EDIT, "Zorbulaq")[0], current)  # one scored, none taken
    monkeypatch.setattr(alphaedit_method, "STOP_LOSS", float("inf"))  # any loss is low enough: stop at once
    vector, steps = method._target_vector(EDIT, "Zorbulaq")
    assert steps == 1 and torch.equal(vector, current)


def test_the_projected_cache_is_the_projection_of_the_cache_also_after_reloading(tmp_path):
    method = alphaedit()
    method.edit([EDIT, EditRecord("zr", "Where does Quelmira live? In ", "R", subject="Quelmira")])
    for projection, cache, projected in zip(method.projections, method.cache, method.projected):
        assert cache.abs().max() > 0
        assert torch.allclose(projected, projection @ cache, atol=1e-5)
    method.save(tmp_path / "memory")
    again = registered()["alphaedit"].load(tmp_path / "memory", tiny_llama(), byte_tokenizer(), "tiny")
    for a, b in zip(method.projected, again.projected):
        assert torch.allclose(a, b, atol=1e-5)
