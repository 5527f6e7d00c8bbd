"""``orderq connect``: the stage that pulls orders (contract §7). It runs one poller per
connector file of ``ORDERQ_CONNECTORS_DIR`` and watches ``ORDERQ_IMPORT_DIR``; any number of
these processes may run on any hosts: each connector and the folder are worked by one at a
time (a lease in Redis), and another takes over within a lease when it dies.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from connect.config import directories, load_all
from connect.folder import Folder
from connect.poller import Poller
from connect.state import configured as list_configured
from orderq.client import Redis
from orderq.committer import Committer
from orderq.control import Control
from orderq.errors import ConfigError
from orderq.intake import Intake
from orderq.runner import Stage
from orderq.settings import Settings

log = structlog.get_logger("orderq.connect")


def configured(settings: Settings) -> bool:
    """True when there is something to pull: a connector file, or a watched folder."""
    connectors, folder = directories(settings)
    return folder is not None or (connectors is not None and any(connectors.glob("*.toml")))


class ConnectStage(Stage):
    stage = "connect"

    @classmethod
    def check(cls, settings: Settings) -> None:
        if not configured(settings):
            raise ConfigError(
                "ORDERQ_CONNECTORS_DIR", "no connector file (*.toml) and no ORDERQ_IMPORT_DIR: nothing to pull"
            )
        load_all(directories(settings)[0], settings)  # a broken connector file stops the stage at start

    def __init__(self, r: Redis, control: Control | None = None, consumer: str | None = None) -> None:
        super().__init__(r, control, consumer)
        connectors_dir, self.import_dir = directories(self.settings)
        self.connectors = load_all(connectors_dir, self.settings)
        assert control is not None, "the intake sheds by the breaker's stage: it needs the control mirror"
        self.intake = Intake(r, Committer(r), control)

    def started_fields(self) -> dict[str, Any]:
        return {"connectors": [c.name for c in self.connectors], "import_dir": str(self.import_dir or "")}

    async def run(self, drain: bool = False) -> int:
        """Poll until stopped (``drain`` does not apply: a platform never runs out of time)."""
        channels = self.settings.channels
        gone = await list_configured(self.r.client, [c.name for c in self.connectors])
        if gone:
            log.info("connect.unlisted", connectors=gone)  # files removed or renamed since the last start
        jobs = [Poller(c, self.intake, channels, self.stopping).run() for c in self.connectors]
        if self.import_dir is not None:
            jobs.append(Folder(self.import_dir, self.intake, channels, self.stopping).run())
        tasks = [asyncio.create_task(j) for j in jobs]
        # A job that fails stops the process (exit 1: `orderq up` restarts it), not only itself.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        self.stopping.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return 0

    async def close(self) -> None:
        await self.intake.close()
