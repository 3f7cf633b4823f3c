"""Fault trials, scripted and counted: kill -9 at random (seeded, reproducible) moments of a real `tuneforge
serve` with 2 workers running a few jobs, spread over the API process (the supervisor: its workers and their
trainings die with it, and the server is started again on the same data and database), the workers, the
training subprocesses and the checkpoint writes; then everything is let finish and counted.

Counts (each must be 0): lost jobs (not finished when the trials end), jobs not succeeded, lost and duplicated
metrics events, duplicated terminal events, duplicated models or result files, double claims (two training
processes of one job alive at once, sampled every 50 ms; two claims of the same attempt number), orphan
processes (a training that outlived its worker, anything left after a kill or at the end); and files left
behind (temporaries, partial checkpoint folders), checkpoint rows that disagree with the disk.

The RNG (--seed) fixes the sequence of kinds, targets and moments (a moment: right away, or after the job
advances by N steps); the wall clock still decides what each kill interrupts, so two runs are alike, not equal.

`--kinds sigterm` sends SIGTERM instead (what every deploy sends: to the API process alone, as Docker and
Kubernetes do, or to its whole process group, as systemd does) at random moments, waits for the server to exit
and starts it again. Counted as well: stops that took longer than the grace period or exited non-zero, and
progress lost (steps a running job had reported when the signal came, minus the step it was requeued at: 0 when
every training checkpointed at its step boundary).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fault_trials.py --database sqlite \
        --out bench/results/fault_trials_sqlite.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/fault_trials.py --database postgresql \
        --out bench/results/fault_trials_postgresql.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/fault_trials.py --kinds sigterm --kills 12 --database sqlite \
        --out bench/results/sigterm_trials_sqlite.json

PostgreSQL: a fresh database is made (and dropped) as tests/service/conftest.py does (TUNEFORGE_TEST_POSTGRES,
else the local postgresql://tuneforge:tuneforge@127.0.0.1:5432/postgres).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.conftest import CHAT_RECORDS  # noqa: E402
from tests.service.conftest import Server, create_pg_database, drop_pg_database, tiny_job  # noqa: E402
from tests.service.test_faults import (RUNNER, WORKER, audit_job, group_processes, job_processes, runner_job,  # noqa: E402
                                       kill, last_step, parent_of)

KINDS = {"api": 1, "worker": 2, "runner": 3, "checkpoint": 3, "sigterm": 1}  # an API kill restarts everything (slow)
GRACE_SECONDS = 25.0  # `tuneforge serve`'s default --shutdown-grace-seconds
ATTEMPT_EVENT = re.compile(r"Training attempt (\d+) started by (\S+)")
TERMINAL = ("succeeded", "failed", "cancelled")
OTHER = ("no_adapter", "temporaries", "partial_checkpoints", "checkpoint_rows", "results_csv")


class Sampler(threading.Thread):
    """Every 50 ms: the training processes per job in the live server's process group. Two at once for one
    job is a double claim (two workers training into the same run folder)."""

    def __init__(self, trial: Trial):
        super().__init__(daemon=True)
        self.trial = trial
        self.stop = threading.Event()
        self.samples = 0
        self.double_runs: dict[str, list[int]] = {}

    def run(self) -> None:
        while not self.stop.wait(0.05):
            server = self.trial.server
            if server.proc is None or server.proc.poll() is not None:
                continue
            per_job = defaultdict(list)
            for pid, argv in group_processes(server.proc.pid).items():
                if RUNNER in argv:
                    per_job[runner_job(argv)].append(pid)
            self.samples += 1
            for job_id, pids in per_job.items():
                if len(pids) > 1:
                    self.double_runs.setdefault(job_id, sorted(pids))


class ApiLoad(threading.Thread):
    """Reads through the API all the time, so that an API kill lands mid-request."""

    def __init__(self, trial: Trial):
        super().__init__(daemon=True)
        self.trial, self.stop, self.requests = trial, threading.Event(), 0

    def run(self) -> None:
        import httpx

        while not self.stop.wait(0.05):
            job_id = self.trial.rng_load.choice(self.trial.jobs)
            try:
                httpx.get(f"{self.trial.server.url}/fine_tuning/jobs/{job_id}/events?limit=5", timeout=2,
                          headers={"Authorization": f"Bearer {self.trial.key}"})
                self.requests += 1
            except Exception:  # noqa: BLE001 — the API is down between a kill and the restart
                pass


class Trial:
    def __init__(self, args, root: Path):
        from tuneforge.models.tiny import make_tiny_model

        self.args = args
        self.rng = random.Random(args.seed)
        self.rng_load = random.Random(args.seed + 1)
        self.root = root
        model = make_tiny_model("llama", root / "model")
        self.train = root / "train.jsonl"
        self.train.write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2))
        self.pg_name = None
        database_url = None
        if args.database == "postgresql":
            made = create_pg_database()
            if made is None:
                raise SystemExit("PostgreSQL is not reachable (set TUNEFORGE_TEST_POSTGRES)")
            database_url, self.pg_name = made
        (root / "data").mkdir()
        self.server = Server(root / "data", model, database_url, workers=args.workers)
        self.kills: Counter = Counter()
        self.sigterms: list[dict] = []
        self.kill_log: list[dict] = []
        self.orphans: list[dict] = []
        self.restarts = 0
        self.jobs: list[str] = []
        self.steps: dict[str, int] = {}
        self.key = ""

    # ---------------------------------------------------------------- set-up

    def start(self) -> None:
        self.server.start()
        self.key = self.server.key("trials")
        client = self.server.client("trials")
        with open(self.train, "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        for i in range(self.args.jobs):
            steps = self.args.steps + 20 * i
            save_every = (2, 5, 3, 10, 4)[i % 5]
            job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, seed=i,
                                                 extra_body=tiny_job(max_steps=steps, save_every=save_every))
            self.jobs.append(job.id)
            self.steps[job.id] = steps

    def store(self):
        return self.server.store()

    # ---------------------------------------------------------------- what is running

    def running(self, store) -> list[dict]:
        return [j for j in (store.get_job(i) for i in self.jobs) if j and j["status"] == "running"]

    def runners(self) -> dict[str, int]:
        """{job id: pid} of the live training processes."""
        return {runner_job(argv): pid for pid, argv in group_processes(self.server.proc.pid).items() if RUNNER in argv}

    def unfinished(self, store) -> list[str]:
        return [i for i in self.jobs if store.get_job(i)["status"] not in TERMINAL]

    def wait_moment(self, store, job_id: str | None) -> None:
        """A random moment: right away (often mid start-up) or after the job advances by up to 12 steps.
        A job that has had 4 attempts in a row without a new checkpoint gets one first, so the trials stay
        within max_attempts (10) and test survival, not the give-up rule."""
        if job_id is None:
            time.sleep(self.rng.uniform(0, 2))
            return
        job = store.get_job(job_id)
        advance = self.rng.choice([0, 0, 1, 2, 3, 5, 8, 12])
        if job["attempts"] >= 4:
            deadline = time.time() + 120
            while time.time() < deadline and store.get_job(job_id)["step"] <= job["step"] \
                    and store.get_job(job_id)["status"] == "running":
                time.sleep(0.02)
            return
        target = last_step(store, job_id) + advance
        deadline = time.time() + 60
        while advance and time.time() < deadline and last_step(store, job_id) < target \
                and store.get_job(job_id)["status"] == "running":
            time.sleep(0.01)

    # ---------------------------------------------------------------- the kills

    def kill_api(self, store) -> bool:
        running = self.running(store)
        if running and max(j["attempts"] for j in running) >= 4:
            self.wait_moment(store, max(running, key=lambda j: j["attempts"])["id"])
        else:
            time.sleep(self.rng.uniform(0, 3))
        pgid = self.server.proc.pid
        kill(pgid)
        self.server.proc.wait()
        self.reap(pgid, "api kill")
        self.server.start()
        self.restarts += 1
        return True

    def reap(self, pgid: int, after: str) -> None:
        """Wait up to 10 s for the stopped server's processes to exit; any left is an orphan (then killed)."""
        deadline = time.time() + 10
        while group_processes(pgid) and time.time() < deadline:
            time.sleep(0.05)
        left = group_processes(pgid)
        if left:
            self.orphans.append({"after": after, "processes": {str(p): " ".join(a) for p, a in left.items()}})
            os.killpg(pgid, signal.SIGKILL)

    def kill_sigterm(self, store) -> bool:
        """SIGTERM to the API process or to the whole group, at a random moment of a random training; then what
        each running job kept, and the server started again."""
        job_id = self.pick_running_job(store)
        self.wait_moment(store, job_id)
        running = {j["id"]: last_step(store, j["id"]) for j in self.running(store)}
        to_group = self.rng.random() < 0.5
        pgid, t = self.server.proc.pid, time.time()
        os.killpg(pgid, signal.SIGTERM) if to_group else os.kill(pgid, signal.SIGTERM)
        code = self.server.proc.wait(timeout=GRACE_SECONDS + 60)
        seconds = time.time() - t
        self.reap(pgid, "sigterm")
        kept = {j: store.get_job(j) for j in running}
        self.sigterms.append({
            "to": "group" if to_group else "api", "exit": code, "seconds": round(seconds, 2),
            "jobs": {j[-6:]: {"reported": at, "status": kept[j]["status"], "requeued_at": kept[j]["step"],
                              "lost": max(0, at - kept[j]["step"]) if kept[j]["status"] == "queued" else 0}
                     for j, at in running.items()}})
        self.server.start()
        self.restarts += 1
        return True

    def kill_worker(self, store) -> bool:
        workers = job_processes(self.server.proc.pid, WORKER)
        if not workers:
            return False
        runners = self.runners()
        busy = {parent_of(pid): job_id for job_id, pid in runners.items()}
        pid = self.rng.choice(sorted(workers))
        self.wait_moment(store, busy.get(pid))
        child = next((p for j, p in self.runners().items() if parent_of(p) == pid), None)
        if not kill(pid):
            return False
        if child is not None:  # its training must die with it (PR_SET_PDEATHSIG)
            deadline = time.time() + 5
            while child in group_processes(self.server.proc.pid) and time.time() < deadline:
                time.sleep(0.02)
            if child in group_processes(self.server.proc.pid):
                self.orphans.append({"after": "worker kill", "processes": {str(child): "training outlived its worker"}})
                kill(child)
        return True

    def kill_runner(self, store) -> bool:
        job_id = self.pick_running_job(store)
        if job_id is None:
            return False
        self.wait_moment(store, job_id)
        pid = self.runners().get(job_id)
        return pid is not None and kill(pid)

    def kill_checkpoint(self, store) -> bool | str:
        job_id = self.pick_running_job(store)
        if job_id is None:
            return False
        checkpoints = self.server.data_dir / "jobs" / job_id / "run" / "checkpoints"
        deadline = time.time() + 60
        while time.time() < deadline:  # spin: a tiny model's checkpoint takes milliseconds
            pid = self.runners().get(job_id)
            if pid is None and store.get_job(job_id)["status"] in TERMINAL:
                return False
            try:
                tmp = next((Path(e.path) for e in os.scandir(checkpoints) if e.name.startswith(".tmp-step-")), None)
            except FileNotFoundError:
                tmp = None
            if tmp is not None and pid is not None:
                kill(pid)
                gone_by = time.time() + 5
                while pid in group_processes(self.server.proc.pid) and time.time() < gone_by:
                    time.sleep(0.005)
                return "landed" if tmp.exists() else "missed"
        return False

    def pick_running_job(self, store) -> str | None:
        """A running job with a live training process (waits up to 60 s for one to start)."""
        deadline = time.time() + 60
        while time.time() < deadline:
            live = [j for j in self.runners() if j in self.steps]
            if live:
                return self.rng.choice(sorted(live))
            if not self.unfinished(store):
                return None
            time.sleep(0.05)
        return None

    def run_kills(self) -> None:
        store = self.store()
        try:
            while sum(self.kills.values()) < self.args.kills and self.unfinished(store):
                kind = self.rng.choices(self.args.kinds, [KINDS[k] for k in self.args.kinds])[0]
                t = time.time()
                done = getattr(self, f"kill_{kind}")(store)
                if not done:
                    continue
                label = kind if done is True else f"checkpoint_{done}"
                self.kills[label] += 1
                self.kill_log.append({"n": sum(self.kills.values()), "kind": label, "at": round(t - self.t0, 2),
                                      "steps": {j[-6:]: last_step(store, j) for j in self.jobs}})
                print(f"kill {sum(self.kills.values()):3d}: {label:18s} "
                      f"steps {[last_step(store, j) for j in self.jobs]}", file=sys.stderr, flush=True)
        finally:
            store.dispose()

    # ---------------------------------------------------------------- the count

    def count(self, finish_timeout: float) -> dict:
        store = self.store()
        deadline = time.time() + finish_timeout
        while self.unfinished(store) and time.time() < deadline:
            time.sleep(0.5)
        lost = self.unfinished(store)
        audits = {j: audit_job(store, self.server.data_dir, j, self.steps[j]) for j in self.jobs if j not in lost}
        attempts_per_job, double_attempts = {}, {}
        for j in self.jobs:
            events, _ = store.list_events(j, limit=100_000, after=None)
            claims = [ATTEMPT_EVENT.match(e["message"]).groups() for e in events if ATTEMPT_EVENT.match(e["message"])]
            numbers = Counter(int(n) for n, _ in claims)
            attempts_per_job[j] = len(claims)
            if any(n > 1 for n in numbers.values()):
                double_attempts[j] = {n: c for n, c in numbers.items() if c > 1}
        store.dispose()

        def total(kind: str) -> int:
            return sum(len(a.get(kind, [])) for a in audits.values())

        stops = self.sigterms
        return {"sigterm_stops": len(stops),
                "sigterm_progress_lost_steps": sum(j["lost"] for t in stops for j in t["jobs"].values()),
                "sigterm_jobs_left_running": sum(j["status"] == "running" for t in stops for j in t["jobs"].values()),
                "sigterm_stops_over_grace": sum(t["seconds"] > GRACE_SECONDS for t in stops),
                "sigterm_nonzero_exits": sum(t["exit"] != 0 for t in stops),
                "sigterm_slowest_stop_seconds": max((t["seconds"] for t in stops), default=None),
                "lost_jobs": len(lost), "lost_job_ids": lost,
                "jobs_not_succeeded": len(lost) + sum(1 for a in audits.values() if "not_succeeded" in a),
                "lost_metrics_events": sum(len(a["lost_steps"][0]) for a in audits.values() if "lost_steps" in a),
                "duplicated_metrics_events": sum(len(a["duplicated_steps"][0]) for a in audits.values()
                                                 if "duplicated_steps" in a),
                "duplicated_terminal_events": total("terminal_events"),
                "duplicated_models_or_result_files": total("models") + total("result_files") + total("model_events"),
                "double_claims": len(self.sampler.double_runs) + len(double_attempts),
                "orphan_processes": len(self.orphans),
                "leftover_files": sum(len(x) for a in audits.values() for k in ("temporaries", "partial_checkpoints")
                                      for x in a.get(k, [])),
                "other_problems": {j[-8:]: {k: v for k, v in a.items() if k in OTHER} for j, a in audits.items()
                                   if any(k in a for k in OTHER)},
                "audits": {j[-8:]: a for j, a in audits.items() if a},
                "double_runs_sampled": self.sampler.double_runs, "double_attempt_numbers": double_attempts,
                "orphans": self.orphans, "claims_per_job": attempts_per_job}

    def run(self) -> dict:
        self.t0 = time.time()
        self.start()
        self.sampler, self.load = Sampler(self), ApiLoad(self)
        self.sampler.start()
        self.load.start()
        self.run_kills()
        kills_done = time.time() - self.t0
        self.load.stop.set()
        result = self.count(self.args.finish_timeout)
        self.sampler.stop.set()
        self.sampler.join()
        pgid = self.server.proc.pid
        self.server.stop()
        time.sleep(1)
        left = group_processes(pgid)
        if left:
            self.orphans.append({"after": "server stop", "processes": {str(p): " ".join(a) for p, a in left.items()}})
            result["orphan_processes"] = len(self.orphans)
            os.killpg(pgid, signal.SIGKILL)
        if self.pg_name:
            drop_pg_database(self.pg_name)
        return {"database": self.args.database, "seed": self.args.seed, "workers": self.args.workers,
                "jobs": len(self.jobs), "steps_per_job": [self.steps[j] for j in self.jobs],
                "kills": sum(self.kills.values()), "kill_breakdown": dict(sorted(self.kills.items())),
                "server_restarts": self.restarts, "api_requests_made": self.load.requests,
                "process_samples": self.sampler.samples,
                "wall_seconds": round(time.time() - self.t0, 1), "kills_phase_seconds": round(kills_done, 1),
                **result, "kill_log": self.kill_log, "sigterm_log": self.sigterms}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--kills", type=int, default=50, help="kill -9s (or SIGTERMs) to deliver (default 50)")
    p.add_argument("--kinds", type=lambda t: t.split(","), default=["api", "worker", "runner", "checkpoint"],
                   help=f"comma-separated, of {', '.join(KINDS)} (default: every kill -9 kind)")
    p.add_argument("--jobs", type=int, default=4, help="jobs (default 4)")
    p.add_argument("--steps", type=int, default=200, help="steps of the first job; each next one 20 more")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finish-timeout", type=float, default=600, help="seconds to let the jobs finish after the kills")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--keep", action="store_true", help="keep the data folder (printed) for inspection")
    args = p.parse_args()
    if not args.kinds or set(args.kinds) - set(KINDS):
        p.error(f"--kinds: choose from {', '.join(KINDS)}")
    root = Path(tempfile.mkdtemp(prefix="fault-trials-"))
    try:
        result = Trial(args, root).run()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["data_dir"] = str(root) if args.keep else None
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
