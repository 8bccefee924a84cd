"""Typed errors of the public API.

Every error a user can cause derives from :class:`JlcmError`; the CLI turns it into a one-line message and exit code 2.
Anything else that escapes is a bug (exit code 1).
"""

from __future__ import annotations


class JlcmError(Exception):
    """Base class of the errors caused by bad input: a bad model, config, path or calibration data."""


class ConfigError(JlcmError, ValueError):
    """A configuration field has a bad value; the message names the field and the value."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        super().__init__(f"config field '{field}' = {value!r} is invalid: expected {expected}")
        self.field = field
        self.value = value
        self.expected = expected


class ModelError(JlcmError):
    """The input model cannot be read, is not valid ONNX, or cannot be handled."""


class OutputError(JlcmError):
    """The output cannot be written where it was asked for."""


class CalibrationError(JlcmError):
    """Calibration data does not fit the model (names, dtypes, shapes, values) or cannot be read; the message names
    the input and the mismatch."""


class MemoryBudgetError(JlcmError):
    """The run's estimated peak memory exceeds its budget (``max_memory``); raised before any work is done."""
