"""``GET /v1/admin/connectors`` (contract §7): each connector's cursor, lag, last error and counts,
read by a real ingress from what a real ``orderq connect`` process wrote; admin token only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loadtest.platforms import Faults, simulator
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
