"""Every method on every architecture: trains (loss falls), saves/loads/merges to the same logits,
and starts from the base model's logits (adapters are initialised as no-ops)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import CHAT_RECORDS, tiny_spec
from tuneforge import api
from tuneforge.data.batching import collate
from tuneforge.data.encode import encode_chat
from tuneforge.methods import apply_method
from tuneforge.models import load_model, load_tokenizer
from tuneforge.spec import AdapterSpec

METHODS = ["lora", "dora", "qlora", "ia3", "prompt_tuning", "full"]
ARCHS = ["llama", "phi3", "qwen2"]


def probe_batch(model_dir):
    tok = load_tokenizer(model_dir)
    return collate([encode_chat(tok, r) for r in CHAT_RECORDS[:3]], tok.pad_token_id)


def logits(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[:, -batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "full"])
def test_fresh_adapter_is_a_no_op(tiny_models, arch, method):
    base = load_model(tiny_models[arch]).eval()
    batch = probe_batch(tiny_models[arch])
    before = logits(base, batch)
    wrapped = apply_method(copy.deepcopy(base), method, AdapterSpec(r=4, dropout=0.0)).eval()
    torch.testing.assert_close(logits(wrapped, batch), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_train_save_load_merge(tiny_models, chat_file, tmp_path, arch, method):
    lr = {"ia3": 0.3, "prompt_tuning": 0.3, "full": 3e-3}.get(method, 1e-2)
    spec = tiny_spec(tiny_models[arch], chat_file, tmp_path / "run", max_steps=8, batch_size=8, lr=lr)
    spec["method"] = method
    s = api.train(spec, progress=False)
    import json

    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["train_loss"], rows[-1]["train_loss"]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert last < first - 0.05, (first, last)  # memorisable batch: loss must fall (nats/token)
    assert 0 < s.trainable_params <= s.total_params
    if method != "full":
        assert s.trainable_params < 0.5 * s.total_params

    if method == "full":  # training switches the KV cache off; the saved model must generate with it
        assert json.loads((tmp_path / "run" / "model" / "config.json").read_text()).get("use_cache", True) is True

    # save -> load: the reloaded run reproduces the trained model's logits on held data.
    batch = probe_batch(tiny_models[arch])
    loaded = api.load(tmp_path / "run")
    reloaded = logits(loaded.model, batch)
    base = logits(load_model(tiny_models[arch]).eval(), batch)
    assert not torch.allclose(reloaded, base, atol=1e-4), "training changed nothing"
    if method == "prompt_tuning":
        with pytest.raises(Exception, match="nothing to merge"):
            api.merge(tmp_path / "run", tmp_path / "merged")
        return
    # merge -> a standalone transformers model with the same logits as base + adapter.
    merged_dir = api.merge(tmp_path / "run", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(logits(merged, batch), reloaded, atol=2e-4, rtol=1e-4)
