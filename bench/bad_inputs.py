"""Bad inputs and faults, counted: the table of tests/integration/test_bad_inputs.py (run in-process, one case
after another) plus cases that need a real process (Ctrl-C / SIGTERM at several moments, kill -9 then --resume),
plus tests/service/test_hostile.py's hostile requests sent to a real `tuneforge serve` (5xx answers, reset
connections and tracebacks in its log counted).

Prints one JSON object: how many cases ran, how many showed a Python traceback, a wrong or undocumented exit
code, user files deleted or changed, or a message that does not name what is wrong, and the failing cases
(each with its problems and, for a known defect, the defect). A known defect is recorded on its case
(`defect=...`, in either table); none is recorded at present. Exit status 0 whatever the counts; the numbers
are the report.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bad_inputs.py [--only SUBSTRING] [--no-subprocess] [--no-service] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(1)

from tests.integration.test_bad_inputs import (  # noqa: E402
    CASES, DOCUMENTED_CODES, Env, Outcome, Sandbox, base_spec, damaged, jsonl, make_tiny_models, prepare_env,
    snapshot, with_changes,
)

# ====================================================================================== cases in a real process

START_TIMEOUT_S = 120


def _proc_env(sb: Sandbox) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER",)}
    env.update(HOME=str(sb.home), TUNEFORGE_CACHE=str(sb.env.cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _start(sb: Sandbox, *args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuneforge.cli", *args], cwd=sb.work, env=_proc_env(sb),
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    code = proc.returncode
    if code < 0:  # killed by a signal: what a shell reports ($? = 128 + the signal number)
        code = 128 - code
    return code, out, err


def _run(sb: Sandbox, *args: str, timeout: float = 300) -> tuple[int, str, str]:
    return _finish(_start(sb, *args), timeout)


def _wait_for(predicate, timeout: float = START_TIMEOUT_S, poll: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _long_job(sb: Sandbox, **training) -> str:
    """A job of many tiny steps (batch 1), long enough to be interrupted at a chosen moment."""
    records = [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                             {"role": "assistant", "content": f"Answer number {i}."}]} for i in range(120)]
    sb.write("data/long.jsonl", jsonl(records))
    spec = with_changes(base_spec(), {"data.train": "data/long.jsonl", "training.batch_size": 1,
                                      "training.max_steps": 100, "output_dir": "runs/long",
                                      **{f"training.{k}": v for k, v in training.items()}})
    sb.write("long.yaml", yaml.safe_dump(spec))
    (sb.work / "runs" / "long").parent.mkdir(exist_ok=True)
    sb.write("runs/my-run-notes.txt", "the user's notes beside the runs\n")
    return "long.yaml"


def _steps_logged(run: Path) -> int:
    try:
        return len([l for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()])
    except OSError:
        return 0


def _checkpoints(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _summary_steps(run: Path) -> int | None:
    try:
        return json.loads((run / "summary.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return None


class ProcessCase:
    """A case that needs its own process. `run(sb)` returns (exit code, stdout, stderr, problems).
    `defect`: a known tuneforge defect the case shows (none at present)."""

    def __init__(self, id: str, run, code: int | tuple[int, ...], says: tuple[str, ...] = (),
                 defect: str | None = None):
        self.id, self.run, self.code, self.says, self.defect = id, run, code, says, defect


def _signal_mid_training(sig: int, after_steps: int = 3):
    def run(sb: Sandbox):
        job = _long_job(sb, save_every=1000)
        proc = _start(sb, "train", job)
        run_dir = sb.work / "runs" / "long"
        if not _wait_for(lambda: _steps_logged(run_dir) >= after_steps):
            proc.kill()
        proc.send_signal(sig)
        code, out, err = _finish(proc)
        problems = []
        ckpts = _checkpoints(run_dir)
        if len(ckpts) != 1 or not ckpts[0].startswith("step-"):
            problems.append(f"expected one checkpoint after the stop, found {ckpts}")
        if "--resume" not in err:
            problems.append("the stop message does not say how to continue (--resume)")
        code2, out2, err2 = _run(sb, "train", job, "--resume")
        if code2 != 0 or "Traceback" in err2:
            problems.append(f"--resume after the stop: exit {code2}: {err2.strip().splitlines()[-1:] }")
        elif _summary_steps(run_dir) != 100:
            problems.append(f"--resume did not finish the run (summary steps {_summary_steps(run_dir)})")
        return code, out, err + err2, problems

    return run


def _caught(pid: int, sig: int) -> bool:
    """True once process `pid` has a handler installed for `sig` (the SigCgt mask in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _signal_at_startup(sig: int, moment: str, big_data: bool = False):
    """Ctrl-C / SIGTERM while tuneforge is still starting: no traceback, the documented code, nothing left.

    moment: "cli-starting" (0.15 s after the interpreter put its own SIGINT handler in place: `tuneforge.cli.main`
    is parsing its arguments and importing transformers to quiet its logging), or "handlers-installed" (tuneforge's SIGINT/SIGTERM handlers are in place, the training loop has not started:
    with `big_data` it is checking and encoding 40,000 examples)."""

    def run(sb: Sandbox):
        job = _long_job(sb)
        if big_data:
            records = [{"messages": [{"role": "user", "content": f"Question {i}: " + "word " * (i % 40)},
                                     {"role": "assistant", "content": f"Answer {i}."}]} for i in range(40_000)]
            sb.write("data/long.jsonl", jsonl(records))
        proc = _start(sb, "train", job)
        problems = []
        if moment == "handlers-installed":
            reached = _wait_for(lambda: _caught(proc.pid, signal.SIGTERM), poll=0.005)
            time.sleep(0.3)
        else:
            reached = _wait_for(lambda: _caught(proc.pid, signal.SIGINT), poll=0.001)
            time.sleep(0.15)
            reached = reached and not _caught(proc.pid, signal.SIGTERM)
        if not reached or proc.poll() is not None:
            problems.append(f"the moment '{moment}' was not hit (timing); the result says nothing")
        proc.send_signal(sig)
        code, out, err = _finish(proc)
        run_dir = sb.work / "runs" / "long"
        if run_dir.exists() and not _checkpoints(run_dir) and (run_dir / "summary.json").exists():
            problems.append("a run folder with a summary but no checkpoint was left behind")
        return code, out, err, problems

    return run


def _second_sigint(moment: str):
    """Ctrl-C, then Ctrl-C again ("press Ctrl-C again to stop at once"): `at-once` sends the second 1 ms after
    the first (it lands inside the step or the checkpoint write); `while-exiting` sends the second once the run has stopped and tuneforge has
    put the previous signal handlers back (SIGTERM no longer caught): the process is on its way out."""

    def run(sb: Sandbox):
        job = _long_job(sb, save_every=1000)
        proc = _start(sb, "train", job)
        run_dir = sb.work / "runs" / "long"
        problems = []
        if not _wait_for(lambda: _steps_logged(run_dir) >= 2):
            problems.append("the run never started training")
        proc.send_signal(signal.SIGINT)
        if moment == "while-exiting":
            _wait_for(lambda: not _caught(proc.pid, signal.SIGTERM) or proc.poll() is not None, poll=0.0005)
        else:
            time.sleep(0.001)  # two separate signals (sent at once the kernel may merge them into one)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        else:
            problems.append("the process exited before the second Ctrl-C (timing); the result says nothing")
        code, out, err = _finish(proc)
        code2, _, err2 = _run(sb, "train", job, "--resume")
        if code2 == 1 and "no complete checkpoint" in err2:  # stopped before any checkpoint: start again
            code2, _, err3 = _run(sb, "train", job)
            err2 += err3
        if "Traceback" in err2 or code2 != 0:
            problems.append(f"continuing after the double Ctrl-C: exit {code2}: {err2.strip().splitlines()[-1:]}")
        return code, out, err + err2, problems

    return run


def _kill9_then_resume(when: str):
    """kill -9 (no handler can run) mid-run, then --resume: it continues from the newest complete checkpoint."""

    def run(sb: Sandbox):
        job = _long_job(sb, save_every=1 if when == "checkpointing" else 10)
        proc = _start(sb, "train", job)
        code2 = None
        run_dir = sb.work / "runs" / "long"
        if when == "checkpointing":  # the moment the first checkpoint is being written
            ready = _wait_for(lambda: (run_dir / "checkpoints").is_dir(), poll=0.001)
        else:  # after a checkpoint or two, between checkpoints
            ready = _wait_for(lambda: _steps_logged(run_dir) >= 25)
        proc.kill()
        code, out, err = _finish(proc)
        problems = [] if ready else ["the run never reached the moment to kill it"]
        code2, out2, err2 = _run(sb, "train", job, "--resume")
        if code2 == 1 and "no complete checkpoint" in err2:  # killed before the first one was complete:
            code2, out3, err3 = _run(sb, "train", job)  # the user starts again, in the same folder
            err2 += err3
        if "Traceback" in err2:
            problems.append(f"--resume after kill -9: traceback: {err2.strip().splitlines()[-1]}")
        elif code2 != 0:
            problems.append(f"--resume after kill -9: exit {code2}: {err2.strip().splitlines()[-1:]}")
        elif _summary_steps(run_dir) != 100:
            problems.append(f"--resume did not finish the run (summary steps {_summary_steps(run_dir)})")
        leftovers = [n for n in _checkpoints(run_dir) if not n.startswith("step-")]
        if leftovers:
            problems.append(f"temporary checkpoint folders left after the resumed run finished: {leftovers}")
        return 137, out, err + err2, problems  # 137: the kill itself; the judged part is the resume

    return run


def _sigterm_during_merge(sb: Sandbox):
    """SIGTERM while merge writes its output: nothing half-written is left where the merged model should be."""
    sb.run("lora")
    proc = _start(sb, "merge", "runs/lora", "--out", "merged")
    _wait_for(lambda: any(p.name.startswith(".tmp-merged") for p in sb.work.iterdir()), poll=0.001)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    problems = []
    out_dir = sb.work / "merged"
    if code != 0 and out_dir.exists() and not (out_dir / "config.json").exists():
        problems.append("a half-written merged model was left in merged/")
    return code, out, err, problems


PROCESS_CASES = [
    ProcessCase("proc-sigint-mid-training-then-resume", _signal_mid_training(signal.SIGINT), 130,
                ("SIGINT", "--resume")),
    ProcessCase("proc-sigterm-mid-training-then-resume", _signal_mid_training(signal.SIGTERM), 143,
                ("SIGTERM", "--resume")),
    ProcessCase("proc-sigint-as-the-cli-starts", _signal_at_startup(signal.SIGINT, "cli-starting"), 130,
                ("interrupted",)),
    ProcessCase("proc-sigint-while-checking-data", _signal_at_startup(signal.SIGINT, "handlers-installed", big_data=True),
                130, ("interrupted",)),
    ProcessCase("proc-sigterm-while-checking-data", _signal_at_startup(signal.SIGTERM, "handlers-installed",
                                                                       big_data=True), 143, ("SIGTERM",)),
    ProcessCase("proc-sigint-twice-at-once", _second_sigint("at-once"), 130, ("--resume",)),
    # `python -m tuneforge.cli` runs cli.entry(), the function the `tuneforge` console script runs: once the
    # command has returned, a late Ctrl-C must not break the interpreter's shutdown.
    ProcessCase("proc-sigint-again-while-exiting", _second_sigint("while-exiting"), 130),
    ProcessCase("proc-kill-9-mid-run-then-resume", _kill9_then_resume("between"), 137),
    ProcessCase("proc-kill-9-while-checkpointing-then-resume", _kill9_then_resume("checkpointing"), 137),
    ProcessCase("proc-sigterm-during-merge", _sigterm_during_merge, (0, 143)),
]


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning)\b.*)$", re.M)


