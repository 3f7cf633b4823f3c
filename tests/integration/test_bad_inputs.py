"""A battery of bad inputs and faults, as a new user makes them, run through the real CLI and the Python API.

Every case runs in a fresh sandbox that looks like a user's machine: a HOME with dot files, a current folder
with notes, its parent, a data folder, a model folder (a tiny random Llama) and a folder of the user's own
files, each holding sentinel files. A case passes when

  (a) no Python traceback reaches the user: `tuneforge.cli.main` (or the API call) raises nothing but a
      `TuneforgeError` (the CLI turns those into `error: ...`) or argparse's SystemExit;
  (b) the exit code is the documented one (0 ok; 1 a run, data, model, output or checkpoint problem; 2 an
      invalid spec or command line; 130 Ctrl-C; 143 SIGTERM);
  (c) every file and folder that tuneforge did not make is still there with the same bytes;
  (d) the message names the offending file / field / value where that makes sense (`says`).

Cases run in-process (the suite stays fast); the table (`CASES`) and the runner (`run_case`) are shared with
`bench/bad_inputs.py`, which adds cases that need a real process (signals, kill -9) and prints the totals.
A known tuneforge defect can be recorded on its case (`defect="what goes wrong"`): the test then expects the
case to fail (xfail, strict: once the defect is fixed the mark must go), and the bench counts it as a failing case
with the defect attached. No defect is recorded at present: every case states what a correct tuneforge does.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.conftest import CHAT_RECORDS

DOCUMENTED_CODES = (0, 1, 2, 130, 143)
CASE_TIMEOUT_S = 60
DELETE = object()  # `changes` value: remove the key from the spec

# ====================================================================================== the harness


@dataclass
class Case:
    """One bad input. Exactly one of `argv` (the CLI, tokens <WORK> <HOME> <ROOT> expanded) and `api` (a call
    given the sandbox) is set. `code`: the expected exit code (an API call's: 0 when it returns, else the
    TuneforgeError's exit_code); a tuple allows several. `says`: substrings the output (or the error) must hold."""

    id: str
    argv: list[str] | None = None
    api: Callable[["Sandbox"], Any] | None = None
    setup: Callable[["Sandbox"], None] | None = None
    code: int | tuple[int, ...] = 0
    says: tuple[str, ...] = ()
    stdin: str | bytes | None = None
    stdin_errors: str = "strict"  # how a UTF-8 terminal decodes stdin (en_US.UTF-8: strict)
    check: Callable[["Sandbox", "Outcome"], str | None] | None = None  # an extra expectation; returns a problem
    defect: str | None = None  # a known tuneforge defect this case shows (xfail strict); none at present


@dataclass
class Outcome:
    case: str
    code: int | None = None
    out: str = ""
    err: str = ""
    traceback: str | None = None  # an exception other than TuneforgeError / argparse's SystemExit
    exception: str | None = None  # its type and first line
    changed: list[str] = field(default_factory=list)  # user files/folders deleted or changed
    problems: list[str] = field(default_factory=list)  # everything wrong, one line each
    wrong_code: bool = False
    missing_text: list[str] = field(default_factory=list)
    seconds: float = 0.0
    result: Any = None  # an API call's return value

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        text = "\n".join(self.problems)
        tail = (self.err or "")[-1500:]
        return f"{text}\n--- stdout (tail)\n{self.out[-800:]}\n--- stderr (tail)\n{tail}" + (
            f"\n--- traceback\n{self.traceback[-2500:]}" if self.traceback else "")


class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs past CASE_TIMEOUT_S (BaseException: no `except Exception` eats it)."""


class _StderrProxy(io.TextIOBase):
    """A stream that writes to whatever sys.stderr is at the moment (log records land in the case's output)."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


_LOG_HANDLER = logging.StreamHandler(_StderrProxy())
# Installed on the root logger around each case (so `main`'s logging.basicConfig never binds a handler to one
# case's captured stderr): log records land in the output of the case that made them.
_LOG_HANDLER.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))


@dataclass
class Env:
    """Shared, read-only material for the sandboxes: tiny models and finished / stopped template runs."""

    root: Path
    tiny: dict[str, Path]
    cache: Path

    @property
    def template(self) -> Path:
        return self.root / "template"


def base_spec() -> dict:
    """A job a new user might write, relative to the current folder: a tiny model, chat data, one step."""
    return {
        "model": "model",
        "task": "chat",
        "data": {"train": "data/train.jsonl"},
        "method": "lora",
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"epochs": 1, "max_steps": 1, "batch_size": 4, "lr": 1e-2, "precision": "fp32",
                     "warmup_ratio": 0.0, "max_seq_len": 128, "eval_every": 1000, "save_every": 1000},
        "device": "cpu",
        "output_dir": "runs/run",
    }


def with_changes(spec: dict, changes: dict | None) -> dict:
    """`spec` with dotted keys set (`{"training.lr": 0}`); a value of DELETE removes the key."""
    spec = json.loads(json.dumps(spec))
    for dotted, value in (changes or {}).items():
        node = spec
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if value is DELETE:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return spec


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


CHAT_DATA = CHAT_RECORDS + [  # 16 distinct conversations (duplicates would only add warnings)
    {"messages": [*r["messages"][:-1], {**r["messages"][-1], "content": r["messages"][-1]["content"] + " Sure."}]}
    for r in CHAT_RECORDS]
USER_FILES = {  # relative to the sandbox root: the user's own things
    "OUTSIDE.txt": b"parent of the current folder\n",
    "home/.bashrc": b"export PATH=$HOME/bin:$PATH\n",
    "home/notes/todo.md": b"- buy milk\n",
    "work/NOTES.txt": b"my notes in the current folder\n",
    "work/data/README.txt": b"where my data came from\n",
    "work/mine/thesis.tex": b"\\chapter{Years of work}\n",
    "work/mine/photo.jpg": b"\xff\xd8\xff\xe0 not really a photo",
    "work/mine/sub/deep.txt": b"deep\n",
}


class Sandbox:
    """A user's machine in a temporary folder: `root` (the parent of the current folder), `home` (HOME),
    `work` (the current folder) with data/, model/ and mine/ (the user's own files)."""

    def __init__(self, env: Env, root: Path):
        self.env, self.root = env, root
        self.home, self.work = root / "home", root / "work"
        for rel, content in USER_FILES.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        self.write("data/train.jsonl", jsonl(CHAT_DATA))
        self.write("data/heldout.jsonl", jsonl(CHAT_RECORDS[:4]))
        shutil.copytree(env.tiny["llama"], self.work / "model")
        self.write("model/MODEL-NOTES.txt", "where I downloaded this model\n")
        self.write("job.yaml", yaml.safe_dump(base_spec()))

    # ---- helpers for setups
    def path(self, rel: str | Path) -> Path:
        return self.work / rel

    def write(self, rel: str | Path, content: str | bytes) -> Path:
        p = self.work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return p

    def spec(self, changes: dict | None = None) -> dict:
        return with_changes(base_spec(), changes)

    def write_spec(self, spec: dict | str | bytes, name: str = "job.yaml") -> Path:
        return self.write(name, spec if isinstance(spec, (str, bytes)) else yaml.safe_dump(spec, sort_keys=False))

    def run(self, name: str, as_name: str | None = None) -> str:
        """Copy a template run (lora, stopped, prompt, merged) into runs/; return its relative path."""
        target = self.work / "runs" / (as_name or name)
        shutil.copytree(self.env.template / "work" / "runs" / name, target, symlinks=True)
        return f"runs/{as_name or name}"

    def model_copy(self, name: str, arch: str = "llama") -> Path:
        target = self.work / name
        shutil.copytree(self.env.tiny[arch], target)
        return target

    def expand(self, text: str) -> str:
        return text.replace("<WORK>", str(self.work)).replace("<HOME>", str(self.home)).replace("<ROOT>", str(self.root))


# ---- what the user owns, and whether it survived

_OWNED_TOP = None


def _run_outputs() -> set[str]:
    global _OWNED_TOP
    if _OWNED_TOP is None:
        from tuneforge.files import MERGE_MARKER, RUN_MARKER, RUN_OUTPUTS

        _OWNED_TOP = (set(RUN_OUTPUTS) | {RUN_MARKER}, RUN_MARKER, MERGE_MARKER)
    return _OWNED_TOP


def _tuneforge_made(path: Path, root: Path) -> bool:
    """True if `path` is something tuneforge wrote: inside a merge output, or a run output inside a run folder."""
    outputs, run_marker, merge_marker = _run_outputs()
    rel = path.relative_to(root)
    for i in range(len(rel.parts)):
        folder = root.joinpath(*rel.parts[:i]) if i else root
        if (folder / merge_marker).is_file() and not folder.is_symlink():
            return True
        if (folder / run_marker).is_file() and not folder.is_symlink():
            top = rel.parts[i]
            if top in outputs or top.startswith(".tmp-"):
                return True
    return False


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str | None]]:
    """Every file, folder and link under `root` that tuneforge did not make: (kind, bytes / link target)."""
    found: dict[str, tuple[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in dirnames + filenames:
            p = here / name
            if _tuneforge_made(p, root):
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                found[rel] = ("dir", None)
            elif p.is_file():
                found[rel] = ("file", p.read_bytes())
    return found


def damaged(before: dict, root: Path) -> list[str]:
    """The user's things from `before` that are gone or different now."""
    out = []
    for rel, (kind, value) in before.items():
        p = root / rel
        if kind == "link":
            if not p.is_symlink():
                out.append(f"{rel} (symlink) was deleted")
            elif os.readlink(p) != value:
                out.append(f"{rel} (symlink) was changed")
        elif kind == "dir":
            if p.is_symlink() or not p.is_dir():
                out.append(f"{rel}/ (folder) was deleted")
        elif p.is_symlink() or not p.is_file():
            out.append(f"{rel} was deleted")
        elif p.read_bytes() != value:
            out.append(f"{rel} was changed")
    return out


# ---- running one case


@contextlib.contextmanager
def _user_session(sb: Sandbox, stdin: io.TextIOBase):
    """cwd, HOME, stdin and the converted-model cache as a user's shell has them; restored afterwards."""
    saved_env = {k: os.environ.get(k) for k in ("HOME", "TUNEFORGE_CACHE")}
    saved_cwd, saved_stdin, saved_argv = os.getcwd(), sys.stdin, sys.argv
    root_logger = logging.getLogger()
    root_logger.addHandler(_LOG_HANDLER)
    os.environ["HOME"] = str(sb.home)
    os.environ["TUNEFORGE_CACHE"] = str(sb.env.cache)
    os.chdir(sb.work)
    sys.stdin = stdin
    sys.argv = ["tuneforge"]
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.stdin, sys.argv = saved_stdin, saved_argv
        root_logger.removeHandler(_LOG_HANDLER)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _alarm(seconds: int):
    if threading_main():
        def fire(signum, frame):
            raise CaseTimeout(f"case ran past {seconds} s")

        previous = signal.signal(signal.SIGALRM, fire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    else:
        yield


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stdin_for(case: Case) -> io.TextIOBase:
    data = case.stdin if case.stdin is not None else ""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors=case.stdin_errors)


def run_case(case: Case, env: Env, tmp_root: Path | None = None) -> Outcome:
    """Run `case` in a fresh sandbox and judge it; the sandbox is removed afterwards."""
    import time

    from tuneforge.errors import TuneforgeError

    owned_tmp = tmp_root is None
    base = Path(tempfile.mkdtemp(prefix="bad-input-")) if owned_tmp else tmp_root
    sb = Sandbox(env, base / "user")
    outcome = Outcome(case.id)
    started = time.time()
    try:
        if case.setup:
            case.setup(sb)
        before = snapshot(sb.root)
        out, err = io.StringIO(), io.StringIO()
        with _user_session(sb, _stdin_for(case)), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                with _alarm(CASE_TIMEOUT_S):
                    if case.argv is not None:
                        from tuneforge.cli import main

                        try:
                            outcome.code = main([sb.expand(a) for a in case.argv])
                        except SystemExit as e:  # argparse (usage errors exit 2, --help 0)
                            outcome.code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    else:
                        try:
                            outcome.result = case.api(sb)
                            outcome.code = 0
                        except TuneforgeError as e:
                            outcome.code = e.exit_code
                            print(f"error: {e}", file=sys.stderr)
            except BaseException as e:  # a traceback the user would see (or a hang)
                outcome.traceback = "".join(traceback.format_exception(e))
                first = (str(e).strip().splitlines() or [""])[0][:300]
                outcome.exception = f"{type(e).__module__}.{type(e).__qualname__}: {first}".removeprefix("builtins.")
        outcome.out, outcome.err = out.getvalue(), err.getvalue()
        outcome.changed = damaged(before, sb.root)
        judge(case, sb, outcome)
    finally:
        outcome.seconds = time.time() - started
        if owned_tmp:
            shutil.rmtree(base, ignore_errors=True)
    return outcome


def judge(case: Case, sb: Sandbox, o: Outcome) -> None:
    expected = case.code if isinstance(case.code, tuple) else (case.code,)
    text = o.out + o.err
    if o.traceback or "Traceback (most recent call last)" in text:
        last = o.exception or (o.traceback or text).strip().splitlines()[-1]
        o.problems.append(f"traceback: {last}")
    elif o.code not in expected:
        o.wrong_code = True
        note = "" if o.code in DOCUMENTED_CODES else " (undocumented)"
        o.problems.append(f"exit code {o.code}{note}, expected {' or '.join(map(str, expected))}")
    for rel in o.changed:
        o.problems.append(f"user data damaged: {rel}")
    if not o.traceback:
        o.missing_text = [s for s in (sb.expand(s) for s in case.says) if s not in text]
        if o.missing_text:
            o.problems.append(f"message does not say {o.missing_text!r}")
        if case.check:
            problem = case.check(sb, o)
            if problem:
                o.problems.append(problem)


# ---- the shared environment: tiny models and template runs, built once per process


def _quiet_main(argv: list[str], cwd: Path) -> int:
    from tuneforge.cli import main

    saved = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(argv)
    finally:
        os.chdir(saved)
    if code != 0:
        raise RuntimeError(f"preparing the template runs failed: tuneforge {' '.join(argv)}\n{err.getvalue()}")
    return code


def make_tiny_models(root: Path) -> dict[str, Path]:
    from tuneforge.models.tiny import ARCHITECTURES, make_tiny_model

    with contextlib.redirect_stderr(io.StringIO()):
        return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


def prepare_env(root: Path, tiny: dict[str, Path]) -> Env:
    """Template runs in `root/template/work/runs` built with the sandbox's relative layout (model/, data/), so
    a copied run is at home in any sandbox: lora (finished, 2 checkpoints), stopped (step 1 of 3), prompt
    (prompt tuning, finished) and merged (a merge of lora)."""
    cache = root / "cache"
    real_cache = Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))
    repo_cache = Path(__file__).resolve().parents[2] / ".cache" / "tuneforge"
    (cache / "models").mkdir(parents=True, exist_ok=True)
    for c in (real_cache, repo_cache):  # the converted SmolLM2 (for `data validate`'s default tokenizer)
        if (c / "models" / "smollm2-135m-instruct" / "config.json").is_file():
            link = cache / "models" / "smollm2-135m-instruct"
            if not link.exists():
                link.symlink_to(c / "models" / "smollm2-135m-instruct")
            break
    env = Env(root, tiny, cache)
    work = env.template / "work"
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "data" / "train.jsonl").write_text(jsonl(CHAT_DATA))
    (work / "data" / "heldout.jsonl").write_text(jsonl(CHAT_RECORDS[:4]))
    shutil.copytree(tiny["llama"], work / "model")
    saved_cache = os.environ.get("TUNEFORGE_CACHE")
    os.environ["TUNEFORGE_CACHE"] = str(cache)
    try:
        for name, changes, extra in (
            ("lora", {"training.max_steps": 2, "training.save_every": 1}, []),
            ("stopped", {"training.max_steps": 3, "training.save_every": 1}, ["--stop-after", "1"]),
            ("prompt", {"method": "prompt_tuning", "adapter.num_virtual_tokens": 4}, []),
        ):
            spec = with_changes(base_spec(), {**changes, "output_dir": f"runs/{name}"})
            (work / f"{name}.yaml").write_text(yaml.safe_dump(spec))
            _quiet_main(["train", f"{name}.yaml", "--quiet", *extra], work)
        _quiet_main(["merge", "runs/lora", "--out", "runs/merged"], work)
    finally:
        if saved_cache is None:
            os.environ.pop("TUNEFORGE_CACHE", None)
        else:
            os.environ["TUNEFORGE_CACHE"] = saved_cache
    return env


