"""Attention for padding-free packed batches: one SDPA call per example in the row.

transformers masks a packed row (positions restarting at 0) with a block-diagonal mask over the
whole row, so attention costs (sum of lengths)^2 and SDPA leaves its fused causal kernel for the
masked path. Here each example is attended separately with `is_causal`, costing sum(length^2).
Batches that are not packed (no `cu_seq_lens_q`) take transformers' own SDPA path unchanged.
"""
from __future__ import annotations

import torch

NAME = "tuneforge_packed_sdpa"


def packed_sdpa_forward(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    outputs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
               for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs, dim=1), None  # (1, T, heads, head_dim), as SDPA returns it


def _register() -> None:
    """transformers' attention registries are process-wide: register once, when this module is imported."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches still need their mask


_register()


def use_packed_attention(model) -> None:
    """Switch `model` (a transformers model) to per-example attention for packed rows."""
    model.set_attn_implementation(NAME)
