"""tuneforge's SDPA attention for training: per-example attention in padding-free packed batches, and (CPU)
the math kernel for short rows.

- Packed rows: transformers masks a packed row (positions restarting at 0) with a block-diagonal mask over the
  whole row, so attention costs (sum of lengths)^2 and SDPA leaves its fused causal kernel for the masked path.
  Here each example is attended separately with `is_causal`, costing sum(length^2).
- Short rows on CPU (training.kernels.attention `math-short`): for keys up to MATH_MAX_KEYS long, SDPA's math
  kernel is faster than its flash kernel on CPU (bench/attention_kernels.py, forward + backward with a mask, two
  runs: 1.6-2.1x at 64 tokens, 1.8-1.9x at 86, 1.5-1.7x at 128, 0.9-1.0x at 192, 0.5x at 512); both compute in
  fp32 from bf16 inputs (the same error against an fp64 reference). Longer rows keep the flash kernel.

Everything else is transformers' own SDPA path unchanged, masks included (a 4D mask passes as given).
"""
from __future__ import annotations

import torch

PACKED = "tuneforge_packed_sdpa"  # packed rows per example; the library's SDPA kernel choice
SHORT_MATH = "tuneforge_sdpa"  # packed rows per example, and the math kernel for short rows on CPU
NAMES = (PACKED, SHORT_MATH)
MATH_MAX_KEYS = 160


def _sdpa(short_math: bool, module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if short_math and query.device.type == "cpu" and key.shape[2] <= MATH_MAX_KEYS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _forward(short_math: bool):
    def forward(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
        if cu_seq_lens_q is None or query.shape[0] != 1:
            return _sdpa(short_math, module, query, key, value, attention_mask, **kwargs)
        bounds = cu_seq_lens_q.tolist()
        outputs = [_sdpa(short_math, module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
                   for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outputs, dim=1), None  # (1, T, heads, head_dim), as SDPA returns it

    return forward


def _register() -> None:
    """transformers' attention registries are process-wide: register once, when this module is imported."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, short_math in ((PACKED, False), (SHORT_MATH, True)):
        AttentionInterface.register(name, _forward(short_math))
        AttentionMaskInterface.register(name, sdpa_mask)  # padded batches still need their mask


_register()


def use_tuneforge_attention(model, *, short_math: bool) -> None:
    """Switch `model` (a transformers model using SDPA) to per-example attention for packed rows, with the math
    kernel for short rows on CPU if `short_math`."""
    model.set_attn_implementation(SHORT_MATH if short_math else PACKED)
