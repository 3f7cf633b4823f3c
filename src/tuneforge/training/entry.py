"""The training engine as a process of its own: `python -m tuneforge.training.entry CHANNEL [--resume]
[--overwrite] [--stop-after N]`.

Whatever trains in a child process starts this, never the CLI: the Python API for a run of several ranks, the
rank launcher (each rank runs this module again), the planner's measured runs. A run reports on a channel of
its own, the folder CHANNEL, not on stdout (libraries print there; this process sends its stdout to stderr):

    CHANNEL/job.json      the JobSpec, written by the parent
    CHANNEL/events.jsonl  one RunEvent per line, as they happen (the main rank's)
    CHANNEL/result.json   {"summary": RunSummary} or {"error": an error record}, written at the end, atomically

`TrainingProcess` is the parent's side: it starts this module, turns the events back into typed RunEvents for
`on_event`, passes a StopRequest on as SIGTERM (every rank stops at the same step boundary with a checkpoint) and
returns the RunSummary, or raises the run's error as its own type (errors.py).

With `distributed.nproc > 1` (and not yet a rank), this process is the launcher: torch's elastic agent starts
this node's ranks (distributed/launch.py), each running `rank_main` with the same CHANNEL in a process forked from
a fork server that imported the training stack once (`ps` shows them as "tuneforge rank R of N ..."). The main rank writes
the events; the first rank of the node writes the result; the launcher writes the result only when no rank did
(a rank that died, a rendezvous that failed). Exit status: 0, or 130/143 when stopped by SIGINT/SIGTERM, or the
error's exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tuneforge.errors import Stopped, TuneforgeError, error_from_record
from tuneforge.training.events import EventHandler, RunEvent, RunSummary, StopRequest

JOB, EVENTS, RESULT = "job.json", "events.jsonl", "result.json"
POLL_SECONDS = 0.1
PEER_GRACE_SECONDS = 2.0  # a rank whose collective failed waits this long for the launcher to find a dead peer


# ---------------------------------------------------------------- the child


class EventWriter:
    """on_event for the child: each RunEvent a JSON line, flushed at once."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, e: RunEvent) -> None:
        self.file.write(json.dumps({"kind": e.kind, "message": e.message, "step": e.step,
                                    "total_steps": e.total_steps, "data": e.data}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def write_result(channel: Path, result: dict) -> None:
    from tuneforge.files import atomic_write_text

    atomic_write_text(channel / RESULT, json.dumps(result))


def read_result(channel: Path) -> dict | None:
    try:
        return json.loads((channel / RESULT).read_text())
    except (OSError, ValueError):
        return None


def _exit_code(summary: RunSummary) -> int:
    if summary.status == "stopped" and summary.stop_reason in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[summary.stop_reason].value
    return 0


def _train_here(channel: Path, spec, args) -> int:
    """One process, or one rank of several: run the recipe, report on the channel."""
    from tuneforge.distributed import DistributedError, in_launched_rank, rank_label
    from tuneforge.process import exit_with_parent, freeze_loaded_objects, stop_on_signals
    from tuneforge.training.recipe import Recipe

    freeze_loaded_objects()

    launched = in_launched_rank()
    if launched:
        exit_with_parent()  # a rank dies with its launcher, as the launcher dies with whoever started it
    main = os.environ.get("RANK", "0") == "0"
    reports = os.environ.get("LOCAL_RANK", "0") == "0"  # this node's result
    events = EventWriter(channel / EVENTS) if main else None
    stop = StopRequest()
    try:
        with stop_on_signals(stop, announce=False):
            summary = Recipe(spec, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
                             on_event=events, stop=stop).run()
    except KeyboardInterrupt:  # before training began: nothing was written
        error = Stopped(f"interrupted ({stop.reason or 'SIGINT'}) before training started; nothing was saved",
                        exit_code=143 if stop.reason == "SIGTERM" else 130)
        if reports:
            write_result(channel, {"error": error.to_record()})
        return error.exit_code
    except TuneforgeError as e:
        if launched:  # said at once, naming the rank (a launcher's own error comes only when every rank has ended)
            print(f"error: {'' if str(e).startswith('rank ') else rank_label()}{e}", file=sys.stderr, flush=True)
        if reports:
            write_result(channel, {"error": e.to_record()})
        if launched and isinstance(e, DistributedError):
            # A collective failed: maybe a peer died. torch's agent reports only the first rank it finds ended, in
            # rank order; the peer's death (the cause) must be found before this rank's exit (the consequence).
            # The agent stops this rank meanwhile when the peer is on this node.
            time.sleep(PEER_GRACE_SECONDS)
        return e.exit_code
    finally:
        if events is not None:
            events.close()
    if reports:
        write_result(channel, {"summary": summary.model_dump(mode="json")})
    return _exit_code(summary)


def entry_flags(*, resume: bool = False, overwrite: bool = False, stop_after: int | None = None) -> list[str]:
    """The command line flags of this module (after CHANNEL)."""
    flags = [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite)) if on]
    return flags + (["--stop-after", str(stop_after)] if stop_after else [])


