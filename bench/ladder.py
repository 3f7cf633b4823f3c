"""Question: what does each speed/memory lever buy, added one on top of the other?

Each rung is one epoch of `tuneforge train` (LoRA r=16, SmolLM2-135M, the uneven chat data of
bench/train_throughput.py) in its own process; TRL's SFTTrainer + peft with its defaults runs in
the same session as the peer. Levers that have no spec field (the loss path, the dropout kernel)
are picked with `training.kernels` (loss / dropout / lora: auto or library), as a user would. MFU uses this machine's bf16 GEMM
rate measured in the same session (2048x576x1536, the MLP shape) and 4 x 134.5M FLOPs per real
token (a LoRA step: forward + input gradients; frozen weights need no weight gradients).

    .venv/bin/python bench/ladder.py --examples 64 > bench/results/ladder.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as tt  # noqa: E402

FLOPS_PER_TOKEN = 4 * 134.5e6
# The fused RMSNorm predates this ladder and stays on in every rung, as it did when the ladder was first measured.
LIBRARY_STEP = {"loss": "library", "dropout": "library", "lora": "library"}
RUNGS = [
    ("fp32, file order, full logits, torch dropout", {"precision": "fp32", "group_by_length": False, "kernels": LIBRARY_STEP}),
    ("+ bf16 autocast", {"precision": "bf16", "base_dtype": "fp32", "group_by_length": False, "kernels": LIBRARY_STEP}),
    ("+ length-grouped batches", {"precision": "bf16", "base_dtype": "fp32", "kernels": LIBRARY_STEP}),
    ("+ frozen base stored in bf16", {"precision": "bf16", "base_dtype": "bf16", "kernels": LIBRARY_STEP}),
    ("+ target-only chunked linear cross-entropy", {"precision": "bf16", "base_dtype": "bf16",
                                                    "kernels": {"dropout": "library", "lora": "library"}}),
    ("+ byte-mask dropout", {"kernels": {"lora": "library"}}),
    ("+ fused LoRA layers, recomputed SwiGLU product (= tuneforge defaults)", {}),
    # Not defaults: checkpointing and the token budget trade speed for memory; packing is measured against grouping.
    ("defaults + gradient checkpointing", {"gradient_checkpointing": True}),
    ("defaults + checkpointing every 2nd layer", {"gradient_checkpointing": True, "checkpoint_every": 2}),
    ("defaults + padding-free packing", {"packing": True}),
    ("defaults + packing, batches not length-grouped", {"packing": True, "group_by_length": False}),
    ("defaults + micro_batch_tokens 1024", {"micro_batch_tokens": 1024}),
]


def gemm_gflops(m: int = 2048, k: int = 576, n: int = 1536, reps: int = 30) -> dict:
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(5):
            a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        out[name] = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
    return out


def child(data: Path, out: Path, training: dict) -> dict:
    from tuneforge import api

    spec = {"model": "smollm2-135m-instruct", "task": "chat", "data": {"train": str(data)}, "method": "lora",
            "adapter": {**tt.LORA, "target_modules": "all-linear"},
            "training": {**tt.HP, "save_every": 10_000, "eval_every": 10_000, "warmup_ratio": 0.0, **training},
            "output_dir": str(out)}
    t0 = time.perf_counter()
    s = api.train(spec, overwrite=True, progress=False)
    return {"train_seconds": time.perf_counter() - t0, "final_loss": s.final_train_loss, "kernels": s.kernels}


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t0
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--child", type=int)
    ap.add_argument("--trl-child", action="store_true")
    ap.add_argument("--one", help="run one rung (index) or 'trl' in a fresh process and print its JSON")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--rungs", help="comma-separated rung indices to run (default: all); the TRL peer always runs")
    args = ap.parse_args()
    if args.child is not None:
        _, training = RUNGS[args.child]
        print(json.dumps(child(Path(args.data), Path(args.out), training)))
        return
    if args.one is not None:  # one measured child, in its own parent so RUSAGE_CHILDREN is its own peak
        cmd = [sys.executable, __file__, "--data", args.data, "--out", args.out]
        cmd += ["--trl-child"] if args.one == "trl" else ["--child", args.one]
        print(json.dumps(run(cmd)))
        return
    if args.trl_child:
        print(json.dumps(tt.child_trl(Path(args.data), Path(args.out))))
        return

    work = Path(tempfile.mkdtemp(prefix="tf-ladder-"))
    data = tt.make_data(work / "train.jsonl", args.examples)
    tokens = tt.real_tokens(data)
    gemm_before = gemm_gflops()
    rows = []
    chosen = [int(i) for i in args.rungs.split(",")] if args.rungs else range(len(RUNGS))
    for label, idx in [("TRL SFTTrainer + peft, defaults (peer)", "trl")] + [(RUNGS[i][0], str(i)) for i in chosen]:
        proc = subprocess.run([sys.executable, __file__, "--one", idx, "--data", str(data), "--out", str(work / idx)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(label=label, tokens_per_second=tokens / res["train_seconds"])
        rows.append(res)
        print(f"{label:48s} {res['tokens_per_second']:6.0f} tok/s  {res['peak_rss_mb']:6.0f} MB  "
              f"loss {res['final_loss']:.3f}", file=sys.stderr)
    gemm_after = gemm_gflops()
    bf16 = (gemm_before["bf16"] + gemm_after["bf16"]) / 2
    peer = rows[0]
    for r in rows:
        r["mfu_vs_bf16_gemm"] = r["tokens_per_second"] * FLOPS_PER_TOKEN / (bf16 * 1e9)
        r["speed_vs_trl"] = r["tokens_per_second"] / peer["tokens_per_second"]
        r["rss_vs_trl"] = r["peak_rss_mb"] / peer["peak_rss_mb"]
    print(json.dumps({"real_tokens": tokens, "examples": args.examples, "gemm_gflops_before": gemm_before,
                      "gemm_gflops_after": gemm_after, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
