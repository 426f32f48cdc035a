"""The exception hierarchy. Every error a user can cause is a `SaecacheError`; the CLI prints its message as one
line and exits non-zero. Anything else is a bug and keeps its traceback."""


class SaecacheError(Exception):
    """Bad input or an unusable artifact: the message says what was wrong and what to do."""


class ConfigError(SaecacheError, ValueError):
    """A configuration value is invalid or conflicts with another."""


class StoreError(SaecacheError):
    """A store is missing, incomplete, corrupt, from another config, or from a newer format."""


class RunDirError(SaecacheError):
    """A run directory is missing files, from a newer format, or does not match the store or model."""


class ModelError(SaecacheError):
    """A model or tokenizer cannot be loaded, or a hook point does not exist."""


class DataError(SaecacheError):
    """Text input is missing, empty, or lacks the requested field."""


class DivergedError(SaecacheError):
    """Training produced NaN/Inf; the last good checkpoint is kept."""
