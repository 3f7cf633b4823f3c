"""QLoRA's base on CPU: quantised once in a child process, cached, and the same model as quantising on load."""
from __future__ import annotations

import json
import subprocess

import torch

from tuneforge.models import load_model
from tuneforge.models import quantize


def test_cached_copy_is_reused_and_equals_quantising_on_load(tiny_models, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    src = tiny_models["llama"]
    first = quantize.quantized_copy(src, torch.float32)
    config = json.loads((first / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"

    def no_child(*a, **k):
        raise AssertionError("quantised again although cached")

    monkeypatch.setattr(subprocess, "run", no_child)
    assert quantize.quantized_copy(src, torch.float32) == first
    model = load_model(src, load_in_4bit=True)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    direct = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, device_map={"": "cpu"},
                                                  quantization_config=quantize.bnb_config(torch.float32))
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits)


def test_prune_keeps_the_most_recent(tmp_path):
    import os
    import time

    folders = []
    for i in range(quantize.KEEP + 2):
        f = tmp_path / f"m{i}"
        f.mkdir()
        os.utime(f, (time.time() - 100 + i, time.time() - 100 + i))
        folders.append(f)
    quantize._prune(tmp_path, keep=folders[0])
    # The oldest beyond KEEP go, except the copy in use (m0, oldest, just made or just used).
    left = sorted(p.name for p in tmp_path.iterdir())
    newest = [f"m{i}" for i in range(quantize.KEEP + 2)][-quantize.KEEP:]
    assert left == sorted(["m0"] + newest)
