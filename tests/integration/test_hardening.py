"""Bad input and faults, as a new user meets them: tuneforge never deletes what it did not make, a user's
mistake is one clear line with a documented exit code (no traceback), and resume holds in every edge case.

Most cases run the real CLI in-process (`tuneforge.cli.main`), which catches the same exceptions the
console script does; cases that need a signal or a second process run it as a subprocess.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import CHAT_RECORDS, tiny_spec, write_jsonl
from tuneforge.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `tuneforge ARGS` in this process: (exit code, stdout, stderr). A traceback fails the test."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes, so a test can assert that nothing changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS * 2)


@pytest.fixture
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


# ---------------------------------------------------------------- data loss


def test_overwrite_refuses_a_folder_tuneforge_did_not_make(capsys, llama, data, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(llama, data, mine, max_steps=1))
    code, _, err = cli(capsys, "train", spec, "--overwrite")
    assert code == 1
    assert f"{mine}" in err and "did not make" in err
    assert (mine / "chapter1.tex").read_text() == "years of work"


def test_overwrite_validates_everything_before_deleting(capsys, llama, data, tmp_path):
    run = tmp_path / "run"
    spec = tiny_spec(llama, data, run, max_steps=1)
    assert cli(capsys, "train", write_spec(tmp_path / "job.yaml", spec))[0] == 0
    before = tree(run)
    broken = {**spec, "data": {"train": str(tmp_path / "missing.jsonl")}}
    code, _, err = cli(capsys, "train", write_spec(tmp_path / "broken.yaml", broken), "--overwrite")
    assert code == 1 and "missing.jsonl: data file not found" in err
    assert tree(run) == before


def test_overwrite_removes_only_what_tuneforge_wrote(capsys, llama, data, tmp_path):
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(llama, data, run, max_steps=2, save_every=1))
    assert cli(capsys, "train", spec)[0] == 0
    (run / "my-notes.md").write_text("keep me")
    (run / "checkpoints" / "step-000099").mkdir()  # a stale checkpoint must not survive --overwrite
    (run / "checkpoints" / "step-000099" / "state.json").write_text("{}")
    assert cli(capsys, "train", spec, "--overwrite", "--set", "training.max_steps=1")[0] == 0
    assert (run / "my-notes.md").read_text() == "keep me"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


@pytest.mark.parametrize("where", ["", ".", "cwd-parent", "home"])
def test_output_dir_never_the_current_folder_a_parent_or_home(capsys, llama, data, tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("x")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    out = {"": "", ".": ".", "cwd-parent": str(tmp_path), "home": "~"}[where]
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(llama, data, Path("x"), max_steps=1) | {"output_dir": out})
    code, _, err = cli(capsys, "train", spec, "--overwrite")
    assert code == 2 and "output_dir" in err
    assert (work / "precious.txt").read_text() == "x" and (tmp_path / "job.yaml").exists()


def test_demo_refuses_a_folder_it_did_not_make_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8")
    started = time.time()
    code, _, err = cli(capsys, "demo", "--output-dir", mine)
    assert code == 1 and f"{mine}" in err and "did not make" in err
    assert (mine / "cat.jpg").read_bytes() == b"\xff\xd8"
    assert not (tmp_path / "data").exists(), "nothing may be written before the output folder is checked"
    assert time.time() - started < 10, "refused only after loading a model"


@pytest.fixture
def finished_run(capsys, llama, data, tmp_path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(llama, data, run, max_steps=2, save_every=1))
    assert cli(capsys, "train", spec)[0] == 0
    return spec, run


def test_merge_refuses_a_folder_it_did_not_make(capsys, finished_run, tmp_path):
    _, run = finished_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("a")
    code, _, err = cli(capsys, "merge", run, "--out", mine)
    assert code == 1 and f"{mine}" in err and (mine / "a.txt").read_text() == "a"


def test_merge_onto_its_own_run_is_refused(capsys, finished_run, tmp_path):
    _, run = finished_run
    before = tree(run)
    for target in (run, run / "adapter", run.parent):
        code, _, err = cli(capsys, "merge", run, "--out", target)
        assert code == 1 and "run" in err, target
    assert tree(run) == before


def test_merge_onto_a_file_leaves_nothing_behind(capsys, finished_run, tmp_path):
    _, run = finished_run
    target = tmp_path / "model.bin"
    target.write_text("not a folder")
    code, _, err = cli(capsys, "merge", run, "--out", target)
    assert code == 1 and "not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert target.read_text() == "not a folder"


def test_merge_replaces_its_own_earlier_output(capsys, finished_run, tmp_path):
    _, run = finished_run
    out = tmp_path / "merged"
    assert cli(capsys, "merge", run, "--out", out)[0] == 0
    (out / "stale.txt").write_text("from an older merge")
    assert cli(capsys, "merge", run, "--out", out)[0] == 0
    assert (out / "config.json").exists() and not (out / "stale.txt").exists()


# ---------------------------------------------------------------- resume and interruption


def test_resume_of_a_finished_run_changes_nothing(capsys, finished_run):
    spec, run = finished_run
    before = tree(run)
    for extra in ([], ["--set", "training.max_steps=1"]):
        code, _, err = cli(capsys, "train", spec, "--resume", *extra)
        assert code == 0 and "already finished" in err, err
        assert tree(run) == before


def test_resume_keeps_the_schedule_it_started_with(capsys, llama, data, tmp_path):
    straight = tiny_spec(llama, data, tmp_path / "straight", max_steps=8, save_every=1, scheduler="linear")
    split = {**straight, "output_dir": str(tmp_path / "split")}
    assert cli(capsys, "train", write_spec(tmp_path / "a.yaml", straight))[0] == 0
    path = write_spec(tmp_path / "b.yaml", split)
    assert cli(capsys, "train", path, "--stop-after", 3)[0] == 0
    # Stopping earlier than planned keeps every remaining step's learning rate.
    assert cli(capsys, "train", path, "--resume", "--set", "training.max_steps=5")[0] == 0
    assert [m["lr"] for m in metrics(tmp_path / "split")] == [m["lr"] for m in metrics(tmp_path / "straight")][:5]
    # Going past the horizon would stretch the schedule: refused, nothing changed.
    before = tree(tmp_path / "split")
    code, _, err = cli(capsys, "train", path, "--resume", "--set", "training.max_steps=12")
    assert code == 1 and "schedule" in err and tree(tmp_path / "split") == before


def test_resume_and_overwrite_together_is_a_usage_error(capsys, finished_run):
    spec, run = finished_run
    before = tree(run)
    code, _, err = cli(capsys, "train", spec, "--resume", "--overwrite")
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert tree(run) == before


def _start_and_signal(path: Path, run: Path, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(path), "--quiet"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_signal_before_the_first_checkpoint_saves_one(capsys, llama, tmp_path, sig, code):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS * 40)
    straight = tiny_spec(llama, data, tmp_path / "straight", max_steps=60, batch_size=1, save_every=1000)
    split = {**straight, "output_dir": str(tmp_path / "split")}
    path = write_spec(tmp_path / "job.yaml", split)
    proc = _start_and_signal(path, tmp_path / "split", sig)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    ckpts = list((tmp_path / "split" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1, proc.stderr[-2000:]
    step = int(ckpts[0].name.split("-")[1])
    assert 1 <= step < 60 and f"step {step}" in proc.stderr and "--resume" in proc.stderr
    assert cli(capsys, "train", path, "--resume")[0] == 0
    assert cli(capsys, "train", write_spec(tmp_path / "s.yaml", straight))[0] == 0
    assert [m["train_loss"] for m in metrics(tmp_path / "split")] == pytest.approx(
        [m["train_loss"] for m in metrics(tmp_path / "straight")], abs=1e-6)


def test_damaged_checkpoint_falls_back_to_the_previous_one(capsys, llama, data, tmp_path):
    straight = tiny_spec(llama, data, tmp_path / "straight", max_steps=6, save_every=2)
    split = {**straight, "output_dir": str(tmp_path / "split")}
    assert cli(capsys, "train", write_spec(tmp_path / "a.yaml", straight))[0] == 0
    path = write_spec(tmp_path / "b.yaml", split)
    assert cli(capsys, "train", path, "--stop-after", 4)[0] == 0
    damaged = tmp_path / "split" / "checkpoints" / "step-000004" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated, as by a failing disk
    with (tmp_path / "split" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train_lo')  # a torn last line
    code, _, err = cli(capsys, "train", path, "--resume")
    assert code == 0 and str(damaged) in err and "step-000002" in err
    assert [m["train_loss"] for m in metrics(tmp_path / "split")] == pytest.approx(
        [m["train_loss"] for m in metrics(tmp_path / "straight")], abs=1e-6)


def test_moved_run_folder_resumes_where_it_now_lies(capsys, llama, data, tmp_path):
    straight = tiny_spec(llama, data, tmp_path / "straight", max_steps=5, save_every=2)
    assert cli(capsys, "train", write_spec(tmp_path / "a.yaml", straight))[0] == 0
    path = write_spec(tmp_path / "b.yaml", {**straight, "output_dir": str(tmp_path / "old")})
    assert cli(capsys, "train", path, "--stop-after", 2)[0] == 0
    shutil.move(tmp_path / "old", tmp_path / "new")
    assert cli(capsys, "train", tmp_path / "new", "--resume")[0] == 0
    assert yaml.safe_load((tmp_path / "new" / "spec.yaml").read_text())["output_dir"] == str(tmp_path / "new")
    assert [m["train_loss"] for m in metrics(tmp_path / "new")] == pytest.approx(
        [m["train_loss"] for m in metrics(tmp_path / "straight")], abs=1e-6)
    # The copied spec.yaml inside the run works as well as the folder itself.
    shutil.copytree(tmp_path / "new", tmp_path / "copy")
    code, _, err = cli(capsys, "train", tmp_path / "copy" / "spec.yaml", "--resume")
    assert code == 0 and "already finished" in err


def _mount_tmpfs(path: Path, size: str, *opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    options = ",".join([f"size={size}", *opts])
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:  # no mount command
        return False


def test_disk_full_says_so_and_keeps_the_previous_checkpoint(capsys, llama, data, tmp_path, monkeypatch):
    """A real full disk where the machine lets us mount a small tmpfs; otherwise the OS's ENOSPC, injected."""
    import errno

    from tuneforge.distributed import strategy

    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "4m")
    try:
        if mounted:  # leave room for one checkpoint (~0.4 MB at r=8) but not two
            st = os.statvfs(disk)
            (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 600 * 1024))
        run = disk / "run"
        spec = tiny_spec(llama, data, run, max_steps=6, save_every=1)
        spec["adapter"]["r"] = 8 if mounted else 4
        calls = []
        if not mounted:
            real = strategy.save_file

            def save_file(tensors, path, *a, **kw):
                calls.append(path)
                if len(calls) == 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(tensors, path, *a, **kw)

            monkeypatch.setattr(strategy, "save_file", save_file)
        code, _, err = cli(capsys, "train", write_spec(tmp_path / "job.yaml", spec))
        assert code == 1 and "disk is full" in err.lower(), err
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names and all(n.startswith("step-") for n in names), names  # no temporary left behind
        assert f"kept {names[-1]}" in err
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


