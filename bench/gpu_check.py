"""Question: does tuneforge work on a CUDA GPU, and how does it race TRL there? The one script
`make gpu-check` runs on a lent GPU machine, within `--budget` (480 s: tests 240 s at most, the race the
rest; written for one H200, not yet run on one).

1. the card (`nvidia-smi`) and the Python stack it finds;
2. installs the carried wheels (`.gpu-wheels/*.whl`, made here by `make gpu-wheels`) into
   `.gpu-wheels/site` when that folder is missing (the GPU machine has no network);
3. `pytest -m gpu tests/gpu` with a per-test pass/fail/skip summary (from pytest's junit XML);
4. `bench/gpu_race.py`: tuneforge LoRA against TRL's SFTTrainer + peft on the card;
5. writes all of it to one JSON file: `--out`, else `$OUT/gpu_check.json` when $OUT is set, else
   `runs/gpu_check.json`. Exit status 0 when every test passed and the race ran, else 1.

Without a CUDA device it says the check was skipped, writes `{"skipped": "no CUDA device", ...}` and
exits 0. It uses whichever Python runs it (the GPU machine's own, with its torch) and never `make setup`.

Dry run on the CPU (`TUNEFORGE_GPU_CHECK_DEVICE=cpu`): the same steps with the tests and a tiny race
on the CPU, with this checkout's .venv; it checks this script's plumbing, not the GPU:

    TUNEFORGE_GPU_CHECK_DEVICE=cpu OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_check.py --out /tmp/gpu_check.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"
SITE = WHEELS / "site"
DRY_RUN = os.environ.get("TUNEFORGE_GPU_CHECK_DEVICE") == "cpu"
# Imported by the tests or the race; each one's version goes into the report.
STACK = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "pydantic", "gguf",
         "safetensors", "tokenizers", "pytest")


def say(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "runs" / "gpu_check.json"


def nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-500:]}
    cards = [dict(zip(("name", "memory", "driver"), (x.strip() for x in line.split(","))))
             for line in proc.stdout.strip().splitlines()]
    return {"cards": cards}


def cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed in this Python"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, torch.cuda.get_device_name(0)


def child_env() -> dict:
    env = dict(os.environ)
    paths = [str(ROOT / "src")] + ([] if DRY_RUN else [str(SITE)])  # tuneforge, then the carried wheels
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume test
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TUNEFORGE_CACHE", str(ROOT / ".cache" / "tuneforge"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def install_wheels() -> dict:
    """pip install --no-index --no-deps --target .gpu-wheels/site .gpu-wheels/*.whl, once."""
    wheels = sorted(WHEELS.glob("*.whl"))
    info = {"wheels": [w.name for w in wheels], "megabytes": round(sum(w.stat().st_size for w in wheels) / 1e6, 1)}
    if DRY_RUN:
        return {**info, "site": "not used (dry run: this checkout's environment)"}
    if not wheels:
        return {**info, "error": "no wheels in .gpu-wheels/: run `make gpu-wheels` on the CPU machine and carry "
                                 "\".gpu-wheels\""}
    stamp = SITE / ".installed"
    if stamp.is_file() and stamp.read_text().split() == info["wheels"]:
        return {**info, "site": "already installed"}
    shutil.rmtree(SITE, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--disable-pip-version-check", "--target", str(SITE),
                           *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {**info, "error": f"pip install failed: {(proc.stderr or proc.stdout)[-2000:]}"}
    stamp.write_text("\n".join(info["wheels"]) + "\n")
    return {**info, "site": f"installed in {time.time() - t0:.0f} s"}


def stack_versions(env: dict) -> dict:
    code = ("import importlib, importlib.metadata, json\nout = {}\nfor name in %r:\n"
            "    try:\n        m = importlib.import_module(name)\n"
            "        v = getattr(m, '__version__', None) or importlib.metadata.version(name)\n"
            "        out[name] = v + (' (carried)' if '.gpu-wheels' in (m.__file__ or '') else '')\n"
            "    except Exception as e:\n        out[name] = 'not importable: %%s' %% str(e).splitlines()[0][:200]\n"
            "import tuneforge.api, torch\nout['tuneforge'] = 'importable'\n"
            "out['cuda'] = torch.version.cuda\nprint(json.dumps(out))") % (STACK,)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_with_budget(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str, float]:
    """Run `cmd`, echoing its output as it comes; (exit code, or None when it ran out of time; output; seconds)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    lines: list[str] = []

    def echo() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this call started: pytest or the race, and their children
        proc.wait()
        code = None
    reader.join(timeout=10)
    return code, "".join(lines), time.time() - t0


def junit_cases(path: Path) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:1500]
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 2), **({"message": message} if message else {})})
    return cases


def run_tests(env: dict, timeout: float) -> dict:
    junit = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rfEs", "--durations=10",
           f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    say("running " + " ".join(cmd[1:]))
    code, out, seconds = run_with_budget(cmd, env, timeout)
    result = {"command": " ".join(cmd[2:]), "returncode": code, "seconds": round(seconds, 1),
              "output_tail": out[-4000:]}
    if code is None:
        result["error"] = f"ran out of its {timeout:.0f} s budget"
    if junit.is_file():
        cases = junit_cases(junit)
        result["summary"] = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
        result["cases"] = cases
    elif code is not None:
        result["error"] = f"pytest exited {code} without a junit report"
    return result


def run_race(env: dict, timeout: float, args) -> dict:
    out = Path(tempfile.mkdtemp(prefix="gpu-race-")) / "race.json"
    cmd = [sys.executable, "bench/gpu_race.py", "--rounds", str(args.race_rounds), "--examples",
           str(args.race_examples), "--out", str(out),
           # each of the 2 x rounds runs gets an equal share; the report is rewritten after each run
           "--child-timeout", str(int(max((timeout - 30) / (2 * args.race_rounds), 90)))]
    if DRY_RUN:
        cmd.append("--tiny")
    say("running " + " ".join(cmd[1:]))
    code, text, seconds = run_with_budget(cmd, env, timeout)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(command=" ".join(cmd[1:]), returncode=code, wall_seconds=round(seconds, 1))
    if code is None:
        result["error"] = f"ran out of its {timeout:.0f} s budget"
    elif code != 0:
        result["error"] = f"exit code {code}"
        result["output_tail"] = text[-4000:]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="the JSON report (default: $OUT/gpu_check.json, "
                                                           "else runs/gpu_check.json)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole check (tests + race)")
    ap.add_argument("--tests-budget", type=float, default=240, help="seconds the GPU tests may take")
    ap.add_argument("--race-rounds", type=int, default=2)
    ap.add_argument("--race-examples", type=int, default=512)
    ap.add_argument("--skip-race", action="store_true")
    args = ap.parse_args()
    if DRY_RUN:
        args.race_rounds, args.race_examples = min(args.race_rounds, 1), min(args.race_examples, 8)
    out = args.out or default_out()
    started = time.time()
    report: dict = {"check": "make gpu-check", "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "host": platform.node(), "python": sys.version.split()[0], "dry_run": DRY_RUN,
                    "skipped": None, "ok": None, "gpu": nvidia_smi()}
    for card in report["gpu"].get("cards", []):
        say(f"card: {card['name']} ({card['memory']}, driver {card['driver']})")

    def save() -> None:  # after every stage, so a check cut short still leaves what it found
        report["seconds"] = round(time.time() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    def finish(ok: bool) -> int:
        report["ok"] = ok
        save()
        say(f"wrote {out}")
        return 0 if ok else 1

    has_cuda, detail = cuda_available()
    report["cuda"] = detail
    if not has_cuda and not DRY_RUN:
        report["skipped"] = "no CUDA device"
        say(f"skipped: no CUDA device ({detail})")
        return finish(True)
    if DRY_RUN:
        say("DRY RUN on the CPU (TUNEFORGE_GPU_CHECK_DEVICE=cpu): checks the plumbing, not the GPU")

    report["wheels"] = install_wheels()
    say(f"wheels: {report['wheels'].get('site') or report['wheels'].get('error')}")
    env = child_env()
    report["stack"] = stack_versions(env)
    say(f"stack: {json.dumps(report['stack'])}")
    save()
    if "error" in report["stack"]:
        say("tuneforge does not import with this stack; stopping")
        return finish(False)

    report["tests"] = run_tests(env, min(args.tests_budget, args.budget - (time.time() - started)))
    say(f"tests: {report['tests'].get('summary')} {report['tests'].get('error', '')}")
    save()
    if args.skip_race:
        report["race"] = {"skipped": "--skip-race"}
    else:
        report["race"] = run_race(env, args.budget - (time.time() - started), args)
        r = report["race"]
        say(f"race: tokens/s {r.get('median_tokens_per_second')}, peak memory MB {r.get('median_peak_memory_mb')}, "
            f"speed ratio {r.get('speed_ratio_median')}, memory ratio {r.get('memory_ratio_median')} "
            f"{r.get('error', '')}")
    tests = report["tests"]
    tests_ok = tests.get("returncode") == 0 and not tests.get("error")
    race_ok = args.skip_race or "error" not in report["race"]
    return finish(tests_ok and race_ok)


if __name__ == "__main__":
    sys.exit(main())
