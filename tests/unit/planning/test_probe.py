"""The calibration probe: its live-bytes tracker, and its extrapolation from model cuts against the whole model."""
from __future__ import annotations

import torch

from tuneforge.planning.probe import LiveBytes, RunShape, build_probe_model, probe


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


def _shape(method: str) -> RunShape:
    from tuneforge.training.kernels import resolve_kernels

    kernels = resolve_kernels("auto", torch.device("cpu"), method, 0.0)
    return RunShape(method, r=4, alpha=8, dropout=0.0, kernels=tuple(sorted(kernels.as_dict().items())),
                    rows=2, seq_len=48)


def test_probe_extrapolates_saved_activations_to_the_whole_model():
    """Activations of the 6-layer model, measured directly with saved-tensor hooks, equal the probe's
    extrapolation from its 1-layer and deeper cuts (each built in a child process)."""
    from tuneforge.hardware import autocast
    from tuneforge.models.tiny import make_config
    from tuneforge.training.loss import loss_fn_for

    config = make_config("llama", 512, num_hidden_layers=6)
    shape = _shape("lora")
    result = probe(config, shape, use_cache=False)
    assert [p["layers"] for p in result.points][0] == 1 and result.points[1]["layers"] > 1

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
