"""Fixtures for the 2-process tests: distinct chat examples (13: the last global step of an epoch has
fewer micro-batches than ranks, so a rank runs an empty one), specs, the CLI as a subprocess, and the
runs that several test files check (`one_process_runs`, `rank_runs`: computed once per test session,
also under pytest-xdist, and shared)."""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import tiny_spec, write_jsonl

N_EXAMPLES = 13


def chat_records(n: int = N_EXAMPLES) -> list[dict]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
             "kilo", "lima", "mike", "november", "oscar"]
    return [{"messages": [{"role": "user", "content": f"Say {words[i]} {'twice ' * (i % 3)}please"},
                          {"role": "assistant", "content": f"{words[i]} " * (1 + i % 4) + "done."}]}
            for i in range(n)]


def validation_records() -> list[dict]:
    """5 held-out chats (3 evaluation batches of 2, the last one short)."""
    words = ["papa", "quebec", "romeo", "sierra", "tango"]
    return [{"messages": [{"role": "user", "content": f"Spell {w}{' slowly' * (i % 2)}"},
                          {"role": "assistant", "content": " ".join(w) + " ok"}]} for i, w in enumerate(words)]


@pytest.fixture
def dist_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", chat_records())


def dist_spec(model_dir: Path, data: Path, out: Path, method: str = "lora", world: int = 1,
              distributed: dict | None = None, validation: Path | None = None, **training) -> dict:
    """1 process: grad_accum 2 (global batch 4); `world` ranks: grad_accum 1 each, same global batch.
    `validation`: a held-out file, evaluated every 2 steps (and after the last)."""
    training = {"batch_size": 2, "grad_accum": 2 // world, "max_steps": 4, "lr": 1e-2,
                **({"eval_every": 2} if validation else {}), **training}
    spec = tiny_spec(model_dir, data, out, **training)
    if validation:
        spec["data"]["validation"] = str(validation)
    spec["method"] = method
    if method == "full":
        spec["training"]["lr"] = 1e-3
    if distributed is not None:
        spec["distributed"] = {"nproc": world, "timeout_seconds": 60, **distributed}
    return spec


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def cli(*args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`tuneforge ARGS` in a process of its own (forked with the imports done: tests/cli_runner.py), one thread
    per rank."""
    from tests.cli_runner import run_cli

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    return run_cli(args, timeout=timeout, env=env, cwd=cwd)


DOC = Path(__file__).parents[2] / "docs" / "distributed.md"


def write_matrix(backend: str, strategies: tuple[str, ...], methods: tuple[str, ...], results: dict,
                 refused: dict[tuple[str, str], str]) -> None:
    """Rewrite the `backend` compatibility table in docs/distributed.md (between its markers) from this
    test run: pass = losses and weights within 1e-4 of one process; refused = a clear spec error up front."""
    import fcntl

    rows = ["| method | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for m in methods:
        cells = []
        for s in strategies:
            res = results.get(f"{m}/{s}")
            if (m, s) in refused:
                cells.append(f"refused ({refused[(m, s)]})")
            elif res is None:
                cells.append("not tested")
            else:
                cells.append("pass" if res["ok"] else "**fail**")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    start, end = f"<!-- matrix:{backend} -->", f"<!-- /matrix:{backend} -->"
    import tempfile

    with open(Path(tempfile.gettempdir()) / "tuneforge-distributed-doc.lock", "w") as lock:  # two test workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = DOC.read_text()
        if start not in text or end not in text:
            return
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        DOC.write_text(head + start + "\n" + "\n".join(rows) + "\n" + end + tail)


# ---------------------------------------------------------------- runs shared by several test files

ONE_PROCESS_METHODS = ("lora", "dora", "full", "qlora")
RESUME_STRATEGIES = ("ddp", "zero1", "zero3", "zero3+offload")


def torch_distributed(strategy: str) -> dict:
    name, _, offload = strategy.partition("+")
    return {"strategy": name, "offload": "parameters" if offload else "none"}


def deepspeed_distributed(strategy: str) -> dict:
    name, _, offload = strategy.partition("+")
    return {"strategy": name, "backend": "deepspeed",
            "offload": ("parameters" if name == "zero3" else "optimizer") if offload else "none"}


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@contextmanager
def _once_per_session(tmp_path_factory, name: str):
    """(folder, done): a folder every pytest-xdist worker of this session shares, held under a lock; `done`
    says whether another worker already filled it (each worker builds its own tiny models, but the first
    worker's stay on disk for the whole session)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root.mkdir(exist_ok=True)
        yield root, (root / "done.json").is_file()


@pytest.fixture(scope="session")
def one_process_runs(tiny_models, tmp_path_factory) -> Path:
    """`single-<method>/`: the 1-process references (4 steps, validation every 2) of every method, and
    the data they read (`train.jsonl`, `valid.jsonl`)."""
    with _once_per_session(tmp_path_factory, "one-process") as (root, done):
        if not done:
            from tuneforge.spec import build_spec
            from tuneforge.training.recipe import train

            data = write_jsonl(root / "train.jsonl", chat_records())
            valid = write_jsonl(root / "valid.jsonl", validation_records())
            for method in ONE_PROCESS_METHODS:
                train(build_spec(dist_spec(tiny_models["llama"], data, root / f"single-{method}", method,
                                           validation=valid)), overwrite=True)
            (root / "model").write_text(str(tiny_models["llama"]))
            (root / "done.json").write_text("{}")
    return root


def full_matrix(config) -> bool:
    """The whole method x strategy matrix runs with `-m long` (`make test-all`; it also rewrites the tables in
    docs/distributed.md). The default suite runs a covering subset: every strategy with LoRA and full
    fine-tuning (the cells the validation tests read) and every other method at least once, 21 of 35 runs."""
    from tests.conftest import asked_for

    return asked_for(config, "long")


# (method, strategy) cells of the default suite beyond LoRA and full at every strategy
TORCH_SUBSET = {("dora", "zero3"), ("qlora", "zero1")}
DEEPSPEED_SUBSET = {("full", "zero1"), ("full", "zero3"), ("dora", "zero2+offload")}


def torch_matrix_combos(full: bool = True):
    for method in ONE_PROCESS_METHODS:
        for strategy in ("ddp", "zero1", "zero2", "zero3", "zero3+offload"):
            if method == "qlora" and strategy not in ("ddp", "zero1"):
                continue  # refused up front (test_spec_and_sharding.py)
            if full or method in ("lora", "full") or (method, strategy) in TORCH_SUBSET:
                yield method, strategy


def deepspeed_combos(full: bool = True):
    for method in ("lora", "dora", "full"):
        for strategy in ("ddp", "zero1", "zero2", "zero3", "zero2+offload", "zero3+offload"):
            if full or method == "lora" or (method, strategy) in DEEPSPEED_SUBSET:
                yield method, strategy


@pytest.fixture(scope="session")
def rank_runs(one_process_runs, tmp_path_factory, pytestconfig) -> tuple[Path, dict]:
    """Every 2-rank run that test_equality, test_checkpoints, test_deepspeed and test_memory check, in one
    pair of spawned ranks (imports paid once): (folder, {job name: result as rank 0 saw it}). A run's
    folder is `<folder>/<job name with / as ->`; the 1-process references are in `one_process_runs`."""
    from tests.distributed.ranks import run_in_ranks

    full = full_matrix(pytestconfig)
    with _once_per_session(tmp_path_factory, "rank-runs") as (root, done):
        if done:
            return root, json.loads((root / "done.json").read_text())
        model = Path((one_process_runs / "model").read_text())
        data, valid = one_process_runs / "train.jsonl", one_process_runs / "valid.jsonl"
        # What each strategy holds per rank, and zero1's checkpoint (tests/distributed/test_memory.py)
        jobs = [{"_name": f"memory/{s}", "_call": "tests.distributed.test_memory:probe", "strategy": s,
                 "model_dir": str(model), "out": str(root / "memory")} for s in ("ddp", "zero1", "zero3")]
        # 2 ranks vs 1 process: every method x strategy (test_equality.py)
        jobs += [{**dist_spec(model, data, root / f"{m}-{s}", m, world=2, distributed=torch_distributed(s),
                              validation=valid), "_name": f"{m}/{s}"} for m, s in torch_matrix_combos(full)]
        # stop + resume across an epoch boundary: 13 examples, global batch 4 = 4 steps per epoch (test_checkpoints.py)
        for s in RESUME_STRATEGIES:
            for part, train in (("whole", {}), ("stop", {"stop_after": 3}), ("resume", {"resume": True})):
                out = root / f"resume-{s}-{'whole' if part == 'whole' else 'cut'}"
                spec = dist_spec(model, data, out, world=2, distributed=torch_distributed(s), max_steps=6, save_every=2)
                jobs.append({**spec, "_name": f"resume-{s}/{part}", "_train": train or {"overwrite": True}})
        if deepspeed_installed():  # test_deepspeed.py
            jobs += [{**dist_spec(model, data, root / f"ds-{m}-{s}", m, world=2, distributed=deepspeed_distributed(s),
                                  validation=valid), "_name": f"ds-{m}/{s}"} for m, s in deepspeed_combos(full)]
            cut = dist_spec(model, data, root / "ds-resume-zero3", "lora", world=2,
                            distributed=deepspeed_distributed("zero3"), save_every=1)
            jobs += [{**cut, "_name": "ds-resume/stop", "_train": {"stop_after": 2}},
                     {**cut, "_name": "ds-resume/resume", "_train": {"resume": True}}]
        # Where DeepSpeed would compile a C++ op (its CPU all-reduce: it must not, test_deepspeed.py checks)
        os.environ["TORCH_EXTENSIONS_DIR"] = str(root / "torch-extensions")
        try:
            results = run_in_ranks(jobs, root / "results")
        finally:
            os.environ.pop("TORCH_EXTENSIONS_DIR")
        (root / "done.json").write_text(json.dumps(results))
    return root, results


def run_folder(root: Path, name: str) -> Path:
    return root / name.replace("/", "-")
