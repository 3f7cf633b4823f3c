"""Run many small trainings inside one pair of ranks (forked with the imports done; paid once), each in its own process
group: RANK / WORLD_SIZE / MASTER_* are set as torch.distributed.run sets them, and the recipe builds the
spec's strategy from them exactly as in a launched rank."""
from __future__ import annotations

import importlib
import json
import os
import socket
import time
import traceback
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_port(rank: int, index: int, results: str) -> int:
    """A free port for job `index`, picked by rank 0 just before the job and read by the others from a file.
    (Ports picked long before use collide: gloo's connections in earlier jobs take ephemeral ports.)"""
    path = Path(results, f"port-{index:04d}")
    if rank == 0:
        Path(results, f".port-{index:04d}").write_text(str(free_port()))
        os.rename(Path(results, f".port-{index:04d}"), path)  # atomic: readers never see a partial number
    deadline = time.time() + 300
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank 0 never picked a port for job {index}")
        time.sleep(0.01)
    return int(path.read_text())


def _all_here(rank: int, world: int, index: int, results: str) -> None:
    """Every rank starts job `index` only when all have finished the one before. Without it, a job that failed on
    one rank early (say, its rendezvous port taken by another test's server in the meantime) and on the other
    only at the collective timeout put the ranks one job apart for good: every later job then timed out too."""
    Path(results, f"ready-{index:04d}-{rank}").touch()
    deadline = time.time() + 300
    while not all(Path(results, f"ready-{index:04d}-{r}").exists() for r in range(world)):
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank}: the other ranks never reached job {index}")
        time.sleep(0.01)


def _rank_main(rank: int, world: int, jobs: list[dict], results: str, env: dict) -> None:
    os.environ.clear()  # the caller's, not the fork server's (started earlier, with the environment of then)
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "DS_ACCELERATOR": "cpu"})
    from tuneforge.spec import build_spec
    from tuneforge.training.recipe import train

    out = {}
    for index, job in enumerate(jobs):
        _all_here(rank, world, index, results)
        os.environ["MASTER_PORT"] = str(_job_port(rank, index, results))
        name, kwargs, call = job.pop("_name"), job.pop("_train", {"overwrite": True}), job.pop("_call", None)
        started = time.perf_counter()
        try:
            if call:  # "module:function", called as function(rank, world, **job); returns JSON
                module, function = call.split(":")
                value = getattr(importlib.import_module(module), function)(rank, world, **job)
                out[name] = {"ok": True, "value": value}
                continue
            summary = train(build_spec(job), **kwargs)
            out[name] = {"ok": True, "steps": summary.steps, "status": summary.status,
                         "seconds": round(time.perf_counter() - started, 2)}
        except Exception as e:  # recorded; the test reports it
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))
    # Leave without the interpreter's teardown: once (one suite run of this session's five, under load) rank 1 aborted there with
    # "terminate called without an active exception" after all 52 jobs had succeeded and been written, which
    # failed every test sharing these runs. A launched rank runs one job per process (tests/distributed/test_launch.py
    # and test_deepspeed.py run those through the real launcher and check their exit codes).
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_in_ranks(jobs: list[dict], results: Path, world: int = 2) -> dict:
    """Run `jobs` (spec dicts with a `_name`, `_train`: train()'s keyword arguments; or `_call`: a function
    "module:name" called with (rank, world, **job)) one after another in `world` spawned ranks; return
    {name: {"ok", "error", "value"}} as rank 0 saw it (other ranks' failures are merged in; `per_rank`: each
    rank's `value` of a `_call` job)."""
    import torch.multiprocessing as mp

    from tests.cli_runner import preloaded_forkserver

    results.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    preloaded_forkserver()  # the ranks are forked with torch, transformers and peft imported (tests/cli_runner.py)
    mp.start_processes(_rank_main, args=(world, jobs, str(results), dict(os.environ)), nprocs=world, join=True,
                       start_method="forkserver")
    per_rank = [json.loads((results / f"rank{r}.json").read_text()) for r in range(world)]
    merged = dict(per_rank[0])
    for name in merged:
        failed = [ranks[name] for ranks in per_rank if not ranks[name]["ok"]]
        merged[name] = failed[0] if failed else merged[name]
        if "value" in merged[name]:
            merged[name]["per_rank"] = [ranks[name]["value"] for ranks in per_rank]
    return merged
