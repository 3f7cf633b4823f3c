"""Question: where does one LoRA training step of SmolLM2-135M spend its time on this CPU?

Runs a few steps of the real recipe's forward/backward on a fixed batch under torch.profiler and
prints the top operators by self CPU time.

    .venv/bin/python bench/profile_step.py --batch 4 --seq 256
"""
from __future__ import annotations

import argparse
import time

import torch

from tuneforge.data.encode import IGNORE_INDEX
from tuneforge.methods import apply_method
from tuneforge.methods.dropout import use_byte_dropout
from tuneforge.models import load_model, resolve_model
from tuneforge.spec import AdapterSpec
from tuneforge.train.loss import causal_lm_loss_sum, loss_fn_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--base-dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--loss", default="fast", choices=["fast", "full"])
    ap.add_argument("--torch-dropout", action="store_true", help="keep peft's nn.Dropout (not ByteDropout)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.base_dtype == "bf16" else torch.float32
    model = apply_method(load_model(resolve_model("smollm2-135m-instruct"), dtype=dtype), "lora", AdapterSpec(dropout=args.dropout))
    if not args.torch_dropout:
        use_byte_dropout(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    fast = loss_fn_for(model)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if args.loss == "fast":
                loss, _ = fast(batch)
            else:
                loss, _ = causal_lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq
    print(f"{per_step:.3f} s/step, {tokens / per_step:.0f} tokens/s (base {args.base_dtype}, bf16 autocast, "
          f"loss {args.loss}, dropout {args.dropout}{' torch' if args.torch_dropout else ' byte'})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
