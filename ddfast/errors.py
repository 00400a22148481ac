"""Errors ddfast raises for bad input.

Every message names the problem and what to do about it. They all derive from
``DdfastError`` so a caller can catch everything ddfast rejects in one place.
"""


class DdfastError(Exception):
    """Base class of every error raised for bad input or a bad environment."""


class ConfigError(DdfastError, ValueError):
    """An invalid configuration key, value or combination."""


class DataError(DdfastError, ValueError):
    """Missing, empty, unreadable or inconsistent data."""


class ModelError(DdfastError, ValueError):
    """A model folder or architecture that cannot be used as asked."""


class OutputError(DdfastError, OSError):
    """An output folder that cannot be written, or would be overwritten."""
