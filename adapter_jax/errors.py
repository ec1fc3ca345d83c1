"""The project's error types: every bad input raises one of these, naming the file, line or key at fault."""


class AdapterJaxError(Exception):
    """Base class of every error adapter-jax raises on bad input."""


class ConfigError(AdapterJaxError, ValueError):
    """A config key has a value that cannot work; the message names the key and what is allowed."""


class DataError(AdapterJaxError, ValueError):
    """A data file or folder is missing or malformed; the message names the path (and line)."""


class WeightsError(AdapterJaxError, ValueError):
    """A checkpoint folder or weights file is missing, mis-shaped or corrupt; the message names it."""


class CheckpointError(AdapterJaxError, ValueError):
    """A training checkpoint or adapter export cannot be used; the message says why."""
