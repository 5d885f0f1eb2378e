"""Config errors, kept apart from config.py so task files can use them without an import cycle."""

from __future__ import annotations

from mtssl.errors import UserError


class ConfigError(UserError, ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}" if key else message)
        self.key = key


def require(ok: bool, key: str, message: str) -> None:
    """Range checks in __post_init__; the loader prefixes the section path to `key`."""
    if not ok:
        raise ConfigError(key, message)
