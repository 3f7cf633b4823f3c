"""Question: where does one LoRA training step of SmolLM2-135M spend its time on this CPU?

Builds the model exactly as `tuneforge train` does (recipe.build_model: bf16 base, fused RMSNorm,
folded adapter dropout, fp32 adapters, fused AdamW) and profiles a step on a right-padded batch of
uneven lengths (`--lengths`), printing step time and the top operators by self CPU time.

    .venv/bin/python bench/profile_step.py --lengths 256,256,256,256
    .venv/bin/python bench/profile_step.py --lengths 512,400,300,200 --no-mask  # what padding's mask costs
    .venv/bin/python bench/profile_step.py --lengths 512,400,300,200 --compile  # torch.compile per layer
"""
from __future__ import annotations

import argparse
import time

import torch

from tuneforge.data.batching import collate
from tuneforge.data.encode import IGNORE_INDEX, Example
from tuneforge.models import resolve_model
from tuneforge.spec import JobSpec
from tuneforge.training.loss import loss_fn_for
from tuneforge.training import recipe
from tuneforge.training.kernels import resolve_kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="256,256,256,256", help="example lengths of the batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--no-mask", action="store_true", help="drop the padding mask (causal SDPA path)")
    ap.add_argument("--training", default="{}", help="JSON merged into the spec's training section")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (the lever's measurement)")
    ap.add_argument("--unfused", action="store_true", help="peft's own LoRA forward (no methods/fused_lora.py)")
    args = ap.parse_args()
    import json

    spec = JobSpec.model_validate({"model": "smollm2-135m-instruct", "task": "chat", "data": {"train": "x.jsonl"},
                                   "adapter": {"target_modules": "all-linear"}, "training": json.loads(args.training)})
    kernels = resolve_kernels({"lora": "library"} if args.unfused else "auto", torch.device("cpu"), spec.method, spec.adapter.dropout)
    model = recipe.build_model(spec, resolve_model(spec.model), torch.device("cpu"), torch.bfloat16, kernels)
    model.train()
    if args.compile:
        for layer in model.get_base_model().model.layers:
            layer.compile()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in map(int, args.lengths.split(",")):
        ids = torch.randint(0, 49152, (n,), generator=g).tolist()
        examples.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * (n // 4) + ids[n // 4 :]))
    batch = collate(examples, pad_id=0)
    if args.no_mask:
        batch.pop("attention_mask")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    loss_fn = loss_fn_for(model)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warm-up (and compilation)
    print(f"first step {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - t0) / args.steps
    tokens = sum(len(e.input_ids) for e in examples)
    print(f"{per_step:.3f} s/step, {tokens / per_step:.0f} real tokens/s, batch {tuple(batch['input_ids'].shape)}, "
          f"mask {'off' if args.no_mask else 'on'}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
