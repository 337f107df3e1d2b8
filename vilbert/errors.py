"""Exceptions raised by the model package; their messages name the field, key or file at fault."""


class ViLBertError(Exception):
    """Base class for errors the command line reports as one line."""


class ConfigError(ViLBertError, ValueError):
    """An invalid model configuration (names the field)."""


class CheckpointError(ViLBertError):
    """A checkpoint that does not fit the model (names the file and the first bad key)."""
