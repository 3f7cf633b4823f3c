"""Question: on this CPU, which SDPA kernel is faster for a training step's attention (forward + backward) at the
row lengths tuneforge trains on: the flash kernel or the math kernel? (training.kernels.attention `auto` picks
the math kernel for rows up to models/attention.py MATH_MAX_KEYS tokens.)

SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head dim 64), a batch of 8 rows, bf16, a 4D
boolean causal mask as transformers passes for padded or shared-prompt rows; the causal flash kernel without a
mask for reference. Each cell is the best of 3 timings of 10 forward + backward passes. Also prints each
kernel's largest error against an fp64 computation.

    flock .cache/bench.lock .venv/bin/python bench/attention_kernels.py [--lengths 64,86,128,192,256,512]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(q, k, v, backend, **kw) -> float:
    best = float("inf")
    with sdpa_kernel(backend):
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(10):
                F.scaled_dot_product_attention(q, k, v, **kw).sum().backward()
            best = min(best, (time.perf_counter() - t0) / 10)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="64,86,128,192,256,512")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows, heads, kv_heads, dim = 8, 9, 3, 64
    results = []
    for n in map(int, args.lengths.split(",")):
        q = torch.randn(rows, heads, n, dim, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(rows, kv_heads, n, dim, dtype=torch.bfloat16).repeat_interleave(heads // kv_heads, 1)
                .requires_grad_() for _ in range(2))
        mask = torch.ones(n, n, dtype=torch.bool).tril().expand(rows, 1, n, n)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        errors = {}
        for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend), torch.no_grad():
                errors[name] = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask).double() - exact).abs().max().item()
        row = {"tokens": n, "flash_mask_ms": 1e3 * timed(q, k, v, SDPBackend.FLASH_ATTENTION, attn_mask=mask),
               "math_mask_ms": 1e3 * timed(q, k, v, SDPBackend.MATH, attn_mask=mask),
               "flash_causal_ms": 1e3 * timed(q, k, v, SDPBackend.FLASH_ATTENTION, is_causal=True),
               "max_error_math": errors["math"], "max_error_flash": errors["flash"]}
        row["math_speedup"] = row["flash_mask_ms"] / row["math_mask_ms"]
        results.append(row)
        print(f"{n:5d} tokens: flash+mask {row['flash_mask_ms']:7.2f} ms, math+mask {row['math_mask_ms']:7.2f} ms "
              f"({row['math_speedup']:.2f}x), flash causal {row['flash_causal_ms']:7.2f} ms; max error math "
              f"{errors['math']:.1e}, flash {errors['flash']:.1e}")
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows, "results": results}, indent=1))


if __name__ == "__main__":
    main()
