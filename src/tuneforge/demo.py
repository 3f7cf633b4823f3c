"""`make demo`: teach SmolLM2-135M-Instruct to triage support tickets into strict JSON, and show
base vs fine-tuned answers and held-out metrics side by side."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tuneforge import api
from tuneforge.demo_data import score_answer, summarise, write_demo_data

DEMO_SPEC = {
    "model": "smollm2-135m-instruct",
    "task": "chat",
    "data": {"train": "data/generated/demo/train.jsonl", "validation": "data/generated/demo/valid.jsonl"},
    "method": "lora",
    "adapter": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    "training": {"epochs": 2, "batch_size": 8, "lr": 1.0e-3, "scheduler": "cosine", "warmup_ratio": 0.05,
                 "max_seq_len": 256, "eval_every": 10, "save_every": 20},
    "output_dir": "runs/demo",
}
MAX_NEW_TOKENS = 48
SHOW = 5


def _evaluate(model, heldout: list[dict]) -> tuple[list[str], dict]:
    prompts = [r["messages"][:-1] for r in heldout]
    outputs = api.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=8)
    scores = [score_answer(o, r["messages"][-1]["content"]) for o, r in zip(outputs, heldout)]
    return outputs, summarise(scores)


def _clip(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(output_dir: str = "runs/demo", epochs: float = 2, overwrite: bool = True) -> int:
    """Replaces an earlier demo's run in `output_dir` (only a folder tuneforge made; checked first)."""
    from tuneforge.spec import build_spec
    from tuneforge.training.recipe import plan_output

    started = time.time()
    data_dir = Path("data/generated/demo")
    spec = {**DEMO_SPEC, "output_dir": output_dir,
            "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "valid.jsonl")},
            "training": {**DEMO_SPEC["training"], "epochs": epochs}}
    plan_output(build_spec(spec), resume=False, overwrite=overwrite)  # before any work or write
    paths = write_demo_data(data_dir)
    heldout = [json.loads(l) for l in Path(paths["heldout"]).read_text().splitlines() if l.strip()]

    print(f"[1/3] base model on {len(heldout)} held-out tickets …", file=sys.stderr)
    base = api.load("smollm2-135m-instruct")
    base_out, base_metrics = _evaluate(base, heldout)
    del base

    print("[2/3] LoRA fine-tuning …", file=sys.stderr)
    summary = api.train(spec, overwrite=overwrite)

    print("[3/3] fine-tuned model on the same tickets …", file=sys.stderr)
    tuned_out, tuned_metrics = _evaluate(api.load(output_dir), heldout)

    lines = ["", "Held-out tickets: base vs fine-tuned (greedy decoding)", "=" * 72]
    for r, b, t in list(zip(heldout, base_out, tuned_out))[:SHOW]:
        lines += [f"ticket    : {_clip(r['messages'][-2]['content'])}",
                  f"reference : {_clip(r['messages'][-1]['content'])}",
                  f"base      : {_clip(b)}",
                  f"fine-tuned: {_clip(t)}", "-" * 72]
    lines += ["", f"{'metric (n=' + str(len(heldout)) + ')':<22}{'base':>10}{'fine-tuned':>12}"]
    for key in ("format_rate", "category_accuracy", "urgency_accuracy", "exact_match"):
        lines.append(f"{key:<22}{base_metrics[key]:>10.1%}{tuned_metrics[key]:>12.1%}")
    lines += ["", f"training: {summary.steps} steps, {summary.train_tokens:,} tokens/epoch, "
                  f"{summary.tokens_per_second:.0f} tokens/s, final eval loss {summary.final_eval_loss:.3f}, "
                  f"peak RSS {summary.peak_rss_mb:.0f} MB",
              f"demo wall time {time.time() - started:.0f} s; run folder: {output_dir} "
              f"(try: .venv/bin/tuneforge chat {output_dir})"]
    print("\n".join(lines))
    report = {"base": base_metrics, "fine_tuned": tuned_metrics, "summary": summary.model_dump(),
              "examples": [{"ticket": r["messages"][-2]["content"], "reference": r["messages"][-1]["content"],
                            "base": b, "fine_tuned": t} for r, b, t in zip(heldout, base_out, tuned_out)]}
    (Path(output_dir) / "demo_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return 0
