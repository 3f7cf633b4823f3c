"""Question: how much faster does a fine-tuned SmolLM2 run once exported, and does each export keep its quality?

One run, one machine: SmolLM2-135M-Instruct with a LoRA adapter (r=16, all-linear) trained on the demo's
ticket-triage data (or `--run` an existing run), exported with `tuneforge.export` to ONNX Runtime GenAI
fp32 / int8 / int4 (and GGUF f16 / q8_0, run in llama.cpp when llama-cpp-python is installed). Each export
passes or fails its own gates (export.json: greedy tokens, held-out loss, adapter present). Then, per engine,
on the same held-out prompts: prefill ms (the prompt in one forward, to the first token's logits) and decode
ms/token (`--new-tokens` greedy steps, one token each, with the KV cache). The peer is PyTorch eager fp32
(the merged model; the unmerged peft model is shown too), measured in the same process and run.

    flock .cache/bench.lock .venv/bin/python bench/export_speed.py --out bench/results/export_speed.json

or, exporting (slow gates, not timed) outside the lock and timing inside it:

    .venv/bin/python bench/export_speed.py --work runs/export-bench --export-only
    flock .cache/bench.lock .venv/bin/python bench/export_speed.py --work runs/export-bench --run runs/export-bench/run \
        --reuse-exports --out bench/results/export_speed.json

Threads: `--threads` (default 2) for every engine; OMP_WAIT_POLICY=PASSIVE so PyTorch's OpenMP workers do not
spin against ONNX Runtime's between measurements.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
GOAL_INT4_DECODE_SPEEDUP = 8.0


def train_run(out: Path, steps: int) -> Path:
    import tuneforge
    from tuneforge.demo_data import write_demo_data

    data = write_demo_data(out / "data", 160, 40, n_valid=20)
    spec = {"model": "smollm2-135m-instruct", "task": "chat",
            "data": {"train": str(data["train"]), "validation": str(data["valid"])},
            "method": "lora", "adapter": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "training": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "scheduler": "cosine", "warmup_ratio": 0.05,
                         "max_seq_len": 256, "eval_every": 1000, "save_every": 1000},
            "eval": {"data": str(data["heldout"]), "before_after": False},
            "output_dir": str(out / "run")}
    summary = tuneforge.train(spec, progress=False)
    assert summary.status == "succeeded", summary
    return out / "run"


def time_torch(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[float]]:
    prefill, decode = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            prefill.append(time.perf_counter() - start)
            past = out.past_key_values
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode.append((time.perf_counter() - start) / new_tokens)
    return prefill, decode


def time_onnx(runner, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[float]]:
    og = runner.og
    prefill, decode = [], []
    for prompt in prompts:
        params = og.GeneratorParams(runner.model)
        total = len(prompt) + new_tokens + 1
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(runner.model, params)
        if runner.active is not None:
            generator.set_active_adapter(runner.adapters, runner.active)
        start = time.perf_counter()
        generator.append_tokens(prompt)  # runs the prompt; logits of its last position ready
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(new_tokens):
            generator.generate_next_token()  # picks a token and runs it through the model
        decode.append((time.perf_counter() - start) / new_tokens)
    return prefill, decode


def llamacpp_model(path: Path, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)


def time_llamacpp(llm, prompts: list[list[int]], new_tokens: int):
    prefill, decode = [], []
    for prompt in prompts:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(new_tokens):
            # the last position's logits straight from llama.cpp (Llama.scores holds them only with logits_all)
            token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
            llm.eval([token])
        decode.append((time.perf_counter() - start) / new_tokens)
    return prefill, decode


def row(name: str, prefill: list[float], decode: list[float], **extra) -> dict:
    return {"engine": name, "prefill_ms": round(1000 * statistics.median(prefill), 2),
            "decode_ms_per_token": round(1000 * statistics.median(decode), 2), **extra}


def quality(record: dict) -> dict:
    g = {x["name"]: x for x in record["gates"]}
    tokens = g.get("greedy_tokens") or g.get("greedy_tokens_info")
    task = g.get("task_metric", {}).get("detail", {})
    return {"gates_passed": record["passed"], "task_token_f1": task.get("token_f1_export"),
            "task_token_f1_pytorch": task.get("token_f1_pytorch"),
            "share_of_gain_lost": g["heldout_loss"]["detail"].get("share_of_gain_lost"),
            "heldout_loss": round(g["heldout_loss"]["detail"]["export"], 4),
            "loss_drift": round(g["heldout_loss"]["detail"]["relative_drift"], 5),
            "loss_tolerance": g["heldout_loss"]["detail"]["tolerance"],
            "greedy_identical": f"{tokens['detail']['identical']}/{tokens['detail']['prompts']}",
            "adapter_agreement": f"{g['adapter_present']['detail']['export_agrees_with_finetune']}/"
                                 f"{g['adapter_present']['detail']['positions_where_finetune_differs']}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="an existing SmolLM2 LoRA run (default: train one, --steps steps)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds over all engines")
    parser.add_argument("--work", help="folder for the run and the exports (default: a temporary folder)")
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    parser.add_argument("--reuse-exports", action="store_true", help="use the exports (and their gates) already in "
                        "--work instead of exporting again (export outside the benchmark lock, time inside it)")
    parser.add_argument("--export-only", action="store_true", help="make the exports (with their gates) and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the script is the entry point: process-wide settings belong here

    from tuneforge.export import export_gguf, export_onnx, gates
    from tuneforge.export.onnx import OnnxRunner, load_run

    work_ctx = tempfile.TemporaryDirectory(prefix="export-speed-") if not args.work else None
    work = Path(args.work) if args.work else Path(work_ctx.name)
    t0 = time.perf_counter()
    run = Path(args.run) if args.run else train_run(work, args.steps)
    train_s = time.perf_counter() - t0

    exports, records = {}, {}
    for precision in ("fp32", "int8", "int4"):
        exports[precision] = work / f"onnx-{precision}"
        if args.reuse_exports and (exports[precision] / "export.json").is_file():
            records[precision] = json.loads((exports[precision] / "export.json").read_text())
            continue
        start = time.perf_counter()
        try:
            records[precision] = export_onnx(run, work / f"onnx-{precision}", precision, threads=args.threads,
                                             keep_failed=True)
        except gates.GateFailed as e:  # measured anyway, reported as failed
            records[precision] = e.record
        records[precision]["export_seconds"] = round(time.perf_counter() - start, 1)
        exports[precision] = work / f"onnx-{precision}"
        print(f"onnx {precision}: gates {'passed' if records[precision]['passed'] else 'FAILED'} "
              f"in {records[precision]['export_seconds']} s", file=sys.stderr)
    try:
        import llama_cpp  # noqa: F401

        have_llamacpp = True
    except ImportError:
        have_llamacpp = False
    for qtype in ("f16", "q8_0"):
        path = work / f"model-{qtype}.gguf"
        if args.reuse_exports and path.with_name(path.name + ".export.json").is_file():
            records[qtype] = json.loads(path.with_name(path.name + ".export.json").read_text())
            continue
        start = time.perf_counter()
        try:
            records[qtype] = export_gguf(run, path, qtype, keep_failed=True)
        except gates.GateFailed as e:
            records[qtype] = e.record
        records[qtype]["export_seconds"] = round(time.perf_counter() - start, 1)
        print(f"gguf {qtype}: gates {'passed' if records[qtype].get('passed') else 'FAILED'}", file=sys.stderr)

    if args.export_only:
        return 0
    # the same held-out prompts for every engine
    spec, loaded = load_run(run)
    held = gates.heldout_data(loaded, spec, None, max_prompts=args.prompts)
    prompts = held.prompts
    tuned_loss = next(g for g in records["fp32"]["gates"] if g["name"] == "heldout_loss")["detail"]["pytorch"]
    # every engine loaded at once, then measured in interleaved rounds (engine after engine, round after round),
    # so a busy neighbour slows them all alike; the medians over rounds and prompts are reported
    merged = copy.deepcopy(loaded.model).merge_and_unload()
    engines = {"pytorch eager fp32 (merged)": ("torch", merged),
               "pytorch eager fp32 (peft, adapter applied)": ("torch", loaded.model)}
    for precision in ("fp32", "int8", "int4"):
        engines[f"onnxruntime-genai {precision}"] = ("onnx", OnnxRunner(exports[precision], threads=args.threads))
    if have_llamacpp:
        for qtype in ("f16", "q8_0"):
            engines[f"llama.cpp gguf {qtype}"] = ("llamacpp", llamacpp_model(work / f"model-{qtype}.gguf", args.threads))
    timings = {name: ([], []) for name in engines}
    for _ in range(args.rounds):
        for name, (kind, engine) in engines.items():
            timer = {"torch": time_torch, "onnx": time_onnx, "llamacpp": time_llamacpp}[kind]
            prefill, decode = timer(engine, prompts, args.new_tokens)
            timings[name][0].extend(prefill)
            timings[name][1].extend(decode)
    extras = {"pytorch eager fp32 (merged)": {"heldout_loss": round(tuned_loss, 4), "note": "the peer"},
              "pytorch eager fp32 (peft, adapter applied)": {"heldout_loss": round(tuned_loss, 4)}}
    for precision in ("fp32", "int8", "int4"):
        extras[f"onnxruntime-genai {precision}"] = quality(records[precision])
    for qtype in ("f16", "q8_0"):
        extras[f"llama.cpp gguf {qtype}"] = {**quality(records[qtype]), "gate_engine": "transformers GGUF loader"}
    if have_llamacpp:  # the GGUF files in llama.cpp itself: greedy tokens against PyTorch on the same prompts
        from tuneforge.export.gguf import LlamaCppRunner
        from tuneforge.inference import stop_ids

        stops = stop_ids(loaded.tokenizer)
        expected = [gates.TorchRunner(merged).greedy(p, args.new_tokens, stops) for p in prompts]
        for qtype in ("f16", "q8_0"):
            runner = LlamaCppRunner(work / f"model-{qtype}.gguf", threads=args.threads)
            got = [runner.greedy(p, args.new_tokens, stops) for p in prompts]
            extras[f"llama.cpp gguf {qtype}"]["llamacpp_greedy_identical"] = \
                f"{sum(a == b for a, b in zip(expected, got))}/{len(prompts)}"
            del runner
    rows = [row(name, *timings[name], **extras[name]) for name in engines]
    del engines, merged, loaded
    peer = rows[0]
    for r in rows:
        r["prefill_speedup"] = round(peer["prefill_ms"] / r["prefill_ms"], 2)
        r["decode_speedup"] = round(peer["decode_ms_per_token"] / r["decode_ms_per_token"], 2)
    int4 = next(r for r in rows if r["engine"] == "onnxruntime-genai int4")
    result = {
        "question": "prefill and decode speed of exported SmolLM2+LoRA vs PyTorch eager, each export with its gates",
        "command": "flock .cache/bench.lock .venv/bin/python bench/export_speed.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads": args.threads,
                    "load_average_at_end": os.getloadavg()},
        "model": "smollm2-135m-instruct + LoRA r=16 all-linear", "run": str(run),
        "train_seconds": round(train_s, 1) if not args.run else None,
        "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "new_tokens": args.new_tokens,
        "rounds": args.rounds, "method": "median over rounds x prompts; engines interleaved within each round",
        "rows": rows,
        "exports": {k: {"passed": v.get("passed"), "export_seconds": v.get("seconds"),
                        "build_seconds": v.get("build_seconds") or v.get("write_seconds"),
                        "bytes": v.get("bytes"), "gates": v.get("gates")} for k, v in records.items()},
        "llama_cpp": have_llamacpp,
        "goal": {"int4_decode_speedup_at_least": GOAL_INT4_DECODE_SPEEDUP, "int4_decode_speedup": int4["decode_speedup"],
                 "int4_gates_passed": int4["gates_passed"],
                 "met": int4["decode_speedup"] >= GOAL_INT4_DECODE_SPEEDUP and int4["gates_passed"]},
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    for r in rows:
        print(f"{r['engine']:45s} prefill {r['prefill_ms']:8.1f} ms  decode {r['decode_ms_per_token']:7.2f} ms/token "
              f"({r['decode_speedup']:.2f}x)  loss {r.get('heldout_loss')}  gates {r.get('gates_passed', '-')}",
              file=sys.stderr)
    if work_ctx:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
