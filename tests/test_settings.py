"""Configuration: a bad value stops a process at start with exit code 2 and one line
naming the variable; a server orderq cannot keep its promise on is refused the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orderq.errors import ConfigError
from orderq.server import EmbeddedServer, free_port
from orderq.settings import DECLARED, Settings

ROOT = Path(__file__).resolve().parent.parent


def run_orderq(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``python -m orderq ...`` with only the given ORDERQ_* variables set."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("ORDERQ_")}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "orderq", *args], env=full, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def assert_config_exit(proc: subprocess.CompletedProcess[str], variable: str, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert variable in lines[0]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "word"),
    [
        ("ORDERQ_PARTITIONS", "zero", "integer"),
        ("ORDERQ_BREAKER_MODE", "maybe", "defer"),
        ("ORDERQ_REDIS_URL", "http://x", "redis://"),
    ],
)
def test_bad_value_exits_2_naming_the_variable(tmp_path: Path, variable: str, value: str, word: str) -> None:
    # validate is a worker: without the check it would go on to connect and run forever
    env = {"ORDERQ_REDIS_URL": "redis://127.0.0.1:1"}
    env[variable] = value
    proc = run_orderq(["validate"], env, tmp_path)
    assert_config_exit(proc, variable, word)


@pytest.mark.parametrize(
    ("variable", "value", "word"),
    [
        ("ORDERQ_PARTITIONS", "0", ">= 1"),
        ("ORDERQ_HTTP_PORT", "80800", "<= 65535"),
        ("ORDERQ_AUTH", "perhaps", "on/off"),
        ("ORDERQ_STOCK_BUFFER", "1.5", "<= 1"),
        ("ORDERQ_BREAKER_COOLDOWN_S", "nan", "finite"),
        ("ORDERQ_DURABILITY", "always", "fsync"),
        ("ORDERQ_CHANNEL_TOKENS", "tmall", "pairs"),
        ("ORDERQ_CHANNEL_TOKENS", "ebay=abc", "ebay"),
        ("ORDERQ_CHANNELS", "we chat", "letters"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str, word: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({variable: value})
    assert err.value.variable == variable
    assert word in str(err.value) and str(err.value).startswith(variable)


def test_bad_value_in_dotenv_file_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# local overrides\nORDERQ_BREAKER_MODE=sometimes\n", encoding="utf-8")
    proc = run_orderq(["audit"], {}, tmp_path)
    assert_config_exit(proc, "ORDERQ_BREAKER_MODE", "sometimes")


def test_readme_environment_table_is_the_declaration() -> None:
    """README.md's table under "## Environment" lists every declared setting once, with its
    default as declared; every declaration says what it means."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Environment\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split(" | ")] if row.startswith("| `ORDERQ_") else []
        if not cells:
            continue
        sep = " · " if " · " in cells[0] else " / "
        names, defaults = cells[0].split(sep), cells[1].split(sep)
        assert len(names) == len(defaults), row
        for name, default in zip(names, defaults, strict=True):
            assert name.strip("`") not in documented, f"{name} twice"
            documented[name.strip("`")] = default.replace("`", "")
    declared = {s.variable: s.shown_default for s in DECLARED}
    assert documented == declared
    assert all(s.meaning for s in DECLARED), [s.variable for s in DECLARED if not s.meaning]


def test_former_names_are_refused_naming_the_new_one() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"ORDERQ_RULES_DIR": "/tmp"})
    assert err.value.variable == "ORDERQ_RULES_DIR" and "ORDERQ_ROUTING_DIR" in str(err.value)