# ====================================================================================== the table

CASES: list[Case] = []


def case(id: str, argv: list[str] | None = None, **kw) -> Case:
    c = Case(id, argv=argv, **kw)
    CASES.append(c)
    return c


def _setup(*steps: Callable[[Sandbox], Any]) -> Callable[[Sandbox], None]:
    def run(sb: Sandbox) -> None:
        for step in steps:
            step(sb)

    return run


def spec_file(changes: dict | None = None, name: str = "job.yaml") -> Callable[[Sandbox], Any]:
    return lambda sb: sb.write_spec(sb.spec(changes), name)


def text_file(rel: str, content: str | bytes) -> Callable[[Sandbox], Any]:
    return lambda sb: sb.write(rel, content)


def copy_run(name: str, as_name: str | None = None) -> Callable[[Sandbox], Any]:
    return lambda sb: sb.run(name, as_name)


def user_notes_in(rel: str) -> Callable[[Sandbox], Any]:
    """The user's own file inside a (tuneforge-made) folder: it must survive whatever tuneforge does there."""
    return lambda sb: sb.write(f"{rel}/my-notes.md", "my notes about this run\n")


# ---------------------------------------------------------------- sanity: the good path works in the sandbox

case("sanity-train", ["train", "job.yaml"], code=0, says=("done: step 1/1",))
case("sanity-api-train", api=lambda sb: __import__("tuneforge").train(sb.spec(), progress=False), code=0)

# ---------------------------------------------------------------- the spec file itself

case("spec-missing", ["train", "nope.yaml"], code=2, says=("nope.yaml", "not found"))
case("spec-is-a-folder", ["train", "data"], code=2, says=("data", "is a folder"))
case("spec-0-bytes", ["train", "job.yaml"], setup=text_file("job.yaml", b""), code=2,
     says=("model", "data", "required"))
case("spec-only-comments", ["train", "job.yaml"], setup=text_file("job.yaml", "# my first job\n# TODO\n"), code=2,
     says=("model", "required"))
case("spec-is-a-list", ["train", "job.yaml"], setup=text_file("job.yaml", "- model: model\n- task: chat\n"),
     code=2, says=("job.yaml", "mapping", "list"))
case("spec-is-a-scalar", ["train", "job.yaml"], setup=text_file("job.yaml", "hello\n"), code=2,
     says=("job.yaml", "mapping"))
case("spec-binary", ["train", "job.yaml"], setup=text_file("job.yaml", bytes(range(256)) * 4), code=2,
     says=("job.yaml", "UTF-8"))
case("spec-utf16", ["train", "job.yaml"],
     setup=lambda sb: sb.write("job.yaml", yaml.safe_dump(sb.spec()).encode("utf-16")), code=2,
     says=("job.yaml", "UTF-8"))
case("spec-utf8-bom", ["train", "job.yaml"],
     setup=lambda sb: sb.write("job.yaml", b"\xef\xbb\xbf" + yaml.safe_dump(sb.spec()).encode()), code=0)
case("spec-crlf", ["train", "job.yaml"],
     setup=lambda sb: sb.write("job.yaml", yaml.safe_dump(sb.spec()).replace("\n", "\r\n")), code=0)
case("spec-tab-indent", ["train", "job.yaml"],
     setup=text_file("job.yaml", "model: model\ndata:\n\ttrain: data/train.jsonl\noutput_dir: runs/run\n"),
     code=2, says=("job.yaml line 3", "YAML"))
case("spec-unclosed-bracket", ["train", "job.yaml"],
     setup=text_file("job.yaml", "model: model\ndata: {train: data/train.jsonl\noutput_dir: runs/run\n"),
     code=2, says=("job.yaml", "YAML"))
case("spec-anchors-and-aliases", ["train", "job.yaml"],
     setup=lambda sb: sb.write("job.yaml", yaml.safe_dump(sb.spec()).replace("max_steps: 1", "max_steps: &one 1")
                               .replace("save_every: 1000", "save_every: *one")), code=0)
case("spec-alias-to-unknown-anchor", ["train", "job.yaml"],
     setup=lambda sb: sb.write("job.yaml", yaml.safe_dump(sb.spec()).replace("max_steps: 1", "max_steps: *n")),
     code=2, says=("job.yaml", "YAML"))
case("spec-merge-key", ["train", "job.yaml"],
     setup=text_file("job.yaml", "defaults: &d {lr: 0.01, max_steps: 1, precision: fp32}\nmodel: model\n"
                     "data: {train: data/train.jsonl}\ntraining: {<<: *d, batch_size: 4}\noutput_dir: runs/run\n"),
     code=2, says=("defaults", "unknown key"))
def _names_both_lines(key: str) -> Callable[["Sandbox", "Outcome"], str | None]:
    """The message names the line of each time `key` (top level) is given in job.yaml."""

    def check(sb: Sandbox, o: Outcome) -> str | None:
        lines = [i for i, line in enumerate((sb.work / "job.yaml").read_text().splitlines(), 1)
                 if line.startswith(f"{key}:")]
        missing = [n for n in lines if not re.search(rf"\b{n}\b", o.err)]
        return f"the message does not name line(s) {missing} of {lines} where {key} is given" if missing else None

    return check


case("spec-duplicate-key", ["train", "job.yaml"],
     setup=lambda sb: sb.write("job.yaml", yaml.safe_dump(sb.spec()) + "model: some-other-model\n"), code=2,
     says=("job.yaml line", "model", "given twice"), check=_names_both_lines("model"))
case("spec-duplicate-nested-key", ["train", "job.yaml"],
     setup=text_file("job.yaml", "model: model\ndata: {train: data/train.jsonl}\ntraining:\n  max_steps: 1\n"
                     "  precision: fp32\n  max_steps: 2\noutput_dir: runs/run\n"), code=2,
     says=("job.yaml line 6", "training.max_steps", "given twice", "line 4"))
case("spec-yaml-1e-4-is-a-string", ["train", "job.yaml"],
     setup=lambda sb: sb.write("job.yaml", yaml.safe_dump(sb.spec()).replace("lr: 0.01", "lr: 1e-4")), code=0)
case("spec-multi-document", ["train", "job.yaml"],
     setup=lambda sb: sb.write("job.yaml", yaml.safe_dump(sb.spec()) + "---\n" + yaml.safe_dump(sb.spec())),
     code=2, says=("job.yaml",))
case("spec-python-tag", ["train", "job.yaml"],
     setup=text_file("job.yaml", "model: !!python/object/apply:os.system ['echo hacked']\n"), code=2,
     says=("job.yaml",))
case("spec-jsonl-given-as-spec", ["train", "data/train.jsonl"], code=2, says=("data/train.jsonl",))
case("spec-without-model", ["train", "job.yaml"], setup=spec_file({"model": DELETE}), code=2,
     says=("model", "required"))
case("spec-without-data", ["train", "job.yaml"], setup=spec_file({"data": DELETE}), code=2, says=("data", "required"))
case("spec-without-output-dir", ["train", "job.yaml"], setup=spec_file({"output_dir": DELETE}), code=0,
     says=("runs/demo",))
case("spec-unknown-top-key", ["train", "job.yaml"], setup=spec_file({"modle": "model"}), code=2,
     says=("modle", "did you mean 'model'"))
case("spec-unknown-nested-key", ["train", "job.yaml"], setup=spec_file({"training.learning_rate": 0.1}), code=2,
     says=("job.yaml line", "training.learning_rate", "valid keys here", "lr"))
case("spec-unknown-nested-key-typo", ["train", "job.yaml"], setup=spec_file({"training.batch_sise": 2}), code=2,
     says=("training.batch_sise", "did you mean 'training.batch_size'"))
case("spec-every-problem-at-once", ["train", "job.yaml"],
     setup=spec_file({"training.lr": -1, "training.batch_size": 0, "task": "chatt"}), code=2,
     says=("training.lr", "training.batch_size", "task", "3 problem"))