# ---------------------------------------------------------------- tracebacks and exit codes


@pytest.mark.parametrize("kind", ["file", "parent-file", "read-only"])
def test_unusable_output_dir_is_found_before_the_model_loads(capsys, llama, data, tmp_path, kind):
    if kind == "file":
        out = tmp_path / "out"
        out.write_text("x")
    elif kind == "parent-file":
        (tmp_path / "parent").write_text("x")
        out = tmp_path / "parent" / "run"
    else:
        if not _mount_tmpfs(tmp_path / "ro", "1m", "ro"):
            pytest.skip("cannot mount a read-only tmpfs here")
        out = tmp_path / "ro" / "run"
    try:
        spec = write_spec(tmp_path / "job.yaml", tiny_spec(tmp_path / "no-model-here", data, out, max_steps=1))
        code, _, err = cli(capsys, "train", spec)
        # The output folder is checked first: its message, not the (also missing) model's.
        assert code == 1 and "output_dir" in err and str(out) in err and "no-model-here" not in err, err
    finally:
        if kind == "read-only":
            subprocess.run(["umount", str(tmp_path / "ro")], check=False)


def test_model_folder_without_tokenizer(capsys, llama, data, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(llama / "config.json", bare / "config.json")
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(bare, data, tmp_path / "run", max_steps=1))
    code, _, err = cli(capsys, "train", spec)
    assert code == 1 and "tokenizer" in err and str(bare) in err
    assert not (tmp_path / "run").exists()


