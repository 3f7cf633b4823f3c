"""How soon a fine-tuning job starts training, and what the service spends on it: forked training attempts
(`tuneforge serve`'s default: each worker imports the training stack once, when the first job is queued,
and forks every attempt from it) against a fresh `python -m tuneforge.service.runner` per attempt
(`--no-fork-attempts`), in the same run, alternating.

Per server (SQLite, one worker, one training thread, the tiny llama of the tests): start it, time `/health`
answering and the API process's resident set then; upload one file; submit --jobs small jobs one after another
(each waits for the one before to succeed) and time, from the client, submit -> first step's metrics event and
submit -> succeeded; stop the server and count the CPU seconds of its whole process tree (this process's
children's rusage after the server exited: every process in it waits for its own children).

    flock .cache/bench.lock .venv/bin/python bench/job_start.py --rounds 2 --out bench/results/job_start.json

Alone on the machine (the figures are seconds of interpreter start-up and imports on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.conftest import CHAT_RECORDS  # noqa: E402
from tests.service.conftest import Server, tiny_job  # noqa: E402

MODES = {"forked": [], "fresh process": ["--no-fork-attempts"]}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def first_metrics(client, job_id: str, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("failed", "cancelled"):
            raise RuntimeError(f"{job_id} {job.status}: {job.error}")
        events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
        if any(e.type == "metrics" for e in events) or job.status == "succeeded":
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"{job_id}: no step within {timeout} s")


def succeeded(client, job_id: str, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status == "succeeded":
            return time.monotonic()
        if job.status in ("failed", "cancelled"):
            raise RuntimeError(f"{job_id} {job.status}: {job.error}")
        time.sleep(0.05)
    raise RuntimeError(f"{job_id} did not finish within {timeout} s")


def one_server(root: Path, model: Path, data: Path, extra: list[str], jobs: int, steps: int) -> dict:
    root.mkdir(parents=True)
    before = children_cpu()
    server = Server(root / "data", model, None, workers=1, extra=extra)
    started = time.monotonic()
    server.start()
    ready = time.monotonic() - started
    api_rss = rss_mb(server.proc.pid)
    client = server.client("bench")
    with open(data, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    to_first_step, to_done = [], []
    try:
        for _ in range(jobs):
            t = time.monotonic()
            job_id = client.fine_tuning.jobs.create(model="tiny", training_file=file_id,
                                                    extra_body=tiny_job(max_steps=steps, save_every=steps)).id
            to_first_step.append(first_metrics(client, job_id) - t)
            to_done.append(succeeded(client, job_id) - t)
    finally:
        server.stop()
    return {"ready_s": ready, "api_rss_mb": api_rss, "to_first_step_s": to_first_step, "to_succeeded_s": to_done,
            "cpu_s": children_cpu() - before}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=4, help="jobs per server, one after another")
    ap.add_argument("--steps", type=int, default=4, help="steps per job")
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = ap.parse_args()

    from tuneforge.models.tiny import make_tiny_model

    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="tf-job-start-") as tmp:
        tmp = Path(tmp)
        model = make_tiny_model("llama", tmp / "llama")
        data = tmp / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2))
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                res = one_server(tmp / f"{mode.replace(' ', '-')}-{r}", model, data, MODES[mode], args.jobs, args.steps)
                results[mode].append(res)
                print(f"round {r + 1} {mode:>13}: ready {res['ready_s']:.2f} s ({res['api_rss_mb']:.0f} MB), "
                      f"first step {', '.join(f'{s:.1f}' for s in res['to_first_step_s'])} s, "
                      f"succeeded {', '.join(f'{s:.1f}' for s in res['to_succeeded_s'])} s, "
                      f"server CPU {res['cpu_s']:.1f} s", flush=True)

    def med(mode: str, key: str, later: bool = False) -> float:
        values = [v for res in results[mode] for v in (res[key][1:] if later else res[key])]
        return statistics.median(values)

    summary = {}
    for mode in MODES:
        summary[mode] = {"first_job_to_first_step_s": statistics.median(r["to_first_step_s"][0] for r in results[mode]),
                         "later_jobs_to_first_step_s": med(mode, "to_first_step_s", later=True),
                         "later_jobs_to_succeeded_s": med(mode, "to_succeeded_s", later=True),
                         "server_cpu_s": statistics.median(r["cpu_s"] for r in results[mode]),
                         "ready_s": statistics.median(r["ready_s"] for r in results[mode]),
                         "api_rss_mb": statistics.median(r["api_rss_mb"] for r in results[mode])}
    f, p = summary["forked"], summary["fresh process"]
    ratios = {"later_jobs_to_first_step": f["later_jobs_to_first_step_s"] / p["later_jobs_to_first_step_s"],
              "server_cpu": f["server_cpu_s"] / p["server_cpu_s"]}
    print(f"\nlater jobs, submit -> first step: forked {f['later_jobs_to_first_step_s']:.2f} s, fresh process "
          f"{p['later_jobs_to_first_step_s']:.2f} s ({ratios['later_jobs_to_first_step']:.2f}x); server CPU for "
          f"{args.jobs} jobs: {f['server_cpu_s']:.1f} s vs {p['server_cpu_s']:.1f} s ({ratios['server_cpu']:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "args": vars(args) | {"out": str(args.out)}, "summary": summary, "ratios": ratios, "rounds": results},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