for key, value, says in [
    ("model", None, "model"), ("model", [], "model"), ("model", 123, "model"), ("model", {"a": 1}, "model"),
    ("task", "chatt", "task"), ("task", None, "task"), ("task", "", "task"), ("task", ["chat"], "task"),
    ("method", "lora2", "method"), ("method", "LoRA", "method"), ("method", None, "method"),
    ("device", "gpu", "device"), ("device", "cuda", "device"), ("device", 0, "device"),
    ("output_dir", None, "output_dir"), ("output_dir", ["runs/a"], "output_dir"),
    ("data", "data/train.jsonl", "data"), ("data", {}, "data.train"), ("data", None, "data"),
    ("data.train", None, "data.train"), ("data.train", ["data/train.jsonl"], "data.train"),
    ("data.overlong", "cut", "data.overlong"), ("data.validation_split", 0.5, "data.validation_split"),
    ("data.prompt_template", "Q: {prompt}", "data.prompt_template"),
    ("data.chat_template", "{% if %}", "data.chat_template"),
    ("adapter", "big", "adapter"), ("adapter.target_modules", 5, "adapter.target_modules"),
    ("training", [1, 2], "training"), ("training.scheduler", "cosin", "training.scheduler"),
    ("training.precision", "fp8", "training.precision"), ("training.optimizer", "sgd", "training.optimizer"),
    ("training.kernels", "fast", "training.kernels"), ("training.kernels", {"loss": "x"}, "training.kernels.loss"),
    ("training.packing", "maybe", "training.packing"), ("trust_remote_code", "yes please", "trust_remote_code"),
    ("eval", "heldout.jsonl", "eval"), ("eval", {"before_after": True}, "eval.data"),
]:
    slug = f"{key}={json.dumps(value)}".replace(" ", "")
    case(f"spec-{slug}", ["train", "job.yaml"], setup=spec_file({key: value}), code=2, says=(says,))

case("spec-classification-without-labels", ["train", "job.yaml"], setup=spec_file({"task": "classification"}),
     code=2, says=("labels",))
case("spec-labels-a-string", ["train", "job.yaml"],
     setup=spec_file({"task": "classification", "labels": "pos,neg"}), code=2, says=("labels",))
case("spec-labels-empty", ["train", "job.yaml"], setup=spec_file({"task": "classification", "labels": []}),
     code=2, says=("labels",))
case("spec-labels-numbers", ["train", "job.yaml"], setup=spec_file({"task": "classification", "labels": [1, 2]}),
     code=2, says=("labels",))
case("spec-validation-and-split", ["train", "job.yaml"],
     setup=spec_file({"data.validation": "data/heldout.jsonl", "data.validation_split": 0.1}), code=2,
     says=("validation",))
case("spec-chat-template-on-completion", ["train", "job.yaml"],
     setup=spec_file({"task": "completion", "data.chat_template": "{{ messages }}"}), code=2,
     says=("data.chat_template",))
case("spec-prompt-template-unmatched-brace", ["train", "job.yaml"],
     setup=spec_file({"task": "completion", "data.prompt_template": "Q: {prompt"}), code=2,
     says=("data.prompt_template",))
case("spec-packing-with-prompt-tuning", ["train", "job.yaml"],
     setup=spec_file({"method": "prompt_tuning", "training.packing": True}), code=2, says=("training.packing",))
case("spec-bf16-base-with-full", ["train", "job.yaml"],
     setup=spec_file({"method": "full", "training.base_dtype": "bf16"}), code=2, says=("base_dtype",))
case("spec-model-empty-string", ["train", "job.yaml"], setup=spec_file({"model": ""}), code=2,
     says=("job.yaml line", "model"))
case("spec-data-train-empty-string", ["train", "job.yaml"], setup=spec_file({"data.train": ""}), code=2,
     says=("job.yaml line", "data.train"))

# ---------------------------------------------------------------- every numeric field, every wrong shape

NUMERIC = {  # field: (kind, minimum rule, nullable)
    "training.epochs": ("float", "gt0", False), "training.max_steps": ("int", "ge1", True),
    "training.batch_size": ("int", "ge1", False), "training.grad_accum": ("int", "ge1", False),
    "training.lr": ("float", "gt0", False), "training.warmup_ratio": ("float", "unit", False),
    "training.weight_decay": ("float", "ge0", False), "training.max_grad_norm": ("float", "gt0", True),
    "training.max_seq_len": ("int", "ge8", False), "training.seed": ("int", "any", False),
    "training.checkpoint_every": ("int", "ge1", False), "training.micro_batch_tokens": ("int", "ge16", True),
    "training.eval_every": ("int", "ge1", False), "training.save_every": ("int", "ge1", False),
    "training.keep_checkpoints": ("int", "ge1", False), "training.log_every": ("int", "ge1", False),
    "adapter.r": ("int", "ge1", False), "adapter.alpha": ("float", "gt0", False),
    "adapter.dropout": ("float", "unit", False), "adapter.num_virtual_tokens": ("int", "ge1", False),
    "data.validation_split": ("float", "half", True), "eval.max_new_tokens": ("int", "ge1", False),
    "eval.examples": ("int", "ge0", False),
}
SHAPES = {"list": [1], "map": {"a": 1}, "null": None, "text": "abc", "empty": "", "negative": -1, "zero": 0,
          "nan": float("nan"), "inf": float("inf"), "huge": 10**30, "fraction": 0.5, "true": True}
# Valid-but-odd values a field accepts: the job then simply runs (or fails later for a documented reason).
ACCEPTED = {
    ("training.max_steps", "null"), ("training.max_grad_norm", "null"), ("training.micro_batch_tokens", "null"),
    ("data.validation_split", "null"), ("training.seed", "zero"),
    ("training.warmup_ratio", "zero"), ("training.weight_decay", "zero"), ("adapter.dropout", "zero"),
    ("eval.examples", "zero"), ("training.warmup_ratio", "fraction"), ("adapter.dropout", "fraction"),
    ("training.epochs", "fraction"), ("training.lr", "fraction"), ("training.weight_decay", "fraction"),
    ("training.max_grad_norm", "fraction"), ("adapter.alpha", "fraction"), ("training.weight_decay", "true"),
    # (every number has an upper bound the engine can use: 10**30 is refused, naming the field and its line)
    # pydantic's lax mode takes true as 1 for numbers (true for lr is 1.0): odd, but a number it is.
    *((f, "true") for f in ("training.max_steps", "training.batch_size", "training.grad_accum", "training.lr",
                            "training.epochs", "training.seed", "training.checkpoint_every", "training.eval_every",
                            "training.save_every", "training.keep_checkpoints", "training.log_every",
                            "adapter.r", "adapter.alpha", "adapter.num_virtual_tokens", "training.max_grad_norm",
                            "eval.examples")),
}
# Values whose job is not worth running (it would train for ~forever): skipped.
SKIP = {("training.epochs", "huge"), ("training.max_steps", "huge"), ("eval.max_new_tokens", "huge"),
        ("training.epochs", "true"), ("eval.max_new_tokens", "true"), ("training.max_steps", "fraction")}
NUMERIC_CONTEXT = {  # extra spec changes a field needs to be read at all
    "adapter.num_virtual_tokens": {"method": "prompt_tuning"},
    "eval.max_new_tokens": {"eval.data": "data/heldout.jsonl", "eval.before_after": False},
    "eval.examples": {"eval.data": "data/heldout.jsonl", "eval.before_after": False},
    "training.epochs": {"training.max_steps": None},
    "training.micro_batch_tokens": {}, "training.checkpoint_every": {"training.gradient_checkpointing": True},
}

for fieldname, (kind, rule, nullable) in NUMERIC.items():
    for shape, value in SHAPES.items():
        if (fieldname, shape) in SKIP:
            continue
        accepted = (fieldname, shape) in ACCEPTED
        if fieldname == "training.epochs" and shape in ("nan",):
            accepted = False
        changes = {**NUMERIC_CONTEXT.get(fieldname, {}), fieldname: value}
        if fieldname == "training.epochs" and shape != "inf":
            changes["training.max_steps"] = 1  # keep the run to one step where epochs is valid
        if fieldname == "training.epochs" and shape == "inf":
            changes["training.max_steps"] = None
        expected = 0 if accepted else 2
        case(f"num-{fieldname}={shape}", ["train", "job.yaml"], setup=spec_file(changes), code=expected,
             says=() if expected == 0 else (fieldname, "job.yaml line"))

# ---------------------------------------------------------------- --set overrides of every shape

SET_CASES = [
    ("no-equals", ["training.lr"], 2, ("--set", "KEY=VALUE")),
    ("empty", [""], 2, ("--set",)),
    ("only-equals", ["="], 2, ("--set", "empty key")),
    ("empty-segment", ["training..lr=1"], 2, ("--set", "empty key")),
    ("trailing-dot", ["training.=1"], 2, ("--set", "empty key")),
    ("unknown-key", ["trainig.lr=1"], 2, ("--set trainig.lr", "did you mean")),
    ("bad-number", ["training.lr=fast"], 2, ("--set training.lr",)),
    ("negative", ["training.batch_size=-4"], 2, ("--set training.batch_size",)),
    ("list", ["training.lr=[1, 2]"], 2, ("--set training.lr",)),
    ("map", ["training.lr={a: 1}"], 2, ("--set training.lr",)),
    ("nan", ["training.lr=.nan"], 2, ("--set training.lr",)),
    ("section-to-scalar", ["training=5"], 2, ("--set training",)),
    ("below-a-value", ["training.lr.x=1"], 2, ("--set training.lr.x", "single value")),
    ("section-replaced", ["training={max_steps: 1, precision: fp32, max_seq_len: 128}"], 0, ()),
    ("null-optional", ["training.max_steps=null", "training.epochs=0.5"], 0, ()),
    ("unclosed-yaml", ["training.lr=[1"], 2, ("--set training.lr",)),
    ("yaml-1e-4", ["training.lr=1e-4"], 0, ()),
    ("max-steps-1e3", ["training.max_steps=1e3"], 2, ("--set training.max_steps",)),
    ("model-empty", ["model="], 2, ("--set model",)),
    ("output-dir-empty", ["output_dir="], 2, ("output_dir",)),
    ("output-dir-root", ["output_dir=/"], 2, ("output_dir", "/ is")),
    ("task-needs-labels", ["task=classification"], 2, ("labels",)),
    ("template-unknown-field", ["task=completion", "data.prompt_template=Q: {quesion}"], 2, ("quesion",)),
    ("same-key-twice", ["training.lr=-1", "training.lr=0.01"], 0, ()),
    ("unicode-key", ["trainïng.lr=1"], 2, ("--set",)),
    ("value-with-equals", ["data.prompt_template=a=b {prompt}", "task=completion"], 1, ("train.jsonl",)),
    ("huge-int", ["training.seed=" + "9" * 5000], 2, ("--set training.seed",)),
]
for slug, sets, code, says in SET_CASES:
    argv = ["train", "job.yaml"]
    for s in sets:
        argv += ["--set", s]
    case(f"set-{slug}", argv, code=code, says=says)

# ---------------------------------------------------------------- data files: every task, broken records

VALID = {
    "chat": CHAT_RECORDS,
    "completion": [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "Capital of France:", "completion": " Paris"},
                   {"prompt": "", "completion": "An empty prompt is allowed."}],
    "text": [{"text": "To reset the kettle, unplug it."}, {"text": "Hold the button for five seconds."}],
    "classification": [{"text": "great product", "label": "pos"}, {"text": "broke in a day", "label": "neg"}],
    "qa": [{"question": "How many moons?", "answer": "3", "context": "Zorb has 3 moons."},
           {"question": "Capital of Zorb?", "answer": "Lisbon"}],
    "translation": [{"source": "The cat sleeps.", "target": "Le chat dort.", "source_lang": "English",
                     "target_lang": "French"}],
    "ner": [{"tokens": ["Ana", "flew", "to", "Oslo"], "tags": ["B-PER", "O", "O", "B-LOC"]},
            {"text": "Bob works at Helix Motors.", "entities": [{"start": 0, "end": 3, "label": "PER"},
                                                               {"start": 13, "end": 25, "label": "ORG"}]}],
    "creative": [{"prompt": "Write a haiku about rain.", "completion": " Grey roofs at dusk"},
                 {"text": "Of the sea I keep salt wind in mind."}],
}
LABELS = {"classification": ["pos", "neg"]}