def test_text_file_named_gguf(capsys, data, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("hello")
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(fake, data, tmp_path / "run", max_steps=1))
    code, _, err = cli(capsys, "train", spec)
    assert code == 1 and "not a GGUF file" in err and str(fake) in err


def test_spec_path_that_is_a_folder_is_a_spec_error(capsys, tmp_path):
    code, _, err = cli(capsys, "train", tmp_path)
    assert code == 2 and str(tmp_path) in err


@pytest.mark.parametrize("args", [
    ["generate", "MODEL", "--prompt", "hi", "--max-new-tokens", "-5"],
    ["generate", "MODEL", "--prompt", "hi", "--temperature", "-1"],
    ["eval", "MODEL", "--data", "DATA", "--max-seq-len", "0"],
    ["eval", "MODEL", "--data", "DATA", "--max-new-tokens", "0"],
])
def test_out_of_range_numbers_are_usage_errors(capsys, llama, data, args):
    args = [str(llama) if a == "MODEL" else str(data) if a == "DATA" else a for a in args]
    code, _, err = cli(capsys, *args)
    assert code == 2 and "must be" in err


def test_fp16_trains_with_a_gradient_scaler(capsys, llama, data, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(llama, data, tmp_path / "run", max_steps=4, precision="fp16"))
    code, out, _ = cli(capsys, "train", spec, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["precision"] == "float16" and summary["grad_scaler"] is True
    losses = [m["train_loss"] for m in metrics(tmp_path / "run")]
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    scaler = torch_load(next((tmp_path / "run" / "checkpoints").glob("step-*")) / "grad_scaler.pt")
    assert scaler["scale"] > 1  # the scale is part of the checkpoint, so resume stays exact


def torch_load(path):
    import torch

    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- messages that mislead


def test_set_errors_are_blamed_on_set(capsys, llama, data, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(llama, data, tmp_path / "run", max_steps=1))
    code, _, err = cli(capsys, "train", spec, "--set", "foo.bar=1")
    assert code == 2 and "--set foo.bar: foo:" in err and "job.yaml line" not in err
    code, _, err = cli(capsys, "train", spec, "--set", "training.lr.x=1")
    assert code == 2 and "--set training.lr.x:" in err and "job.yaml line" not in err


def test_set_string_fields_are_strings(capsys, tmp_path):
    from tuneforge.spec import build_spec

    spec = {"model": "m", "task": "completion", "data": {"train": "t.jsonl"}}
    assert build_spec(spec, ["data.prompt_template=Q: {prompt} A:"]).data.prompt_template == "Q: {prompt} A:"
    assert build_spec(spec, ["output_dir=123"]).output_dir == "123"
    code, _, err = cli(capsys, "train", write_spec(tmp_path / "job.yaml", spec), "--set",
                       "data.prompt_template=Q: {quesion}")
    assert code == 2 and "quesion" in err and "valid string" not in err


def test_validation_split_that_leaves_nothing_to_train_on(capsys, llama, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", CHAT_RECORDS[:1])
    spec = tiny_spec(llama, data, tmp_path / "run", max_steps=1)
    spec["data"]["validation_split"] = 0.1
    code, _, err = cli(capsys, "train", write_spec(tmp_path / "job.yaml", spec))
    assert code == 1 and "validation_split" in err and "too long" not in err


def test_generate_without_prompts_is_an_error(capsys, llama, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = cli(capsys, "generate", llama)
    assert code == 2 and "no prompts" in err and out == ""


def test_missing_eval_data_is_reported_before_training(capsys, llama, data, tmp_path):
    spec = tiny_spec(llama, data, tmp_path / "run", max_steps=1)
    spec["eval"] = {"data": str(tmp_path / "heldout.jsonl")}
    code, _, err = cli(capsys, "train", write_spec(tmp_path / "job.yaml", spec))
    assert code == 1 and "heldout.jsonl: data file not found" in err
    assert not (tmp_path / "run").exists()


def test_report_on_an_unfinished_run_fails_before_evaluating(capsys, llama, data, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(llama, data, tmp_path / "run", max_steps=4))
    assert cli(capsys, "train", spec, "--stop-after", 1)[0] == 0
    started = time.time()
    code, _, err = cli(capsys, "report", tmp_path / "run", "--data", data)
    assert code == 1 and "not finished" in err and "--resume" in err
    assert time.time() - started < 5