def _traceback_block(text: str) -> str:
    """The first traceback in `text` (with any chained ones), up to its last exception line."""
    start = text.find("Traceback (most recent call last)")
    block = text[start:] if start >= 0 else text
    ends = list(_EXCEPTION_LINE.finditer(block))
    return block[: ends[-1].end()] if ends else block


def _exception_line(block: str) -> str:
    """The exception a traceback block ends with (the last of a chain): `KeyboardInterrupt`, `ValueError: ...`."""
    found = _EXCEPTION_LINE.findall(block)
    return found[-1] if found else block.strip().splitlines()[-1]


def run_process_case(pc: ProcessCase, env: Env) -> Outcome:
    base = Path(tempfile.mkdtemp(prefix="bad-input-proc-"))
    started = time.time()
    outcome = Outcome(pc.id)
    try:
        sb = Sandbox(env, base / "user")
        sb.run("lora", "kept")  # an earlier run of the user's: must survive whatever happens to the new one
        sb.write("runs/kept/my-notes.md", "notes on the earlier run\n")
        before = snapshot(sb.root)
        try:
            outcome.code, outcome.out, outcome.err, problems = pc.run(sb)
        except subprocess.TimeoutExpired as e:
            outcome.code, problems = None, [f"hung: {e}"]
        outcome.changed = damaged(before, sb.root)
        expected = pc.code if isinstance(pc.code, tuple) else (pc.code,)
        if "Traceback (most recent call last)" in outcome.err:
            outcome.traceback = _traceback_block(outcome.err)
            outcome.exception = _exception_line(outcome.traceback)
            outcome.problems.append(f"traceback: {outcome.exception}")
        elif outcome.code not in expected:
            outcome.wrong_code = True
            note = "" if outcome.code in DOCUMENTED_CODES else " (undocumented)"
            outcome.problems.append(f"exit code {outcome.code}{note}, expected {' or '.join(map(str, expected))}")
        outcome.problems += [f"user data damaged: {rel}" for rel in outcome.changed]
        outcome.missing_text = [s for s in pc.says if s not in outcome.out + outcome.err]
        if outcome.missing_text and not outcome.traceback:
            outcome.problems.append(f"message does not say {outcome.missing_text!r}")
        outcome.problems += problems
    finally:
        outcome.seconds = time.time() - started
        shutil.rmtree(base, ignore_errors=True)
    return outcome