BROKEN = {  # task: [(slug, the bad line, what the message must name)] — the bad line is line 2
    "chat": [
        ("not-json", '{"messages": [', ("line 2", "json")),
        ("python-dict", "{'messages': []}", ("line 2", "json")),
        ("trailing-comma", '{"messages": [{"role": "user", "content": "hi"},]}', ("line 2", "json")),
        ("array-record", "[1, 2]", ("line 2", "JSON object")),
        ("no-messages", '{"msgs": []}', ("line 2", "messages")),
        ("messages-a-string", '{"messages": "hi"}', ("line 2", "messages")),
        ("messages-empty", '{"messages": []}', ("line 2", "messages")),
        ("messages-nan", '{"messages": NaN}', ("line 2", "messages")),
        ("bad-role", '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
         ("line 2", "messages[1].role", "assistant")),
        ("content-int", '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
         ("line 2", "messages[0].content")),
        ("content-null", '{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "x"}]}',
         ("line 2", "messages[0].content")),
        ("no-assistant", '{"messages": [{"role": "user", "content": "hi"}]}', ("line 2", "no assistant turn")),
        ("assistant-first", '{"messages": [{"role": "assistant", "content": "hi"}]}', ("line 2", "messages[0].role")),
        ("system-late", '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
         '{"role": "assistant", "content": "c"}]}', ("line 2", "messages[1].role")),
        ("weight-2", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
         '"weight": 2}]}', ("line 2", "weight")),
        ("empty-reply", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}',
         ("line 2", "empty")),
        ("tool-args-not-json", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": '
         '[{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}, '
         '{"role": "tool", "tool_call_id": "1", "content": "r"}, {"role": "assistant", "content": "ok"}]}',
         ("line 2", "arguments")),
        ("tools-the-template-drops", '{"tools": [{"type": "function", "function": {"name": "f"}}], "messages": '
         '[{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", '
         '"function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "1", "content": "r"}, '
         '{"role": "assistant", "content": "ok"}]}', ("line 2", "tool")),
        ("deep-nesting", "[" * 100_000, ("line 2", "json")),
        ("huge-integer", '{"messages": 1' + "0" * 5000 + "}", ("line 2", "json")),
        ("raw-nul-in-string", '{"messages": [{"role": "user", "content": "a\x00b"}]}', ("line 2", "json")),
        ("nul-bytes-line", "\x00" * 64, ("line 2",)),
        ("latin-1-byte", b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", '
         b'"content": "x"}]}', ("line 2", "UTF-8")),
    ],
    "completion": [
        ("missing-completion", '{"prompt": "a"}', ("line 2", "completion")),
        ("completion-int", '{"prompt": "a", "completion": 4}', ("line 2", "completion")),
        ("completion-empty", '{"prompt": "a", "completion": ""}', ("line 2", "completion")),
        ("prompt-list", '{"prompt": ["a"], "completion": "b"}', ("line 2", "prompt")),
        ("chat-record", json.dumps(CHAT_RECORDS[0]), ("line 2", "prompt")),
    ],
    "text": [
        ("missing-text", '{"content": "a"}', ("line 2", "text")),
        ("text-blank", '{"text": "   "}', ("line 2", "text")),
        ("text-null", '{"text": null}', ("line 2", "text")),
        ("text-object", '{"text": {"body": "a"}}', ("line 2", "text")),
    ],
    "classification": [
        ("label-not-in-set", '{"text": "ok", "label": "poss"}', ("line 2", "label", "did you mean 'pos'")),
        ("label-int", '{"text": "ok", "label": 1}', ("line 2", "label")),
        ("label-missing", '{"text": "ok"}', ("line 2", "label")),
        ("text-missing", '{"label": "pos"}', ("line 2", "text")),
    ],
    "qa": [
        ("question-missing", '{"answer": "3"}', ("line 2", "question")),
        ("answer-null", '{"question": "q", "answer": null}', ("line 2", "answer")),
        ("context-int", '{"question": "q", "answer": "a", "context": 5}', ("line 2", "context")),
        ("answer-empty", '{"question": "q", "answer": ""}', ("line 2", "answer")),
    ],
    "translation": [
        ("source-lang-missing", '{"source": "a", "target": "b", "target_lang": "French"}', ("line 2", "source_lang")),
        ("target-empty", '{"source": "a", "target": "", "source_lang": "en", "target_lang": "fr"}',
         ("line 2", "target")),
        ("source-list", '{"source": ["a"], "target": "b", "source_lang": "en", "target_lang": "fr"}',
         ("line 2", "source")),
    ],
    "ner": [
        ("tags-length", '{"tokens": ["a", "b"], "tags": ["O"]}', ("line 2", "tags")),
        ("tag-not-bio", '{"tokens": ["Ana"], "tags": ["PER"]}', ("line 2", "tags[0]")),
        ("entity-out-of-range", '{"text": "Ana", "entities": [{"start": 0, "end": 99, "label": "PER"}]}',
         ("line 2", "entities[0]")),
        ("entities-overlap", '{"text": "Ana Lee", "entities": [{"start": 0, "end": 7, "label": "PER"}, '
         '{"start": 4, "end": 7, "label": "PER"}]}', ("line 2", "entities[1]", "overlaps")),
        ("entities-not-list", '{"text": "Ana", "entities": "PER"}', ("line 2", "entities")),
        ("tokens-empty", '{"tokens": [], "tags": []}', ("line 2", "tokens")),
        ("entity-float-offsets", '{"text": "Ana", "entities": [{"start": 0.0, "end": 3.0, "label": "PER"}]}',
         ("line 2", "entities[0]")),
    ],
    "creative": [
        ("neither-text-nor-prompt", '{"title": "a poem"}', ("line 2",)),
        ("completion-int", '{"prompt": "a", "completion": 1}', ("line 2", "completion")),
        ("text-empty", '{"text": ""}', ("line 2", "text")),
    ],
}


def _task_spec(task: str, train: str) -> dict:
    changes: dict = {"task": task, "data.train": train}
    if task in LABELS:
        changes["labels"] = LABELS[task]
    return changes


def _validate_argv(task: str, path: str) -> list[str]:
    argv = ["data", "validate", path, "--task", task, "--model", "model"]
    if task in LABELS:
        argv += ["--labels", ",".join(LABELS[task])]
    return argv


def data_case(slug: str, task: str, content: str | bytes | Callable[[Sandbox], Any], code: int,
              says: tuple[str, ...], train_code: int | None = None, path: str = "data/bad.jsonl") -> None:
    """The same data file through `data validate` and through `train`."""
    write = content if callable(content) else text_file(path, content)
    case(f"validate-{task}-{slug}", _validate_argv(task, path), setup=write, code=code, says=says)
    case(f"train-{task}-{slug}", ["train", "job.yaml"], setup=_setup(write, spec_file(_task_spec(task, path))),
         code=code if train_code is None else train_code, says=says if code else ())


for task, records in VALID.items():
    data_case("valid", task, jsonl(records), 0, ())
    for slug, bad, says in BROKEN[task]:
        content = jsonl(records[:1]).encode() + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n" + \
            jsonl(records[1:]).encode()
        data_case(slug, task, content, 1, says)

# The file itself: chat data (the default task)
data_case("file-0-bytes", "chat", b"", 1, ("data/bad.jsonl", "empty"))
data_case("file-blank-lines", "chat", "\n  \n\t\n", 1, ("data/bad.jsonl", "empty"))
data_case("file-json-array", "chat", json.dumps(CHAT_RECORDS), 1, ("data/bad.jsonl line 1", "JSON object"))
data_case("file-json-array-pretty", "chat", json.dumps(CHAT_RECORDS, indent=2), 1, ("data/bad.jsonl line 1",))
data_case("file-utf16", "chat", jsonl(CHAT_RECORDS).encode("utf-16"), 1, ("data/bad.jsonl line 1", "UTF-8"))
data_case("file-utf8-bom", "chat", b"\xef\xbb\xbf" + jsonl(CHAT_RECORDS).encode(), 0, ())
data_case("file-crlf", "chat", jsonl(CHAT_RECORDS).replace("\n", "\r\n"), 0, ())
data_case("file-no-final-newline", "chat", jsonl(CHAT_RECORDS).rstrip("\n"), 0, ())
data_case("file-10k-char-line", "chat", jsonl([{"messages": [{"role": "user", "content": "x" * 10_000},
                                                             {"role": "assistant", "content": "ok"}]}] + CHAT_RECORDS),
          0, ())
data_case("file-only-10k-char-lines", "chat", jsonl([{"messages": [{"role": "user", "content": "y" * 10_000 + str(i)},
                                                                   {"role": "assistant", "content": "ok"}]}
                                                     for i in range(3)]), 0, (), train_code=1)
data_case("file-escaped-nul", "chat", jsonl([{"messages": [{"role": "user", "content": "a\u0000b"},
                                                           {"role": "assistant", "content": "c\u0000"}]}] + CHAT_RECORDS),
          0, ())
data_case("file-gzip", "chat", gzip.compress(jsonl(CHAT_RECORDS).encode()), 1, ("data/bad.jsonl", "UTF-8"))
data_case("file-is-a-folder", "chat", lambda sb: (sb.work / "data/bad.jsonl").mkdir(parents=True), 1,
          ("data/bad.jsonl", "folder"))
data_case("file-missing", "chat", lambda sb: None, 1, ("data/bad.jsonl", "not found"))
data_case("file-a-weights-file", "chat", lambda sb: None, 1, ("model/model.safetensors",),
          path="model/model.safetensors")
data_case("file-yaml-not-jsonl", "chat", "messages:\n  - role: user\n    content: hi\n", 1, ("data/bad.jsonl line 1",))
data_case("file-every-line-broken", "chat", "x\n" * 500, 1, ("data/bad.jsonl line 1",))

case("train-missing-validation-file", ["train", "job.yaml"], setup=spec_file({"data.validation": "data/valid.jsonl"}),
     code=1, says=("data/valid.jsonl", "not found"))
case("train-broken-validation-and-eval", ["train", "job.yaml"],
     setup=_setup(text_file("data/v.jsonl", "oops\n"), text_file("data/e.jsonl", "{}\n"),
                  spec_file({"data.validation": "data/v.jsonl", "eval.data": "data/e.jsonl"})),
     code=1, says=("data/v.jsonl line 1", "data/e.jsonl line 1"))
case("train-validation-split-leaves-nothing", ["train", "job.yaml"],
     setup=_setup(text_file("data/one.jsonl", jsonl(CHAT_RECORDS[:1])),
                  spec_file({"data.train": "data/one.jsonl", "data.validation_split": 0.4})),
     code=1, says=("validation_split",))
case("train-everything-dropped-as-overlong", ["train", "job.yaml"],
     setup=spec_file({"training.max_seq_len": 8, "data.overlong": "drop"}), code=1,
     says=("data/train.jsonl", "max_seq_len"))
case("train-eval-data-missing", ["train", "job.yaml"], setup=spec_file({"eval.data": "data/nope.jsonl"}), code=1,
     says=("data/nope.jsonl", "not found"))
case("train-classification-labels-mismatch", ["train", "job.yaml"],
     setup=_setup(text_file("data/cls.jsonl", jsonl(VALID["classification"])),
                  spec_file({"task": "classification", "labels": ["positive", "negative"],
                             "data.train": "data/cls.jsonl"})),
     code=1, says=("data/cls.jsonl line 1", "label"))

# ---------------------------------------------------------------- data validate: its own command line

case("validate-no-file-no-spec", ["data", "validate"], code=2, says=("--spec",))
case("validate-spec-missing", ["data", "validate", "--spec", "nope.yaml"], code=2, says=("nope.yaml",))
case("validate-spec-broken", ["data", "validate", "--spec", "job.yaml"], setup=text_file("job.yaml", "a: [\n"),
     code=2, says=("job.yaml",))
case("validate-spec-data-missing", ["data", "validate", "--spec", "job.yaml"],
     setup=spec_file({"data.train": "data/none.jsonl"}), code=1, says=("data/none.jsonl",))
case("validate-spec-ok", ["data", "validate", "--spec", "job.yaml"], code=0, says=("OK",))
case("validate-unknown-task", ["data", "validate", "data/train.jsonl", "--task", "poetry"], code=2,
     says=("--task",))
case("validate-labels-mismatch", ["data", "validate", "data/c.jsonl", "--task", "classification", "--labels", "a,b",
                                  "--model", "none"],
     setup=text_file("data/c.jsonl", jsonl(VALID["classification"])), code=1, says=("line 1", "label"))
case("validate-classification-no-labels", ["data", "validate", "data/c.jsonl", "--task", "classification",
                                           "--model", "none"],
     setup=text_file("data/c.jsonl", jsonl(VALID["classification"])), code=0)
case("validate-labels-only-commas", ["data", "validate", "data/c.jsonl", "--task", "classification", "--labels",
                                     ",,,", "--model", "none"],
     setup=text_file("data/c.jsonl", jsonl(VALID["classification"])), code=(1, 2), says=("label",))
case("validate-bad-prompt-template", ["data", "validate", "data/c.jsonl", "--task", "completion",
                                      "--prompt-template", "{nope}", "--model", "none"],
     setup=text_file("data/c.jsonl", jsonl(VALID["completion"])), code=2, says=("--prompt-template", "nope"))
case("validate-prompt-template-braces", ["data", "validate", "data/c.jsonl", "--task", "completion",
                                         "--prompt-template", "{prompt", "--model", "none"],
     setup=text_file("data/c.jsonl", jsonl(VALID["completion"])), code=2, says=("--prompt-template",))
