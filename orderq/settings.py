"""Settings: one frozen, typed object built once from ``ORDERQ_*`` at start.

Each setting is declared once, as a field of :class:`Settings`: its variable is ``ORDERQ_``
and the field's name in upper case; the annotation gives its type and bounds
(``Annotated[int, Meta(ge=1, ...)]``) and, as the Meta's description, its meaning; the field
gives its default. ``msgspec.convert(..., strict=False)`` reads numbers and text by their
type; a value with a syntax of its own (``channel=token,…`` maps, URLs, directories, amounts)
names its reader with :class:`Syntax`. README.md's environment table is checked against
:data:`DECLARED` by tests/test_settings.py.

Nothing else in orderq reads ``os.environ``. A bad value raises
:class:`~orderq.errors.ConfigError` naming the variable; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from orderq import keys
from orderq.errors import ConfigError
from orderq.keys import ACTIONS

PREFIX = "ORDERQ_"
DEFAULT_CHANNELS = ("tmall", "jd", "douyin", "pdd", "kuaishou", "shopify", "miniapp", "pos")
# The systems that report order events (contract §5), most trusted first by default.
EVENT_SOURCES = ("carrier", "wms", "erp", "channel")
STAGE_NAMES = ("validate", "execute")
# Data shipped with orderq beside the packages, in a source checkout (``make run``) and in an
# installed wheel alike (package data): the channel mappings and the fulfilment routing rules.
PACKAGES_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MAPPINGS = PACKAGES_ROOT / "mappings"
SHIPPED_ROUTING = PACKAGES_ROOT / "routing"
WEBHOOK_PREFIX = "ORDERQ_WEBHOOK_"  # + action, upper case, "." -> "_": ORDERQ_WEBHOOK_WMS_PICK
WEBHOOK_VARIABLES = {WEBHOOK_PREFIX + a.upper().replace(".", "_"): a for a in keys.OUTBOX_ACTIONS}
# A deployment still setting a former name would silently run on the default: refused instead.
RENAMED = {"ORDERQ_RULES_DIR": "ORDERQ_ROUTING_DIR"}

Reader = Callable[[str, str], Any]  # (variable, its stripped text) -> value, or ConfigError


@dataclass(frozen=True, slots=True)
class Syntax:
    """Marks a setting whose text has a syntax of its own, read by ``read``."""

    read: Reader


@dataclass(frozen=True, slots=True)
class Family:
    """Marks a setting read from a family of variables (``variable`` documents it), all at once."""

    variable: str
    read: Callable[[Mapping[str, str]], Any]


def _switch(name: str, text: str) -> bool:
    v = text.lower()
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise ConfigError(name, f"expected on/off (1/0), got {text!r}")


def _names(name: str, text: str, what: str) -> tuple[str, ...]:
    """``a,b,c`` -> names in order, lower case, each once; letters, digits and ``_`` only."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    for n in names:
        if not n.isascii() or not n.replace("_", "").isalnum():
            raise ConfigError(name, f"{what} names are letters, digits and _, got {n!r}")
    return names


def _channels(name: str, text: str) -> tuple[str, ...]:
    # Configuration may add channels; the contract's eight always exist.
    return tuple(dict.fromkeys(DEFAULT_CHANNELS + _names(name, text, "channel")))


def _trust(name: str, text: str) -> tuple[str, ...]:
    order = _names(name, text, "source")
    if sorted(order) != sorted(EVENT_SOURCES):
        raise ConfigError(name, f"expected each of {', '.join(EVENT_SOURCES)} once, most trusted first, got {text!r}")
    return order


