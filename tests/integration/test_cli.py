"""The real CLI in processes of its own: train, --resume (after a SIGKILL of `python -m tuneforge.cli`), merge,
generate, data validate."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.cli_runner import run_cli
from tests.conftest import CHAT_RECORDS, tiny_spec, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tuneforge(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """`tuneforge ARGS` in a process of its own (forked with the imports done: tests/cli_runner.py)."""
    proc = run_cli(args, env=ENV, timeout=300, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_train_merge_generate(tiny_models, chat_file, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=3))
    out = tuneforge("train", spec, "--set", "training.lr=5e-3", "--json")
    summary = json.loads(out.stdout)
    assert summary["steps"] == 3 and summary["status"] == "succeeded"
    assert "Traceback" not in out.stderr
    assert yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())["training"]["lr"] == 5e-3

    tuneforge("merge", tmp_path / "run", "--out", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()

    gen = tuneforge("generate", tmp_path / "run", "--prompt", "Say hi", "--prompt", "2+2?", "--max-new-tokens", "5",
                    "--json")
    rows = [json.loads(l) for l in gen.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Say hi", "2+2?"]
    # The CLI prints what the Python API generates for the same run (greedy, so deterministic).
    from tuneforge import api

    assert [r["output"] for r in rows] == api.generate(tmp_path / "run", ["Say hi", "2+2?"], max_new_tokens=5)

    chat = tuneforge("chat", tmp_path / "run", "--max-new-tokens", "3", input="hello\nand again\n\n")
    assert chat.stdout.count("model> ") == 2

    # The merged folder is a plain model: generate works on it too.
    tuneforge("generate", tmp_path / "merged", "--prompt", "hi", "--max-new-tokens", "3")


def test_resume_after_sigkill(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS * 8)
    spec = tiny_spec(tiny_models["llama"], data, tmp_path / "run", max_steps=400, save_every=5, batch_size=2)
    path = write_spec(tmp_path / "job.yaml", spec)
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(path), "--quiet"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckpts.glob("step-*")):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(ckpts.glob("step-*")), "no checkpoint was written before the kill"
    done = [int(p.name.split("-")[1]) for p in ckpts.glob("step-*")]
    out = tuneforge("train", path, "--resume", "--quiet", "--json", "--set", "training.max_steps=" + str(max(done) + 5))
    summary = json.loads(out.stdout)
    assert summary["steps"] == max(done) + 5
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, max(done) + 6)), "metrics must have no gaps or duplicates after resume"


def test_user_errors_exit_cleanly(tiny_models, chat_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(tiny_models["llama"], bad, tmp_path / "run", max_steps=1))
    out = tuneforge("train", spec, check=False)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert f"{bad} line 1: messages" in out.stderr and f"{bad} line 2: json" in out.stderr

    out = tuneforge("train", spec, "--set", "training.lrr=1", check=False)
    assert out.returncode == 2 and "did you mean 'training.lr'" in out.stderr and "Traceback" not in out.stderr

    out = tuneforge("train", tmp_path / "missing.yaml", check=False)
    assert out.returncode == 2 and "not found" in out.stderr

    out = tuneforge("merge", tmp_path / "nothing-here", "--out", tmp_path / "m", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_data_validate(tiny_models, chat_file, tmp_path):
    ok = tuneforge("data", "validate", chat_file, "--task", "chat", "--model", tiny_models["llama"])
    assert f"OK, {len(CHAT_RECORDS)} chat examples" in ok.stdout and "longest" in ok.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n\xff\n')
    out = tuneforge("data", "validate", bad, "--task", "chat", "--model", "none", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{bad} line 1: messages[0].role" in out.stdout and f"{bad} line 2: encoding" in out.stdout


def test_data_generate_writes_valid_splits(tmp_path):
    out = tuneforge("data", "generate", "chat", "--out", tmp_path / "chat")
    assert "heldout" in out.stdout
    counts = {p.stem: len(p.read_text().splitlines()) for p in (tmp_path / "chat").glob("*.jsonl")}
    assert counts == {"train": 240, "valid": 40, "heldout": 120}
    ok = tuneforge("data", "validate", tmp_path / "chat" / "train.jsonl", "--task", "chat", "--model", "none")
    assert "OK, 240 chat examples" in ok.stdout
