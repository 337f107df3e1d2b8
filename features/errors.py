"""Exceptions raised by the feature pipeline; their messages name the file and the problem."""


class FeaturesError(Exception):
    """Base class for errors the command line reports as one line."""


class FeatureStoreError(FeaturesError):
    """A feature file that is missing, foreign, truncated or inconsistent, or a missing image id."""


class ImageError(FeaturesError):
    """An image that cannot be decoded or used."""


class WeightsError(FeaturesError):
    """A detector weight file that cannot be read or does not fit the detector."""


class OutputLockedError(FeaturesError):
    """An output (feature store, run directory) another live process is writing."""


class DiskFullError(FeaturesError):
    """No space left on the device while writing an output; what was sealed before stays intact."""


class OutputError(FeaturesError):
    """An output path that would replace an input, or a folder or file this project did not write."""
