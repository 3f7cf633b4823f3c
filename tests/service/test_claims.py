"""The store's claim and compare-and-swap under real concurrency, on SQLite and on PostgreSQL: 4 worker
processes claim 200 queued jobs (each claimed exactly once, none lost), and processes racing to move one
job to different terminal states (exactly one wins).

Worker processes are spawned (no forked connection pools) and import only the store, so they start fast.
"""
from __future__ import annotations

import multiprocessing
import secrets
import time

import pytest

N_JOBS = 200
N_WORKERS = 4
N_RACERS = 6
RACE_JOBS = 25
TARGETS = ("succeeded", "failed", "cancelled")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'claims.db'}"
        return
    from tests.service.conftest import create_pg_database, drop_pg_database

    made = create_pg_database()
    if made is None:
        pytest.skip("PostgreSQL not available here (`.ci/run` starts one and sets TUNEFORGE_TEST_POSTGRES)")
    url, name = made
    yield url
    drop_pg_database(name)


def _job_row(job_id: str, org_id: str) -> dict:
    """A queued job as jobs/service.py builds one (the spec is never read here)."""
    from tuneforge.service.storage.store import now

    return {"id": job_id, "org_id": org_id, "status": "queued", "model": "tiny", "fine_tuned_model": None,
            "training_file": "file-x", "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
            "hyperparameters": {}, "method": {"type": "supervised"}, "spec": {}, "error": None, "created_at": now(),
            "started_at": None, "finished_at": None, "trained_tokens": None, "estimated_finish": None,
            "result_files": [], "requested": None, "worker_id": None, "heartbeat_at": None, "attempts": 0, "step": 0,
            "total_steps": None}


def _open_store(url: str, n_jobs: int, status: str = "queued"):
    from tuneforge.service.storage.store import Store

    store = Store(url)
    store.migrate()
    org = store.create_org("org-" + secrets.token_hex(4), "claims")
    ids = [f"ftjob-{i:04d}-{secrets.token_hex(4)}" for i in range(n_jobs)]
    for job_id in ids:
        store.insert_job({**_job_row(job_id, org["id"]), "status": status})
    return store, ids


def _claim_loop(url: str, worker_id: str, start, results) -> None:
    """What a worker does, minus the training: claim, then CAS running -> succeeded, until the queue is empty."""
    from tuneforge.service.storage.store import Store

    store = Store(url)
    store.get_job("warm-up")  # connect before the start line, so all four begin together
    claimed, finished = [], 0
    start.wait()
    misses = 0
    while misses < 3:  # a miss can be a claim lost to a concurrent one: look again before stopping
        job = store.claim_next_job(worker_id)
        if job is None:
            misses += 1
            time.sleep(0.01)
            continue
        misses = 0
        assert job["status"] == "running" and job["worker_id"] == worker_id
        claimed.append(job["id"])
        finished += store.finish_attempt(job["id"], worker_id, "succeeded", finished_at=int(time.time()))
    store.dispose()
    results.put((worker_id, claimed, finished))


def _race(url: str, racer: int, job_ids: list[str], start, results) -> None:
    """For each job: wait for every racer, then try to end it in this racer's terminal state."""
    from tuneforge.service.storage.store import Store

    store = Store(url)
    store.get_job("warm-up")
    target = TARGETS[racer % len(TARGETS)]
    wins = []
    for job_id in job_ids:
        start.wait()
        if racer % 2:  # half as the worker holding the job, half as another worker's reclaim of it
            won = store.finish_attempt(job_id, "holder", target, finished_at=int(time.time()))
        else:
            won = store.reclaim(job_id, time.time() + 3600, target, finished_at=int(time.time()))
        if won:
            wins.append(job_id)
    store.dispose()
    results.put((racer, target, wins))


def _run_processes(target, args_per_process: list[tuple], results) -> list:
    procs = [multiprocessing.get_context("spawn").Process(target=target, args=args) for args in args_per_process]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return out


def test_four_workers_claim_200_jobs_each_exactly_once(database_url):
    store, ids = _open_store(database_url, N_JOBS)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(N_WORKERS), ctx.Queue()
    t0 = time.time()
    out = _run_processes(_claim_loop, [(database_url, f"w{i}", start, results) for i in range(N_WORKERS)], results)
    elapsed = time.time() - t0

    claims = [job_id for _, claimed, _ in out for job_id in claimed]
    double_claims = len(claims) - len(set(claims))
    lost = set(ids) - set(claims)
    assert double_claims == 0, f"{double_claims} job(s) claimed twice"
    assert not lost, f"{len(lost)} job(s) never claimed"
    assert sum(finished for _, _, finished in out) == N_JOBS, "every claimant's CAS to succeeded must win"
    assert sum(1 for _, claimed, _ in out if claimed) >= 2, "the claims did not interleave (no concurrency tested)"
    rows = [store.get_job(job_id) for job_id in ids]
    assert [r["status"] for r in rows] == ["succeeded"] * N_JOBS
    assert all(r["worker_id"] is None and r["started_at"] is not None for r in rows)
    assert store.claim_next_job("late") is None
    store.dispose()
    assert elapsed < 20, f"claiming {N_JOBS} jobs took {elapsed:.1f} s"


def test_racing_terminal_transitions_have_one_winner(database_url):
    store, ids = _open_store(database_url, RACE_JOBS, status="running")
    for job_id in ids:  # held by "holder", whose heartbeat is old enough for the reclaimers
        store.update_job(job_id, worker_id="holder", heartbeat_at=time.time() - 60)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(N_RACERS), ctx.Queue()
    out = _run_processes(_race, [(database_url, r, ids, start, results) for r in range(N_RACERS)], results)

    winner_of: dict[str, list[str]] = {job_id: [] for job_id in ids}
    for _, target, wins in out:
        for job_id in wins:
            winner_of[job_id].append(target)
    assert {job_id: len(w) for job_id, w in winner_of.items() if len(w) != 1} == {}, "exactly one winner per job"
    for job_id, (target,) in winner_of.items():
        assert store.get_job(job_id)["status"] == target  # and the stored state is the winner's
    store.dispose()


def test_claims_are_fair_between_orgs(database_url):
    """Org A queues 3 jobs before org B queues 1: with A's first job running, the next free worker takes B's
    job, not A's second (the org with the fewest jobs running goes first); a per-org cap skips A altogether."""
    from tuneforge.service.storage.store import Store

    store = Store(database_url)
    store.migrate()
    a = store.create_org("org-" + secrets.token_hex(4), "org-a")
    b = store.create_org("org-" + secrets.token_hex(4), "org-b")
    a_jobs = [f"ftjob-a{i}-{secrets.token_hex(4)}" for i in range(3)]
    for job_id in a_jobs:
        store.insert_job(_job_row(job_id, a["id"]))
    b_job = f"ftjob-b0-{secrets.token_hex(4)}"
    store.insert_job(_job_row(b_job, b["id"]))

    assert store.claim_next_job("w1")["id"] == a_jobs[0]  # nobody runs anything: the oldest
    assert store.claim_next_job("w2")["id"] == b_job  # A runs one, B none: B's, though A's second is older
    assert store.claim_next_job("w3")["id"] == a_jobs[1]  # both run one: the oldest again
    assert store.claim_next_job("w4", max_running_per_org=2) is None  # A runs 2 (at the cap), B has none queued
    assert store.claim_next_job("w4", max_running_per_org=3)["id"] == a_jobs[2]
    store.dispose()
