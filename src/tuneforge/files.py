"""Where tuneforge writes and what it may delete: one guard for every delete, one helper for atomic writes.

The rule: tuneforge deletes only what it can prove it made. A folder it creates for a run or a merge
gets a marker file (`.tuneforge-run`, `.tuneforge-merged`); inside a run folder it removes only the
entries it writes itself (checkpoints, adapter, metrics, ...), never a user's own files; it never
writes a run into, or deletes, the current folder, a parent of it, the home folder or the root; and
callers check everything (spec, data, model) before the first delete.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from tuneforge.errors import OutputError, SpecError

RUN_MARKER = ".tuneforge-run"
MERGE_MARKER = ".tuneforge-merged"
# Everything a run writes into its folder (`remove_run_outputs` deletes these and nothing else).
RUN_OUTPUTS = ("checkpoints", "adapter", "model", ".tmp-adapter", ".tmp-model", "tensorboard", "summary.json",
               "metrics.jsonl", "spec.yaml", "loss_curve.png", "report.md", "report.json", "before_after.png",
               "demo_report.json", "result.csv", "reference_logps.safetensors", ".tmp-reference_logps.safetensors")


def expand(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(path)))


def refuse_special(path: Path, field: str) -> None:
    """SpecError if `path` is empty, the current folder, one of its parents, the home folder or the root."""
    if str(path).strip() == "":
        raise SpecError(f"{field}: is empty; give the run its own folder, e.g. runs/NAME")
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    what = None
    if resolved == cwd:
        what = "the current folder"
    elif resolved in cwd.parents:
        what = "a parent of the current folder"
    elif resolved == home:
        what = "your home folder"
    elif resolved == Path(resolved.anchor):
        what = "the root folder"
    if what:
        raise SpecError(f"{field}: {path} is {what}; give the run its own folder, e.g. runs/NAME")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_folder(path: Path, field: str) -> None:
    """OutputError unless `path` is (or can be created as) a folder this process can write into."""
    if path.is_symlink():  # a link may point anywhere, or nowhere: tuneforge writes and deletes real folders only
        raise OutputError(f"{field}: {path} is a symbolic link; give the real folder it should be")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{field}: {path} exists and is not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(f"{field}: {path} cannot be created: {base} is a file, not a folder")
    read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    if read_only or not os.access(base, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise OutputError(f"{field}: {path} cannot be written: {base} {why}")


def owner_of(path: Path) -> str | None:
    """'run' or 'merge' if tuneforge made the folder `path` (its marker is there), else None."""
    for kind, marker in (("run", RUN_MARKER), ("merge", MERGE_MARKER)):
        if (path / marker).is_file():
            return kind
    return None


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def not_ours_message(path: Path, marker: str, field: str) -> str:
    shown = sorted(p.name for p in path.iterdir())[:3]
    return (f"{field}: {path} is not empty ({', '.join(shown)}{', ...' if len(list(path.iterdir())) > 3 else ''}) "
            f"and tuneforge did not make it (no {marker} marker), so it will neither write into it nor delete it; "
            f"choose another folder, or delete it yourself. (Runs made by tuneforge before 0.2 have no marker: "
            f"`touch {path / marker}` lets tuneforge replace it.)")


def mark(path: Path, marker: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not (path / marker).exists():
        (path / marker).write_text(json.dumps({"made_by": "tuneforge"}) + "\n")


def _guarded_rmtree(path: Path) -> None:
    """The only recursive delete in tuneforge: refuses anything outside a folder tuneforge marked."""
    path = path.absolute()
    if not any((parent / m).is_file() for parent in (path, *path.parents) for m in (RUN_MARKER, MERGE_MARKER)):
        raise OutputError(f"refusing to delete {path}: tuneforge did not make it")
    refuse_special(path, "delete")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_run_outputs(run_dir: Path) -> None:
    """Delete what a run wrote in `run_dir` (a folder carrying the run marker), leaving other files alone."""
    if owner_of(run_dir) != "run":
        raise OutputError(not_ours_message(run_dir, RUN_MARKER, "output_dir"))
    for name in RUN_OUTPUTS:
        if (run_dir / name).exists() or (run_dir / name).is_symlink():
            _guarded_rmtree(run_dir / name)


def remove_owned(path: Path) -> None:
    """Delete `path` inside a run folder or a merge output (checkpoints, temporaries, an old merge)."""
    _guarded_rmtree(path)


def remove_temporary(path: Path) -> None:
    """Delete a temporary folder this process created with `temporary_folder` (best effort)."""
    if path.name.startswith(".tmp-"):
        shutil.rmtree(path, ignore_errors=True)


def temporary_folder(next_to: Path) -> Path:
    """A new empty `.tmp-NAME-XXXX` folder beside `next_to`, to be renamed onto it when complete."""
    next_to.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{next_to.name}-", dir=next_to.parent))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` so a crash leaves the old content or the new, never half of it."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, path) from None


LOW_SPACE_BYTES = 64 * 2**20


def is_disk_full(e: BaseException, path: Path | None = None) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if "No space left" in text:
        return True
    # torch.save's C++ zip writer reports a short write without errno ("[enforce fail at
    # inline_container.cc] unexpected pos ..."): call it a full disk when the disk is (nearly) full.
    if "inline_container" in text and path is not None:
        try:
            return shutil.disk_usage(_nearest_existing(path)).free < LOW_SPACE_BYTES
        except OSError:
            return False
    return False


def disk_error(e: BaseException, path: Path) -> OutputError:
    """An OutputError for a failed write: says plainly when the disk is full."""
    if is_disk_full(e, path):
        try:
            free = shutil.disk_usage(_nearest_existing(path)).free / 2**20
            free_text = f" ({free:.0f} MiB free)"
        except OSError:
            free_text = ""
        return OutputError(f"the disk is full: could not write {path}{free_text}; free some space and run again")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return OutputError(f"could not write {path}: {reason}")


def write_jsonl_splits(out_dir: str | os.PathLike, splits: dict[str, list[dict]], *, overwrite: bool = False,
                       field: str = "--out") -> dict[str, Path]:
    """Write `{name}.jsonl` per split into `out_dir`. A file already there with other content is someone's
    data: refused (naming it) unless `overwrite`; the same content is simply kept."""
    out = expand(out_dir)
    check_writable_folder(out, field)
    texts = {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in splits.items()}
    paths = {name: out / f"{name}.jsonl" for name in splits}
    if not overwrite:
        clash = [str(p) for name, p in paths.items()
                 if p.exists() and (not p.is_file() or p.read_bytes() != texts[name].encode("utf-8"))]
        if clash:
            raise OutputError(f"{field}: {', '.join(clash)} already exist(s) with other content; choose another "
                              "folder, or pass --overwrite to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, out) from None
    for name, path in paths.items():
        atomic_write_text(path, texts[name])
    return paths