def rank_main(channel: str, flags: list[str]) -> None:
    """One rank of a launch: forked from the launcher's fork server, called by torch's agent with RANK, WORLD_SIZE,
    LOCAL_RANK and MASTER_ADDR set. The same run as `main` (`flags` are its flags), ended by `sys.exit`."""
    import setproctitle

    setproctitle.setproctitle(f"tuneforge rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: "
                              f"python -m tuneforge.training.entry {channel} {' '.join(flags)}".rstrip())
    code = main([channel, *flags])
    if code:
        sys.exit(code)


def _launch_here(channel: Path, spec, args) -> int:
    """Start this node's ranks (each runs `rank_main` with the same channel) and wait for them. The first rank's
    result stands when it says more than the launcher can: a summary when the ranks were stopped, its own error
    (say, a data problem) when it failed; otherwise the launcher's error (which rank died and how, a rendezvous
    failure), also over the first rank's own view of a peer that stopped responding."""
    import multiprocessing

    from tuneforge.distributed import DistributedError, launch_ranks

    # Process-wide, so set here at the entry point: the ranks are forked from a server that imported the training
    # stack once (each rank would otherwise start an interpreter and import it itself: ~5 s of CPU). Not this
    # module: a forked child runs it afresh as multiprocessing's __mp_main__ (runpy warns when it is there already).
    preload = ["tuneforge.training.rank_server"] + (["deepspeed"] if spec.distributed.backend == "deepspeed" else [])
    multiprocessing.set_forkserver_preload(preload)
    try:
        flags = entry_flags(resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after)
        launch_ranks(spec.distributed, rank_main, (str(channel), flags), log_dir=channel / "launcher")
        failure = None
    except (DistributedError, Stopped) as e:
        failure = e
    result = read_result(channel)
    said = "summary" if result and "summary" in result else result["error"]["kind"] if result else None
    if failure is None and said is None:  # every rank exited 0, yet none reported
        failure = DistributedError("the ranks finished without reporting a result")
    keep = (failure is None or (isinstance(failure, Stopped) and said is not None)
            or (isinstance(failure, DistributedError) and said not in (None, "summary", "stopped", "distributed")))
    if not keep:
        if said == "distributed":  # the first rank's view of its silent or dead peer, with the launcher's account
            failure = DistributedError(f"{result['error']['message']}; {failure}")
        write_result(channel, {"error": failure.to_record()})
        return failure.exit_code
    if said == "summary":
        return _exit_code(RunSummary.model_validate(result["summary"]))
    return error_from_record(result["error"]).exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.training.entry")
    parser.add_argument("channel", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--stop-after", type=int)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from tuneforge.process import quiet_libraries

    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what libraries print goes with the rest of the log
    quiet_libraries()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from tuneforge.distributed import needs_launch
    from tuneforge.spec import JobSpec
    from tuneforge.training.allocator import return_big_buffers_to_os, returns_big_buffers

    spec = JobSpec.model_validate_json((args.channel / JOB).read_text())
    if needs_launch(spec.distributed):
        return _launch_here(args.channel, spec, args)
    if returns_big_buffers(spec):
        return_big_buffers_to_os()  # process-wide, so set here at the entry point (see training/allocator.py)
    return _train_here(args.channel, spec, args)


# ---------------------------------------------------------------- the parent


class TrainingProcess:
    """`spec` trained in a child process (this module); `wait` relays its events and returns its summary.

    `capture`: the child's stderr (and the stdout it sends there) is kept in `log` instead of passing through;
    `env`: its environment (default: this process's)."""

    def __init__(self, spec, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
                 env: dict | None = None, capture: bool = False):
        from tuneforge.process import die_with_parent

        self.tmp = tempfile.TemporaryDirectory(prefix="tuneforge-train-")
        self.channel = Path(self.tmp.name)
        (self.channel / JOB).write_text(spec.model_dump_json())
        command = [sys.executable, "-m", "tuneforge.training.entry", str(self.channel),
                   *entry_flags(resume=resume, overwrite=overwrite, stop_after=stop_after)]
        self.log_file = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") if capture else None
        # A session of its own: a terminal's Ctrl-C reaches only this process, which passes one signal on (a
        # second one to the rank launcher would cut its wait for the ranks' checkpoints short).
        self.proc = subprocess.Popen(command, env=env, stdout=self.log_file, stderr=self.log_file,
                                     preexec_fn=die_with_parent(), start_new_session=True)
        self.offset = 0

    @property
    def log(self) -> str:
        if self.log_file is None:
            return ""
        self.log_file.seek(0)
        return self.log_file.read()

    def _relay(self, on_event: EventHandler | None) -> None:
        path = self.channel / EVENTS
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            f.seek(self.offset)
            while (line := f.readline()).endswith("\n"):  # a line still being written waits for the next poll
                self.offset = f.tell()
                if on_event is not None:
                    e = json.loads(line)
                    on_event(RunEvent(e["kind"], e["message"], e["step"], e["total_steps"], e["data"]))

    def wait(self, on_event: EventHandler | None = None, stop: StopRequest | None = None,
             timeout: float | None = None) -> RunSummary:
        """Relay events until the child exits; a `stop` request is passed on once, as the signal that made it
        (SIGINT, SIGTERM; else SIGTERM). The run's summary (status "stopped" when it stopped), or its error raised
        as its own type. While this waits, `stop` is armed: a signal handler defers to the child's step boundary."""
        deadline = None if timeout is None else time.monotonic() + timeout
        signalled = False
        if stop is not None:
            stop.armed = True
        try:
            while self.proc.poll() is None:
                self._relay(on_event)
                if stop is not None and stop and not signalled:  # the ranks stop at a step boundary, with a checkpoint
                    self.proc.send_signal(signal.SIGINT if stop.reason == "SIGINT" else signal.SIGTERM)
                    signalled = True
                if deadline is not None and time.monotonic() > deadline:
                    self.proc.kill()
                    self.proc.wait()
                    raise TuneforgeError(f"the training process ran past {timeout:.0f} s and was stopped")
                time.sleep(POLL_SECONDS)
            self._relay(on_event)
            result = read_result(self.channel)
        finally:
            if stop is not None:
                stop.armed = False
            if self.proc.poll() is None:  # a second Ctrl-C, or an error here: the launcher and its ranks die with it
                self.proc.kill()
                self.proc.wait()
            self.tmp.cleanup()
        if result is None:
            tail = " | ".join(self.log.strip().splitlines()[-5:])[:1000]
            raise TuneforgeError(f"the training process exited with status {self.proc.returncode} without a result"
                                 + (f": {tail}" if tail else " (its messages are above)"))
        if "error" in result:
            raise error_from_record(result["error"])
        return RunSummary.model_validate(result["summary"])


if __name__ == "__main__":
    # by the module's own name, not as __main__: the ranks' fork server finds `rank_main` under that name
    from tuneforge.training.entry import main as entry_main

    sys.exit(entry_main())
