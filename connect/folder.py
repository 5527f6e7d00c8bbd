"""The watched import folder (``ORDERQ_IMPORT_DIR``, contract §7): a file dropped there (an FTP
upload of ``order_20261111.csv``) is imported once it has stopped growing, then moved to
``done/`` (every row accepted or a duplicate) or ``failed/`` (a row invalid, or the file
unreadable) with its report beside it. One process at a time watches a folder (a lease in
Redis); a file it was importing when it died is imported again by the next (re-importing
changes nothing).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from connect import fileimport
from connect.state import Lease
from connect.table import TableError
from orderq import keys

if TYPE_CHECKING:
    from orderq.intake import Intake

log = structlog.get_logger("orderq.import")

SCAN_S = 1.0  # how often the folder is listed
STABLE_SCANS = 2  # a file is taken once its size and time are unchanged over this many scans
PARTIAL_SUFFIXES = (".part", ".tmp", ".filepart", ".crdownload", ".partial")  # uploads under way
SUFFIXES = (".csv", ".txt", ".xlsx", ".xlsm")
WORKING, DONE, FAILED = "working", "done", "failed"
LEASE_S = 30.0


def _candidate(p: Path) -> bool:
    name = p.name.lower()
    return (
        p.is_file()
        and not name.startswith(".")
        and not name.endswith(PARTIAL_SUFFIXES)
        and name.endswith(SUFFIXES)
        and not name.endswith(fileimport.REPORT_SUFFIX)
    )


def _free_name(directory: Path, name: str) -> Path:
    """``name`` in ``directory``, or with a time stamp when a file of that name is already there
    (the same file name dropped again the next day)."""
    target = directory / name
    if not target.exists():
        return target
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    stem, dot, suffix = name.rpartition(".")
    return directory / (f"{stem}.{stamp}.{suffix}" if dot else f"{name}.{stamp}")


class Folder:
    def __init__(self, directory: Path, intake: Intake, channels: tuple[str, ...], stopping: asyncio.Event) -> None:
        self.dir = directory
        self.intake = intake
        self.channels = channels
        self.stopping = stopping
        self.lease = Lease(intake.redis.client, keys.IMPORT_LEASE_KEY, LEASE_S)
        self._sizes: dict[Path, tuple[tuple[int, int], int]] = {}  # file -> ((size, mtime), scans unchanged)
        for sub in (WORKING, DONE, FAILED):
            (directory / sub).mkdir(exist_ok=True)

    async def run(self) -> None:
        keeper = asyncio.create_task(self.lease.keep(self.stopping))
        try:
            while not self.stopping.is_set():
                if self.lease.held:
                    try:
                        await self.scan()
                    except Exception as exc:  # Redis down, a full disk: try again at the next scan
                        log.warning("import.scan_failed", error=repr(exc)[:300])
                try:
                    await asyncio.wait_for(self.stopping.wait(), SCAN_S)
                except TimeoutError:
                    pass
        finally:
            self.stopping.set()
            await asyncio.gather(keeper, return_exceptions=True)
            await self.lease.release()

    def ready(self) -> list[Path]:
        """Files whose size and time stayed the same over ``STABLE_SCANS`` scans, oldest first;
        the files of an earlier process in ``working/`` at once."""
        out = sorted((p for p in (self.dir / WORKING).iterdir() if _candidate(p)), key=lambda p: p.stat().st_mtime)
        seen: dict[Path, tuple[tuple[int, int], int]] = {}
        for p in sorted(self.dir.iterdir(), key=lambda p: p.name):
            if not _candidate(p):
                continue
            st = p.stat()
            sig = (st.st_size, st.st_mtime_ns)
            before = self._sizes.get(p)
            scans = before[1] + 1 if before is not None and before[0] == sig else 0
            seen[p] = (sig, scans)
            if scans >= STABLE_SCANS:
                out.append(p)
        self._sizes = seen
        return out

    async def scan(self) -> None:
        for p in self.ready():
            if self.stopping.is_set() or not self.lease.held:
                return
            working = p if p.parent.name == WORKING else _free_name(self.dir / WORKING, p.name)
            if working != p:
                os.replace(p, working)  # taken: a second drop of the same name waits its turn
            await self.import_one(working)

    async def import_one(self, path: Path) -> None:
        report = path.with_name(path.name + fileimport.REPORT_SUFFIX)
        try:
            result = await fileimport.import_file(self.intake, path, self.channels, report=report)
            ok = result.ok
            if set(result.counts) & {"shed", "unavailable"}:  # not the file's fault: left in working/
                log.warning("import.postponed", file=str(path), **result.counts)
                return
        except TableError as exc:  # unreadable as a table: the report says why, the file goes to failed/
            fileimport.write_failure(report, str(exc))
            ok = False
            log.warning("import.unreadable", file=str(path), error=str(exc))
        target_dir = self.dir / (DONE if ok else FAILED)
        target = _free_name(target_dir, path.name)
        os.replace(report, target.with_name(target.name + fileimport.REPORT_SUFFIX))
        os.replace(path, target)
        log.info("import.moved", file=path.name, to=str(target))
