"""Question: on one GPU, how fast and how lean is `tuneforge train` (LoRA) against TRL's SFTTrainer + peft
with TRL's defaults, on the same data for the same steps?

Model: SmolLM2-135M's architecture (its real LlamaConfig: hidden 576, 30 layers, 9 heads, 3 KV heads,
MLP 1536, vocabulary 49,152, tied embeddings, rope theta 1e5) with random weights and tuneforge's tiny
byte-level tokenizer (`tuneforge.models.tiny`): the real model's package (93 MB) cannot travel to the
GPU machine. Speed and memory depend on the shapes, not the weights; the loss values mean nothing.
Data: `train_throughput.make_data`'s uneven chat examples (the CPU race's). The byte-level tokenizer
makes one token per character: the default 512 examples run from 184 to 9,411 tokens (median 1,203), and
cutting them at `--max-seq-len` 2,048 (a quarter are cut, the same way on both sides) leaves 642,109.

Both sides: LoRA r=16, alpha 32, dropout 0.05 on all linear layers, one epoch, batch `--batch-size`,
lr 2e-4, each tool's own defaults otherwise (tuneforge: bf16 autocast with a bf16 frozen base,
length-grouped batches, loss on the replies; TRL: bf16 autocast over an fp32 model, gradient
checkpointing, batches in file order padded to their longest, loss on every token). Each run is its
own process; the tools alternate between rounds. Throughput counts real (non-padding) tokens per second
of `api.train()` for tuneforge (model loading, data encoding and saving included, as in the CPU race;
CUDA's start-up excluded, as it is for TRL) and of `trainer.train()` for TRL; `loop_tokens_per_second` is
tuneforge's own training-loop rate. Peak memory is the child's `torch.cuda.max_memory_allocated()`.

    PYTHONPATH=src:.gpu-wheels/site python3 bench/gpu_race.py --rounds 2 --out runs/gpu_race.json

`make gpu-check` runs it after the GPU tests (bench/gpu_check.py). Dry run on the CPU (checks the code
paths in a minute; the numbers mean nothing, peak memory is then the child's max RSS):

    TUNEFORGE_GPU_CHECK_DEVICE=cpu OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_race.py --tiny --examples 8 --rounds 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import HP, LORA, make_data  # noqa: E402 - the CPU race's data and hyper-parameters

# SmolLM2-135M's config.json, less what the tiny tokenizer decides (token ids).
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
TOOLS = ("tuneforge", "trl")


def device() -> str:
    return os.environ.get("TUNEFORGE_GPU_CHECK_DEVICE", "cuda")


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if device() == "cuda" else None


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by this process; on a CPU dry run, its peak RSS."""
    import torch

    if device() == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    from tuneforge.training.metrics import peak_rss_mb

    return peak_rss_mb()


def child_tuneforge(model: Path, data: Path, out: Path, batch_size: int, max_seq_len: int) -> dict:
    import torch

    from tuneforge import api

    spec = {"model": str(model), "task": "chat", "data": {"train": str(data)}, "method": "lora",
            "adapter": {**LORA, "target_modules": "all-linear"},
            "training": {**HP, "batch_size": batch_size, "max_seq_len": max_seq_len, "save_every": 10**6,
                         "eval_every": 10**6, "warmup_ratio": 0.0},
            "device": device(), "output_dir": str(out)}
    if device() == "cuda":  # CUDA's start-up is process overhead, outside the timing as it is for TRL
        torch.zeros(1, device="cuda")
    t0 = time.perf_counter()
    api.train(spec, overwrite=True, progress=False)
    if device() == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    s = api.summary(out)
    return {"train_seconds": seconds, "loop_tokens_per_second": s["tokens_per_second"], "steps": s["steps"],
            "final_loss": s["final_train_loss"], "train_tokens": s["train_tokens"], "precision": s["precision"],
            "base_dtype": s.get("base_dtype"), "peak_memory_mb": peak_memory_mb(), "gpu": gpu_name()}


def child_trl(model: Path, data: Path, out: Path, batch_size: int, max_seq_len: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    config = SFTConfig(output_dir=str(out), use_cpu=device() == "cpu", per_device_train_batch_size=batch_size,
                       learning_rate=HP["lr"], num_train_epochs=HP["epochs"], max_length=max_seq_len,
                       report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model), args=config, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    t0 = time.perf_counter()
    result = trainer.train()
    if device() == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"train_seconds": seconds, "steps": result.global_step, "final_loss": result.training_loss,
            "bf16": bool(config.bf16), "gradient_checkpointing": bool(config.gradient_checkpointing),
            "peak_memory_mb": peak_memory_mb(), "gpu": gpu_name()}


