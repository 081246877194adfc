"""Adapter names: they become file names, URL path parts and HTTP header values, so one rule checks them
wherever a name comes in (export, the runtime's load_adapter, the server's header)."""

from __future__ import annotations

from ..errors import ConfigError

DEFAULT_ADAPTER_NAME = "default"

ADAPTER_NAME_MAX_LENGTH = 64
_ADAPTER_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_adapter_name(name: str) -> None:
    """Adapter names become file names, URL path parts and HTTP header values: ASCII letters, digits, '-', '_' and
    '.' (not first), at most ADAPTER_NAME_MAX_LENGTH characters, never a path."""
    if (not isinstance(name, str) or not name or name.startswith(".") or len(name) > ADAPTER_NAME_MAX_LENGTH
            or not set(name) <= _ADAPTER_NAME_CHARACTERS):
        shown = repr(name)
        if isinstance(name, str) and len(name) > 80:
            shown = f"{name[:40]!r}... ({len(name)} characters)"
        raise ConfigError(f"Adapter name {shown} must be 1 to {ADAPTER_NAME_MAX_LENGTH} characters of ASCII letters, "
                          "digits, '-', '_' or '.' (not first); rename it, e.g. NAME=PATH")
