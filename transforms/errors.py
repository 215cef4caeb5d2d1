"""The errors sluice raises on purpose, as one flat tree.

Each message is one line that says what failed, where, and what to do, because it is what a user
sees at the end of a failed ``spark-submit`` or Airflow task. ``UserCodeError`` is kept apart from
the rest: it means the *model* raised, not sluice, and the engine routes the offending records to
the dead-letter/quarantine instead of failing the job.
"""

from __future__ import annotations


class SluiceError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line, always: multi-line messages get lost in Spark and Airflow logs.
        super().__init__(" ".join(message.split()))


class ConfigError(SluiceError):
    """The job's configuration is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class SourceError(SluiceError):
    """The source is missing, unreadable, or does not have the expected schema."""

    exit_code = 3


class ModelLoadError(SluiceError):
    """The model artifact is missing, corrupt, of an unknown kind, or fails its checksum."""

    exit_code = 4


class SinkError(SluiceError):
    """A sink could not be written (unwritable path, incompatible existing table, store down)."""

    exit_code = 5


class QualityGateError(SluiceError):
    """Too many rows were quarantined; the run's outputs were not published."""

    exit_code = 6


class UserCodeError(SluiceError):
    """The model (user code) raised while running a batch.

    Carries the original exception so the engine can bisect the batch down to the records
    that trigger it and dead-letter only those.
    """

    exit_code = 7

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause
