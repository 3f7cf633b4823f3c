"""Run many small trainings inside one pair of spawned ranks (imports paid once), each in its own process
group: RANK / WORLD_SIZE / MASTER_* are set as torch.distributed.run sets them, and the recipe builds the
spec's strategy from them exactly as in a launched rank."""
from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, jobs: list[dict], ports: list[int], results: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "DS_ACCELERATOR": "cpu"})
    from tuneforge.spec import build_spec
    from tuneforge.training.recipe import train

    out = {}
    for job, port in zip(jobs, ports):
        os.environ["MASTER_PORT"] = str(port)
        name, kwargs = job.pop("_name"), job.pop("_train", {"overwrite": True})
        try:
            summary = train(build_spec(job), **kwargs)
            out[name] = {"ok": True, "steps": summary.steps, "status": summary.status}
        except Exception as e:  # recorded; the test reports it
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))


def run_in_ranks(jobs: list[dict], results: Path, world: int = 2) -> dict:
    """Run `jobs` (spec dicts with a `_name`) one after another in `world` spawned ranks; return
    {name: {"ok", "error"}} as rank 0 saw it (rank 1's failures are merged in)."""
    import torch.multiprocessing as mp

    results.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in jobs]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(world, jobs, ports, str(results)), nprocs=world, join=True)
    merged = json.loads((results / "rank0.json").read_text())
    for r in range(1, world):
        for name, res in json.loads((results / f"rank{r}.json").read_text()).items():
            if not res["ok"] and merged[name]["ok"]:
                merged[name] = res
    return merged