# ====================================================================================== the service, over HTTP


def run_service_cases(only: str | None) -> list[tuple[Outcome, str | None, str]]:
    """tests/service/test_hostile.py's table sent to a real `tuneforge serve` (1 worker, SQLite): each request a
    case; a 5xx answer or a traceback in the server's log is counted as one."""
    import httpx

    from tests.service.conftest import Server
    from tests.service.test_hostile import REQUESTS, make_objects, send
    from tuneforge.models.tiny import make_tiny_model

    cases = [c for c in REQUESTS if not only or only in f"service-{c[0]}"]
    if not cases:
        return []
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-service-"))
    results = []
    try:
        model = make_tiny_model("llama", root / "model")
        train = root / "train.jsonl"
        from tests.conftest import CHAT_RECORDS

        train.write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2))
        (root / "data").mkdir()
        server = Server(root / "data", model, None, workers=1, extra=["--max-jobs-per-org", "50"]).start()
        log = root / f"serve-{server.port}.log"
        try:
            with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=60) as client:
                names = {**make_objects(client, server.key("acme"), train), "data_dir": str(server.data_dir)}
                for case in cases:
                    started, seen = time.time(), log.stat().st_size
                    outcome = Outcome(f"service-{case[0]}")
                    try:
                        response, outcome.problems = send(client, names, case)
                        outcome.code = response.status_code
                        if response.status_code >= 500:
                            outcome.wrong_code = True
                    except httpx.HTTPError as e:  # a reset connection is as bad as a 500
                        outcome.problems, outcome.wrong_code = [f"no answer: {type(e).__name__}: {e}"], True
                    time.sleep(0.05)
                    with open(log, errors="replace") as f:
                        f.seek(seen)
                        logged = f.read()
                    if "Traceback (most recent call last)" in logged:
                        outcome.traceback = _traceback_block(logged)
                        outcome.exception = _exception_line(outcome.traceback)
                        outcome.problems.append(f"traceback in the server's log: {outcome.exception}")
                    outcome.seconds = time.time() - started
                    results.append((outcome, None, "service"))
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