def _pairs(name: str, text: str) -> dict[str, str]:
    """``a=x,b=y`` -> {a: x, b: y}; empty items are ignored."""
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(name, f"expected channel=value pairs, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _rates(name: str, text: str) -> dict[str, float]:
    rate = _typed(Annotated[float, Meta(ge=0.001)], float)
    return {k: rate(name, v) for k, v in _pairs(name, text).items()}


def _amount(name: str, text: str) -> Decimal:
    """A money amount in CNY: a non-negative decimal with at most 2 decimals."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ConfigError(name, f"expected an amount like 5000 or 4999.50, got {text!r}") from None
    if not value.is_finite() or value < 0 or value.as_tuple().exponent < -2:  # type: ignore[operator]
        raise ConfigError(name, f"expected a non-negative amount with at most 2 decimals, got {text!r}")
    return value


def _redis_url(name: str, text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(name, f"expected redis://, rediss:// or unix://, got {text!r}")
    return text


def _http_url(name: str, text: str) -> str:
    parsed = urlsplit(text)
    try:
        port_ok = parsed.port is None or parsed.port > 0
    except ValueError:
        port_ok = False
    if not text.startswith(("http://", "https://")):
        raise ConfigError(name, f"expected an http:// or https:// URL, got {text!r}")
    if not parsed.hostname or not port_ok or any(c.isspace() for c in text):
        raise ConfigError(name, f"expected an http:// or https:// URL with a host, got {text!r}")
    return text


def _directory(name: str, text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise ConfigError(name, f"not a directory: {text!r}")
    return path


def _webhooks(env: Mapping[str, str]) -> dict[str, str]:
    """``ORDERQ_WEBHOOK_<ACTION>=https://…`` -> {action: URL}; an unknown action is a typo, refused."""
    out: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(WEBHOOK_PREFIX) or not raw.strip():
            continue
        action = WEBHOOK_VARIABLES.get(name)
        if action is None:
            raise ConfigError(name, f"unknown action (known: {', '.join(sorted(WEBHOOK_VARIABLES))})")
        out[action] = _http_url(name, raw.strip())
    return out


Directory = Annotated[Path, Syntax(_directory)]  # an existing directory
RedisUrl = Annotated[str, Syntax(_redis_url)]
HttpUrl = Annotated[str, Syntax(_http_url)]
Amount = Annotated[Decimal, Syntax(_amount)]
Channels = Annotated[tuple[str, ...], Syntax(_channels)]
Pairs = Annotated[Mapping[str, str], Syntax(_pairs)]  # name=value,name=value
Rates = Annotated[Mapping[str, float], Syntax(_rates)]  # channel=per_second,…
TrustOrder = Annotated[tuple[str, ...], Syntax(_trust)]
Seconds = Annotated[float, Meta(ge=0)]


def doc(meaning: str, **bounds: Any) -> Meta:
    """A setting's meaning and bounds (msgspec constraints: ``ge``, ``le``, ``gt``, …)."""
    return Meta(description=meaning, **bounds)


Malloc = Literal["jemalloc", "libc"]  # ORDERQ_MALLOC (orderq/server.py jemalloc_env)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every ``ORDERQ_*`` setting, typed. Defaults are the contract's (§2)."""

    # Redis, processes, HTTP
    redis_url: Annotated[
        RedisUrl | None,
        doc("redis://, rediss:// or unix:// URL of Redis >= 7 / Valkey >= 7.2; unset: the embedded server"),
    ] = None
    redis_cluster: Annotated[bool, doc("the URL names a Redis Cluster node")] = False
    data_dir: Annotated[Path, doc("embedded server data, redis.url, tokens.env")] = Path(".orderq")
    http_host: Annotated[str, doc("ingress bind address")] = "127.0.0.1"
    http_port: Annotated[int, doc("ingress bind port", ge=0, le=65535)] = 8080
    ingress_processes: Annotated[int, doc("ingress processes under orderq up", ge=1, le=256)] = 1
    validate_processes: Annotated[int, doc("validate processes under orderq up", ge=1, le=256)] = 1
    execute_processes: Annotated[int, doc("execute processes under orderq up", ge=1, le=256)] = 1
    partitions: Annotated[int, doc("stream partitions (order key hash -> partition)", ge=1, le=1024)] = 4
    malloc: Annotated[
        Malloc,
        doc("allocator of the embedded server and the stage processes: jemalloc when the system has it"),
    ] = "jemalloc"
    # Channels and access
    channels: Annotated[Channels, doc("channel names: the contract's eight and any added")] = DEFAULT_CHANNELS
    channel_tokens: Annotated[
        Pairs, doc("channel=token,…: each channel's bearer token; unset: generated into tokens.env")
    ] = field(default_factory=dict)
    admin_token: Annotated[str | None, doc("bearer token of the admin, review and stats API; unset: generated")] = None
    auth: Annotated[bool, doc("bearer tokens required; off only for local experiments")] = True
    source_tokens: Annotated[Pairs, doc("source=token,…: tokens of the systems that report order events")] = field(
        default_factory=dict
    )
    source_trust: Annotated[TrustOrder, doc("event sources, most trusted first")] = EVENT_SOURCES
    # Requests
    max_body_bytes: Annotated[
        int, doc("single-order body limit (batch bodies: x100); larger: 413", ge=1024, le=64 * 1024 * 1024)
    ] = 65536
    batch_max: Annotated[int, doc("orders per batch request", ge=1, le=100_000)] = 1000
    ack_deadline_ms: Annotated[int, doc("503 when Redis has not confirmed a write by then", ge=10)] = 2000
    ack_target_ms: Annotated[
        int, doc("an ingress process that cannot acknowledge within this answers the excess 503", ge=1, le=60_000)
    ] = 100
    worker_nice: Annotated[
        int,
        doc("niceness of the validate, execute, dispatch and connect processes (the ingress first)", ge=0, le=19),
    ] = 10
    read_deadline_s: Annotated[float, doc("a request body must arrive whole within this (408)", ge=0.1, le=3600)] = 10.0
    durability: Annotated[
        Literal["fast", "fsync"], doc("202 once Redis has the write (fast) or once it is on disk (fsync)")
    ] = "fast"
    wait_replicas: Annotated[
        int, doc("replicas whose append-only file must hold a write before its 202 (WAITAOF)", ge=0, le=16)
    ] = 0
    # Backpressure
    breaker_open_depth: Annotated[int, doc("backlog from which non-core syncs stop (degraded)", ge=1)] = 5000
    breaker_close_depth: Annotated[int, doc("backlog under which the breaker closes again", ge=0)] = 2000
    breaker_cooldown_s: Annotated[Seconds, doc("time under the close depth before closing")] = 5.0
    breaker_mode: Annotated[
        Literal["defer", "drop"], doc("skipped syncs replayed once normal (defer) or discarded (drop)")
    ] = "defer"
    shed_depth: Annotated[int, doc("backlog from which ingress refuses regular and new orders", ge=1)] = 50000
    shed_vip_depth: Annotated[int, doc("backlog from which ingress refuses VIP orders too", ge=1)] = 100000
    channel_rate: Annotated[Rates, doc("channel=orders_per_s,…: token buckets shared by all ingress (429)")] = field(
        default_factory=dict
    )
    priority_aging_s: Annotated[Seconds, doc("an order waiting longer than this is served by age")] = 30.0
    # Validation
    rules: Annotated[bool, doc("the validation rules run; off: pass-through validation (priority only)")] = True
    stock_buffer: Annotated[float, doc("sellable = floor(physical x buffer) - reserved", ge=0, le=1)] = 0.95
    unknown_sku: Annotated[Literal["review", "reject", "allow"], doc("what a SKU with no stock record gets")] = "review"
    subsidy_cap: Annotated[
        float, doc("a customer's coupon total in a day may not pass this share of goods value", ge=0, le=1)
    ] = 0.30
    risk_review_score: Annotated[int, doc("risk score from which an order goes to review", ge=0)] = 80
    ip_orders_per_hour: Annotated[int, doc("orders from one IP in a sliding hour above which risk fires", ge=0)] = 5
    dup_window_s: Annotated[int, doc("window of the duplicate-suspect rule", ge=0)] = 180
    approval_amount: Annotated[Amount, doc("orders paying at least this (CNY) wait for approval; 0: off")] = Decimal(
        "5000"
    )
    # Fulfilment
    routing_dir: Annotated[Directory, doc("directory of routing.toml (re-read on SIGHUP)")] = SHIPPED_ROUTING
    # Workers and records
    status_ttl_s: Annotated[int, doc("status record lifetime after a final state", ge=1)] = 7 * 24 * 3600
    max_deliveries: Annotated[int, doc("deliveries before an entry is dead-lettered", ge=1, le=1000)] = 5
    claim_idle_ms: Annotated[int, doc("a pending entry idle this long is reclaimed by a live worker", ge=100)] = 30000
    worker_batch: Annotated[int, doc("entries a worker takes per batch", ge=1, le=10_000)] = 200
    worker_concurrency: Annotated[int, doc("batches a worker keeps in flight while behind", ge=1, le=64)] = 3
    outbox_maxlen: Annotated[int, doc("entries kept per outbox stream (no webhook)", ge=1000)] = 1_000_000
    dead_letter_grace_s: Annotated[
        int, doc("orderq audit exits 1 while an unresolved dead letter is older than this", ge=0)
    ] = 3600
    # Logs and alerts (the alerts are evaluated by the breaker stage)
    log_format: Annotated[
        Literal["console", "json"] | None, doc("structlog renderer; unset: console on a TTY, else json")
    ] = None
    log_level: Annotated[Literal["debug", "info", "warning", "error"], doc("log level")] = "info"
    alert_webhook: Annotated[HttpUrl | None, doc("URL that receives a POST for every alert fired or cleared")] = None
    alert_window_s: Annotated[int, doc("window of the order-surge alert", ge=1)] = 3600
    alert_lag_s: Annotated[float, doc("execution-lag alert: age of the oldest ready order", ge=0.001)] = 60.0
    alert_ship_lag_s: Annotated[float, doc("ship-lag alert: executed, not shipped", ge=0.001)] = 7200.0
    alert_connector_lag_s: Annotated[float, doc("connector-lag alert: cursor behind now", ge=0.001)] = 1800.0
    # Integrations
    mappings_dir: Annotated[Directory, doc("directory of the channel mapping files")] = SHIPPED_MAPPINGS
    shopify_secret: Annotated[str | None, doc("Shopify webhook signing secret; unset: the webhook answers 401")] = None
    connectors_dir: Annotated[Directory | None, doc("directory of the pull connectors, one TOML file each")] = None
    import_dir: Annotated[Directory | None, doc("folder whose dropped files are imported as orders")] = None
    webhooks: Annotated[
        Mapping[str, str],
        Family("ORDERQ_WEBHOOK_<ACTION>", _webhooks),
        doc("downstream endpoint per action (action -> URL); any set starts the dispatch stage"),
    ] = field(default_factory=dict)
    dispatch_timeout_s: Annotated[float, doc("webhook request timeout", ge=0.01, le=300)] = 5.0
    dispatch_concurrency: Annotated[int, doc("concurrent webhook requests per target", ge=1, le=1000)] = 16
    dispatch_backoff_s: Annotated[float, doc("first retry delay; doubles, capped", ge=0.001, le=3600)] = 0.5
    dispatch_failures: Annotated[int, doc("consecutive failures that open a target's circuit", ge=1, le=1000)] = 5
    dispatch_open_s: Annotated[float, doc("first open period of a circuit; doubles", ge=0.01, le=3600)] = 5.0
    dispatch_probe_timeout_s: Annotated[float, doc("timeout of the half-open probe", ge=0.01, le=300)] = 2.0

    @property
    def outbox_trim(self) -> str:
        """Per action, how many outbox entries to keep (``name=maxlen,...``): an action with a
        webhook is never trimmed (the dispatcher deletes what it delivered, and trimming would
        drop undelivered actions); the others keep the last ``ORDERQ_OUTBOX_MAXLEN``."""
        return ",".join(f"{a}={0 if a in self.webhooks else self.outbox_maxlen}" for a in ACTIONS)

    @property
    def batch_body_bytes(self) -> int:
        return self.max_body_bytes * 100

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv: bool = True) -> Settings:
        """Build settings from ``env`` (default ``os.environ``) plus ``./.env``."""
        base: dict[str, str] = {}
        if dotenv:
            base.update(read_dotenv(Path(".env")))
        base.update(os.environ if env is None else env)
        return cls.from_mapping(base)

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Settings:
        """Read every declared setting from ``env``; a blank value means unset."""
        for old, new in RENAMED.items():
            if env.get(old, "").strip():
                raise ConfigError(old, f"renamed {new}")
        values: dict[str, Any] = {}
        for setting in DECLARED:
            if setting.family is not None:
                values[setting.attribute] = setting.family.read(env)
                continue
            text = env.get(setting.variable, "").strip()
            if text and setting.read is not None:
                values[setting.attribute] = setting.read(setting.variable, text)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field checks."""
        if self.breaker_close_depth > self.breaker_open_depth:
            raise ConfigError(
                "ORDERQ_BREAKER_CLOSE_DEPTH",
                f"must be <= ORDERQ_BREAKER_OPEN_DEPTH ({self.breaker_open_depth})",
            )
        if self.shed_vip_depth < self.shed_depth:
            raise ConfigError("ORDERQ_SHED_VIP_DEPTH", f"must be >= ORDERQ_SHED_DEPTH ({self.shed_depth})")
        for variable, names in (
            ("ORDERQ_CHANNEL_TOKENS", self.channel_tokens),
            ("ORDERQ_CHANNEL_RATE", self.channel_rate),
        ):
            for name in names:
                if name not in self.channels:
                    raise ConfigError(variable, f"unknown channel {name!r} (known: {', '.join(self.channels)})")
        for name in self.source_tokens:
            if name not in EVENT_SOURCES:
                raise ConfigError(
                    "ORDERQ_SOURCE_TOKENS", f"unknown source {name!r} (known: {', '.join(EVENT_SOURCES)})"
                )


def read_dotenv(path: Path) -> dict[str, str]:
    """Read a ``.env`` file: ``KEY=value`` lines, ``#`` comments, optional quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(str(path), f"line {lineno}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


