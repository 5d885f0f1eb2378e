"""The one error class the CLI treats as the user's to fix: one line, exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the command, config, data, storage settings or run directory.

    Raised before any compute where possible; the message says what to change.
    """
