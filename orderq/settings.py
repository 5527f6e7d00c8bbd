"""Settings: one frozen, typed object built once from ``ORDERQ_*`` at start.

Nothing else in orderq reads ``os.environ``. A bad value raises
:class:`~orderq.errors.ConfigError` naming the variable; the CLI turns it into
exit code 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from orderq import keys
from orderq.errors import ConfigError
from orderq.keys import ACTIONS

T = TypeVar("T")

DEFAULT_CHANNELS = ("tmall", "jd", "douyin", "pdd", "kuaishou", "shopify", "miniapp", "pos")
STAGE_NAMES = ("validate", "execute")
# The channel mappings shipped with orderq: ``mappings/`` beside the packages, in a source
# checkout (``make run``) and in an installed wheel alike (shipped as package data).
SHIPPED_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"
# The fulfilment routing rules shipped with orderq (``rules/routing.toml``), found the same way.
SHIPPED_RULES = Path(__file__).resolve().parent.parent / "rules"
WEBHOOK_PREFIX = "ORDERQ_WEBHOOK_"  # + action, upper case, "." -> "_": ORDERQ_WEBHOOK_WMS_PICK
WEBHOOK_VARIABLES = {WEBHOOK_PREFIX + a.upper().replace(".", "_"): a for a in keys.ACTIONS}


def _int(name: str, raw: str, lo: int | None = None, hi: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    if lo is not None and value < lo:
        raise ConfigError(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(name, f"must be <= {hi}, got {value}")
    return value


def _float(name: str, raw: str, lo: float | None = None, hi: float | None = None) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(name, f"expected a finite number, got {raw!r}")
    if lo is not None and value < lo:
        raise ConfigError(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(name, f"must be <= {hi}, got {value}")
    return value


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise ConfigError(name, f"expected on/off (1/0), got {raw!r}")


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    v = raw.strip().lower()
    if v not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {raw!r}")
    return v


def _pairs(name: str, raw: str) -> dict[str, str]:
    """Parse ``a=x,b=y`` into a dict; empty items are ignored."""
    out: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(name, f"expected channel=value pairs, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _amount(name: str, raw: str) -> Decimal:
    """A money amount in CNY: a non-negative decimal with at most 2 decimals."""
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise ConfigError(name, f"expected an amount like 5000 or 4999.50, got {raw!r}") from None
    if not value.is_finite() or value < 0 or value.as_tuple().exponent < -2:  # type: ignore[operator]
        raise ConfigError(name, f"expected a non-negative amount with at most 2 decimals, got {raw!r}")
    return value


def _redis_url(name: str, raw: str) -> str | None:
    v = raw.strip()
    if not v:
        return None
    if not v.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(name, f"expected redis://, rediss:// or unix://, got {v!r}")
    return v


def _http_url(name: str, raw: str) -> str:
    v = raw.strip()
    if not v.startswith(("http://", "https://")):
        raise ConfigError(name, f"expected an http:// or https:// URL, got {v!r}")
    return v


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


@dataclass(frozen=True, slots=True)
class Settings:
    """Every ``ORDERQ_*`` setting, typed. Defaults are the contract's (§2)."""

    redis_url: str | None = None
    redis_cluster: bool = False
    data_dir: Path = Path(".orderq")
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    ingress_processes: int = 1
    validate_processes: int = 1
    execute_processes: int = 1
    partitions: int = 4
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    channel_tokens: Mapping[str, str] = field(default_factory=dict)
    admin_token: str | None = None
    auth: bool = True
    max_body_bytes: int = 65536
    batch_max: int = 1000
    breaker_open_depth: int = 5000
    breaker_close_depth: int = 2000
    breaker_cooldown_s: float = 5.0
    breaker_mode: str = "defer"
    shed_depth: int = 50000
    shed_vip_depth: int = 100000
    channel_rate: Mapping[str, float] = field(default_factory=dict)
    priority_aging_s: float = 30.0
    stock_buffer: float = 0.95
    unknown_sku: str = "review"
    subsidy_cap: float = 0.30
    risk_review_score: int = 80
    ip_orders_per_hour: int = 5
    dup_window_s: int = 180
    rules: bool = True
    # Fulfilment (issue 9): orders paying at least this wait for a manager (0: no approvals);
    # the routing rules file (routing.toml) lives in rules_dir, reloaded on SIGHUP.
    approval_amount: Decimal = Decimal("5000")
    rules_dir: Path = SHIPPED_RULES
    durability: str = "fast"
    # Replicas whose append-only file must hold a write before its 202 (WAITAOF's numreplicas):
    # an acknowledged order then survives its master's loss and the replica's promotion.
    wait_replicas: int = 0
    log_format: str | None = None
    log_level: str = "info"
    # Not in the contract's table, but named by the core issue.
    status_ttl_s: int = 7 * 24 * 3600
    max_deliveries: int = 5
    claim_idle_ms: int = 30000
    worker_batch: int = 200
    worker_concurrency: int = 3
    ack_deadline_ms: int = 2000
    # An ingress process that cannot acknowledge within this answers the excess 503 overloaded
    # (contract §6, ingress/admission.py).
    ack_target_ms: int = 100
    read_deadline_s: float = 10.0  # a request body must arrive whole within this (408)
    outbox_maxlen: int = 1_000_000
    # `orderq audit` exits 1 while an unresolved dead letter is older than this (contract §5).
    dead_letter_grace_s: int = 3600
    # Alerts (issue 5): evaluated by the breaker process.
    alert_webhook: str | None = None
    alert_window_s: int = 3600
    alert_lag_s: float = 60.0
    # Integrations (issue 6): channel mappings, the Shopify webhook, downstream webhooks.
    mappings_dir: Path = SHIPPED_MAPPINGS
    shopify_secret: str | None = None
    webhooks: Mapping[str, str] = field(default_factory=dict)  # action -> URL (ORDERQ_WEBHOOK_<ACTION>)
    dispatch_timeout_s: float = 5.0
    dispatch_concurrency: int = 16
    dispatch_backoff_s: float = 0.5
    dispatch_failures: int = 5
    dispatch_open_s: float = 5.0
    dispatch_probe_timeout_s: float = 2.0

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
        kw: dict[str, Any] = {}

        def get(name: str, conv: Callable[[str, str], T]) -> None:
            raw = env.get(name)
            if raw is not None and raw.strip() != "":
                kw[_field_of(name)] = conv(name, raw)

        get("ORDERQ_REDIS_URL", _redis_url)
        get("ORDERQ_REDIS_CLUSTER", _bool)
        get("ORDERQ_DATA_DIR", lambda n, r: Path(r.strip()))
        get("ORDERQ_HTTP_HOST", lambda n, r: r.strip())
        get("ORDERQ_HTTP_PORT", lambda n, r: _int(n, r, 0, 65535))
        for stage in ("INGRESS", "VALIDATE", "EXECUTE"):
            get(f"ORDERQ_{stage}_PROCESSES", lambda n, r: _int(n, r, 1, 256))
        get("ORDERQ_PARTITIONS", lambda n, r: _int(n, r, 1, 1024))
        get("ORDERQ_CHANNELS", _channels)
        get("ORDERQ_CHANNEL_TOKENS", _pairs)
        get("ORDERQ_ADMIN_TOKEN", lambda n, r: r.strip())
        get("ORDERQ_AUTH", _bool)
        get("ORDERQ_MAX_BODY_BYTES", lambda n, r: _int(n, r, 1024, 64 * 1024 * 1024))
        get("ORDERQ_BATCH_MAX", lambda n, r: _int(n, r, 1, 100_000))
        get("ORDERQ_BREAKER_OPEN_DEPTH", lambda n, r: _int(n, r, 1))
        get("ORDERQ_BREAKER_CLOSE_DEPTH", lambda n, r: _int(n, r, 0))
        get("ORDERQ_BREAKER_COOLDOWN_S", lambda n, r: _float(n, r, 0))
        get("ORDERQ_BREAKER_MODE", lambda n, r: _choice(n, r, ("defer", "drop")))
        get("ORDERQ_SHED_DEPTH", lambda n, r: _int(n, r, 1))
        get("ORDERQ_SHED_VIP_DEPTH", lambda n, r: _int(n, r, 1))
        get("ORDERQ_CHANNEL_RATE", _rates)
        get("ORDERQ_PRIORITY_AGING_S", lambda n, r: _float(n, r, 0))
        get("ORDERQ_STOCK_BUFFER", lambda n, r: _float(n, r, 0, 1))
        get("ORDERQ_UNKNOWN_SKU", lambda n, r: _choice(n, r, ("review", "reject", "allow")))
        get("ORDERQ_SUBSIDY_CAP", lambda n, r: _float(n, r, 0, 1))
        get("ORDERQ_RISK_REVIEW_SCORE", lambda n, r: _int(n, r, 0))
        get("ORDERQ_IP_ORDERS_PER_HOUR", lambda n, r: _int(n, r, 0))
        get("ORDERQ_DUP_WINDOW_S", lambda n, r: _int(n, r, 0))
        get("ORDERQ_RULES", _bool)
        get("ORDERQ_APPROVAL_AMOUNT", _amount)
        get("ORDERQ_RULES_DIR", _directory)
        get("ORDERQ_DURABILITY", lambda n, r: _choice(n, r, ("fast", "fsync")))
        get("ORDERQ_WAIT_REPLICAS", lambda n, r: _int(n, r, 0, 16))
        get("ORDERQ_LOG_FORMAT", lambda n, r: _choice(n, r, ("console", "json")))
        get("ORDERQ_LOG_LEVEL", lambda n, r: _choice(n, r, ("debug", "info", "warning", "error")))
        get("ORDERQ_STATUS_TTL_S", lambda n, r: _int(n, r, 1))
        get("ORDERQ_MAX_DELIVERIES", lambda n, r: _int(n, r, 1, 1000))
        get("ORDERQ_CLAIM_IDLE_MS", lambda n, r: _int(n, r, 100))
        get("ORDERQ_WORKER_BATCH", lambda n, r: _int(n, r, 1, 10_000))
        get("ORDERQ_WORKER_CONCURRENCY", lambda n, r: _int(n, r, 1, 64))
        get("ORDERQ_ACK_DEADLINE_MS", lambda n, r: _int(n, r, 10))
        get("ORDERQ_ACK_TARGET_MS", lambda n, r: _int(n, r, 1, 60_000))
        get("ORDERQ_READ_DEADLINE_S", lambda n, r: _float(n, r, 0.1, 3600))
        get("ORDERQ_OUTBOX_MAXLEN", lambda n, r: _int(n, r, 1000))
        get("ORDERQ_DEAD_LETTER_GRACE_S", lambda n, r: _int(n, r, 0))
        get("ORDERQ_ALERT_WEBHOOK", _http_url)
        get("ORDERQ_ALERT_WINDOW_S", lambda n, r: _int(n, r, 1))
        get("ORDERQ_ALERT_LAG_S", lambda n, r: _float(n, r, 0.001))
        get("ORDERQ_MAPPINGS_DIR", _directory)
        get("ORDERQ_SHOPIFY_SECRET", lambda n, r: r.strip())
        get("ORDERQ_DISPATCH_TIMEOUT_S", lambda n, r: _float(n, r, 0.01, 300))
        get("ORDERQ_DISPATCH_CONCURRENCY", lambda n, r: _int(n, r, 1, 1000))
        get("ORDERQ_DISPATCH_BACKOFF_S", lambda n, r: _float(n, r, 0.001, 3600))
        get("ORDERQ_DISPATCH_FAILURES", lambda n, r: _int(n, r, 1, 1000))
        get("ORDERQ_DISPATCH_OPEN_S", lambda n, r: _float(n, r, 0.01, 3600))
        get("ORDERQ_DISPATCH_PROBE_TIMEOUT_S", lambda n, r: _float(n, r, 0.01, 300))
        kw["webhooks"] = _webhooks(env)

        s = cls(**kw)
        s.check()
        return s

    def check(self) -> None:
        """Cross-field checks."""
        if self.breaker_close_depth > self.breaker_open_depth:
            raise ConfigError(
                "ORDERQ_BREAKER_CLOSE_DEPTH",
                f"must be <= ORDERQ_BREAKER_OPEN_DEPTH ({self.breaker_open_depth})",
            )
        if self.shed_vip_depth < self.shed_depth:
            raise ConfigError("ORDERQ_SHED_VIP_DEPTH", f"must be >= ORDERQ_SHED_DEPTH ({self.shed_depth})")
        for name in list(self.channel_tokens) + list(self.channel_rate):
            if name not in self.channels:
                raise ConfigError(
                    "ORDERQ_CHANNEL_TOKENS" if name in self.channel_tokens else "ORDERQ_CHANNEL_RATE",
                    f"unknown channel {name!r} (known: {', '.join(self.channels)})",
                )


