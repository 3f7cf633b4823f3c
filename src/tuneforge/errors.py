"""One exception hierarchy. The CLI prints these as messages (no traceback) and exits with `exit_code`.

Errors about user input carry their problems as a list of `Problem`s (source, line, field, message),
so a long-running caller (the HTTP service) can map each one to an API error with `param`, while
the CLI prints the same problems as `FILE line N: field: problem`.

Exit codes (documented in the README; scripts may rely on them):
  0 success · 1 a run, data, model or checkpoint problem · 2 an invalid spec or command line ·
  130 stopped by Ctrl-C (SIGINT) · 143 stopped by SIGTERM.
"""
from __future__ import annotations

from dataclasses import dataclass


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

    exit_code = 1

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems: list[Problem] = list(problems or [])


class SpecError(TuneforgeError):
    """The job spec or a command-line argument is invalid."""

    exit_code = 2


class DataError(TuneforgeError):
    """A data file is invalid; `problems` lists every one, printed as `FILE line N: field: problem`."""

    exit_code = 1


class ModelError(TuneforgeError):
    """A model could not be resolved or loaded."""

    exit_code = 1


class CheckpointError(TuneforgeError):
    """A run folder or checkpoint is missing or unusable."""

    exit_code = 1


class OutputError(TuneforgeError):
    """An output folder cannot be used: not ours to replace, not a folder, not writable, or the disk is full."""

    exit_code = 1


class Stopped(TuneforgeError):
    """Training stopped on request (Ctrl-C, SIGTERM, a service's cancel or pause) before it finished."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
