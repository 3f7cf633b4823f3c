"""Question: how much memory does each rank hold when full fine-tuning SmolLM2-135M-Instruct at 2 ranks,
per strategy (none / ddp / zero1 / zero2 / zero3 / zero3+offload) and backend (torch, deepspeed)?

Each configuration is one `tuneforge train SPEC --json` (the real launcher; `none` is one process),
fp32, batch 1 per rank, 3 steps. Per-rank peak RSS is each rank process's VmHWM, polled every 50 ms
from /proc while it runs (VmHWM only grows, so the last reading is the peak up to 50 ms before exit).
Every rank also loads the whole model before sharding it, so the peak includes one full copy of the
weights; ZeRO's saving is in what stays resident through the steps (the optimizer state and
gradients, 3x the weights for full fine-tuning with AdamW). On 2 cores these runs prove memory, not
speed. Run alone:

    flock .cache/bench.lock .venv/bin/python bench/distributed_memory.py > bench/results/distributed_memory.json

`--model FOLDER` runs the same configurations on another model (e.g. a tiny one, to check the script itself
in seconds: `--model runs/tiny-llama --only zero1:torch`).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CONFIGS = [("none", None), ("ddp", "torch"), ("zero1", "torch"), ("zero2", "torch"), ("zero3", "torch"),
           ("zero3+offload", "torch"), ("ddp", "deepspeed"), ("zero1", "deepspeed"), ("zero2", "deepspeed"),
           ("zero3", "deepspeed"), ("zero3+offload", "deepspeed")]


def make_data(path: Path, n: int = 16) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Ticket {i}: my order {1000 + i} has not arrived yet, why?"},
                          {"role": "assistant", "content": f"Order {1000 + i} ships tomorrow; tracking follows by email."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _ranks(parent: int) -> dict[int, int]:
    found = {}
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        rank = next((kv.split("=", 1)[1] for kv in env if kv.startswith("RANK=")), None)
        if rank is not None:
            found[int(rank)] = int(child)
    return found


def run(strategy: str, backend: str | None, data: Path, work: Path, steps: int,
        model: str = "smollm2-135m-instruct") -> dict:
    name, _, offload = strategy.partition("+")
    spec = {"model": model, "task": "chat", "data": {"train": str(data)}, "method": "full",
            "training": {"max_steps": steps, "batch_size": 1, "lr": 1e-5, "precision": "fp32", "max_seq_len": 128,
                         "save_every": 1000, "eval_every": 1000, "warmup_ratio": 0.0},
            "device": "cpu", "output_dir": str(work / f"{strategy}-{backend}")}
    if backend:
        spec["distributed"] = {"strategy": name, "backend": backend, "nproc": 2, "master_port": free_port(),
                               "offload": ("parameters" if name == "zero3" else "optimizer") if offload else "none"}
    else:
        spec["training"]["grad_accum"] = 2  # the same global batch in one process
    path = work / f"{strategy}-{backend}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(path), "--json", "--quiet",
                             "--overwrite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        pids = _ranks(proc.pid) if backend else {0: proc.pid}
        for rank, pid in pids.items():
            hwm = _hwm_kb(pid)
            if hwm:
                peaks[rank] = max(peaks.get(rank, 0), hwm)
        time.sleep(0.05)
    out, err = proc.communicate()
    result = {"strategy": strategy, "backend": backend or "-", "ranks": 2 if backend else 1,
              "ok": proc.returncode == 0, "wall_s": round(time.time() - started, 1),
              "peak_rss_mb_per_rank": [round(peaks[r] / 1024) for r in sorted(peaks)]}
    if proc.returncode == 0:
        summary, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
        result["final_train_loss"] = summary["final_train_loss"]
    else:
        result["error"] = err.strip().splitlines()[-1][:300] if err.strip() else f"exit {proc.returncode}"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="configs as STRATEGY:BACKEND, e.g. zero3:torch none:")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or folder (default: SmolLM2)")
    args = ap.parse_args()
    configs = [c for c in CONFIGS if not args.only or f"{c[0]}:{c[1] or ''}" in args.only]
    with tempfile.TemporaryDirectory(prefix="tuneforge-distmem-") as tmp:
        work = Path(tmp)
        data = make_data(work / "train.jsonl")
        results = []
        for strategy, backend in configs:
            results.append(run(strategy, backend, data, work, args.steps, args.model))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"question": "per-rank peak RSS, full fine-tuning "
                      + ("SmolLM2-135M-Instruct" if args.model == "smollm2-135m-instruct" else args.model) + ", 2 ranks, fp32",
                      "machine": f"{os.cpu_count()} cores", "steps": args.steps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
