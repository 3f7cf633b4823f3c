"""Launching ranks through torch.distributed.run from the real CLI and from the Python API (both through the
training entry): `--nproc 2`, two nodes on localhost, a rank killed with SIGKILL then `--resume`, a hung rank
reported within the timeout, and the API's events, stop and resume with two ranks."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.distributed.conftest import cli, dist_spec, metrics
from tests.distributed.ranks import free_port

pytestmark = pytest.mark.distributed


def _write(spec: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def _single(tiny_models, dist_data, tmp_path, **training) -> list[dict]:
    from tuneforge.spec import build_spec
    from tuneforge.training.recipe import train

    train(build_spec(dist_spec(tiny_models["llama"], dist_data, tmp_path / "single", **training)))
    return metrics(tmp_path / "single")


def _assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-4, (x, y)


def test_two_nodes_on_localhost_write_one_output(one_process_runs, tmp_path):
    """Two launcher invocations (node ranks 0 and 1, one rank each) rendezvous and train as one job."""
    model, data = Path((one_process_runs / "model").read_text()), one_process_runs / "train.jsonl"
    spec = dist_spec(model, data, tmp_path / "run", world=2, distributed={"strategy": "zero3"})
    spec["distributed"].update({"nproc": 1, "nnodes": 2})
    job = _write(spec, tmp_path / "job.yaml")
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    nodes = [subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(job), "--quiet", "--node-rank",
                               str(n), "--master-port", port], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=240) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "done: step 4/4" in outs[0][1] and "done:" not in outs[1][1]
    _assert_same_losses(metrics(one_process_runs / "single-lora"), metrics(tmp_path / "run"))


def test_rendezvous_failures_are_one_line_naming_what_failed(tiny_models, dist_data, tmp_path):
    """Node 0 unreachable, a name that does not resolve, node 1 never arriving, the port taken: each is one
    `error:` line naming the address, port or timeout (no c10d C++ log or stack frames) and exit code 1."""
    import socket

    spec = dist_spec(tiny_models["llama"], dist_data, tmp_path / "run", world=2, distributed={"strategy": "ddp"})
    spec["distributed"].update({"nproc": 1, "nnodes": 2, "timeout_seconds": 2})
    job = _write(spec, tmp_path / "job.yaml")
    taken = socket.socket()
    taken.bind(("", 0))
    taken.listen()
    nobody, alone, held = free_port(), free_port(), taken.getsockname()[1]  # a port per case: they run at once
    cases = {  # flags -> what the line must say
        ("--node-rank", "1", "--master-port", str(nobody)): [f"node 1: the rendezvous at 127.0.0.1:{nobody} failed",
                                                            "node 0 did not answer within 2 s", "--master-addr"],
        ("--node-rank", "1", "--master-addr", "no-such-host.invalid", "--master-port", str(nobody)): [
            f"no-such-host.invalid:{nobody} does not resolve", "--master-addr"],
        ("--node-rank", "0", "--master-port", str(alone)): [
            f"node 0: the rendezvous at 127.0.0.1:{alone} failed", "not every node joined within 2 s (1 of 2 nodes "
            "joined)", "--node-rank"],
        ("--nnodes", "1", "--nproc", "2", "--master-port", str(held)): [
            f"port {held} is already in use on this node", "--master-port"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    try:
        procs = {flags: subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(job), "--quiet", *flags],
                                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for flags in cases}
        outs = {flags: p.communicate(timeout=120) for flags, p in procs.items()}
    finally:
        taken.close()
    for flags, words in cases.items():
        err = outs[flags][1].strip()
        assert procs[flags].returncode == 1, (flags, err[-2000:])
        assert len(err.splitlines()) == 1 and err.startswith("error: node "), (flags, err[-2000:])
        for w in words:
            assert w in err, (flags, w, err)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def _rank_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of the ranks among `parent`'s descendants (the CLI starts the training entry, whose fork server
    forks the ranks; each names itself "tuneforge rank R of N: ..." in `ps`)."""
    found, todo = {}, [parent]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            todo.append(int(child))
            try:
                title = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if title.startswith("tuneforge rank "):
                found[int(title.split()[2])] = int(child)
    return found


