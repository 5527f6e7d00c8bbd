"""orderq's exceptions: one base class; control-flow errors carry their data."""

from __future__ import annotations


class OrderqError(Exception):
    """Base of every orderq error."""


class ConfigError(OrderqError):
    """A setting or the server it names is unusable; the CLI exits with code 2."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        self.variable = variable
        self.reason = reason


class ServerCheckError(ConfigError):
    """The Redis/Valkey server is reachable but configured in a way orderq refuses."""


class ServerUnavailable(OrderqError):
    """Redis did not answer within the deadline (stalled, down or out of memory)."""

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
