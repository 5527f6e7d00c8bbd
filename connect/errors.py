"""What a platform call can end in, besides an answer: retry it (throttled, 5xx, a network
fault) after a wait, or give up on it (a bad signature, an expired session) until someone fixes
the configuration. Neither ever moves a connector's cursor: a window is read whole or not at all.
"""

from __future__ import annotations

from orderq.errors import OrderqError


class PlatformError(OrderqError):
    def __init__(self, reason: str, code: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Retry(PlatformError):
    """Throttled or a transient fault on the platform's side: the same call again after ``wait_s``."""

    def __init__(self, reason: str, code: str = "", wait_s: float | None = None) -> None:
        super().__init__(reason, code)
        self.wait_s = wait_s


class GiveUp(PlatformError):
    """The platform refuses the call itself (signature, credentials, parameters): retrying at once
    cannot help; the connector reports it and tries again only after a long pause."""
