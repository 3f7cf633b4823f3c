"""Question: how much memory does QLoRA save against bf16 LoRA on a >= 1B-parameter model?

Builds a random Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, vocab 32000),
saves it once as bf16 safetensors, then trains a few LoRA steps in each mode in its own process
and reports each process's peak RSS. Random weights are fine: memory does not depend on values.

    .venv/bin/python bench/qlora_memory.py --steps 3 > bench/results/qlora_memory.json

QLoRA's NF4 copy is made once (`quantize`, its own process and peak) and then loaded by training.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.models.tiny import make_tokenizer

    if (folder / "config.json").exists():
        return folder
    tok = make_tokenizer("llama")
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# qlora turns gradient checkpointing on by default; lora+gc is bf16 LoRA with it on, for a like-for-like row.
# qlora+8bit adds bitsandbytes' 8-bit AdamW (training.optimizer: adamw_8bit).
RUNS = ("lora", "lora+gc", "quantize", "qlora", "qlora+8bit")


def child(model: Path, data: Path, out: Path, run: str, steps: int) -> dict:
    from tuneforge import api

    if run == "quantize":  # the one-time NF4 copy, measured on its own (training then loads it)
        import torch

        from tuneforge.models.quantize import quantized_copy

        t0 = time.perf_counter()
        quantized_copy(model, torch.bfloat16)
        return {"seconds": time.perf_counter() - t0}
    method, _, extra = run.partition("+")
    spec = {"model": str(model), "task": "chat", "data": {"train": str(data)}, "method": method,
            "training": {"max_steps": steps, "batch_size": 2, "max_seq_len": 256, "save_every": 10_000,
                         "eval_every": 10_000, "precision": "bf16", "gradient_checkpointing": extra == "gc" or None,
                         "optimizer": "adamw_8bit" if extra == "8bit" else "adamw"},
            "output_dir": str(out)}
    if method == "qlora":  # what `tuneforge train` sets at its entry point for QLoRA on CPU
        from tuneforge.training.allocator import return_big_buffers_to_os

        return_big_buffers_to_os()
    t0 = time.perf_counter()
    s = api.train(spec, overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t0, "params": s.total_params, "trainable": s.trainable_params,
            "base_weight_bytes": s.base_weight_bytes, "final_loss": s.final_train_loss, "kernels": s.kernels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", choices=RUNS)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS) +
                    " (keep quantize before the qlora runs: it fills the cache they load)")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.model), Path(args.data), Path(args.out), args.child, args.steps)))
        return
    work = Path(tempfile.mkdtemp(prefix="tf-qlora-"))
    model = build_model(work / "llama-1.1b")
    # ~230 byte-level tokens per example: within max_seq_len, so every example keeps its targets.
    rows = [{"messages": [{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "reply " * 20}]}] * 16
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for method in args.runs.split(","):
        # A fresh grandparent per method: RUSAGE_CHILDREN is a running maximum over all children.
        code = ("import json,resource,subprocess,sys; p=subprocess.run(sys.argv[1:],capture_output=True,text=True); "
                "r=json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode==0 else {'error': p.stderr[-2000:]}; "
                "r['peak_rss_mb']=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024; print(json.dumps(r))")
        proc = subprocess.run([sys.executable, "-c", code, sys.executable, __file__, "--child", method, "--model",
                               str(model), "--data", str(data), "--out", str(work / method), "--steps",
                               str(args.steps)], capture_output=True, text=True)
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        if "error" in results[method]:
            raise SystemExit(f"{method} failed:\n{results[method]['error']}")
        print(f"{method}: peak RSS {results[method]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    for run in results.copy():
        for base in ("lora", "lora+gc"):
            if run.startswith("qlora") and base in results:
                results[f"rss_ratio_{run}_vs_{base}"] = results[run]["peak_rss_mb"] / results[base]["peak_rss_mb"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