def _start(job: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(job), "--quiet",
                             "--master-port", str(free_port()), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(run: Path, proc: subprocess.Popen, done, seconds: float = 120) -> None:
    """Until metrics.jsonl's last step satisfies `done`."""
    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never got there"
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if lines and lines[-1].endswith("}") and done(int(lines[-1].split('"step": ')[1].split(",")[0])):
            return
        time.sleep(0.05)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_killed_rank_is_named_and_resume_equals_uninterrupted(tiny_models, dist_data, tmp_path):
    """`--nproc 2` launches the ranks (the spec names only the strategy); SIGKILL of rank 1 mid-run is
    reported by rank number and signal; `--resume` continues, SIGTERM stops every rank at one step with a
    checkpoint, `--resume` again finishes: the whole trajectory matches 1 process."""
    steps = 30  # long enough that the kill (after step 4) and SIGTERM (after step 8) land mid-run
    spec = dist_spec(tiny_models["llama"], dist_data, tmp_path / "run", world=2, distributed={"strategy": "zero3"},
                     max_steps=steps, save_every=2)
    del spec["distributed"]["nproc"]
    proc = _start(_write(spec, tmp_path / "job.yaml"), "--nproc", "2")
    _wait_for(tmp_path / "run" / "checkpoints" / "step-000004", proc)
    os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rank 1" in err and "was killed by SIGKILL" in err, err[-3000:]
    assert "Traceback" not in err and "exitcode" not in err, err[-3000:]  # one line from us, not torch's log
    assert not (tmp_path / "run" / "summary.json").exists()
    saved = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())
    assert saved["distributed"]["nproc"] == 2 and saved["distributed"]["strategy"] == "zero3"
    # SIGTERM to the launcher: every rank stops at the same step boundary with one checkpoint, exit 143
    proc = _start(tmp_path / "run", "--resume")
    _wait_for_step(tmp_path / "run", proc, lambda n: n >= 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped at step" in err and "Traceback" not in err, err[-3000:]
    stopped_at = max(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert 8 <= stopped_at < steps
    again = cli("train", str(tmp_path / "run"), "--resume", "--master-port", str(free_port()))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count(f"done: step {steps}/{steps}") == 1, again.stderr[-2000:]  # the main rank reports
    assert "2 ranks (zero3), global batch 2 x 1 x 2 = 4" in again.stderr
    _assert_same_losses(_single(tiny_models, dist_data, tmp_path, max_steps=steps, save_every=2),
                        metrics(tmp_path / "run"))


def test_hung_rank_fails_the_run_within_the_timeout_naming_it(tiny_models, dist_data, tmp_path):
    timeout = 8
    spec = dist_spec(tiny_models["llama"], dist_data, tmp_path / "run", world=2, distributed={"strategy": "ddp"},
                     max_steps=200, save_every=2)
    spec["distributed"]["timeout_seconds"] = timeout
    proc = _start(_write(spec, tmp_path / "job.yaml"))
    _wait_for(tmp_path / "run" / "checkpoints" / "step-000002", proc)
    hung = _rank_pids(proc.pid)[1]
    os.kill(hung, signal.SIGSTOP)  # alive but silent: holds its sockets open, answers nothing
    started = time.time()
    try:
        for line in proc.stderr:
            if line.startswith("error: "):
                break
        waited = time.time() - started
    finally:
        # The launcher would wait for the stopped rank to honour SIGTERM before its SIGKILL.
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGKILL)
        proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert waited < timeout + 10, waited
    assert line.startswith("error: rank 0: ") and "rank 1 last reported 'step" in line, line
    assert "a collective failed while 'step" in line


def test_python_api_launches_the_ranks_like_the_cli(one_process_runs, tmp_path):
    """`tuneforge.train(spec)` with distributed.nproc 2 starts the ranks through the training entry (in a child
    process, never the CLI) and returns the main rank's summary; the trajectory is the 1-process one."""
    import json

    import tuneforge

    model, data = Path((one_process_runs / "model").read_text()), one_process_runs / "train.jsonl"
    spec = dist_spec(model, data, tmp_path / "run", world=2, distributed={"strategy": "zero1"})
    events = []
    summary = tuneforge.train(spec, on_event=events.append)
    assert summary.status == "succeeded" and summary.steps == 4, summary
    assert summary.model_dump(mode="json") == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any(e.message.startswith("done: step 4/4") for e in events), [e.message for e in events][-5:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "state.json").read_text())
    assert (state["world_size"], state["strategy"]) == (2, "zero1")  # written by 2 ranks
    _assert_same_losses(metrics(one_process_runs / "single-lora"), metrics(tmp_path / "run"))


STEPS = 16


def test_python_api_with_two_ranks_gives_the_same_events_as_one_process(tiny_models, dist_data, tmp_path,
                                                                         monkeypatch):
    """tuneforge.train with distributed.nproc 2: the ranks run in a child process (the training entry) and its
    events reach on_event as one process's would, from the main rank; a StopRequest stops every rank at one step
    boundary with a checkpoint and the summary says so; resuming the folder through the API finishes the run."""
    import tuneforge
    from tuneforge.training.events import StopRequest

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = dist_spec(tiny_models["llama"], dist_data, tmp_path / "run", world=2, distributed={"strategy": "ddp"},
                     max_steps=STEPS, save_every=2)
    spec["distributed"]["master_port"] = free_port()
    stop, events = StopRequest(), []

    def on_event(e):
        events.append(e)
        if e.kind == "step" and e.step == 3:
            stop.request("the caller's stop")

    stopped = tuneforge.train(spec, on_event=on_event, stop=stop, progress=False)
    # the events reach the caller while the ranks go on: the stop lands at step 3 or a later one (a few steps
    # later on a loaded machine: tiny steps take milliseconds, hence the room)
    at = stopped.steps
    assert stopped.status == "stopped" and stopped.stop_reason == "SIGTERM" and 3 <= at < STEPS
    assert [e.kind for e in events if e.kind != "warning"][0] == "started"
    assert [e.step for e in events if e.kind == "step"] == list(range(1, at + 1))
    assert [e.step for e in events if e.kind == "checkpoint"] == sorted(set(range(2, at + 1, 2)) | {at})
    assert events[-1].kind == "stopped" and stopped.checkpoint.endswith(f"step-{at:06d}")
    assert next(e for e in events if e.kind == "started").data["world_size"] == 2
    resumed: list = []
    done = tuneforge.train(tmp_path / "run", resume=True, on_event=resumed.append, progress=False,
                           overrides=[f"distributed.master_port={free_port()}"])
    assert done.status == "succeeded" and done.steps == STEPS
    assert [e.step for e in resumed if e.kind == "step"] == list(range(at + 1, STEPS + 1))
    assert resumed[-1].kind == "finished"
    assert [m["step"] for m in metrics(tmp_path / "run")] == list(range(1, STEPS + 1))
