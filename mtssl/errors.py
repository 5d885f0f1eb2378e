"""Error classes low in the dependency order: the user's mistakes, and a training run's stop."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the command, config, data, storage settings or run directory.

    Raised before any compute where possible; the message says what to change.
    """


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, a refused resume, a lost peer): the last good
    checkpoint is kept."""
