"""The calibration probe: its live-bytes tracker, and its extrapolation from model cuts against the whole model."""
from __future__ import annotations

import pytest
import torch

from tuneforge.planning.probe import LiveBytes, RunShape, build_probe_model, probe, probes_whole_model


def test_live_bytes_counts_allocations_until_freed():
    tracker = LiveBytes()
    with tracker:
        a = torch.ones(1024, dtype=torch.float32)  # 4 KiB
        b = a * 2  # another 4 KiB
        del b
        c = torch.zeros(256, dtype=torch.float64)  # 2 KiB
    assert tracker.peak == 8192
    assert tracker.current == 4096 + 2048
    del a, c


def _shape(method: str, rows: int = 2, seq_len: int = 48) -> RunShape:
    from tuneforge.training.kernels import resolve_kernels

    kernels = resolve_kernels("auto", torch.device("cpu"), method, 0.0)
    return RunShape(method, r=4, alpha=8, dropout=0.0, kernels=tuple(sorted(kernels.as_dict().items())),
                    rows=rows, seq_len=seq_len)


@pytest.mark.parametrize("whole", [False, True], ids=["cuts", "whole"])
def test_probe_extrapolates_saved_activations_to_the_whole_model(whole):
    """Activations of the 6-layer model, measured directly with saved-tensor hooks, equal the probe's
    extrapolation from its 1-layer and deeper cuts (each built in a child process), or its direct probe of
    the whole model."""
    from tuneforge.hardware import autocast
    from tuneforge.models.tiny import make_config
    from tuneforge.training.loss import loss_fn_for

    config = make_config("llama", 512, num_hidden_layers=6)
    shape = _shape("lora")
    result = probe(config, shape, use_cache=False, whole=whole)
    layers = [p["layers"] for p in result.points]
    assert layers == [6] if whole else (layers[0] == 1 and 1 < layers[1] < 6), layers

    model, _ = build_probe_model(config, shape, 6)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss_fn = loss_fn_for(model, chunked=True)

    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(torch.device("cpu"), torch.bfloat16):
            loss_fn(batch)
    direct = sum(seen.values())
    assert abs(result.saved_bytes - direct) <= 0.02 * direct, (result.saved_bytes, direct)
    assert result.rss_growth_bytes > 0 and result.forward_backward_seconds > 0


def test_small_models_are_probed_whole_and_large_ones_in_cuts():
    """SmolLM2-135M's step is cheap enough to probe whole (its allocator growth does not scale with the layer
    count); Phi-3-mini (3.8B) is probed in cuts."""
    from pathlib import Path

    from transformers import AutoConfig, LlamaConfig

    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    phi3 = AutoConfig.from_pretrained(Path(__file__).parents[2] / "data" / "phi3-mini")
    assert probes_whole_model(smollm2, _shape("lora", rows=4, seq_len=256))
    assert not probes_whole_model(phi3, _shape("qlora", rows=1, seq_len=128))
