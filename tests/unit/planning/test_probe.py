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


@pytest.mark.parametrize("rmsnorm", ["auto", "library"])
def test_the_probe_builds_its_model_with_the_recipes_own_code(tiny_models, chat_file, tmp_path, monkeypatch, rmsnorm):
    """The planner's probe and `train` build their models through one function (recipe.prepare_model): a kernel
    setting changed in the spec reaches both, and both install the same kernels."""
    import torch

    from tests.conftest import tiny_spec
    from tuneforge.planning.estimate import load_config
    from tuneforge.planning.plan import run_shape
    from tuneforge.planning.probe import build_probe_model
    from tuneforge.spec import build_spec
    from tuneforge.training import recipe

    calls = []
    real = recipe.install_kernels

    def spy(model, kernels, *, before_peft):
        counts = real(model, kernels, before_peft=before_peft)
        calls.append((kernels.rmsnorm, before_peft, counts.get("rmsnorm", 0)))
        return counts

    monkeypatch.setattr(recipe, "install_kernels", spy)
    raw = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=1)
    raw["training"]["kernels"] = {"rmsnorm": rmsnorm}
    spec = build_spec(raw)
    recipe.build_model(spec, tiny_models["llama"], torch.device("cpu"), torch.float32)
    build_probe_model(load_config(str(tiny_models["llama"])), run_shape(spec, "lora", torch.device("cpu"), 1, 16), 1)
    train, probe = calls[:2], calls[2:]
    assert [c[:2] for c in train] == [c[:2] for c in probe] == [
        ("fused" if rmsnorm == "auto" else "library", True), ("fused" if rmsnorm == "auto" else "library", False)]
    swapped = [train[0][2], probe[0][2]]  # norms swapped in: every one of the model, and of the 1-layer cut
    assert all(n > 0 for n in swapped) if rmsnorm == "auto" else swapped == [0, 0]