def make_model(folder: Path, tiny: bool) -> Path:
    """The race's model: SmolLM2-135M's shape with random weights (`tiny`: the 2-layer test model)."""
    from tuneforge.models.tiny import make_tiny_model, make_tokenizer

    if tiny:
        return make_tiny_model("llama", folder)
    try:
        return make_tiny_model("llama", folder, **SMOLLM2_135M)
    except TypeError:  # make_tiny_model passes vocab_size positionally, so an override of it clashes
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        tok = make_tokenizer("llama")
        config = LlamaConfig(**SMOLLM2_135M, bos_token_id=None, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        tok.save_pretrained(folder)
        return folder


def real_tokens(model: Path, data: Path, max_seq_len: int) -> int:
    """Non-padding tokens one epoch feeds the model: the chat template, cut at max_seq_len (both tools)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    total = 0
    for line in data.read_text().splitlines():
        text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        total += min(len(tok(text, add_special_tokens=False)["input_ids"]), max_seq_len)
    return total


def run_child(tool: str, args, model: Path, data: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--model", str(model), "--data", str(data), "--child-out",
           str(out), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {args.child_timeout} s", "stderr_tail": str(e.stderr or "")[-3000:]}
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    result = json.loads(lines[-1])
    result["process_seconds"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--tiny", action="store_true", help="the 2-layer test model instead of SmolLM2's shape (dry runs)")
    ap.add_argument("--child-timeout", type=int, default=300, help="seconds one run may take")
    ap.add_argument("--out", help="also write the JSON report here")
    ap.add_argument("--child", choices=TOOLS)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--child-out")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        child = child_tuneforge if args.child == "tuneforge" else child_trl
        print(json.dumps(child(Path(args.model), Path(args.data), Path(args.child_out), args.batch_size,
                               args.max_seq_len)))
        return

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tf-gpu-race-"))
    model = make_model(work / "model", args.tiny)
    data = make_data(work / "train.jsonl", args.examples)
    tokens = real_tokens(model, data, args.max_seq_len)
    runs: dict[str, list[dict]] = {t: [] for t in TOOLS}
    for r in range(args.rounds):
        for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
            res = run_child(tool, args, model, data, work / f"{tool}-{r}")
            if "error" not in res:
                res["tokens_per_second"] = tokens / res["train_seconds"]
                print(f"round {r + 1} {tool:9s}: {res['tokens_per_second']:,.0f} tok/s, peak memory "
                      f"{res['peak_memory_mb']:,.0f} MB, {res['steps']} steps, loss {res['final_loss']:.3f}",
                      file=sys.stderr)
            else:
                print(f"round {r + 1} {tool:9s}: FAILED ({res['error']})\n{res['stderr_tail']}", file=sys.stderr)
            runs[tool].append(res)
            report = summarize(runs, args, tokens, time.perf_counter() - started)
            if args.out:  # after every run, so a check that runs out of time keeps what was measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    sys.exit(1 if report["errors"] else 0)


def summarize(runs: dict[str, list[dict]], args, tokens: int, seconds: float) -> dict:
    ok = {t: [x for x in runs[t] if "error" not in x] for t in TOOLS}

    def med(tool, key):
        values = [x[key] for x in ok[tool] if x.get(key) is not None]
        return statistics.median(values) if values else None

    def ratio(key_a, key_b, pairs):
        return statistics.median(a[key_a] / b[key_b] for a, b in pairs) if pairs else None

    # Rounds where both tools ran; the ratios are per round, then their median.
    pairs = [(a, b) for a, b in zip(runs["tuneforge"], runs["trl"]) if "error" not in a and "error" not in b]
    report = {
        "question": "tuneforge LoRA vs TRL SFTTrainer + peft (defaults), SmolLM2-135M shape, random weights, one epoch",
        "device": device(),
        "gpu": next((x["gpu"] for t in TOOLS for x in ok[t] if x.get("gpu")), None),
        "model_config": "tiny (dry run)" if args.tiny else SMOLLM2_135M,
        "examples": args.examples, "real_tokens": tokens,
        "hyper_parameters": {**HP, **LORA, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len},
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device() == "cuda" else "max RSS (CPU dry run)",
        "runs": runs,
        "median_tokens_per_second": {t: med(t, "tokens_per_second") for t in TOOLS},
        "median_tuneforge_loop_tokens_per_second": med("tuneforge", "loop_tokens_per_second"),
        "median_peak_memory_mb": {t: med(t, "peak_memory_mb") for t in TOOLS},
        "speed_ratio_per_round": [a["tokens_per_second"] / b["tokens_per_second"] for a, b in pairs],
        "speed_ratio_median": ratio("tokens_per_second", "tokens_per_second", pairs),
        "loop_speed_ratio_median": ratio("loop_tokens_per_second", "tokens_per_second", pairs),
        "memory_ratio_median": ratio("peak_memory_mb", "peak_memory_mb", pairs),
        "errors": sum("error" in x for t in TOOLS for x in runs[t]),
        "seconds": seconds,
    }
    counted = ok["tuneforge"][0].get("train_tokens") if ok["tuneforge"] else tokens
    if counted != tokens:
        report["note"] = f"tuneforge counted {counted} train tokens, this script {tokens}: the rates use the latter"
    return report


if __name__ == "__main__":
    main()
