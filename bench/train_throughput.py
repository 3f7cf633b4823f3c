"""Question: how fast does `tuneforge train` (LoRA) run against TRL's SFTTrainer + peft with its defaults?

Same model (SmolLM2-135M-Instruct), same chat data of very uneven lengths, same hyper-parameters
(LoRA r=16 all-linear, batch 4, lr 2e-4, one epoch, max length 512). Each run is a separate
process; the two tools alternate so machine drift hits both. Throughput counts real
(non-padding) tokens; peak RSS is the child process's maximum resident set.

    .venv/bin/python bench/train_throughput.py --rounds 2 --examples 64 > bench/results/throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from children import in_fresh_parent, print_round  # bench/children.py (this folder is sys.path[0])

WORDS = ("the model reads a ticket and answers in a short clear sentence about billing shipping refunds "
         "accounts passwords delivery tracking errors crashes invoices orders customers support team").split()
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
HP = {"batch_size": 4, "lr": 2e-4, "epochs": 1, "max_seq_len": 512}


def make_data(path: Path, n: int, seed: int = 0) -> Path:
    """Chat examples from ~40 to ~900 tokens: the uneven mix that makes padding costly."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        a = " ".join(rng.choice(WORDS) for _ in range(int(rng.expovariate(1 / 180)) + 10))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def child_tuneforge(data: Path, out: Path) -> dict:
    from tuneforge import api

    spec = {"model": "smollm2-135m-instruct", "task": "chat", "data": {"train": str(data)}, "method": "lora",
            "adapter": {**LORA, "target_modules": "all-linear"},
            "training": {**HP, "save_every": 10_000, "eval_every": 10_000, "warmup_ratio": 0.0},
            "output_dir": str(out)}
    t0 = time.perf_counter()
    s = api.train(spec, overwrite=True, progress=False)
    return {"train_seconds": time.perf_counter() - t0, "final_loss": s.final_train_loss, "steps": s.steps,
            "kernels": s.kernels}


def child_trl(data: Path, out: Path, tuned: bool = False) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tuneforge.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    config = SFTConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=HP["batch_size"],
                       learning_rate=HP["lr"], num_train_epochs=HP["epochs"], max_length=HP["max_seq_len"],
                       report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                       # "tuned": the best TRL settings we found on CPU: packing, no activation checkpointing.
                       **({"packing": True, "gradient_checkpointing": False} if tuned else {}))
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), args=config, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    t0 = time.perf_counter()
    result = trainer.train()
    return {"train_seconds": time.perf_counter() - t0, "final_loss": result.training_loss, "steps": result.global_step}


def real_tokens(data: Path) -> int:
    """Non-padding tokens one epoch feeds the model (same template and truncation for both tools)."""
    from tuneforge.data.encode import encode_chat
    from tuneforge.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    return sum(min(len(encode_chat(tok, r).input_ids), HP["max_seq_len"]) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--child", choices=["tuneforge", "trl", "trl-tuned"])
    ap.add_argument("--peer", default="trl", choices=["trl", "trl-tuned"], help="the TRL configuration to compare with")
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.child == "tuneforge":
            result = child_tuneforge(Path(args.data), Path(args.out))
        else:
            result = child_trl(Path(args.data), Path(args.out), tuned=args.child == "trl-tuned")
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    data = make_data(work / "train.jsonl", args.examples)
    tokens = real_tokens(data)
    peer = args.peer
    runs: dict[str, list[dict]] = {"tuneforge": [], peer: []}
    # RUSAGE_CHILDREN is a running maximum, so each child's peak is measured in a fresh grandparent.
    for r in range(args.rounds):
        for tool in ("tuneforge", peer) if r % 2 == 0 else (peer, "tuneforge"):
            res = in_fresh_parent([__file__, "--child", tool, "--data", str(data), "--out", str(work / tool)],
                                  tool, tokens)
            runs[tool].append(res)
            print_round(r, tool, res)

    def med(tool, key):
        return statistics.median(r[key] for r in runs[tool])

    ratios = [a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(runs["tuneforge"], runs[peer])]
    report = {
        "question": f"tuneforge LoRA vs {peer} (SFTTrainer+peft), SmolLM2-135M, one epoch",
        "examples": args.examples, "real_tokens": tokens, "hyper_parameters": {**HP, **LORA},
        "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
        "runs": runs,
        "median_tokens_per_second": {t: med(t, "tokens_per_second") for t in runs},
        "median_peak_rss_mb": {t: med(t, "peak_rss_mb") for t in runs},
        "speed_ratio_per_round": ratios,
        "speed_ratio_median": statistics.median(ratios),
        "whole_process_ratio_median": statistics.median(
            a["tokens_per_second_whole_process"] / b["tokens_per_second_whole_process"]
            for a, b in zip(runs["tuneforge"], runs[peer])),
        "rss_ratio_median": med("tuneforge", "peak_rss_mb") / med(peer, "peak_rss_mb"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
