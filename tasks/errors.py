"""Exceptions raised by training and evaluation code; their messages name the file, key or id.

One hierarchy with the model's: `TasksError` is a `vilbert.errors.ViLBertError`, and a bad run configuration is the
model package's `ConfigError` (re-exported here). The feature pipeline keeps its own root, `FeaturesError`, because
`features` and `vilbert` never import each other; the command line reports both as one line.
"""

from vilbert.errors import ConfigError, ViLBertError

__all__ = ["AnnotationError", "ConfigError", "DataError", "ResumeError", "TasksError", "TrainingDiverged"]


class TasksError(ViLBertError):
    """Base class for errors of data, training and evaluation."""


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
