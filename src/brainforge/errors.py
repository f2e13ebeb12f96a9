"""User-facing errors.

Anything a user can fix (a config key, a file, a column) raises a `BrainforgeError`
subclass whose message names the thing and the fix. The CLI prints that message alone and
exits non-zero; everything else is a bug and keeps its traceback.
"""


class BrainforgeError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(BrainforgeError):
    """The config file is missing, malformed, or has bad keys or values."""


class DataError(BrainforgeError):
    """A dataset source is missing, has the wrong columns, or yields no trainable tokens."""


class ModelError(BrainforgeError):
    """A model, GGUF file or adapter cannot be found or does not fit."""


class MissingDependencyError(BrainforgeError):
    """An optional feature was asked for but its package is not installed."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the package '{package}', which is not installed. "
            f"Install it with: pip install 'brainforge[{extra}]'"
        )


class StoreError(BrainforgeError):
    """The memory store, a document to ingest, or an SOP file cannot be used as asked."""
