"""The bench report: the contract's figures gathered in one place (``summary``), the targets
checked against them, and the printed text."""

from __future__ import annotations

from typing import Any

from orderq import keys

SCHEMA = "orderq.bench/1"  # the JSON report's schema (BENCHMARKS.md describes it)
PRIORITIES = keys.PRIORITIES
CANCEL_SUMMARY = ("sent", "outcomes", "final_cancelled", "not_final", "acted_after_cancel", "stock_exact")
CANCEL_TARGET = "cancels: lost 0, duplicates 0, stock exact"


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The contract's §8 figures in one place; each names the phase it comes from."""
    ph = report["phases"]
    single, batch, burst, e2e = (ph.get(k) or {} for k in ("single", "batch", "burst", "e2e"))
    return {
        "accepted_per_s": {"single": single.get("orders_per_s"), "batch": batch.get("orders_per_s")},
        "ack_ms": {k: ph[k]["ack_ms"] for k in ("single", "batch", "e2e", "spike") if k in ph},
        "e2e_ms": {k: ph[k]["e2e_ms"] for k in ("e2e", "spike") if k in ph},
        "executed_per_s": {
            "capacity": burst.get("executed_per_s"),
            "sustained": e2e.get("executed_per_s"),
        },
        "drain_s": {k: ph[k]["drain_s"] for k in ("burst", "e2e", "spike") if k in ph},
        "peak_backlog": {k: ph[k]["peak_backlog"] for k in ("burst", "e2e", "spike") if k in ph},
        "stages_visited": {k: ph[k]["stages_visited"] for k in ("burst", "e2e", "spike") if k in ph},
        "redis_memory_per_queued_order_bytes": burst.get("memory_per_queued_order_bytes"),
        "redis_memory_per_order_after_drain_bytes": (burst.get("memory_after_drain") or {}).get("per_order_bytes"),
        "oracle": {k: v for k, v in (report.get("oracle") or {}).items() if k != "examples"},
        "lost": report.get("audit", {}).get("lost"),
        "duplicate_effects": report.get("audit", {}).get("duplicate_effects"),
        "cancels": {k: v for k, v in report["cancels"].items() if k in CANCEL_SUMMARY} if "cancels" in report else None,
        "machine": report.get("machine"),
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance and correctness targets, checked against what this run measured (None: not measured)."""
    ph = report["phases"]
    ratios = (ph.get("reference") or {}).get("ratios") or {}
    e2e = ph.get("e2e") or {}
    burst = ph.get("burst") or {}
    spike = ph.get("spike") or {}
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, value: Any, ok: bool | None) -> None:
        out.append({"name": name, "target": target, "value": value, "ok": ok})

    def at_least(v: float | None, bound: float) -> bool | None:
        return None if v is None else v >= bound

    def below(v: float | None, bound: float) -> bool | None:
        return None if v is None else v < bound

    add("single vs reference", ">= 0.8", ratios.get("single"), at_least(ratios.get("single"), 0.8))
    add("batch vs reference batch", ">= 0.7", ratios.get("batch"), at_least(ratios.get("batch"), 0.7))
    p99 = (e2e.get("ack_ms") or {}).get("p99")
    add(f"ack p99 at {e2e.get('offered_per_s', 0):g}/s offered, every stage", "< 100 ms", p99, below(p99, 100))
    cap = burst.get("executed_per_s")
    add("executed orders/s (burst drain)", ">= 3500", cap, at_least(cap, 3500))
    peer = (ph.get("peers") or {}).get("ratio_burst_executed")
    add("executed/s vs the best peer queue's no-op jobs/s", ">= 2", peer, at_least(peer, 2))
    sp99 = (spike.get("ack_ms") or {}).get("p99")
    add("spike ack p99", "< 100 ms", sp99, below(sp99, 100))
    ap99 = (spike.get("answer_ms") or {}).get("p99")
    add("spike answer p99 (202 and 503 alike)", "< 100 ms", ap99, below(ap99, 100))
    first = spike.get("taken_first_try_share")
    add("spike orders taken at the first try", ">= 0.6", first, at_least(first, 0.6))
    taken = spike.get("all_taken_s") if spike else None
    add(
        "spike every order taken (resends)",
        "<= 120 s",
        taken,
        None if not spike else (taken is not None and taken <= 120),
    )
    lost = spike.get("lost")
    add("spike lost", "== 0", lost, None if lost is None else lost == 0)
    o = report.get("oracle")
    bad = None if o is None else o["lost"] + o["duplicated"] + o["unexpected"] + o["unchecked"]
    add("oracle: lost + duplicated + unexpected", "== 0", bad, None if bad is None else bad == 0)
    add(CANCEL_TARGET, "== 0", *_cancel_faults(report))
    sd = spike.get("drain_s") if spike else None
    add("spike backlog 0 after last order", "<= 5 s", sd, None if not spike else (sd is not None and sd <= 5))
    return out


def _cancel_faults(report: dict[str, Any]) -> tuple[int | None, bool | None]:
    """With cancels: orders lost or an action applied twice (the oracle, cancelled orders among
    them), cancelled orders not ended cancelled or acted on after their cancel, and bench SKUs
    whose sellable stock is off; (None, None) without cancels. Not ok unless the stock was checked."""
    c, o = report.get("cancels"), report.get("oracle")
    if not c or o is None:
        return None, None
    n = o["lost"] + o["duplicated"] + c["not_final"] + c["acted_after_cancel"] + len(c["stock"]["mismatches"])
    return n, (n == 0) if c["stock_exact"] is not None else (False if n else None)


def _q(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"p50 {d['p50']:.1f}  p95 {d.get('p95', 0):.1f}  p99 {d['p99']:.1f}  max {d['max']:.1f} ms"


def render(report: dict[str, Any]) -> str:
    """The printed report."""
    m, inst, ph = report["machine"], report["instance"], report["phases"]
    lines = [
        f"orderq bench  run {report['run_id']}  {report['started_at']}  ({report['elapsed_s']} s)",
        f"machine   {m['cpu_model']}, {m['cores_usable']}/{m['cores']} cores, {m['memory_gb']} GB, {m['python']}, "
        f"{m['server']} {m['server_version']}",
        f"instance  {inst['mode']} · ingress {inst['ingress_url']} · durability {inst['durability']} · "
        f"{inst['partitions']} partitions · processes {inst['processes']} · stock set {inst['stock_set']} · "
        f"warehouses {inst.get('warehouses', 0)}",
        "",
    ]

    def closed(title: str, d: dict[str, Any]) -> None:
        lines.append(
            f"{title:<26} {d['orders_per_s']:>10,.0f} orders/s accepted   ({d['requests_per_s']:,.0f} req/s, "
            f"{d['connections']} conns, refused {d['refused']}, errors {d['connection_errors']})"
        )
        lines.append(f"{'':<26} ack {_q(d['ack_ms'])}")

    if "single" in ph:
        closed("single (workers paused)", ph["single"])
    if "batch" in ph:
        closed(f"batch x{ph['batch']['batch_size']}", ph["batch"])
    ref = ph.get("reference") or {}
    for kind in ("single", "batch"):
        if kind in ref:
            closed(f"reference {kind}", ref[kind])
    if ref.get("ratios"):
        r = ref["ratios"]
        lines.append(f"{'ours / reference':<26} single {r.get('single')}   batch {r.get('batch')}")
    peers = ph.get("peers") or {}
    if peers.get("runs"):
        runs = "   ".join(f"{x['broker']} {x['jobs_per_s']:,.0f}" for x in peers["runs"])
        lines.append(
            f"{'peer queue (taskiq)':<26} no-op jobs/s: {runs}   "
            f"burst executed/s ÷ best: {peers['ratio_burst_executed']}"
        )
    elif peers.get("skipped"):
        lines.append(f"{'peer queue':<26} skipped: {peers['skipped']}")
    if "burst" in ph:
        b = ph["burst"]
        lines.append(
            f"{'burst':<26} {b['orders_queued']:,} queued · "
            f"{b['memory_per_queued_order_bytes']} B Redis memory/order · "
            f"drained in {b['drain_s']} s · {b['executed_per_s']} executed/s · peak backlog {b['peak_backlog']:,} · "
            f"stages {', '.join(b['stages_visited']) or '-'}"
        )
        if b.get("memory_after_drain"):
            m = b["memory_after_drain"]
            lines.append(
                f"{'':<26} after the drain: {m['per_order_bytes']} B Redis memory/order "
                f"({m['outbox_per_order_bytes']} B of it in outbox streams)"
            )
        if b.get("valkey_instructions_per_order"):
            n = b["valkey_instructions_per_order"]
            lines.append(f"{'':<26} Valkey instructions per executed order (callgrind): {n:,}")
    for name in ("e2e", "spike"):
        if name not in ph:
            continue
        d = ph[name]
        title = f"{name} @ {d['offered_per_s']:,.0f}/s offered" if name == "e2e" else f"spike {d['offered']:,} orders"
        lines.append(
            f"{title:<26} {d['accepted_per_s']:>10,.0f} orders/s accepted · executed {d['executed_per_s']:,.0f}/s · "
            f"refused {d['refused']} · drain {d['drain_s']} s · peak backlog {d['peak_backlog']:,} · "
            f"stages {', '.join(d['stages_visited']) or '-'}"
        )
        lines.append(f"{'':<26} ack {_q(d['ack_ms'])}")
        if d.get("answer_ms"):
            lines.append(f"{'':<26} every answer (202 and 503) {_q(d['answer_ms'])}")
            share = d["taken_first_try_share"]
            lines.append(
                f"{'':<26} taken at the first try {'-' if share is None else f'{share:.1%}'} · "
                f"resends {d['resends']:,} · every order taken after {d['all_taken_s']} s · "
                f"not taken {d['not_taken']} · refusing {d['refusing_s']} s · {d['connections']} connections"
            )
            for cls, q in d["answer_ms_by_class"].items():
                lines.append(
                    f"{'':<26} answer {cls:<8} p50 {q['p50']:.1f}  p99 {q['p99']:.1f} ms  (n={q['n']}"
                    + (", while refusing)" if d["refusing_s"] else ")")
                )
        for prio in PRIORITIES:
            e = d["e2e_ms"].get(prio)
            if e and e["n"]:
                lines.append(f"{'':<26} end-to-end {prio:<8} p50 {e['p50']:.1f}  p99 {e['p99']:.1f} ms  (n={e['n']})")
        if name == "spike":
            lines.append(f"{'':<26} lost {d.get('lost')} · duplicate effects {d.get('duplicate_effects')}")
    au = report.get("audit")
    if au:
        lines.append(
            f"{'audit':<26} accepted {au['accepted']:,} · executed {au['executed']:,} · review {au['review']} · "
            f"rejected {au['rejected']} · lost {au['lost']} · duplicate effects {au['duplicate_effects']}"
        )
    if report.get("oracle"):
        o = report["oracle"]
        lines.append(
            f"{'oracle':<26} {o['sent']:,} orders sent · {o['acked']:,} acknowledged · lost {o['lost']} · "
            f"duplicated {o['duplicated']} · unexpected {o['unexpected']} · recovered {o['recovered']}"
            + (f" · unchecked {o['unchecked']}" if o["unchecked"] else "")
        )
        for category, examples in o["examples"].items():
            lines.append(f"{'':<26} {category}: {', '.join(examples)}")
    if report.get("cancels"):
        lines += _cancel_lines(report["cancels"], ph)
    lines += ["", "targets"]
    for t in report["targets"]:
        mark = {True: "ok  ", False: "MISS", None: "-   "}[t["ok"]]
        lines.append(f"  {mark} {t['name']:<44} {t['target']:<10} {t['value']}")
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _cancel_lines(c: dict[str, Any], ph: dict[str, Any]) -> list[str]:
    """The cancels' outcomes and checks (``--cancel-share``)."""
    o = c["outcomes"]
    st = c["stock"]
    stock = {True: "stock exact", False: f"stock OFF for {len(st['mismatches'])} SKUs", None: "stock not checked"}
    lines = [
        f"{'cancels':<26} {c['sent']:,} sent · cancelled {o['cancelled']} · intercepted→cancelled "
        f"{o['intercepted']} · pending {o['pending']} · too late {o['too_late']} · "
        f"not cancellable {o['not_cancellable']} · errors {o['error']}",
        f"{'':<26} ended cancelled {c['final_cancelled']:,} · not ended {c['not_final']} · acted on after "
        f"the cancel {c['acted_after_cancel']} · {stock[c['stock_exact']]} ({st['units_held']:,} units held, "
        f"{st['units_of_cancelled']:,} of cancelled orders)",
    ]
    for name in ("e2e", "spike"):
        pc = (ph.get(name) or {}).get("cancels")
        if pc:
            moments = "   ".join(
                f"{m}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for m, d in pc["by_moment"].items()
            )
            lines.append(f"{'':<26} {name}: {moments} · ended (executed + cancelled) {pc['ended_per_s_incl_drain']}/s")
    for category, examples in c["examples"].items():
        lines.append(f"{'':<26} {category}: {', '.join(examples)}")
    for m in st["mismatches"][:5]:
        lines.append(f"{'':<26} stock {m['sku']}: sellable {m['sellable']:,}, expected {m['expected']:,}")
    return lines
