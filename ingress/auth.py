"""Who may call what (contract §4): bearer tokens, compared in constant time."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from ingress import responses
from ingress.http import bearer
from orderq.settings import Settings


def same(a: str, b: str) -> bool:
    """``a == b`` in time that does not tell where they differ."""
    return hmac.compare_digest(a.encode(), b.encode())


class Auth:
    """Token checks, constant-time. ``channel_of`` maps a token to its channel."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth
        self.channel_tokens: dict[str, str] = dict(settings.channel_tokens)
        self.admin = settings.admin_token or ""
        # encoded once: channel_of runs on every order write, refusals included
        self._channel_bytes = [(c, t.encode()) for c, t in self.channel_tokens.items()]

    def channel_of(self, request: Request) -> str | None:
        """The channel whose token the request carries (None while auth is off); 401 when none
        matches, 403 for the admin token."""
        if not self.enabled:
            return None
        token = bearer(request)
        if token is None:
            raise responses.unauthorized("missing bearer token")
        found = None
        presented = token.encode()
        for channel, t in self._channel_bytes:
            if hmac.compare_digest(presented, t):  # no early exit: time does not tell which channel matched
                found = channel
        if found is None:
            if self.admin and same(token, self.admin):
                raise responses.forbidden("order writes take a channel token, not the admin token")
            raise responses.unauthorized("invalid bearer token")
        return found

    def admin_only(self, request: Request) -> None:
        """401 / 403 unless the request carries the admin token."""
        if not self.enabled:
            return
        token = bearer(request)
        if token is None:
            raise responses.unauthorized("missing bearer token")
        if not (self.admin and same(token, self.admin)):
            if any(same(token, t) for t in self.channel_tokens.values()):
                raise responses.forbidden("this endpoint takes the admin token")
            raise responses.unauthorized("invalid bearer token")

    def channel_or_admin(self, request: Request, channel: str) -> None:
        """401 / 403 unless the request carries ``channel``'s token or the admin token."""
        if not self.enabled:
            return
        token = bearer(request)
        if token is None:
            raise responses.unauthorized("missing bearer token")
        if self.admin and same(token, self.admin):
            return
        own = self.channel_tokens.get(channel)
        if own and same(token, own):
            return
        if any(same(token, t) for t in self.channel_tokens.values()):
            raise responses.forbidden(f"token of another channel than {channel!r}")
        raise responses.unauthorized("invalid bearer token")
