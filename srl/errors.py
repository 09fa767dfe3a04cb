"""Exceptions that reach the user as one clear line instead of a traceback."""
from __future__ import annotations


class SrlError(Exception):
    """Base class for errors that srl reports as a single line (exit code 2 on the CLI)."""


class ConfigError(SrlError):
    """A bad experiment file or override.

    Args:
        field: dotted path of the offending field (``workers.actors.count``), or "" for the file.
        message: what is wrong, phrased for the user.
        source: the file (or "override") the value came from.
    """

    def __init__(self, field: str, message: str, source: str | None = None):
        self.field = field
        self.message = message
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [p for p in (self.source, self.field) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message

    def with_source(self, source: str) -> "ConfigError":
        return ConfigError(self.field, self.message, self.source or source)
