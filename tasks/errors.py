"""Exceptions raised by training and evaluation code; their messages name the file, key or id."""


class TasksError(Exception):
    """Base class for errors the command line reports as one line."""


class ConfigError(TasksError, ValueError):
    """An invalid run configuration (names the key)."""


class AnnotationError(TasksError):
    """A malformed annotation file (names the file and the entry)."""


class DataError(TasksError):
    """Data that cannot be joined or batched (missing feature ids, empty splits)."""


class ResumeError(TasksError):
    """A run checkpoint that cannot be resumed from (names the directory or file and the problem).

    Distinct from `vilbert.errors.CheckpointError`, which is about model weight files that do not fit the model.
    """


class TrainingDiverged(TasksError):
    """The loss became NaN or infinite; names the step and the last good checkpoint."""
