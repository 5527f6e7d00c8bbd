"""The ``orderq`` command (contract §1). Exit codes: 0 ok, 2 bad configuration, 1 other failure."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import msgspec

from orderq.errors import ConfigError, OrderqError
from orderq.settings import Settings

STAGES = ("ingress", "validate", "execute", "breaker", "dispatch", "connect")


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="orderq", description="order-intake queue for peak sales")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run every stage on this machine (embedded server when ORDERQ_REDIS_URL is unset)")
    for stage in STAGES:
        sub.add_parser(stage, help=f"run the {stage} stage alone against ORDERQ_REDIS_URL")
    st = sub.add_parser("status", help="one screen for an operator")
    st.add_argument("--json", action="store_true", help="print /v1/stats as JSON")
    st.add_argument("--watch", action="store_true", help="refresh every second")
    cd = sub.add_parser("cluster-dev", help="run a local 3-master Valkey cluster under ORDERQ_DATA_DIR/cluster")
    cd.add_argument("--masters", type=int, default=3)
    cd.add_argument("--replicas", type=int, default=0, help="replicas per master (they fail over by themselves)")
    au = sub.add_parser("audit", help="reconcile accepted orders with what happened to them")
    au.add_argument("--json", action="store_true")
    dl = sub.add_parser("dead-letters", help="list, replay or discard dead letters")
    dls = dl.add_subparsers(dest="dl_command", required=True)
    ls = dls.add_parser("list", help="unresolved dead letters, oldest first")
    ls.add_argument("--stage", choices=("validate", "execute", "dispatch"))
    ls.add_argument("--limit", type=int, default=100, help="at most this many (1 to 1000)")
    ls.add_argument("--after", help="the 'next' of a previous page")
    ls.add_argument("--json", action="store_true", help="print the API's JSON document")
    rp = dls.add_parser("replay", help="put a dead letter back where it failed")
    rp.add_argument("id")
    dc = dls.add_parser("discard", help="resolve a dead letter for good (the order is rejected: discarded)")
    dc.add_argument("id")
    dc.add_argument("--reason", required=True)
    im = sub.add_parser("import", help="queue a CSV or Excel file of orders through the intake")
    from connect.cli import add_import_arguments

    add_import_arguments(im)
    be = sub.add_parser("bench", help="headless benchmark; prints a report")
    if command == "bench":  # its options live with the tool, in loadtest/: imported for this command only
        from loadtest.bench import arguments

        arguments.add_arguments(be)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv[0] if argv else None).parse_args(argv)
    try:
        settings = Settings.from_env()
        from orderq import logs

        logs.configure(settings.log_format, settings.log_level)
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"orderq: bad configuration: {exc}", file=sys.stderr)
        return 2
    except OrderqError as exc:
        print(f"orderq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from orderq import runner

    cmd = args.command
    if cmd == "up":
        from ingress.channels import load_mappings
        from orderq.supervisor import Supervisor

        load_mappings(settings)  # a broken mapping file stops `orderq up` at once, not in a restart loop
        from connect.config import directories, load_all

        load_all(directories(settings)[0], settings)  # so does a broken connector file
        return Supervisor(settings).run()
    if cmd == "ingress":
        from ingress.app import serve
        from orderq.tokens import ensure_tokens

        settings, path = ensure_tokens(settings)
        if path is not None:
            print(f"orderq: bearer tokens are in {path.resolve()}", file=sys.stderr, flush=True)
        _check_first(settings)
        serve(settings)
        return 0
    if cmd == "validate":
        from validate.worker import ValidateWorker

        runner.run(runner.serve(settings, ValidateWorker))
        return 0
    if cmd == "execute":
        from execute import routing
        from execute.worker import ExecuteWorker

        try:  # a routing file that does not parse stops the stage before it takes work
            routing.load(settings.routing_dir)
        except routing.RulesError as exc:
            raise ConfigError("ORDERQ_ROUTING_DIR", str(exc)) from None

        runner.run(runner.serve(settings, ExecuteWorker))
        return 0
    if cmd == "breaker":
        from breaker.controller import Breaker

        runner.run(runner.serve(settings, Breaker))
        return 0
    if cmd == "dispatch":
        from dispatch.worker import Dispatcher

        runner.run(runner.serve(settings, Dispatcher))
        return 0
    if cmd == "connect":
        from connect.app import ConnectStage

        runner.run(runner.serve(settings, ConnectStage))
        return 0
    if cmd == "import":
        from connect.cli import run_import

        return run_import(args, settings)
    if cmd == "status":
        return asyncio.run(_status(settings, args.json, args.watch))
    if cmd == "audit":
        return asyncio.run(_audit(settings, args.json))
    if cmd == "dead-letters":
        return asyncio.run(_dead_letters(settings, args))
    if cmd == "cluster-dev":
        from loadtest import clusterdev

        return clusterdev.main(settings.data_dir, args.masters, args.replicas)
    if cmd == "bench":
        from loadtest.bench import command

        return command.main(args, settings)
    raise AssertionError(cmd)


def _check_first(settings: Settings) -> None:
    """Refuse a bad server before uvicorn starts (its lifespan errors are less clear)."""
    from orderq import client

    async def check() -> None:
        r = await client.connect(settings)
        await r.close()

    asyncio.run(check())


async def _status(settings: Settings, as_json: bool, watch: bool) -> int:
    from orderq import client, stats

    r = await client.connect(settings)
    meter = stats.RateMeter()
    try:
        await stats.compute(r, meter)  # first sample: rates need two
        await asyncio.sleep(1.0)
        while True:
            doc = await stats.compute(r, meter)
            if as_json:
                print(msgspec.json.encode(doc).decode(), flush=True)
            else:
                if watch:
                    print("\x1b[2J\x1b[H", end="")
                print(render_status(doc), flush=True)
            if not watch:
                return 0
            await asyncio.sleep(1.0)
    finally:
        await r.close()


def render_status(doc: dict[str, Any]) -> str:
    d, t, rt = doc["depth"], doc["totals"], doc["rates"]
    lines = [
        f"orderq  {time.strftime('%Y-%m-%d %H:%M:%S')}   stage: {doc['stage'].upper()}   backlog: {doc['backlog']}",
        "",
        f"depth    intake {d['intake']:>8}   ready vip {d['ready']['vip']:>7}  new {d['ready']['new']:>7}"
        f"  regular {d['ready']['regular']:>7}",
        f"         review {d['review']:>8}   deferred {d['deferred']:>8}   held {doc.get('held', 0):>7}",
        f"rates/s  accepted {rt['accepted_per_s']:>8}   validated {rt['validated_per_s']:>8}"
        f"   executed {rt['executed_per_s']:>8}",
        "totals   " + "  ".join(f"{k} {v}" for k, v in t.items()),
        f"paused   {', '.join(doc['paused']) or '-'}    holds {', '.join(doc.get('holds', [])) or '-'}",
        "workers  " + (", ".join(f"{w['stage']}@{w['host']}:{w['pid']}" for w in doc["workers"]) or "none"),
    ]
    return "\n".join(lines)


async def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from orderq import client, deadletters

    if args.dl_command == "list" and not 1 <= args.limit <= deadletters.MAX_LIST:
        print(f"orderq: --limit must be from 1 to {deadletters.MAX_LIST}", file=sys.stderr)
        return 1
    r = await client.connect(settings)
    try:
        if args.dl_command == "list":
            try:
                items, nxt = await deadletters.list_dead(r, args.stage, args.limit, args.after)
            except ValueError as exc:
                print(f"orderq: --after: {exc}", file=sys.stderr)
                return 1
            if args.json:
                print(msgspec.json.encode({"items": [d.doc() for d in items], "next": nxt}).decode())
            else:
                print(render_dead_letters([d.doc() for d in items], nxt))
            return 0
        try:
            if args.dl_command == "replay":
                doc = await deadletters.replay(r, args.id)
            else:
                doc = await deadletters.discard(r, args.id, args.reason)
        except deadletters.NotFound:
            print(f"orderq: no unresolved dead letter {args.id!r}", file=sys.stderr)
            return 1
        except deadletters.NotReplayable as exc:
            print(f"orderq: {exc}", file=sys.stderr)
            return 1
        print(f"{doc['id']}: {doc['resolution']} ({doc['order_key']} is {doc['status'] or 'unknown'})")
        return 0
    finally:
        await r.close()


def render_dead_letters(items: list[dict[str, Any]], nxt: str | None) -> str:
    if not items:
        return "no unresolved dead letters"
    rows = [("ID", "STAGE", "SINCE (UTC)", "ORDER", "ACTION", "TRIES", "ERROR")]
    for d in items:
        error = " ".join(d["error"].split())
        rows.append(
            (
                d["id"],
                d["stage"],
                d["since"][:19].replace("T", " "),
                d["order_key"],
                d["action"] or "-",
                str(d["deliveries"]),
                error if len(error) <= 60 else error[:59] + "…",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows]
    if nxt:
        lines.append(f"(more: --after {nxt})")
    return "\n".join(lines)


async def _audit(settings: Settings, as_json: bool) -> int:
    from orderq import audit

    return await audit.main(settings, as_json)
