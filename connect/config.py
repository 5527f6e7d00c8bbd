"""Connector files (contract §7): one TOML file per connector in ``ORDERQ_CONNECTORS_DIR``,
named after the connector (``tmall-flagship.toml``)::

    platform  = "taobao"              # taobao | jd | douyin | pdd | shopify
    shop      = "flagship"            # the shop's name on the platform (Shopify: its myshopify host)
    channel   = "tmall"               # the orderq channel it feeds (default: the platform's)
    mapping   = "tmall"               # a mapping of ORDERQ_MAPPINGS_DIR, or a file path (default: the channel's)
    every_s   = 300                   # poll period once caught up
    overlap_s = 300                   # re-read this much before the cursor: the platform's late writes
    url       = "https://eco.taobao.com/router/rest"   # the platform's endpoint (a simulator in tests)
    start     = "2026-11-10T00:00:00+08:00"            # where a new connector starts (default: a day ago)
    [credentials]                     # each value names an environment variable, never the secret itself
    app_key    = "TAOBAO_APP_KEY"
    app_secret = "TAOBAO_APP_SECRET"
    session    = "TAOBAO_SESSION"

Optional: ``window_s`` (at most the platform's limit), ``lag_s`` (how far behind the platform's
clock a window must end), ``page_size``, ``lease_s``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
from collections.abc import Mapping as EnvMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from orderq.errors import ConfigError
from orderq.mapping import Mapping, SpecError, compile_mapping, load_file
from orderq.settings import Settings

Platform = Literal["taobao", "jd", "douyin", "pdd", "shopify"]
DEFAULT_CHANNEL: dict[str, str] = {
    "taobao": "tmall",
    "jd": "jd",
    "douyin": "douyin",
    "pdd": "pdd",
    "shopify": "shopify",
}
Seconds = Annotated[float, Meta(gt=0, le=7 * 24 * 3600)]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConnectorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    platform: Platform
    shop: Annotated[str, Meta(min_length=1, max_length=200)]
    channel: str | None = None
    mapping: str | None = None
    every_s: Seconds = 300.0
    overlap_s: Annotated[float, Meta(ge=0, le=7 * 24 * 3600)] = 300.0
    url: str | None = None
    start: Annotated[dt.datetime, Meta(tz=True)] | None = None
    window_s: Seconds | None = None
    lag_s: Annotated[float, Meta(ge=0, le=3600)] | None = None
    page_size: Annotated[int, Meta(ge=1, le=250)] | None = None
    lease_s: Annotated[float, Meta(ge=1, le=600)] = 15.0
    credentials: dict[str, str] = {}


@dataclass(frozen=True)
class Connector:
    name: str
    spec: ConnectorSpec
    channel: str
    mapping: Mapping
    secrets: dict[str, str]  # credential field -> its value, read from the environment at start
    file: Path


def directories(settings: Settings, env: EnvMapping[str, str] | None = None) -> tuple[Path | None, Path | None]:
    """``ORDERQ_CONNECTORS_DIR`` and ``ORDERQ_IMPORT_DIR``: from the settings object when it has
    them, else read here once at start, with the same refusal of a path that is not a directory."""
    out: list[Path | None] = []
    for attr, name in (("connectors_dir", "ORDERQ_CONNECTORS_DIR"), ("import_dir", "ORDERQ_IMPORT_DIR")):
        if hasattr(settings, attr):
            value = getattr(settings, attr)
            out.append(Path(value) if value else None)
            continue
        raw = (os.environ if env is None else env).get(name, "").strip()
        if raw and not Path(raw).is_dir():
            raise ConfigError(name, f"not a directory: {raw!r}")
        out.append(Path(raw) if raw else None)
    return out[0], out[1]


def load_mapping(ref: str, channel: str, settings: Settings) -> Mapping:
    """``ref``: a mapping name of ``ORDERQ_MAPPINGS_DIR`` or a path to a mapping file; compiled for
    ``channel`` whatever the file is called."""
    path = Path(ref)
    if not path.suffix:
        path = settings.mappings_dir / f"{ref}.toml"
    if path.stem == channel:
        return load_file(path, settings.channels)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        return compile_mapping(channel, doc, path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the mapping: {exc}") from None
    except SpecError as exc:
        raise ConfigError(str(path), f"{'.'.join(exc.key)}: {exc.message}") from None


def load_connector(path: Path, settings: Settings, env: EnvMapping[str, str] | None = None) -> Connector:
    name = path.stem
    if not _NAME.match(name):
        raise ConfigError(str(path), "a connector's file name is its name: letters, digits, '.', '_', '-'")
    try:
        spec = msgspec.convert(tomllib.loads(path.read_text(encoding="utf-8")), ConnectorSpec)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the connector: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ConfigError(str(path), str(exc)) from None
    channel = spec.channel or DEFAULT_CHANNEL[spec.platform]
    if channel not in settings.channels:
        raise ConfigError(
            str(path), f"channel {channel!r} is not one of ORDERQ_CHANNELS ({', '.join(settings.channels)})"
        )
    environ = os.environ if env is None else env
    secrets: dict[str, str] = {}
    for field, variable in spec.credentials.items():
        value = environ.get(variable, "")
        if not value:
            raise ConfigError(variable, f"unset, and named by credentials.{field} of {path}")
        secrets[field] = value
    mapping = load_mapping(spec.mapping or channel, channel, settings)
    return Connector(name, spec, channel, mapping, secrets, path)


def load_all(directory: Path | None, settings: Settings, env: EnvMapping[str, str] | None = None) -> list[Connector]:
    if directory is None:
        return []
    from connect.adapters import check_spec

    out = []
    for path in sorted(directory.glob("*.toml")):
        c = load_connector(path, settings, env)
        check_spec(c)
        out.append(c)
    return out