_FIELD_OVERRIDES = {"ORDERQ_REDIS_CLUSTER": "redis_cluster", "ORDERQ_AUTH": "auth", "ORDERQ_RULES": "rules"}


def _field_of(env_name: str) -> str:
    return _FIELD_OVERRIDES.get(env_name) or env_name.removeprefix("ORDERQ_").lower()


def _channels(name: str, raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(c.strip().lower() for c in raw.split(",") if c.strip()))
    for c in names:
        if not c.isascii() or not c.replace("_", "").isalnum():
            raise ConfigError(name, f"channel names are letters, digits and _, got {c!r}")
    # Configuration may add channels; the contract's eight always exist.
    return tuple(dict.fromkeys(DEFAULT_CHANNELS + names))


def _directory(name: str, raw: str) -> Path:
    path = Path(raw.strip())
    if not path.is_dir():
        raise ConfigError(name, f"not a directory: {raw.strip()!r}")
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
        url = _http_url(name, raw)
        parsed = urlsplit(url)
        try:
            port_ok = parsed.port is None or parsed.port > 0
        except ValueError:
            port_ok = False
        if not parsed.hostname or not port_ok or any(c.isspace() for c in url):
            raise ConfigError(name, f"expected an http:// or https:// URL with a host, got {url!r}")
        out[action] = url
    return out


def _rates(name: str, raw: str) -> dict[str, float]:
    return {k: _float(name, v, 0.001) for k, v in _pairs(name, raw).items()}
