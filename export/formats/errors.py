"""The exception hierarchy shared by every lorafleet layer.

Library code raises a subclass of :class:`LorafleetError` for every *known* failure (bad input, missing
files, incompatible adapters...). The CLI maps these to a one-line message and a non-zero exit; anything else
is a bug and keeps its traceback.
"""


class LorafleetError(Exception):
    """Base class of every error lorafleet reports to a user as one line."""

    exit_code = 1


class ConfigError(LorafleetError, ValueError):
    """An invalid configuration value (names the field and the value)."""


class ModelSpecError(LorafleetError):
    """A model spec that cannot be resolved or loaded (unknown name, missing path, corrupt GGUF...)."""


class AdapterError(LorafleetError):
    """A PEFT adapter directory that is missing, malformed, unsafe (pickle) or inconsistent."""


class AggregationError(LorafleetError, ValueError):
    """Client adapters that cannot be aggregated together (mismatched modules or shapes, unequal ranks for
    FedAvg, bad weights, an unknown method or option)."""


class PackageError(LorafleetError):
    """An edge package that is missing, corrupt (checksum mismatch) or lacks what was asked of it."""


class ExportError(LorafleetError):
    """A failure while compiling or verifying an edge package."""


class NotAvailableError(LorafleetError):
    """A command that this version of lorafleet does not provide yet."""

    exit_code = 2


class DataError(LorafleetError):
    """A training-data file that is missing or malformed (names the file and the line)."""