# ====================================================================================== the totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run only cases whose id contains this")
    parser.add_argument("--no-subprocess", action="store_true", help="skip the cases that need a real process")
    parser.add_argument("--no-service", action="store_true", help="skip the requests to a real `tuneforge serve`")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    from tests.integration.test_bad_inputs import run_case

    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-env-"))
    try:
        env = prepare_env(root, make_tiny_models(root / "tiny-models"))
        cases = [c for c in CASES if not args.only or args.only in c.id]
        process_cases = [] if args.no_subprocess else [c for c in PROCESS_CASES if not args.only or args.only in c.id]
        results: list[tuple[Outcome, str | None, str]] = []
        for i, case in enumerate(cases, 1):
            outcome = run_case(case, env)
            results.append((outcome, case.defect, "in-process"))
            if not outcome.ok:
                print(f"[{i}/{len(cases)}] {case.id}: {outcome.problems[0]}", file=sys.stderr, flush=True)
        for pc in process_cases:
            outcome = run_process_case(pc, env)
            results.append((outcome, pc.defect, "subprocess"))
            print(f"[process] {pc.id}: {'ok' if outcome.ok else outcome.problems}  ({outcome.seconds:.1f} s)",
                  file=sys.stderr, flush=True)
        if not args.no_service:
            service = run_service_cases(args.only)
            results += service
            for outcome, _, _ in service:
                if not outcome.ok:
                    print(f"[service] {outcome.case}: {outcome.problems}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    failing = [(o, d, kind) for o, d, kind in results if not o.ok]
    report = {
        "cases": len(results),
        "in_process_cases": sum(1 for _, _, k in results if k == "in-process"),
        "subprocess_cases": sum(1 for _, _, k in results if k == "subprocess"),
        "service_requests": sum(1 for _, _, k in results if k == "service"),
        "service_5xx_or_reset": sum(1 for o, _, k in results if k == "service" and o.wrong_code),
        "passed": len(results) - len(failing),
        "failing_cases": len(failing),
        "tracebacks": sum(1 for o, _, _ in results if o.traceback),
        "wrong_exit_codes": sum(1 for o, _, _ in results if o.wrong_code),
        "undocumented_exit_codes": sum(1 for o, _, k in results
                                       if k != "service" and o.code is not None and o.code not in DOCUMENTED_CODES
                                       and not (o.code == 137 and o.case.startswith("proc-kill-9"))),
        "sentinels_deleted_or_changed": sum(len(o.changed) for o, _, _ in results),
        "cases_that_damaged_user_files": sum(1 for o, _, _ in results if o.changed),
        # no traceback, the right exit code, no damage, yet failing: a message that does not name the problem or
        # misleads, or a wrong result
        "wrong_or_misleading_messages": sum(1 for o, _, _ in failing
                                            if not o.traceback and not o.wrong_code and not o.changed),
        "known_defects_marked": sum(1 for _, d, _ in results if d),  # xfail in the test; in the process cases too
        "unexpected_failures": sum(1 for o, d, _ in failing if not d),
        "unexpected_passes_of_marked_defects": [o.case for o, d, _ in results if d and o.ok],
        "seconds": round(time.time() - started, 1),
        "failing": [{"case": o.case, "kind": kind, "exit_code": o.code, "problems": o.problems,
                     **({"defect": d} if d else {}),
                     **({"traceback_tail": _traceback_block(o.traceback).strip().splitlines()[-6:]}
                        if o.traceback else {})}
                    for o, d, kind in failing],
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
