"""One exception hierarchy. The CLI prints these as messages (no traceback) and exits with `exit_code`."""
from __future__ import annotations


class TuneforgeError(Exception):
    """Something the user can fix; the message says what and how."""

    exit_code = 1


class SpecError(TuneforgeError):
    """The job spec is invalid."""

    exit_code = 2


class DataError(TuneforgeError):
    """A data file is invalid; the message lists every problem as `FILE line N: field: problem`."""

    exit_code = 1


class ModelError(TuneforgeError):
    """A model could not be resolved or loaded."""

    exit_code = 1


class CheckpointError(TuneforgeError):
    """A run folder or checkpoint is missing or unusable."""

    exit_code = 1