case("validate-model-missing", ["data", "validate", "data/train.jsonl", "--model", "nope/nope"], code=0,
     says=("nope/nope",))
case("validate-default-tokenizer", ["data", "validate", "data/train.jsonl"], code=0, says=("OK",))
case("validate-max-seq-len-negative", ["data", "validate", "data/train.jsonl", "--model", "model",
                                       "--max-seq-len", "-5"], code=2, says=("--max-seq-len",))
case("validate-max-seq-len-zero", ["data", "validate", "data/train.jsonl", "--model", "model",
                                   "--max-seq-len", "0"], code=2, says=("--max-seq-len",))
case("validate-max-seq-len-text", ["data", "validate", "data/train.jsonl", "--max-seq-len", "many"], code=2,
     says=("--max-seq-len",))
case("validate-json-output-broken", ["data", "validate", "data/b.jsonl", "--json", "--model", "none"],
     setup=text_file("data/b.jsonl", "{oops\n"), code=1, says=('"valid": false',))

# ---------------------------------------------------------------- data generate

case("generate-data-unknown-name", ["data", "generate", "poems", "--out", "data/gen"], code=2, says=("poems",))
case("generate-data-no-out", ["data", "generate", "qa"], code=2, says=("--out",))
case("generate-data-out-is-a-file", ["data", "generate", "qa", "--out", "NOTES.txt"], code=1,
     says=("NOTES.txt", "not a folder"))
case("generate-data-out-under-a-file", ["data", "generate", "demo", "--out", "NOTES.txt/gen"], code=1,
     says=("NOTES.txt",))
case("generate-data-over-users-files", ["data", "generate", "qa", "--out", "data"],
     setup=text_file("data/train.jsonl", jsonl(CHAT_DATA) + "\n"),  # the user's own train.jsonl
     code=1, says=("data/train.jsonl", "already exist", "--overwrite"))
case("generate-data-over-users-valid-file", ["data", "generate", "demo", "--out", "data"],
     setup=text_file("data/valid.jsonl", jsonl(CHAT_RECORDS)), code=1, says=("data/valid.jsonl", "already exist"))
case("generate-data-same-again", ["data", "generate", "qa", "--out", "data/gen"],
     setup=lambda sb: _quiet_main(["data", "generate", "qa", "--out", "data/gen"], sb.work), code=0)
case("generate-data-into-new-folder", ["data", "generate", "ner", "--out", "data/ner"], code=0,
     says=("heldout",))

# ---------------------------------------------------------------- model references

def broken_model(mutate: Callable[[Path], Any]) -> Callable[[Sandbox], Any]:
    def run(sb: Sandbox) -> None:
        mutate(sb.model_copy("broken"))
        sb.write_spec(sb.spec({"model": "broken"}))

    return run


