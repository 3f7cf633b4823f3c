"""How close are `tuneforge plan`'s predictions to real runs? (docs/plan.md)

For each run: the planner predicts peak RSS and step time (in this process, before the run; its calibration
probe is cached), then `tuneforge train` runs it in a fresh process on fixed-length text (every micro-batch
exactly batch x max_seq_len tokens), and the prediction is compared with the measured peak RSS and the
median step time after the first step. Run it alone:

    flock .cache/bench.lock .venv/bin/python bench/plan_accuracy.py --out bench/results/plan_accuracy.json
    flock .cache/bench.lock .venv/bin/python bench/plan_accuracy.py --showcase --out bench/results/plan_showcase.json

`--showcase`: `plan` for a Phi-3-mini-shaped model (tests/data/phi3-mini/config.json) in 24 GiB, then one real
QLoRA training step on a random-weight model of that shape (written once under runs/, ~7.6 GB bf16 on disk).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [  # (method, batch, max_seq_len, training overrides)
    ("lora", 4, 256, {}),
    ("lora", 4, 256, {"gradient_checkpointing": True}),
    ("lora", 2, 512, {}),
    ("lora", 1, 1024, {"gradient_checkpointing": True}),
    ("full", 4, 256, {}),
    ("dora", 2, 256, {}),
    ("ia3", 4, 256, {}),
    ("prompt_tuning", 4, 256, {}),
    ("qlora", 4, 256, {}),  # gradient checkpointing on: QLoRA's default
    ("qlora", 2, 512, {"gradient_checkpointing": False}),
    ("lora", 8, 128, {"packing": True}),
]


def spec_for(model: str, data: Path, method: str, batch: int, seq: int, steps: int, training: dict) -> dict:
    return {"model": model, "task": "text", "data": {"train": str(data)}, "method": method, "device": "cpu",
            "training": {"max_steps": steps, "batch_size": batch, "max_seq_len": seq, "save_every": 1000,
                         "eval_every": 1000, "group_by_length": False, **training}}


def predict_and_measure(spec: dict, run_dir: Path) -> dict:
    from tuneforge import api
    from tuneforge.planning.measure import measure_run

    t0 = time.perf_counter()
    row = api.plan(spec, methods=(spec["method"],), use_cache=False).rows_[0]  # probe timed now, alone
    plan_seconds = time.perf_counter() - t0
    m = measure_run(spec, run_dir)
    rec = {"method": spec["method"], "batch": spec["training"]["batch_size"], "seq_len": spec["training"]["max_seq_len"],
           "gradient_checkpointing": row.gradient_checkpointing, "packing": spec["training"].get("packing", False),
           "predicted_peak_mb": row.predicted_peak_mb, "measured_peak_mb": round(m.peak_rss_mb, 1),
           "peak_error": row.predicted_peak_mb / m.peak_rss_mb - 1,
           "predicted_step_seconds": row.predicted_step_seconds, "measured_step_seconds": m.step_seconds,
           "first_step_seconds": m.first_step_seconds, "steps": m.steps, "plan_seconds": plan_seconds}
    rec["step_error"] = (row.predicted_step_seconds / m.step_seconds - 1) if row.predicted_step_seconds else None
    return rec


def accuracy(args) -> dict:
    from tuneforge.models import resolve_model
    from tuneforge.planning.measure import write_fixed_length_text

    resolve_model("smollm2-135m-instruct")
    work = ROOT / "runs" / "plan_accuracy"
    work.mkdir(parents=True, exist_ok=True)
    data = write_fixed_length_text(work / "text.jsonl", 64)
    results = []
    for i, (method, batch, seq, training) in enumerate(RUNS):
        if args.only and i not in args.only:
            continue
        spec = spec_for("smollm2-135m-instruct", data, method, batch, seq, args.steps, training)
        rec = predict_and_measure(spec, work / f"run{i}-{method}-{batch}x{seq}")
        results.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
    worst_peak = max(results, key=lambda r: abs(r["peak_error"]))
    timed = [r for r in results if r["step_error"] is not None]
    worst_step = max(timed, key=lambda r: abs(r["step_error"])) if timed else None
    return {"model": "smollm2-135m-instruct", "steps": args.steps, "runs": results,
            "worst_peak_error": worst_peak["peak_error"], "worst_step_error": worst_step["step_error"] if worst_step else None}


def showcase(args) -> dict:
    """plan Phi-3-mini in 24 GiB; then a real QLoRA step on random weights of that shape."""
    import torch

    from tuneforge import api
    from tuneforge.models.load import build_once
    from tuneforge.planning.measure import measure_run, write_fixed_length_text

    config_dir = ROOT / "tests" / "data" / "phi3-mini"
    base = {"model": str(config_dir), "task": "text", "data": {"train": "-"}, "method": "qlora", "device": "cpu",
            "training": {"max_steps": 1, "batch_size": 1, "max_seq_len": args.showcase_seq, "save_every": 1000,
                         "eval_every": 1000}}
    planned = api.plan(base, memory_gb=24).as_dict()
    print(json.dumps({r["method"]: (r["predicted_peak_mb"], r["fits"]) for r in planned["combinations"]}),
          file=sys.stderr, flush=True)

    def build(tmp: Path) -> None:  # random weights of Phi-3-mini's shape, bf16, with a byte-level tokenizer
        from transformers import AutoConfig, AutoModelForCausalLM

        from tuneforge.models.tiny import make_tokenizer

        config = AutoConfig.from_pretrained(config_dir)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        make_tokenizer("phi3").save_pretrained(tmp)

    t0 = time.perf_counter()
    folder = build_once(ROOT / "runs" / "phi3-mini-random", build)
    build_seconds = time.perf_counter() - t0
    work = ROOT / "runs" / "plan_showcase"
    work.mkdir(parents=True, exist_ok=True)
    data = write_fixed_length_text(work / "text.jsonl", 4, words=args.showcase_seq * 2)
    spec = {**base, "model": str(folder), "data": {"train": str(data)},
            "training": {**base["training"], "max_steps": args.showcase_steps}}
    from tuneforge.planning.measure import measure_run as _measure  # noqa: F401

    t0 = time.perf_counter()
    row = api.plan(spec, methods=("qlora",), memory_gb=24, use_cache=False).rows_[0]
    plan_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = measure_run(spec, work / "qlora", timeout=args.timeout)
    return {"plan_24gib": planned, "model_build_seconds": build_seconds, "plan_seconds": plan_seconds,
            "predicted_peak_mb": row.predicted_peak_mb, "measured_peak_mb": m.peak_rss_mb,
            "peak_error": row.predicted_peak_mb / m.peak_rss_mb - 1,
            "predicted_step_seconds": row.predicted_step_seconds, "measured_step_seconds": m.step_seconds,
            "run_seconds": time.perf_counter() - t0, "summary": m.summary}


def render(result: dict) -> str:
    """The accuracy table of docs/plan.md from a results file."""
    lines = ["| # | method | batch × length | checkpointing | packing | predicted peak (MB) | measured peak (MB) | error |"
             " predicted s/step | measured s/step | error |", "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(result["runs"], 1):
        step_err = f"{100 * r['step_error']:+.0f} %" if r["step_error"] is not None else "–"
        pstep = f"{r['predicted_step_seconds']:.2f}" if r["predicted_step_seconds"] else "–"
        lines.append(f"| {i} | {r['method']} | {r['batch']} × {r['seq_len']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{'on' if r['packing'] else 'off'} | {r['predicted_peak_mb']:.0f} | {r['measured_peak_mb']:.0f} | "
                     f"{100 * r['peak_error']:+.1f} % | {pstep} | {r['measured_step_seconds']:.2f} | {step_err} |")
    lines.append("")
    lines.append(f"Largest peak error: {100 * result['worst_peak_error']:+.1f} %; largest step-time error: "
                 + (f"{100 * result['worst_step_error']:+.0f} %." if result["worst_step_error"] is not None else "–."))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed; the resident set settles by the third)")
    parser.add_argument("--only", type=lambda s: {int(x) for x in s.split(",")}, help="indices into RUNS")
    parser.add_argument("--showcase", action="store_true")
    parser.add_argument("--showcase-seq", type=int, default=128)
    parser.add_argument("--showcase-steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--render", type=Path, help="print the markdown table of a results file and exit")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    result = showcase(args) if args.showcase else accuracy(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
