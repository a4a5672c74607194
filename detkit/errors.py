"""Errors that reach the user as one line (the CLI prints them on stderr and exits with code 2)."""


class DetkitError(Exception):
    """Base class of every error caused by bad input (a config, a file, a name)."""


class ConfigError(DetkitError):
    """A config file, key or value is wrong."""


class PretrainedError(DetkitError):
    """Pretrained weights cannot be found, read or loaded."""


class DataError(DetkitError):
    """A dataset file (image, annotation, mask, split) is missing, malformed or refused."""


class TrainingError(DetkitError):
    """Training cannot go on (e.g. a loss that is NaN or infinite)."""