@pytest.mark.parametrize(
    ("variable", "value", "word"),
    [
        ("ORDERQ_SOURCE_TOKENS", "ups=t1", "ups"),
        ("ORDERQ_SOURCE_TRUST", "wms,carrier", "each of"),
        ("ORDERQ_CONNECTORS_DIR", "/no/such/dir", "not a directory"),
        ("ORDERQ_IMPORT_DIR", "/no/such/dir", "not a directory"),
        ("ORDERQ_ALERT_SHIP_LAG_S", "0", ">= 0.001"),
        ("ORDERQ_LOG_LEVEL", "loud", "debug"),
    ],
)
def test_settings_of_events_and_imports_are_checked(variable: str, value: str, word: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({variable: value})
    assert err.value.variable == variable and word in str(err.value)


def test_settings_of_events_and_imports_are_read(tmp_path: Path) -> None:
    s = Settings.from_mapping({})
    assert (s.source_tokens, s.source_trust, s.connectors_dir, s.import_dir) == (
        {},
        ("carrier", "wms", "erp", "channel"),
        None,
        None,
    )
    assert s.alert_ship_lag_s == 7200
    s = Settings.from_mapping(
        {
            "ORDERQ_SOURCE_TOKENS": "wms=w1,carrier=c1",
            "ORDERQ_SOURCE_TRUST": "WMS, carrier, erp, channel",
            "ORDERQ_CONNECTORS_DIR": str(tmp_path),
            "ORDERQ_IMPORT_DIR": str(tmp_path),
        }
    )
    assert dict(s.source_tokens) == {"wms": "w1", "carrier": "c1"}
    assert s.source_trust == ("wms", "carrier", "erp", "channel")
    assert s.connectors_dir == s.import_dir == tmp_path


def test_no_server_found_is_a_configuration_error(tmp_path: Path) -> None:
    proc = run_orderq(["audit"], {"ORDERQ_DATA_DIR": str(tmp_path / "nothing")}, tmp_path)
    assert_config_exit(proc, "ORDERQ_REDIS_URL", "orderq up")


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"ORDERQ_BREAKER_OPEN_DEPTH": "100", "ORDERQ_BREAKER_CLOSE_DEPTH": "200"})
    assert err.value.variable == "ORDERQ_BREAKER_CLOSE_DEPTH"
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"ORDERQ_SHED_DEPTH": "100", "ORDERQ_SHED_VIP_DEPTH": "50"})
    assert err.value.variable == "ORDERQ_SHED_VIP_DEPTH"
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"ORDERQ_CHANNEL_RATE": "tmall=fast"})
    assert err.value.variable == "ORDERQ_CHANNEL_RATE"


def test_defaults_are_the_contracts() -> None:
    s = Settings.from_mapping({})
    assert (s.http_host, s.http_port, s.partitions, s.max_body_bytes, s.batch_max) == (
        "127.0.0.1",
        8080,
        4,
        65536,
        1000,
    )
    assert (s.breaker_open_depth, s.breaker_close_depth, s.breaker_cooldown_s, s.breaker_mode) == (
        5000,
        2000,
        5.0,
        "defer",
    )
    assert (s.shed_depth, s.shed_vip_depth, s.priority_aging_s, s.durability) == (50000, 100000, 30.0, "fast")
    assert s.auth is True and s.redis_url is None
    # blank values mean "unset", and configuration may add channels to the contract's eight
    s = Settings.from_mapping({"ORDERQ_PARTITIONS": " ", "ORDERQ_CHANNELS": "wechat_shop"})
    assert s.partitions == 4 and "wechat_shop" in s.channels and "tmall" in s.channels


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        ({"maxmemory-policy": "allkeys-lru"}, "allkeys-lru"),
        ({"appendonly": "no"}, "persistence"),
    ],
)
def test_server_orderq_cannot_trust_is_refused(tmp_path: Path, extra: dict[str, str], word: str) -> None:
    server = EmbeddedServer(tmp_path / "srv", port=free_port(), extra=extra).start()
    try:
        env = {"ORDERQ_REDIS_URL": server.url, "ORDERQ_CHANNEL_TOKENS": "tmall=t1", "ORDERQ_ADMIN_TOKEN": "a1"}
        stages = ("validate", "ingress") if "maxmemory-policy" in extra else ("validate",)
        for stage in stages:
            proc = run_orderq([stage], {**env, "ORDERQ_HTTP_PORT": str(free_port())}, tmp_path)
            assert_config_exit(proc, "ORDERQ_REDIS_URL", word)
    finally:
        server.stop()