# --- the declaration, read back -----------------------------------------------------------

_BOUND = re.compile(r"^Expected `\w+` (.+)$")  # msgspec's message for a value out of its bounds
_NOUN = {int: "an integer", float: "a number", str: "text"}


def _typed(hint: Any, base: type) -> Reader:
    """A reader converting the text by its type with msgspec, bounds included."""

    def read(name: str, text: str) -> Any:
        if base is float and not math.isfinite(_float_or_zero(text)):
            raise ConfigError(name, f"expected a finite number, got {text!r}")
        try:
            return msgspec.convert(text, hint, strict=False)
        except msgspec.ValidationError as exc:
            bound = _BOUND.match(str(exc))
            why = f"must be {bound[1]}" if bound else f"expected {_NOUN.get(base, base.__name__)}"
            raise ConfigError(name, f"{why}, got {text!r}") from None

    return read


def _float_or_zero(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def _choice(options: tuple[str, ...]) -> Reader:
    def read(name: str, text: str) -> str:
        value = text.lower()
        if value not in options:
            raise ConfigError(name, f"expected one of {', '.join(options)}, got {text!r}")
        return value

    return read


def _path(name: str, text: str) -> Path:
    return Path(text)


@dataclass(frozen=True, slots=True)
class Declared:
    """One setting as :class:`Settings` declares it."""

    attribute: str
    variable: str
    default: Any
    meaning: str
    read: Reader | None  # None: read as a family
    family: Family | None = None

    @property
    def shown_default(self) -> str:
        """The default as the README's environment table writes it."""
        d = self.default
        if d is None or (isinstance(d, Mapping) and not d):
            return "unset"
        if isinstance(d, bool):
            return "on" if d else "off"
        if isinstance(d, float):
            return f"{d:g}"
        if isinstance(d, tuple):
            return ",".join(d)
        if isinstance(d, Path) and d.parent == PACKAGES_ROOT:
            return f"{d.name}/ beside the packages"
        return str(d)


def _declare(settings: type) -> tuple[Declared, ...]:
    hints = get_type_hints(settings, include_extras=True)
    out = []
    for f in dataclasses.fields(settings):
        hint = hints[f.name]
        marks: list[object] = []
        while True:  # peel Annotated[...] and "| None" down to the value's own type
            if get_origin(hint) is Annotated:
                hint, *more = get_args(hint)
                marks.extend(more)
            elif get_origin(hint) in (Union, types.UnionType):
                (hint,) = (a for a in get_args(hint) if a is not type(None))
            else:
                break
        metas = [m for m in marks if isinstance(m, Meta)]
        syntax = next((m.read for m in marks if isinstance(m, Syntax)), None)
        family = next((m for m in marks if isinstance(m, Family)), None)
        default = f.default_factory() if callable(f.default_factory) else f.default
        meaning = " ".join(m.description for m in metas if m.description)
        if family is not None:
            out.append(Declared(f.name, family.variable, default, meaning, None, family))
            continue
        read: Reader
        if syntax is not None:
            read = syntax
        elif hint is bool:
            read = _switch
        elif hint is Path:
            read = _path
        elif get_origin(hint) is Literal:
            read = _choice(get_args(hint))
        elif hint in _NOUN:
            read = _typed(Annotated[(hint, *metas)] if metas else hint, hint)
        else:
            raise TypeError(f"Settings.{f.name}: no reader for {hint!r}")
        out.append(Declared(f.name, PREFIX + f.name.upper(), default, meaning, read))
    return tuple(out)


DECLARED = _declare(Settings)
