"""Question: how fast, and in how much memory, does `tuneforge train` run DPO with LoRA against TRL's DPOTrainer +
peft with its defaults?

Same model (SmolLM2-135M-Instruct), same preference pairs (the shipped `tuneforge data generate preference` train
split), same hyper-parameters (LoRA r=16 all-linear, batch 8, lr 5e-4, beta 0.1, one epoch, max length 512); the
reference is the base with the adapter switched off in both (TRL's default for a peft model, tuneforge's
`reference: auto`). TRL keeps its own defaults otherwise (bf16 autocast on CPU, gradient checkpointing, no
precomputed reference). tuneforge puts a pair's prompt once in its row (`preference.shared_prompt`, its default:
the same log-probs at fewer tokens); `--rows-layout` adds a tuneforge run in TRL's one-row-per-reply layout to each
round. Each run is a separate process, measured whole; the two tools alternate so machine drift
hits both. Throughput counts the real (non-padding) tokens of both replies of every pair (the reference pass is
not counted: both tools make it); peak RSS is the child process's maximum resident set. Goal (issue #27):
>= 3x TRL's tokens/s at <= 0.7x its peak RSS.

    flock .cache/bench.lock .venv/bin/python bench/dpo_vs_trl.py --rounds 2 --out bench/results/dpo_vs_trl.json
    .venv/bin/python bench/dpo_vs_trl.py --model PATH --examples 16 --rounds 1   # a smoke check on a tiny model
    ... --rows-layout   # also tuneforge in TRL's one-row-per-reply layout, each round

Work files go to a scratch folder (--work, default a new temporary folder); the JSON to stdout, or --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from children import in_fresh_parent, print_round  # bench/children.py (this folder is sys.path[0])

MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
HP = {"batch_size": 8, "lr": 5e-4, "epochs": 1, "max_seq_len": 512, "beta": 0.1}


def make_data(work: Path, n: int | None) -> Path:
    """The shipped preference train split (OpenAI's DPO format), its first `n` pairs."""
    from tuneforge.data.synthetic import write_dataset

    train = write_dataset("preference", work / "data", overwrite=True)["train"]
    if n:
        lines = train.read_text().splitlines()[:n]
        train.write_text("".join(line + "\n" for line in lines))
    return train


def child_tuneforge(model: str, data: Path, out: Path, shared_prompt: bool = True) -> dict:
    from tuneforge import api

    spec = {"model": model, "task": "preference", "data": {"train": str(data)}, "method": "lora",
            "adapter": {**LORA, "target_modules": "all-linear"},
            "preference": {"loss": "dpo", "beta": HP["beta"], "reference": "auto", "shared_prompt": shared_prompt},
            "training": {"batch_size": HP["batch_size"], "lr": HP["lr"], "epochs": HP["epochs"],
                         "max_seq_len": HP["max_seq_len"], "save_every": 10_000, "eval_every": 10_000,
                         "warmup_ratio": 0.0},
            "output_dir": str(out)}
    t0 = time.perf_counter()
    s = api.train(spec, overwrite=True, progress=False)
    return {"train_seconds": time.perf_counter() - t0, "final_loss": s.final_train_loss, "steps": s.steps,
            "kernels": s.kernels, "precision": s.precision}


def trl_rows(data: Path) -> list[dict]:
    """The pairs in TRL's conversational format (prompt / chosen / rejected message lists)."""
    from tuneforge.data.preference import normalise

    rows = []
    for line in data.read_text().splitlines():
        pref = normalise(json.loads(line))
        rows.append({"prompt": pref.prompt, "chosen": pref.chosen, "rejected": pref.rejected})
    return rows


def child_trl(model: str, data: Path, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tuneforge.models import resolve_model

    path = resolve_model(model)
    config = DPOConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=HP["batch_size"],
                       learning_rate=HP["lr"], num_train_epochs=HP["epochs"], max_length=HP["max_seq_len"],
                       beta=HP["beta"], report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), args=config, train_dataset=Dataset.from_list(trl_rows(data)),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    t0 = time.perf_counter()
    result = trainer.train()
    # the last step's loss, as tuneforge reports it (TrainOutput.training_loss is the mean over all steps)
    last = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    return {"train_seconds": time.perf_counter() - t0, "final_loss": last, "mean_loss": result.training_loss,
            "steps": result.global_step,
            "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing}


def real_tokens(model: str, data: Path) -> tuple[int, int]:
    """Non-padding tokens of both sequences of every pair in one epoch (tuneforge's encoding; TRL's tokenizes the
    same template, prompt + reply): the throughput's numerator; and the same with each pair's prompt once (what
    tuneforge's shared-prompt rows hold)."""
    from tuneforge.data.encode import encode_records
    from tuneforge.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(model))
    records = [json.loads(l) for l in data.read_text().splitlines()]
    encoded = encode_records(tok, "preference", records, list(range(1, len(records) + 1)), HP["max_seq_len"])
    return encoded.total_tokens, sum(pair.shared_length for pair in encoded.examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--examples", type=int, default=None, help="the first N pairs (default: all 240)")
    ap.add_argument("--model", default=MODEL, help="model reference (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--work", help="scratch folder for data and runs (default: a new temporary folder)")
    ap.add_argument("--out", help="also write the JSON here (default: stdout only)")
    ap.add_argument("--child", choices=["tuneforge", "trl", "tuneforge-rows"])
    ap.add_argument("--rows-layout", action="store_true",
                    help="also run tuneforge with TRL's one-row-per-reply layout (preference.shared_prompt: false) each "
                         "round: what the shared prompt is worth")
    ap.add_argument("--data")
    args = ap.parse_args()
    if args.child:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.child == "trl":
            result = child_trl(args.model, Path(args.data), Path(args.work))
        else:
            result = child_tuneforge(args.model, Path(args.data), Path(args.work), args.child == "tuneforge")
        print(json.dumps(result))
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tf-dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, args.examples)
    tokens, shared_tokens = real_tokens(args.model, data)
    tools = ("tuneforge", "trl", "tuneforge-rows") if args.rows_layout else ("tuneforge", "trl")
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    # RUSAGE_CHILDREN is a running maximum, so each child's peak is measured in a fresh grandparent.
    for r in range(args.rounds):
        for tool in tools if r % 2 == 0 else tools[::-1]:
            res = in_fresh_parent([__file__, "--child", tool, "--model", args.model, "--data", str(data),
                                   "--work", str(work / tool)], tool, tokens)
            runs[tool].append(res)
            print_round(r, tool, res)

    def med(tool, key):
        return statistics.median(r[key] for r in runs[tool])

    speed = [a["tokens_per_second_whole_process"] / b["tokens_per_second_whole_process"]
             for a, b in zip(runs["tuneforge"], runs["trl"])]
    report = {
        "question": "tuneforge DPO (LoRA, reference = adapter off) vs TRL DPOTrainer + peft (its defaults), "
                    f"{args.model}, one epoch",
        "pairs": sum(1 for _ in data.open()), "real_tokens": tokens, "hyper_parameters": {**HP, **LORA},
        "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
        "runs": runs,
        "median_tokens_per_second": {t: med(t, "tokens_per_second") for t in runs},
        "median_tokens_per_second_whole_process": {t: med(t, "tokens_per_second_whole_process") for t in runs},
        "median_peak_rss_mb": {t: med(t, "peak_rss_mb") for t in runs},
        "speed_ratio_per_round": speed,
        "speed_ratio_median": statistics.median(speed),  # whole process, the measure
        "train_only_ratio_median": statistics.median(
            a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(runs["tuneforge"], runs["trl"])),
        "rss_ratio_median": med("tuneforge", "peak_rss_mb") / med("trl", "peak_rss_mb"),
        "shared_prompt_tokens": shared_tokens,  # what tuneforge's rows hold: each prompt once (no padding)
    }
    if "tuneforge-rows" in runs:  # the same engine in TRL's layout: what computing each prompt once is worth
        report["rows_layout_speed_ratio_median"] = statistics.median(
            a["tokens_per_second_whole_process"] / b["tokens_per_second_whole_process"]
            for a, b in zip(runs["tuneforge-rows"], runs["trl"]))
        report["rows_layout_rss_ratio_median"] = med("tuneforge-rows", "peak_rss_mb") / med("trl", "peak_rss_mb")
    report["goal_met"] = report["speed_ratio_median"] >= 3 and report["rss_ratio_median"] <= 0.7
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
