"""Bearer tokens: the configured ones, or random ones kept in ``ORDERQ_DATA_DIR/tokens.env``
so the ingress never runs open by accident and tokens survive restarts."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

from orderq.settings import Settings, read_dotenv

TOKENS_FILE = "tokens.env"


def tokens_path(settings: Settings) -> Path:
    return settings.data_dir / TOKENS_FILE


def ensure_tokens(settings: Settings) -> tuple[Settings, Path | None]:
    """Fill unset channel/admin tokens from (or into) ``tokens.env``; returns the file if used."""
    if not settings.auth or (settings.channel_tokens and settings.admin_token):
        return settings, None
    path = tokens_path(settings)
    stored = read_dotenv(path)
    channel = dict(settings.channel_tokens)
    if not channel:
        pairs = dict(p.split("=", 1) for p in stored.get("ORDERQ_CHANNEL_TOKENS", "").split(",") if "=" in p)
        channel = {c: pairs.get(c) or secrets.token_urlsafe(24) for c in settings.channels}
    admin = settings.admin_token or stored.get("ORDERQ_ADMIN_TOKEN") or secrets.token_urlsafe(32)
    text = (
        "# orderq bearer tokens, generated because ORDERQ_CHANNEL_TOKENS / ORDERQ_ADMIN_TOKEN were unset.\n"
        f"ORDERQ_CHANNEL_TOKENS={','.join(f'{c}={t}' for c, t in channel.items())}\n"
        f"ORDERQ_ADMIN_TOKEN={admin}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        tmp.replace(path)
    return dataclasses.replace(settings, channel_tokens=channel, admin_token=admin), path
