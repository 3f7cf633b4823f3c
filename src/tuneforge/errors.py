"""One exception hierarchy. The CLI prints these as messages (no traceback) and exits with `exit_code`; the HTTP
service's errors (service/errors.py) are part of it too, each with its HTTP status.

Errors about user input carry their problems as a list of `Problem`s (source, line, field, message),
so a long-running caller (the HTTP service) can map each one to an API error with `param`, while
the CLI prints the same problems as `FILE line N: field: problem`.

An error crosses a process boundary (a training process to its parent, a service job's training to its worker)
as a record (`to_record()` / `error_from_record`) that names its `kind`, and arrives as the same type, with its
message, problems and exit code: the receiving side decides by type, never by class-name strings.

Exit codes (documented in the README; scripts may rely on them):
  0 success · 1 a run, data, model or checkpoint problem · 2 an invalid spec or command line ·
  130 stopped by Ctrl-C (SIGINT) · 143 stopped by SIGTERM.
"""
from __future__ import annotations

from dataclasses import dataclass

_KINDS: dict[str, type[TuneforgeError]] = {}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where it is and what to do about it."""

    source: str | None  # a file name, "--set", a command-line flag, or None
    line: int | None  # 1-based line in `source`, when it is a file
    field: str  # dotted path of the offending value: "training.lr", "messages[0].content", "json"
    message: str

    def __str__(self) -> str:
        where = self.source or ""
        if self.source and self.line is not None:
            where = f"{self.source} line {self.line}"
        return f"{where}: {self.field}: {self.message}" if where else f"{self.field}: {self.message}"

    def as_dict(self) -> dict:
        return {"source": self.source, "line": self.line, "field": self.field, "message": self.message}


class TuneforgeError(Exception):
    """Something the user can fix; the message says what and how."""

    kind = "error"  # the name a record gives this type (set by every subclass that can cross a process boundary)
    exit_code = 1

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems: list[Problem] = list(problems or [])

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            _KINDS[cls.kind] = cls

    def to_record(self) -> dict:
        """This error as JSON-ready data, for another process (`error_from_record` turns it back)."""
        return {"kind": self.kind, "message": str(self), "exit_code": self.exit_code,
                "problems": [p.as_dict() for p in self.problems]}


_KINDS[TuneforgeError.kind] = TuneforgeError


def error_from_record(record: dict) -> TuneforgeError:
    """The error a `to_record()` describes, as its own type (an unknown kind: a TuneforgeError), with the same
    message, problems and exit code."""
    cls = _KINDS.get(str(record.get("kind")), TuneforgeError)
    error = cls.__new__(cls)
    TuneforgeError.__init__(error, str(record.get("message", "")),
                            [Problem(**p) for p in record.get("problems") or []])
    error.exit_code = int(record.get("exit_code", cls.exit_code))
    return error


class SpecError(TuneforgeError):
    """The job spec or a command-line argument is invalid."""

    kind = "spec"
    exit_code = 2


class DataError(TuneforgeError):
    """A data file is invalid; `problems` lists every one, printed as `FILE line N: field: problem`."""

    kind = "data"


class ModelError(TuneforgeError):
    """A model could not be resolved or loaded."""

    kind = "model"


class CheckpointError(TuneforgeError):
    """A run folder or checkpoint is missing or unusable."""

    kind = "checkpoint"


class OutputError(TuneforgeError):
    """An output folder cannot be used: not ours to replace, not a folder, not writable, or the disk is full."""

    kind = "output"


class Stopped(TuneforgeError):
    """Training stopped on request (Ctrl-C, SIGTERM, a service's cancel or pause) before it finished."""

    kind = "stopped"
    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
