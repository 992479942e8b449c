"""Project exceptions.

Every error raised on bad input is a :class:`ForceCentricError` (or subclass) whose message names
the file, the record and what is wrong, so a user can find and fix the offending input.
"""

from __future__ import annotations


class ForceCentricError(Exception):
    """Base class of all errors raised by forcecentric on bad input or bad state."""


class DataError(ForceCentricError, ValueError):
    """A data file or record is invalid (NaN/Inf, shape mismatch, atoms too close, ...)."""

    def __init__(self, problem: str, *, file: str | None = None, record: int | None = None):
        self.file = None if file is None else str(file)
        self.record = record
        self.problem = problem
        where = []
        if self.file is not None:
            where.append(f"file {self.file!r}")
        if record is not None:
            where.append(f"record {record}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + problem)


class ConfigError(ForceCentricError, ValueError):
    """A configuration file has unknown keys, wrong types or impossible values."""


class CheckpointError(ForceCentricError):
    """A checkpoint cannot be loaded (missing, corrupt or from an incompatible version)."""


class ElementError(ForceCentricError, ValueError):
    """A structure contains an element the model was not trained on."""


class TrainingDivergedError(ForceCentricError, RuntimeError):
    """A loss or a prediction became NaN/Inf during training."""


class ModelKindError(ForceCentricError, ValueError):
    """A checkpoint holds another kind of model than asked for (a property model where a force
    field is needed, or the reverse)."""


class MissingDependencyError(ForceCentricError, ImportError):
    """An optional dependency a feature needs is not installed; the message says how to install it
    (an ImportError too, for code that catches that)."""