MODEL_CASES = [
    ("missing-path", {"model": "models/nope"}, None, ("models/nope",)),
    ("empty-folder", {"model": "empty"}, lambda sb: (sb.work / "empty").mkdir(), ("empty", "config.json")),
    ("users-folder", {"model": "mine"}, None, ("mine", "config.json")),
    ("home", {"model": "~"}, None, ("config.json",)),
    ("current-folder", {"model": "."}, None, ("config.json",)),
    ("text-file", {"model": "NOTES.txt"}, None, ("NOTES.txt",)),
    ("fake-gguf", {"model": "m.gguf"}, text_file("m.gguf", "hello"), ("m.gguf", "not a GGUF")),
    ("empty-gguf", {"model": "m.gguf"}, text_file("m.gguf", b""), ("m.gguf",)),
    ("missing-gguf", {"model": "m.gguf"}, None, ("m.gguf", "not found")),
    ("truncated-gguf", {"model": "m.gguf"}, text_file("m.gguf", b"GGUF\x03\x00\x00\x00"), ("m.gguf",)),
    ("gguf-header-garbage", {"model": "m.gguf"}, text_file("m.gguf", b"GGUF" + bytes(range(256)) * 8), ("m.gguf",)),
    ("gguf-version-only", {"model": "m.gguf"}, text_file("m.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 16), ("m.gguf",)),
    ("hub-id-offline", {"model": "someorg/some-model"}, None, ("someorg/some-model",)),
    ("hub-id-invalid", {"model": "a/b/c/d"}, None, ("a/b/c/d",)),
    ("alias-typo", {"model": "smollm2-135m"}, None, ("smollm2-135m", "smollm2-135m-instruct")),
    ("run-folder-as-model", {"model": "runs/lora"}, copy_run("lora"), ("runs/lora",)),
    ("weights-file-as-model", {"model": "model/model.safetensors"}, None, ("model/model.safetensors",)),
]
for slug, changes, extra, says in MODEL_CASES:
    case(f"model-{slug}", ["train", "job.yaml"], setup=_setup(*(s for s in (extra,) if s), spec_file(changes)),
         code=1, says=says)

BROKEN_MODELS = [
    ("config-not-json", lambda m: (m / "config.json").write_text("{not json")),
    ("config-a-list", lambda m: (m / "config.json").write_text("[]")),
    ("config-unknown-type", lambda m: (m / "config.json").write_text('{"model_type": "nope"}')),
    ("config-empty-object", lambda m: (m / "config.json").write_text("{}")),
    ("no-weights", lambda m: (m / "model.safetensors").unlink()),
    ("truncated-weights", lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:999])),
    ("weights-of-another-size", lambda m: (m / "config.json").write_text(
        (m / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32'))),
    ("no-tokenizer", lambda m: [(m / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")]),
    ("tokenizer-not-json", lambda m: (m / "tokenizer.json").write_text("{")),
    ("tokenizer-config-not-json", lambda m: (m / "tokenizer_config.json").write_text("{")),
]
for slug, mutate in BROKEN_MODELS:
    case(f"model-{slug}", ["train", "job.yaml"], setup=broken_model(mutate), code=1, says=("broken",))
    case(f"generate-model-{slug}", ["generate", "broken", "--prompt", "hi", "--max-new-tokens", "2"],
         setup=broken_model(mutate), code=1, says=("broken",))

case("model-no-chat-template", ["train", "job.yaml"],
     setup=broken_model(lambda m: (m / "chat_template.jinja").unlink()), code=1, says=("chat template",))
case("chat-with-model-without-chat-template", ["chat", "broken", "--max-new-tokens", "2"], stdin="hello\n",
     setup=broken_model(lambda m: (m / "chat_template.jinja").unlink()), code=1, says=("chat template",))

# ---------------------------------------------------------------- output_dir

OUTPUT_CASES = [
    ("a-file", "NOTES.txt", 1, ("NOTES.txt", "not a folder")),
    ("under-a-file", "NOTES.txt/run", 1, ("NOTES.txt",)),
    ("current-folder", ".", 2, ("output_dir", "current folder")),
    ("current-folder-slash", "./", 2, ("output_dir", "current folder")),
    ("parent", "..", 2, ("output_dir", "parent")),
    ("dotdot-path", "runs/../..", 2, ("output_dir", "parent")),
    ("home", "~", 2, ("output_dir", "home")),
    ("home-absolute", "<HOME>", 2, ("output_dir", "home")),
    ("root", "/", 2, ("output_dir", "/ is")),
    ("empty", "", 2, ("output_dir",)),
    ("blank", "   ", 2, ("output_dir",)),
    ("users-folder", "mine", 1, ("mine", "did not make")),
    ("users-subfolder", "mine/sub", 1, ("mine/sub", "did not make")),
    ("data-folder", "data", 1, ("data", "did not make")),
    ("model-folder", "model", 1, ("model", "did not make")),
    ("the-data-file", "data/train.jsonl", 1, ("data/train.jsonl", "not a folder")),
    ("dev-null", "/dev/null", 1, ("/dev/null",)),
    ("proc", "/proc/self", 1, ("/proc/self",)),
]
for slug, out, code, says in OUTPUT_CASES:
    setup = (lambda sb: sb.write_spec(sb.spec({"output_dir": str(sb.home)}))) if out == "<HOME>" else \
        spec_file({"output_dir": out})
    case(f"output-{slug}", ["train", "job.yaml"], setup=setup, code=code, says=says)
    if code == 1 and slug in ("users-folder", "data-folder", "model-folder", "users-subfolder"):
        case(f"output-{slug}-overwrite", ["train", "job.yaml", "--overwrite"], setup=spec_file({"output_dir": out}),
             code=1, says=says)

case("output-new-folder-inside-users-folder", ["train", "job.yaml"], setup=spec_file({"output_dir": "mine/new-run"}),
     code=0)
case("output-the-spec-file", ["train", "job.yaml"], setup=spec_file({"output_dir": "job.yaml"}), code=1,
     says=("job.yaml", "not a folder"))
case("output-users-folder-resume", ["train", "job.yaml", "--resume"], setup=spec_file({"output_dir": "mine"}), code=1,
     says=("mine",))
case("output-symlink-to-users-folder", ["train", "job.yaml", "--overwrite"],
     setup=_setup(lambda sb: (sb.work / "link").symlink_to(sb.work / "mine"), spec_file({"output_dir": "link"})),
     code=1, says=("link", "symbolic link"))
case("output-symlink-to-home", ["train", "job.yaml", "--overwrite"],
     setup=_setup(lambda sb: (sb.work / "link").symlink_to(sb.home), spec_file({"output_dir": "link"})),
     code=2, says=("link", "home"))
case("output-symlink-to-cwd", ["train", "job.yaml", "--overwrite"],
     setup=_setup(lambda sb: (sb.work / "link").symlink_to(sb.work), spec_file({"output_dir": "link"})),
     code=2, says=("link", "current folder"))
case("output-dangling-symlink", ["train", "job.yaml"],
     setup=_setup(lambda sb: (sb.work / "link").symlink_to(sb.work / "gone"), spec_file({"output_dir": "link"})),
     code=1, says=("link", "symbolic link"))
case("output-symlink-to-empty-folder", ["train", "job.yaml"],
     setup=_setup(lambda sb: (sb.work / "empty").mkdir(), lambda sb: (sb.work / "link").symlink_to(sb.work / "empty"),
                  spec_file({"output_dir": "link"})), code=1, says=("link", "symbolic link"))
case("output-a-finished-run", ["train", "job.yaml"],
     setup=_setup(copy_run("lora"), user_notes_in("runs/lora"), spec_file({"output_dir": "runs/lora"})), code=1,
     says=("runs/lora", "--resume", "--overwrite"))
case("output-a-finished-run-overwrite", ["train", "job.yaml", "--overwrite"],
     setup=_setup(copy_run("lora"), user_notes_in("runs/lora"), spec_file({"output_dir": "runs/lora"})), code=0)
case("output-a-merged-model", ["train", "job.yaml", "--overwrite"],
     setup=_setup(copy_run("merged"), spec_file({"output_dir": "runs/merged"})), code=1, says=("runs/merged", "merge"))
case("output-inside-a-run", ["train", "job.yaml"],
     setup=_setup(copy_run("lora"), spec_file({"output_dir": "runs/lora/adapter"})), code=1,
     says=("runs/lora/adapter",))
case("output-is-runs-holding-runs", ["train", "job.yaml", "--overwrite"],
     setup=_setup(copy_run("lora"), spec_file({"output_dir": "runs"})), code=1, says=("runs", "did not make"))
case("output-legacy-run-without-marker", ["train", "job.yaml", "--overwrite"],
     setup=_setup(copy_run("lora"), lambda sb: (sb.work / "runs/lora/.tuneforge-run").unlink(),
                  user_notes_in("runs/lora"), spec_file({"output_dir": "runs/lora"})),
     code=1, says=("runs/lora", "did not make"))

# ---------------------------------------------------------------- resume, stop-after, half-made runs

case("resume-nothing-there", ["train", "job.yaml", "--resume"], code=1, says=("checkpoint", "runs/run"))
case("resume-users-folder", ["train", "mine", "--resume"], code=2, says=("mine", "folder"))
case("resume-model-folder", ["train", "model", "--resume"], code=2, says=("model", "folder"))
case("resume-a-data-file", ["train", "data/train.jsonl", "--resume"], code=2, says=("data/train.jsonl",))
case("resume-a-merged-model", ["train", "runs/merged", "--resume"], setup=copy_run("merged"), code=2,
     says=("runs/merged",))
case("resume-spec-yaml-only", ["train", "runs/half", "--resume"],
     setup=_setup(copy_run("lora", "half"),
                  lambda sb: [shutil.rmtree(sb.work / "runs/half" / n) if (sb.work / "runs/half" / n).is_dir()
                              else (sb.work / "runs/half" / n).unlink()
                              for n in ("checkpoints", "adapter", "summary.json", "metrics.jsonl", "tensorboard",
                                        "loss_curve.png")]),
     code=1, says=("runs/half", "checkpoint"))
case("resume-and-overwrite", ["train", "runs/lora", "--resume", "--overwrite"], setup=copy_run("lora"), code=2,
     says=("--resume", "--overwrite"))
case("resume-finished-run", ["train", "runs/lora", "--resume"], setup=_setup(copy_run("lora"), user_notes_in("runs/lora")),
     code=0, says=("already finished",))
case("resume-stopped-run", ["train", "runs/stopped", "--resume"],
     setup=_setup(copy_run("stopped"), user_notes_in("runs/stopped")), code=0, says=("step 3/3",))
case("resume-stopped-run-changed-lr", ["train", "runs/stopped", "--resume", "--set", "training.lr=0.5"],
     setup=copy_run("stopped"), code=1, says=("training.lr",))
case("resume-corrupt-summary", ["train", "runs/lora", "--resume"],
     setup=_setup(copy_run("lora"), text_file("runs/lora/summary.json", "{not json")), code=0)
case("resume-corrupt-state-json", ["train", "runs/stopped", "--resume"],
     setup=_setup(copy_run("stopped"), text_file("runs/stopped/checkpoints/step-000001/state.json", "{")),
     code=1, says=("state.json",))
case("resume-every-checkpoint-damaged", ["train", "runs/stopped", "--resume"],
     setup=_setup(copy_run("stopped"), text_file("runs/stopped/checkpoints/step-000001/trainable.safetensors", "x")),
     code=1, says=("damaged",))
case("resume-corrupt-spec-yaml", ["train", "runs/stopped", "--resume"],
     setup=_setup(copy_run("stopped"), text_file("runs/stopped/spec.yaml", b"\x00\xff\xfe")), code=(1, 2),
     says=("runs/stopped/spec.yaml",))
case("resume-spec-yaml-a-list", ["train", "runs/stopped", "--resume"],
     setup=_setup(copy_run("stopped"), text_file("runs/stopped/spec.yaml", "- a\n")), code=(1, 2),
     says=("runs/stopped/spec.yaml",))
case("resume-past-the-schedule", ["train", "runs/stopped", "--resume", "--set", "training.max_steps=50"],
     setup=copy_run("stopped"), code=1, says=("schedule",))
case("stop-after-zero", ["train", "job.yaml", "--stop-after", "0"], code=2, says=("--stop-after",))
case("stop-after-negative", ["train", "job.yaml", "--stop-after", "-3"], code=2, says=("--stop-after",))
case("stop-after-text", ["train", "job.yaml", "--stop-after", "ten"], code=2, says=("--stop-after",))
case("stop-after-float", ["train", "job.yaml", "--stop-after", "1.5"], code=2, says=("--stop-after",))
case("stop-after-huge", ["train", "job.yaml", "--stop-after", "9" * 40], code=0)
case("train-unknown-flag", ["train", "job.yaml", "--epochs", "3"], code=2, says=("--epochs",))
case("train-no-spec", ["train"], code=2, says=("spec",))
case("no-command", [], code=2, says=("COMMAND",))
case("unknown-command", ["finetune", "job.yaml"], code=2, says=("finetune",))


def _half_run(*remove: str, corrupt: dict[str, bytes] | None = None) -> Callable[[Sandbox], Any]:
    def run(sb: Sandbox) -> None:
        sb.run("lora", "half")
        for name in remove:
            p = sb.work / "runs/half" / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for name, content in (corrupt or {}).items():
            sb.write(f"runs/half/{name}", content)
        sb.write("runs/half/my-notes.md", "notes\n")

    return run


HALF_RUNS = [
    ("spec-only", _half_run("checkpoints", "adapter", "summary.json", "metrics.jsonl"), 1, ("runs/half", "not finished")),
    ("no-adapter", _half_run("adapter"), 1, ("runs/half", "not finished")),
    ("corrupt-summary", _half_run(corrupt={"summary.json": b"{oops"}), 0, ()),
    ("corrupt-adapter-config", _half_run(corrupt={"adapter/adapter_config.json": b"{oops"}), 1,
     ("runs/half/adapter", "adapter_config.json")),
    ("adapter-config-empty-object", _half_run(corrupt={"adapter/adapter_config.json": b"{}"}), 1,
     ("runs/half/adapter",)),
    ("no-adapter-weights", _half_run("adapter/adapter_model.safetensors"), 1,
     ("runs/half/adapter", "adapter_model.safetensors")),
    ("truncated-adapter-weights", _half_run(corrupt={"adapter/adapter_model.safetensors": b"\x08\x00\x00\x00"}), 1,
     ("runs/half/adapter",)),
    ("spec-yaml-corrupt", _half_run(corrupt={"spec.yaml": b"model: [\n"}), (1, 2), ("runs/half/spec.yaml",)),
    ("spec-yaml-wrong-model", None, 1, ("runs/half",)),  # spec.yaml edited to name a model of another width
    ("no-tokenizer-in-adapter", _half_run("adapter/tokenizer.json", "adapter/tokenizer_config.json"), 1,
     ("runs/half/adapter", "tokenizer")),
]


def _wrong_model_spec(sb: Sandbox) -> None:
    """spec.yaml of a finished run now names another model (the user edited it): one of another width."""
    from tuneforge.models.tiny import make_tiny_model

    with contextlib.redirect_stderr(io.StringIO()):
        make_tiny_model("llama", sb.work / "other", hidden_size=32, intermediate_size=64)
    spec = yaml.safe_load((sb.env.template / "work/runs/lora/spec.yaml").read_text())
    spec["model"] = "other"
    sb.write("runs/half/spec.yaml", yaml.safe_dump(spec))


for slug, setup, code, says in HALF_RUNS:
    if slug == "spec-yaml-wrong-model":
        setup = _setup(_half_run(), _wrong_model_spec)
    case(f"half-run-{slug}-generate", ["generate", "runs/half", "--prompt", "hi", "--max-new-tokens", "2"],
         setup=setup, code=code, says=says)
    case(f"half-run-{slug}-merge", ["merge", "runs/half", "--out", "runs/merged-half"], setup=setup, code=code,
         says=says)
    case(f"half-run-{slug}-eval", ["eval", "runs/half", "--data", "data/heldout.jsonl", "--max-new-tokens", "2"],
         setup=setup, code=code, says=says)
    if slug in ("spec-only", "no-adapter", "corrupt-summary", "no-adapter-weights", "corrupt-adapter-config"):
        case(f"half-run-{slug}-report", ["report", "runs/half", "--data", "data/heldout.jsonl"], setup=setup,
             code=code, says=says)

# ---------------------------------------------------------------- generate and chat

case("generate-missing-model", ["generate", "nope", "--prompt", "hi"], code=1, says=("nope",))
case("generate-users-folder", ["generate", "mine", "--prompt", "hi"], code=1, says=("mine",))
case("generate-data-file-as-model", ["generate", "data/train.jsonl", "--prompt", "hi"], code=1,
     says=("data/train.jsonl",))
case("generate-no-prompt-empty-stdin", ["generate", "runs/lora"], setup=copy_run("lora"), code=2,
     says=("no prompts",))
case("generate-stdin-blank-lines", ["generate", "runs/lora", "--max-new-tokens", "2"], setup=copy_run("lora"),
     stdin="\n   \n\t\n", code=2, says=("no prompts",))
case("generate-stdin-prompts", ["generate", "runs/lora", "--max-new-tokens", "2", "--json"], setup=copy_run("lora"),
     stdin="hello\nworld\n", code=0, says=('"prompt": "hello"', '"prompt": "world"'))
case("generate-stdin-binary", ["generate", "runs/lora", "--max-new-tokens", "2"], setup=copy_run("lora"),
     stdin=b"\xff\xfe\x00\x01binary\n\x89PNG\r\n", code=2, says=("stdin", "not UTF-8"))
case("generate-stdin-binary-c-locale", ["generate", "runs/lora", "--max-new-tokens", "2"], setup=copy_run("lora"),
     stdin=b"\xff\xfebinary\n", stdin_errors="surrogateescape", code=2, says=("stdin", "not UTF-8"))
case("generate-stdin-nul-bytes", ["generate", "runs/lora", "--max-new-tokens", "2"], setup=copy_run("lora"),
     stdin="a\x00b\n", code=0)
case("generate-empty-prompt", ["generate", "runs/lora", "--prompt", "", "--max-new-tokens", "2"],
     setup=copy_run("lora"), code=0)
case("generate-huge-prompt", ["generate", "runs/lora", "--prompt", "word " * 300, "--max-new-tokens", "2"],
     setup=copy_run("lora"), code=(0, 1))
case("generate-max-new-tokens-zero", ["generate", "runs/lora", "--prompt", "hi", "--max-new-tokens", "0"],
     code=2, says=("--max-new-tokens",))
case("generate-max-new-tokens-text", ["generate", "runs/lora", "--prompt", "hi", "--max-new-tokens", "lots"],
     code=2, says=("--max-new-tokens",))
case("generate-max-new-tokens-float", ["generate", "runs/lora", "--prompt", "hi", "--max-new-tokens", "2.5"],
     code=2, says=("--max-new-tokens",))
case("generate-temperature-negative", ["generate", "runs/lora", "--prompt", "hi", "--temperature", "-0.1"],
     code=2, says=("--temperature",))
case("generate-temperature-nan", ["generate", "runs/lora", "--prompt", "hi", "--temperature", "nan"], code=2,
     says=("--temperature",))
case("generate-temperature-inf", ["generate", "runs/lora", "--prompt", "hi", "--temperature", "inf",
                                  "--max-new-tokens", "2"], setup=copy_run("lora"), code=(0, 2))
case("generate-temperature-huge", ["generate", "runs/lora", "--prompt", "hi", "--temperature", "1e308",
                                   "--max-new-tokens", "2"], setup=copy_run("lora"), code=(0, 2))
case("generate-temperature-tiny", ["generate", "runs/lora", "--prompt", "hi", "--temperature", "1e-30",
                                   "--max-new-tokens", "2"], setup=copy_run("lora"), code=(0, 2))
case("generate-bad-task", ["generate", "runs/lora", "--prompt", "hi", "--task", "poetry"], code=2, says=("--task",))
case("generate-template-unknown-field", ["generate", "runs/lora", "--prompt", "hi", "--task", "completion",
                                         "--prompt-template", "{nope}"], setup=copy_run("lora"), code=2,
     says=("--prompt-template", "nope"))
case("generate-template-on-chat", ["generate", "runs/lora", "--prompt", "hi", "--prompt-template", "Q: {prompt}"],
     setup=copy_run("lora"), code=2, says=("--prompt-template", "chat"))
case("generate-template-braces", ["generate", "runs/lora", "--prompt", "hi", "--task", "completion",
                                  "--prompt-template", "{prompt"], setup=copy_run("lora"), code=2,
     says=("--prompt-template",))
case("generate-run-typo", ["generate", "runs/lroa", "--prompt", "hi"], setup=copy_run("lora"), code=1,
     says=("runs/lroa",))
case("generate-translation-bare-prompt", ["generate", "runs/lora", "--prompt", "cat", "--task", "translation",
                                          "--max-new-tokens", "2"], setup=copy_run("lora"), code=0)
case("generate-plain-model", ["generate", "model", "--prompt", "hi", "--max-new-tokens", "2"], code=0)
case("generate-stopped-run", ["generate", "runs/stopped", "--prompt", "hi"], setup=copy_run("stopped"), code=1,
     says=("runs/stopped", "--resume"))
case("generate-prompt-tuning-run", ["generate", "runs/prompt", "--prompt", "hi", "--max-new-tokens", "2"],
     setup=copy_run("prompt"), code=0)
case("chat-empty-stdin", ["chat", "runs/lora", "--max-new-tokens", "2"], setup=copy_run("lora"), code=0)
case("chat-two-turns", ["chat", "runs/lora", "--max-new-tokens", "2", "--system", "Be brief."],
     setup=copy_run("lora"), stdin="hello\nand again\n", code=0, says=("model>",))
case("chat-binary-stdin", ["chat", "runs/lora", "--max-new-tokens", "2"], setup=copy_run("lora"),
     stdin=b"\xff\xfe\xfd\n", code=2, says=("stdin", "not UTF-8"))
case("chat-binary-stdin-c-locale", ["chat", "runs/lora", "--max-new-tokens", "2"], setup=copy_run("lora"),
     stdin=b"\xff\xfe\xfd\n", stdin_errors="surrogateescape", code=2, says=("stdin", "not UTF-8"))
case("chat-missing-model", ["chat", "nope"], code=1, says=("nope",))
case("chat-stopped-run", ["chat", "runs/stopped"], setup=copy_run("stopped"), code=1, says=("runs/stopped",))
case("chat-max-new-tokens-zero", ["chat", "runs/lora", "--max-new-tokens", "0"], code=2,
     says=("--max-new-tokens",))
case("chat-temperature-text", ["chat", "runs/lora", "--temperature", "warm"], code=2, says=("--temperature",))
case("chat-unknown-option", ["chat", "runs/lora", "--prompt", "hi"], code=2, says=("--prompt",))

# ---------------------------------------------------------------- eval and report

EVAL = ["eval", "runs/lora", "--max-new-tokens", "2"]
STOPPED_EVAL = ["eval", "runs/stopped", "--max-new-tokens", "2"]
case("eval-ok", [*EVAL, "--data", "data/heldout.jsonl"], setup=copy_run("lora"), code=0, says=("loss",))
case("eval-no-data-flag", ["eval", "runs/lora"], code=2, says=("--data",))
case("eval-data-missing", [*EVAL, "--data", "data/nope.jsonl"], setup=copy_run("lora"), code=1,
     says=("data/nope.jsonl", "not found"))
case("eval-data-folder", [*EVAL, "--data", "data"], setup=copy_run("lora"), code=1, says=("data", "folder"))
case("eval-data-empty", [*EVAL, "--data", "data/e.jsonl"], setup=_setup(copy_run("lora"), text_file("data/e.jsonl", "")),
     code=1, says=("data/e.jsonl", "empty"))
case("eval-data-broken-record", [*EVAL, "--data", "data/e.jsonl"],
     setup=_setup(copy_run("lora"), text_file("data/e.jsonl", '{"messages": 1}\n')), code=1,
     says=("data/e.jsonl line 1", "messages"))
case("eval-data-other-task", [*EVAL, "--data", "data/heldout.jsonl", "--task", "ner"], setup=copy_run("lora"),
     code=1, says=("data/heldout.jsonl line 1",))
case("eval-classification-no-labels", [*EVAL, "--data", "data/heldout.jsonl", "--task", "classification"],
     setup=copy_run("lora"), code=2, says=("labels",))
case("eval-labels-empty-string", [*EVAL, "--data", "data/c.jsonl", "--task", "classification", "--labels", ""],
     setup=_setup(copy_run("lora"), text_file("data/c.jsonl", jsonl(VALID["classification"]))), code=2,
     says=("labels",))
case("eval-classification-ok", [*EVAL, "--data", "data/c.jsonl", "--task", "classification", "--labels", "pos,neg"],
     setup=_setup(copy_run("lora"), text_file("data/c.jsonl", jsonl(VALID["classification"]))), code=0,
     says=("accuracy",))
case("eval-max-seq-len-tiny", [*EVAL, "--data", "data/heldout.jsonl", "--max-seq-len", "1"], setup=copy_run("lora"),
     code=1, says=("--max-seq-len", "no answer tokens left"))
case("eval-max-seq-len-zero", [*EVAL, "--data", "data/heldout.jsonl", "--max-seq-len", "0"], code=2,
     says=("--max-seq-len",))
case("eval-bad-template", [*EVAL, "--data", "data/c.jsonl", "--prompt-template", "{x}", "--task", "completion"],
     setup=_setup(copy_run("lora"), text_file("data/c.jsonl", jsonl(VALID["completion"]))), code=2,
     says=("--prompt-template", "x"))
case("eval-template-braces", [*EVAL, "--data", "data/c.jsonl", "--task", "completion", "--prompt-template",
                              "Q: {prompt"], setup=_setup(copy_run("lora"), text_file("data/c.jsonl", jsonl(VALID["completion"]))),
     code=2, says=("--prompt-template",))
case("eval-stopped-run", [*STOPPED_EVAL, "--data", "data/heldout.jsonl"], setup=copy_run("stopped"), code=1,
     says=("runs/stopped", "--resume"))
case("eval-plain-model", ["eval", "model", "--data", "data/heldout.jsonl", "--max-new-tokens", "2"], code=0)
case("eval-missing-model", ["eval", "nope", "--data", "data/heldout.jsonl"], code=1, says=("nope",))
case("eval-data-is-the-model", [*EVAL, "--data", "model/model.safetensors"], setup=copy_run("lora"), code=1,
     says=("model/model.safetensors",))
case("eval-max-new-tokens-negative", ["eval", "runs/lora", "--data", "data/heldout.jsonl", "--max-new-tokens", "-1"],
     code=2, says=("--max-new-tokens",))

case("report-ok", ["report", "runs/lora", "--data", "data/heldout.jsonl"],
     setup=_setup(copy_run("lora"), user_notes_in("runs/lora")), code=0, says=("report.md",))
case("report-not-a-run", ["report", "mine"], code=1, says=("mine", "not a run"))
case("report-missing", ["report", "runs/nope"], code=1, says=("runs/nope",))
case("report-stopped-run", ["report", "runs/stopped", "--data", "data/heldout.jsonl"], setup=copy_run("stopped"),
     code=1, says=("not finished",))
case("report-no-held-out-data", ["report", "runs/lora"], setup=copy_run("lora"), code=(1, 2), says=("--data",))
case("report-data-missing", ["report", "runs/lora", "--data", "data/nope.jsonl"], setup=copy_run("lora"), code=1,
     says=("data/nope.jsonl",))
case("report-data-broken", ["report", "runs/lora", "--data", "data/b.jsonl"],
     setup=_setup(copy_run("lora"), text_file("data/b.jsonl", "[]\n")), code=1, says=("data/b.jsonl line 1",))
case("report-spec-eval-data-gone", ["report", "runs/lora"],
     setup=_setup(copy_run("lora"), lambda sb: sb.write("runs/lora/spec.yaml", (sb.work / "runs/lora/spec.yaml")
                                                       .read_text().replace("eval: null", "eval: {data: gone.jsonl}"))),
     code=1, says=("gone.jsonl",))

# ---------------------------------------------------------------- merge

MERGE = ["merge", "runs/lora", "--out"]
MERGE_CASES = [
    ("users-folder", "mine", 1, ("mine", "did not make")),
    ("a-file", "NOTES.txt", 1, ("NOTES.txt", "not a folder")),
    ("under-a-file", "NOTES.txt/m", 1, ("NOTES.txt",)),
    ("current-folder", ".", 2, ("--out", "current folder")),
    ("parent", "..", 2, ("--out", "parent")),
    ("home", "~", 2, ("--out", "home")),
    ("root", "/", 2, ("--out", "/ is")),
    ("empty", "", 2, ("--out",)),
    ("the-run", "runs/lora", 1, ("runs/lora", "run")),
    ("inside-the-run", "runs/lora/adapter", 1, ("runs/lora/adapter",)),
    ("holds-the-run", "runs", 1, ("runs",)),
    ("model-folder", "model", 1, ("model", "did not make")),
    ("data-folder", "data", 1, ("data", "did not make")),
    ("data-file", "data/train.jsonl", 1, ("data/train.jsonl",)),
    ("another-run", "runs/stopped", 1, ("runs/stopped", "is a tuneforge run folder")),
]
def _not_told_to_touch_a_marker(sb: Sandbox, o: Outcome) -> str | None:
    if "did not make" in o.err or "touch " in o.err:
        return "misleading: the message says tuneforge did not make the run it made, and suggests touching a merge " \
               "marker into it (after which a merge would delete the run)"
    return None


for slug, out, code, says in MERGE_CASES:
    extra = copy_run("stopped") if slug == "another-run" else None
    case(f"merge-out-{slug}", [*MERGE, out], setup=_setup(copy_run("lora"), user_notes_in("runs/lora"),
                                                          *(s for s in (extra,) if s)), code=code, says=says,
         check=_not_told_to_touch_a_marker if slug == "another-run" else None)
case("merge-out-symlink-to-users-folder", [*MERGE, "link"],
     setup=_setup(copy_run("lora"), lambda sb: (sb.work / "link").symlink_to(sb.work / "mine")), code=1,
     says=("link", "symbolic link"))
case("merge-out-symlink-to-empty-folder", [*MERGE, "link"],
     setup=_setup(copy_run("lora"), lambda sb: (sb.work / "empty").mkdir(),
                  lambda sb: (sb.work / "link").symlink_to(sb.work / "empty")), code=1, says=("link", "symbolic link"))
case("merge-out-dangling-symlink", [*MERGE, "link"],
     setup=_setup(copy_run("lora"), lambda sb: (sb.work / "link").symlink_to(sb.work / "gone")), code=1,
     says=("link", "symbolic link"))
case("merge-out-its-earlier-merge", [*MERGE, "runs/merged"], setup=_setup(copy_run("lora"), copy_run("merged")),
     code=0)
case("merge-no-out", ["merge", "runs/lora"], code=2, says=("--out",))
case("merge-not-a-run", ["merge", "model", "--out", "merged"], code=1, says=("model",))
case("merge-users-folder-as-run", ["merge", "mine", "--out", "merged"], code=1, says=("mine",))
case("merge-missing-run", ["merge", "runs/nope", "--out", "merged"], code=1, says=("runs/nope",))
case("merge-stopped-run", ["merge", "runs/stopped", "--out", "merged"], setup=copy_run("stopped"), code=1,
     says=("runs/stopped", "--resume"))
case("merge-prompt-tuning-run", ["merge", "runs/prompt", "--out", "merged"], setup=copy_run("prompt"), code=1,
     says=("prompt tuning",))
case("merge-base-model-gone", ["merge", "runs/lora", "--out", "merged"],
     setup=_setup(copy_run("lora"), lambda sb: shutil.rmtree(sb.work / "model")), code=1, says=("model",))

# ---------------------------------------------------------------- export (only what fails before a model loads)

ONNX = ["export", "onnx", "runs/lora", "--out"]
for slug, out, code, says in [c for c in MERGE_CASES if c[0] not in ("another-run",)]:
    case(f"export-onnx-out-{slug}", [*ONNX, out], setup=_setup(copy_run("lora"), user_notes_in("runs/lora")),
         code=code, says=says)
case("export-onnx-out-another-run", [*ONNX, "runs/stopped"], setup=_setup(copy_run("lora"), copy_run("stopped")),
     code=1, says=("runs/stopped", "did not make"))
case("export-onnx-not-a-run", ["export", "onnx", "data", "--out", "exports/x"], code=1,
     says=("data", "not a run folder"))
case("export-onnx-stopped-run", ["export", "onnx", "runs/stopped", "--out", "exports/x"], setup=copy_run("stopped"),
     code=1, says=("runs/stopped", "--resume"))
case("export-onnx-prompt-tuning-run", ["export", "onnx", "runs/prompt", "--out", "exports/x"],
     setup=copy_run("prompt"), code=1, says=("prompt tuning",))
case("export-onnx-precision", [*ONNX, "exports/x", "--precision", "fp8"], code=2, says=("--precision", "fp8"))
case("export-onnx-tolerance", [*ONNX, "exports/x", "--loss-tolerance", "-1"], setup=copy_run("lora"), code=2,
     says=("--loss-tolerance",))
GGUF = ["export", "gguf", "runs/lora", "--out"]
for slug, out, code, says in [
    ("not-gguf", "model.bin", 2, (".gguf",)), ("a-folder", "data", 2, (".gguf",)),
    ("users-file", "mine.gguf", 1, ("mine.gguf", "did not write")), ("inside-the-run", "runs/lora/m.gguf", 1,
                                                                     ("runs/lora",)),
    ("under-a-file", "NOTES.txt/m.gguf", 1, ("NOTES.txt",)),
]:
    case(f"export-gguf-out-{slug}", [*GGUF, out], code=code, says=says,
         setup=_setup(copy_run("lora"), user_notes_in("runs/lora"), text_file("mine.gguf", b"GGUF mine")))
case("export-gguf-type", [*GGUF, "m.gguf", "--type", "q4_0"], code=2, says=("--type", "q4_0"))
case("export-gguf-stopped-run", ["export", "gguf", "runs/stopped", "--out", "m.gguf"], setup=copy_run("stopped"),
     code=1, says=("runs/stopped", "--resume"))

# ---------------------------------------------------------------- plan, compare, k8s render, several processes

case("plan-spec-missing", ["plan", "nope.yaml"], code=2, says=("nope.yaml", "no such spec file"))
case("plan-methods-empty", ["plan", "job.yaml", "--methods", ""], code=2, says=("--methods",))
case("plan-methods-blank-name", ["plan", "job.yaml", "--methods", "lora,,dora"], code=2, says=("--methods",))
case("plan-methods-unknown", ["plan", "job.yaml", "--methods", "lora,bogus", "--strategies", "zero9"],
     setup=spec_file(), code=2, says=("bogus", "zero9"))
case("plan-memory-negative", ["plan", "job.yaml", "--memory-gb", "-2"], code=2, says=("--memory-gb",))
case("plan-model-folder-without-config", ["plan", "data"], code=1, says=("data",))
case("compare-out-users-folder", ["compare", "job.yaml", "--methods", "lora", "--out", "mine"], setup=spec_file(),
     code=1, says=("mine",))
case("compare-methods-unknown", ["compare", "job.yaml", "--methods", "lora,bogus", "--out", "cmp"],
     setup=spec_file(), code=2, says=("bogus",))
K8S = ["k8s", "render", "job.yaml", "--nodes", "2", "--gpus-per-node", "1"]
case("k8s-image-malformed", [*K8S, "--image", "bad image!"], setup=spec_file(), code=2, says=("--image",))
case("k8s-namespace-malformed", [*K8S, "--image", "x", "--namespace", "Team_A"], setup=spec_file(), code=2,
     says=("--namespace",))
case("k8s-out-users-file", [*K8S, "--image", "x", "--out", "NOTES.txt", "--overwrite"], setup=spec_file(), code=1,
     says=("NOTES.txt", "did not render"))
case("k8s-out-a-folder", [*K8S, "--image", "x", "--out", "data", "--overwrite"], setup=spec_file(), code=1,
     says=("data", "folder"))
case("k8s-out-exists", [*K8S, "--image", "x", "--out", "job-manifest.yaml"],
     setup=lambda sb: (spec_file()(sb), sb.write("job-manifest.yaml", "# tuneforge: rendered earlier\n")), code=2,
     says=("--overwrite",))
case("k8s-out-users-file-no-overwrite", [*K8S, "--image", "x", "--out", "NOTES.txt"], setup=spec_file(), code=1,
     says=("NOTES.txt", "did not render"),  # --overwrite would not help, so it is not suggested
     check=lambda sb, o: "suggests --overwrite, which refuses" if "--overwrite" in o.err else None)
case("k8s-name-empty", [*K8S, "--image", "x", "--name", ""], setup=spec_file(), code=2, says=("--name",))
case("plan-memory-infinite", ["plan", "job.yaml", "--memory-gb", "inf"], setup=spec_file(), code=2,
     says=("--memory-gb",))
case("serve-port-out-of-range", ["serve", "--data-dir", "svc", "--port", "70000"], code=2, says=("--port",))
case("serve-data-dir-a-file", ["serve", "--data-dir", "NOTES.txt"], code=2, says=("--data-dir", "NOTES.txt", "file"))
case("serve-data-dir-under-a-file", ["serve", "--data-dir", "NOTES.txt/svc"], code=2, says=("--data-dir", "file"))
case("keys-data-dir-a-file", ["keys", "create", "--data-dir", "NOTES.txt", "--org", "acme"], code=2,
     says=("--data-dir",))
case("serve-adapter-not-a-model", ["serve", "--data-dir", "svc", "--adapter", "junk=data"], code=2,
     says=("--adapter", "junk", "neither a run folder nor a model folder"))
case("serve-grace-zero", ["serve", "--data-dir", "svc", "--shutdown-grace-seconds", "0"], code=2,
     says=("--shutdown-grace-seconds",))
case("serve-job-ranks-huge", ["serve", "--data-dir", "svc", "--max-job-ranks", "100000"], code=2,
     says=("--max-job-ranks",))
case("k8s-spec-missing", ["k8s", "render", "nope.yaml", "--nodes", "2", "--gpus-per-node", "1", "--image", "x"],
     code=2, says=("nope.yaml",))
case("train-master-port", ["train", "job.yaml", "--nproc", "2", "--master-port", "99999"], code=2,
     says=("--master-port",))
case("train-node-rank-negative", ["train", "job.yaml", "--node-rank", "-1"], code=2, says=("--node-rank",))
case("train-node-rank-not-below-nnodes", ["train", "job.yaml", "--nproc", "2", "--nnodes", "2", "--node-rank", "2"],
     setup=spec_file(), code=2, says=("distributed.node_rank", "nnodes"))
case("train-qlora-zero3", ["train", "job.yaml", "--nproc", "2", "--set", "distributed.strategy=zero3"],
     setup=spec_file({"method": "qlora"}), code=2, says=("qlora", "zero3"))

# ---------------------------------------------------------------- demo (only what fails before a model loads)

for slug, out, code, says in [
    ("users-folder", "mine", 1, ("mine", "did not make")), ("a-file", "NOTES.txt", 1, ("NOTES.txt",)),
    ("current-folder", ".", 2, ("current folder",)), ("root", "/", 2, ("/ is",)), ("home", "~", 2, ("home",)),
    ("empty", "", 2, ("output_dir",)), ("data-folder", "data", 1, ("data", "did not make")),
    ("model-folder", "model", 1, ("model", "did not make")), ("parent", "..", 2, ("parent",)),
]:
    case(f"demo-output-{slug}", ["demo", "--output-dir", out], code=code, says=says,
         check=lambda sb, o: "demo wrote data/generated before refusing" if (sb.work / "data/generated").exists() else None)
for slug, epochs, code, says in [("zero", "0", 2, ("epochs",)), ("negative", "-1", 2, ("--epochs",)),
                                 ("nan", "nan", 2, ("--epochs",)), ("text", "two", 2, ("--epochs",))]:
    case(f"demo-epochs-{slug}", ["demo", "--epochs", epochs, "--output-dir", "mine"], code=code, says=says)

# ---------------------------------------------------------------- the Python API


def _tf():
    import tuneforge

    return tuneforge


def _api():
    from tuneforge import api

    return api


API_CASES = [
    ("train-empty-dict", lambda sb: _tf().train({}, progress=False), 2, ("model", "required")),
    ("train-none", lambda sb: _tf().train(None, progress=False), 2, ()),
    ("train-list", lambda sb: _tf().train([sb.spec()], progress=False), 2, ()),
    ("train-bad-lr", lambda sb: _tf().train(sb.spec({"training.lr": "fast"}), progress=False), 2, ("training.lr",)),
    ("train-missing-yaml", lambda sb: _tf().train("nope.yaml", progress=False), 2, ("nope.yaml",)),
    ("train-overrides-a-string", lambda sb: _tf().train(sb.spec(), overrides="training.lr=0.1", progress=False),
     (0, 2), ()),
    ("train-users-folder", lambda sb: _tf().train(sb.spec({"output_dir": "mine"}), overwrite=True, progress=False), 1,
     ("mine", "did not make")),
    ("train-resume-missing", lambda sb: _tf().train(sb.spec(), resume=True, progress=False), 1, ("checkpoint",)),
    ("train-stop-after-zero", lambda sb: _tf().train(sb.spec({"training.max_steps": 2}), stop_after=0, progress=False),
     (0, 2), ()),
    ("train-jobspec-with-bad-override", lambda sb: _tf().train(_tf().build_spec(sb.spec()), overrides=["training.lr=-1"],
                                                               progress=False), 2, ("training.lr",)),
    ("merge-missing-run", lambda sb: _api().merge("runs/nope", "merged"), 1, ("runs/nope",)),
    ("merge-out-none", lambda sb: (sb.run("lora"), _api().merge("runs/lora", None))[1], 2, ("out",)),
    ("merge-onto-itself", lambda sb: (sb.run("lora"), _api().merge("runs/lora", "runs/lora"))[1], 1, ("runs/lora",)),
    ("merge-users-folder", lambda sb: (sb.run("lora"), _api().merge("runs/lora", sb.work / "mine"))[1], 1, ("mine",)),
    ("load-missing", lambda sb: _api().load("nope"), 1, ("nope",)),
    ("load-users-folder", lambda sb: _api().load("mine"), 1, ("mine",)),
    ("load-bad-template", lambda sb: (sb.run("lora"), _api().load("runs/lora", task="completion",
                                                                  prompt_template="{x}"))[1], 2, ("x",)),
    ("load-unknown-task", lambda sb: (sb.run("lora"), _tf().generate(_api().load("runs/lora", task="poetry"), ["hi"],
                                                                     max_new_tokens=2))[1], 2, ("poetry",)),
    ("load-stopped-run", lambda sb: (sb.run("stopped"), _api().load("runs/stopped"))[1], 1, ("runs/stopped",)),
    ("generate-missing-model", lambda sb: _tf().generate("nope", ["hi"]), 1, ("nope",)),
    ("generate-max-new-tokens-zero", lambda sb: (sb.run("lora"), _tf().generate("runs/lora", ["hi"], max_new_tokens=0))[1],
     2, ("max_new_tokens",)),
    ("generate-temperature-nan", lambda sb: (sb.run("lora"), _tf().generate("runs/lora", ["hi"],
                                                                            temperature=float("nan")))[1], 2,
     ("temperature",)),
    ("generate-no-prompts", lambda sb: (sb.run("lora"), _tf().generate("runs/lora", []))[1], 0, ()),
    ("generate-message-list", lambda sb: (sb.run("lora"), _tf().generate(
        "runs/lora", [[{"role": "user", "content": "hi"}]], max_new_tokens=2))[1], 0, ()),
    ("generate-a-string-not-a-list", lambda sb: (sb.run("lora"), _tf().generate("runs/lora", "hello",
                                                                                max_new_tokens=2))[1], (0, 2), ()),
    ("generate-prompt-none", lambda sb: (sb.run("lora"), _tf().generate("runs/lora", [None], max_new_tokens=2))[1], 2,
     ("prompt",)),
    ("generate-prompt-int", lambda sb: (sb.run("lora"), _tf().generate("runs/lora", [42], max_new_tokens=2))[1], 2,
     ("prompt",)),
    ("generate-message-without-content", lambda sb: (sb.run("lora"), _tf().generate("runs/lora", [[{"role": "user"}]],
                                                                                    max_new_tokens=2))[1], (0, 2), ()),
    ("generate-message-bad-role", lambda sb: (sb.run("lora"), _tf().generate(
        "runs/lora", [[{"role": "bot", "content": "hi"}]], max_new_tokens=2))[1], (0, 2), ()),
    ("evaluate-missing-data", lambda sb: (sb.run("lora"), _api().evaluate("runs/lora", "data/nope.jsonl"))[1], 1,
     ("data/nope.jsonl",)),
    ("evaluate-unknown-task", lambda sb: (sb.run("lora"), _api().evaluate("runs/lora", "data/heldout.jsonl",
                                                                         task="poetry"))[1], (1, 2), ("poetry",)),
    ("evaluate-missing-model", lambda sb: _api().evaluate("nope", "data/heldout.jsonl"), 1, ("nope",)),
    ("evaluate-max-seq-len-zero", lambda sb: (sb.run("lora"), _api().evaluate("runs/lora", "data/heldout.jsonl",
                                                                             max_seq_len=0, max_new_tokens=2))[1],
     2, ("max_seq_len",)),
    ("evaluate-as-documented-after-an-evaluation", lambda sb: (sb.run("lora"), __import__("tuneforge.evaluation.runner"),
                                                               _tf().evaluate("runs/lora", "data/heldout.jsonl",
                                                                              max_new_tokens=2, progress=False))[2],
     0, ()),
    ("evaluate-ok", lambda sb: (sb.run("lora"), _api().evaluate("runs/lora", "data/heldout.jsonl", max_new_tokens=2,
                                                              progress=False))[1], 0, ()),
]


def _generate_len_check(sb: Sandbox, o: Outcome) -> str | None:
    if o.code == 0 and isinstance(o.result, list) and len(o.result) != 1:
        return f"one prompt string gave {len(o.result)} outputs"
    return None


def _no_none_folder(sb: Sandbox, o: Outcome) -> str | None:
    return "a folder named 'None' was written" if (sb.work / "None").exists() else None


API_CHECKS = {"generate-a-string-not-a-list": _generate_len_check, "merge-out-none": _no_none_folder}
for slug, call, code, says in API_CASES:
    case(f"api-{slug}", api=call, code=code, says=says, check=API_CHECKS.get(slug))


# ====================================================================================== pytest


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.defect)] if c.defect else []
    return pytest.param(c, id=c.id, marks=marks)


@pytest.fixture(scope="session")
def bad_input_env(tiny_models, tmp_path_factory) -> Env:
    return prepare_env(tmp_path_factory.mktemp("bad-input-env"), tiny_models)


assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("bad", [_param(c) for c in CASES])
def test_bad_input(bad: Case, bad_input_env: Env, tmp_path):
    outcome = run_case(bad, bad_input_env, tmp_path)
    assert outcome.ok, outcome.report()
