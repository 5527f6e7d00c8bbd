"""``GET /v1/admin/connectors`` (contract §7): each connector's cursor, lag, last error and counts,
read by a real ingress from what a real ``orderq connect`` process wrote; admin token only. Only
configured connectors are listed (there, on the dashboard and in ``/metrics``): a connector file
removed or renamed leaves the list at the next start, and one added back resumes from its cursor."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from loadtest.platforms import Faults, simulator
from orderq import keys
from tests.conftest import ADMIN, StageProcess, auth
from tests.test_connect_platforms import SECRET_ENV, connector_file, wait_all


async def test_admin_connectors(
    ingress: Callable[..., Any], stages: Callable[..., StageProcess], flushed: Any, tmp_path: Path
) -> None:
    base = await ingress()
    with simulator("jd", Faults(throttle_every=5)) as sim:
        now = int(time.time())
        sim.platform.populate(120, now - 900, now - 30)
        name = connector_file(tmp_path / "connectors", "jd", sim, now - 1000)
        # a second connector whose credentials the platform refuses: its error is shown, nothing moves
        bad = connector_file(tmp_path / "connectors", "jd", sim, now - 1000)
        (tmp_path / "connectors" / f"{name}.toml").rename(tmp_path / "connectors" / "jd-good.toml")
        text = (tmp_path / "connectors" / "jd-good.toml").read_text().replace("SIM_APP_SECRET", "SIM_WRONG")
        (tmp_path / "connectors" / f"{bad}.toml").write_text(text)
        proc = stages(
            "connect", ORDERQ_CONNECTORS_DIR=tmp_path / "connectors", SIM_WRONG="not-the-secret", **SECRET_ENV
        )
        wait_all(flushed.url, sim, "jd", "jd-good", [proc], 60)
        async with httpx.AsyncClient(base_url=base) as c:
            assert (await c.get("/v1/admin/connectors")).status_code == 401
            assert (await c.get("/v1/admin/connectors", headers=auth("jd"))).status_code in (401, 403)
            deadline = time.monotonic() + 30
            while True:
                doc = (await c.get("/v1/admin/connectors", headers=ADMIN)).json()
                views = {v["name"]: v for v in doc["connectors"]}
                good, failing = views.get("jd-good"), views.get(bad)
                if good and good["counts"]["accepted"] == 120 and failing and failing["last_error"]:
                    break
                assert time.monotonic() < deadline, doc
                time.sleep(0.2)
    assert good["platform"] == "jd" and good["channel"] == "jd" and good["shop"] == "flagship"
    assert good["cursor"] is not None and good["cursor"].endswith("Z") and 0 <= good["lag_s"] < 60
    assert good["owner"] and good["owner"].endswith(str(proc.proc.pid if proc.proc else ""))
    assert good["counts"]["windows"] >= 1 and good["counts"]["retries"] >= 1 and not good["failing"]
    assert failing["cursor"] is None and failing["failing"] and "签名" in failing["last_error"]


async def listed_everywhere(
    base: str, expected: set[str], ready: Callable[[dict[str, Any]], bool] = lambda views: True, timeout: float = 30
) -> dict[str, Any]:
    """Wait until the admin list, the dashboard's data and ``/metrics`` all show exactly
    ``expected`` and the admin list's views (by name) are ``ready``; those views."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        while True:
            admin = (await c.get("/v1/admin/connectors", headers=ADMIN)).json()["connectors"]
            board = (await c.get("/dashboard/data", headers=ADMIN)).json()["connectors"]
            text = (await c.get("/metrics")).text
            metrics = set(re.findall(r'^orderq_connector_\w+\{connector="([^"]+)"', text, re.M))
            seen = ({v["name"] for v in admin}, {v["name"] for v in board}, metrics)
            views = {v["name"]: v for v in admin}
            if all(names == expected for names in seen) and ready(views):
                return views
            assert time.monotonic() < deadline, f"listed {seen}, configured {expected}: {views}"
            await asyncio.sleep(0.2)


def read(views: dict[str, Any], name: str) -> int:
    """Orders a connector read: queued by it, or found queued already."""
    counts = views[name]["counts"]
    return int(counts["accepted"] + counts["duplicate"])


def state(url: str, name: str) -> tuple[int, int]:
    """A connector's cursor and number of windows read, as Redis holds them."""
    with redis.Redis.from_url(url) as c:
        return int(c.get(keys.connector_key(name, "cursor")) or 0), int(
            c.hget(keys.connector_key(name, "state"), "n:windows") or 0
        )


async def test_removed_connector_leaves_the_list_and_resumes_when_added_back(
    ingress: Callable[..., Any], stages: Callable[..., StageProcess], flushed: Any, tmp_path: Path
) -> None:
    base = await ingress()
    folder = tmp_path / "connectors"
    env = {"ORDERQ_CONNECTORS_DIR": folder, **SECRET_ENV}
    with simulator("jd", Faults()) as sim:
        now = int(time.time())
        sim.platform.populate(50, now - 900, now - 30)
        for name in ("jd-a", "jd-b"):
            default = connector_file(folder, "jd", sim, now - 1000)
            (folder / f"{default}.toml").rename(folder / f"{name}.toml")
        proc = stages("connect", **env)
        await listed_everywhere(base, {"jd-a", "jd-b"}, lambda v: read(v, "jd-a") == read(v, "jd-b") == 50)
        assert proc.stop() == 0
        cursor_b, windows_b = state(flushed.url, "jd-b")
        assert cursor_b > 0 and windows_b > 0

        (folder / "jd-b.toml").unlink()  # removed
        (folder / "jd-a.toml").rename(folder / "jd-c.toml")  # renamed: a new connector
        proc = stages("connect", **env)
        await listed_everywhere(base, {"jd-c"})
        assert proc.stop() == 0
        assert state(flushed.url, "jd-b") == (cursor_b, windows_b)  # kept: added back, it resumes there

        default = connector_file(folder, "jd", sim, now - 1000)
        (folder / f"{default}.toml").rename(folder / "jd-b.toml")
        stages("connect", **env)
        views = await listed_everywhere(base, {"jd-b", "jd-c"}, lambda v: v["jd-b"]["counts"]["windows"] > windows_b)
        assert state(flushed.url, "jd-b")[0] >= cursor_b
        assert read(views, "jd-b") == 50, views  # read again from its cursor, not from its start
