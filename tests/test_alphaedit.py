"""AlphaEdit: null-space projected closed-form updates, key statistics cached once per model."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from elder import EditRecord
from elder.methods import registered
from elder.settings import ConfigError

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
