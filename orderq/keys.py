"""Every Redis key, stream, group and channel name orderq uses, in one place.

Layout: each partition owns a hash tag, and every key a partition script touches
carries it, so each script call stays in one hash slot and the same layout runs
on a Redis Cluster. Tags are chosen so that partition ``i`` of ``P`` hashes into
the ``i``-th ``1/P`` of the slot space, which spreads partitions evenly over the
masters of a cluster (slot ranges are assigned contiguously).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache, lru_cache

PREFIX = "oq"

# Consumer groups, one per consuming stage. Created at id 0 so that entries written
# before the group existed are never skipped.
GROUP_VALIDATE = "validate"
GROUP_EXECUTE = "execute"

# Priority classes, served in this order (aging aside).
PRIORITIES = ("vip", "new", "regular")

# Downstream actions. Core ones always run; non-core syncs are the breaker's to skip.
CORE_ACTIONS = ("wms.pick", "notify.sms", "invoice.request")
SYNC_ACTIONS = ("crm.remark_sync", "crm.gift_sync")
ACTIONS = CORE_ACTIONS + SYNC_ACTIONS
# Actions after execution (contract §5): fired by a cancel (wms.intercept) or an order event
# (channel.ship_sync), each into its own outbox stream, delivered by the dispatcher like the
# others. Apart from ACTIONS: the execute stage's scripts take one outbox per action of ACTIONS.
LIFECYCLE_ACTIONS = ("wms.intercept", "channel.ship_sync")
OUTBOX_ACTIONS = ACTIONS + LIFECYCLE_ACTIONS  # every action with an outbox (and a webhook variable)

# Global keys (not partition-scoped; read and written with plain commands, never
# inside a partition script).
BREAKER_KEY = f"{PREFIX}:breaker"  # hash: stage, since, backlog, rates; for late joiners
EVENTS_CHANNEL = f"{PREFIX}:events"  # pub/sub: stage changes, pause/resume, holds
PAUSED_KEY = f"{PREFIX}:paused"  # set of paused stages ("validate", "execute")
WORKERS_KEY = f"{PREFIX}:workers"  # hash: "<stage>:<host>:<pid>" -> heartbeat JSON
WORKER_TTL_S = 10  # a worker whose heartbeat is older than this is not listed
COUNTERS_GLOBAL = f"{PREFIX}:n"  # hash: counters with no partition (invalid, shed)
CUSTOMER_TTL_S = 400 * 24 * 3600  # "first order seen" memory: over a year of sales

# --- Operator views and alerts -------------------------------------------------------------
# Global, plain commands: the breaker process writes them once a second, the dashboard,
# /metrics and the alert evaluator read them. None is ever touched by a partition script.
HISTORY_KEY = f"{PREFIX}:hist"  # list, newest first: one JSON sample a second for the dashboard chart
HISTORY_LEN = 600  # samples kept by LTRIM: ten minutes of chart in a few hundred KB
HISTORY_LOCK = f"{PREFIX}:hist:lock"  # SET NX PX: one sample a second even with several breaker processes
ALERTS_STATE_KEY = f"{PREFIX}:alerts:state"  # hash: active alert id -> JSON; HSETNX fires each onset once
ALERTS_COUNT_KEY = f"{PREFIX}:alerts:n"  # hash: alert kind -> times fired (orderq_alerts_total)
ALERTS_HOURLY_KEY = f"{PREFIX}:alerts:hourly"  # hash: window index -> "accepted total,ts" at its first sample
# listed at 0 in /metrics
ALERT_KINDS = ("order_surge", "execution_lag", "dead_letters", "sku_out_of_stock", "ship_lag")
# hash: SKU -> consecutive out-of-stock refusals; the validate stage increments it on an
# out_of_stock refusal and deletes the field when the SKU is reserved again.
OOS_STREAK_KEY = f"{PREFIX}:alerts:oos_streak"
# Ingress admission control: each process counts its overload refusals in memory and
# adds them here with its metrics flush, once a second (a refusal itself never touches Redis).
OVERLOAD_REFUSED_KEY = f"{PREFIX}:m:overload"  # hash: customer tier -> orders refused 503 overloaded
INGRESS_STATE_KEY = f"{PREFIX}:m:ingress"  # hash: "<host>:<pid>" -> JSON admission state, for /metrics
# Orders per channel and outcome (accepted, duplicate, shed), counted in the memory of every process
# that takes orders (ingress, connect, import) and added here with its metrics flush.
CHANNEL_ORDERS_KEY = f"{PREFIX}:m:channels"  # hash: "<channel>|<outcome>" -> orders
# Dispatch targets' circuits (dispatch/circuit.py): each dispatcher process writes its own, on a
# change and once a second; /metrics shows the worst state per action among the live ones.
CIRCUITS_KEY = f"{PREFIX}:m:circuits"  # hash: "<action>|<host>:<pid>" -> "<state>|<unix time>"
CIRCUIT_OPENS_KEY = f"{PREFIX}:m:circuit_opens"  # hash: action -> times a circuit opened, every process
# Latency histograms are observed in process memory and added here once a second, so /metrics on
# any process shows the sum over all of them: one hash per histogram.
HIST_PREFIX = f"{PREFIX}:m:h"
REASONS_KEY = f"{PREFIX}:m:reasons"  # hash: reason code (SKU stripped) -> orders; the dashboard's reasons chart
# hash: province -> JSON {"reason", "since"} of each region hold; every process mirrors it (control.py)
# so an executor holds an order without a round trip
HOLDS_KEY = f"{PREFIX}:holds"


def hist_key(name: str) -> str:
    """Hash of histogram ``name``: "<label>|<bucket index>" -> count, "<label>|sum"."""
    return f"{HIST_PREFIX}:{name}"


_SLOTS = 16384


def _crc16(data: bytes) -> int:
    """CRC16-XMODEM, the hash Redis Cluster uses for key slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


@cache
def partition_tag(index: int, partitions: int) -> str:
    """The hash tag of partition ``index``: ``p<i>`` plus a suffix that puts it in its slot range."""
    lo = index * _SLOTS // partitions
    hi = (index + 1) * _SLOTS // partitions
    mid = (lo + hi) // 2
    best, best_dist = f"p{index}", _SLOTS
    for n in range(20000):
        tag = f"p{index}.{n}"
        slot = _crc16(tag.encode()) % _SLOTS
        if lo <= slot < hi and abs(slot - mid) < best_dist:
            best, best_dist = tag, abs(slot - mid)
            if best_dist < max(1, (hi - lo) // 8):
                break
    return best


def partition_of(order_key: str, partitions: int) -> int:
    """Order key hash -> partition (stable across processes and hosts)."""
    return zlib.crc32(order_key.encode()) % partitions


@dataclass(frozen=True, slots=True)
class Partition:
    """Names of every key of one partition."""

    index: int
    tag: str

    @property
    def base(self) -> str:
        return f"{PREFIX}:{{{self.tag}}}"

    @property
    def intake(self) -> str:  # stream: accepted orders waiting for validation
        return f"{self.base}:in"

    def ready(self, priority: str) -> str:  # stream per class: validated orders to execute
        return f"{self.base}:rdy:{priority}"

    @property
    def lanes(self) -> tuple[str, str, str]:
        return (self.ready("vip"), self.ready("new"), self.ready("regular"))

    @property
    def counters(self) -> str:  # hash: totals moved inside the scripts that move orders
        return f"{self.base}:n"

    @property
    def errors(self) -> str:  # hash: stream entry id -> last processing error (for dead letters)
        return f"{self.base}:err"

    @property
    def dead(self) -> str:  # stream: entries delivered more than ORDERQ_MAX_DELIVERIES times
        return f"{self.base}:dl"

    @property
    def deferred(self) -> str:  # stream: non-core syncs skipped by the breaker, to replay
        return f"{self.base}:df"

    @property
    def review(self) -> str:  # sorted set: order key by time it entered review
        return f"{self.base}:rv"

    @property
    def held(self) -> str:  # sorted set: order key by time it was held (region hold)
        return f"{self.base}:hd"

    @property
    def parked(self) -> str:  # hash: order key -> payload of orders in review or held
        return f"{self.base}:pk"

    def outbox(self, action: str) -> str:  # stream per action: effects for downstream systems
        return f"{self.base}:ob:{action}"

    @property
    def order_copies(self) -> str:  # hash: order key -> payload of an executed order, stored once
        # for its outbox, deferred and dispatch dead-letter entries, which reference it ('o')
        return f"{self.base}:obo"

    @property
    def copy_refs(self) -> str:  # hash: order key -> entries still referencing its copy; the
        # script that removes the last one deletes the copy (orderq/ordercopies.py)
        return f"{self.base}:obr"

    def status(self, order_key: str) -> str:  # hash: status record + dedup + effect ledger
        return f"{self.base}:o:{order_key}"

    def payload(self, order_key: str) -> str:  # string: an executed order's payload (msgpack), what
        # an intercept, a shipment and a return carry later. Beside its status record, not in it:
        # a value over 64 bytes would turn the record's compact listpack into a hashtable (~1 KB
        # more per order). It lives exactly as long as the record: every script that sets or
        # takes the record's TTL does the same to it, in the same call.
        return f"{self.base}:d:{order_key}"

    @property
    def status_pattern(self) -> str:
        return f"{self.base}:o:*"

    @property
    def cancel_pending(self) -> str:  # hash: order key -> "<deadline ms>\t<reason>\t<note>\t<at us>"
        # of cancels that came before their order (cancel.lua writes, intake.lua reads)
        return f"{self.base}:cxp"

    @property
    def cancel_owed(self) -> str:  # hash: order key -> "<seq>|<accept us>|<payload>": ledger
        # releases owed by cancelled orders, deleted once orderq/lifecycle.py released them
        return f"{self.base}:cxo"


# SCAN pattern of every partition's status records at once (orderq audit scans each server
# once, not once per partition); the validation ledger's records (LEDGER_PREFIX + "o:") match
# it too and are told apart by their tag.
STATUS_PATTERN = f"{PREFIX}:{{*}}:o:*"
# ... and the executed orders' payload keys (Partition.payload) with them, in the same SCAN
RECORD_PATTERN = f"{PREFIX}:{{*}}:[od]:*"


@cache
def partitions(count: int) -> tuple[Partition, ...]:
    return tuple(Partition(i, partition_tag(i, count)) for i in range(count))


def benchref_stream(run_id: str) -> str:
    """Stream the benchmark's reference endpoint (decode + XADD, the floor orderq's ingress is
    measured against) adds each order to: one per run, deleted after it."""
    return f"{PREFIX}:benchref:{run_id}"


def bucket_key(channel: str) -> str:
    """Token bucket of a channel's ORDERQ_CHANNEL_RATE; one tag so one call serves every channel."""
    return f"{PREFIX}:{{rl}}:bucket:{channel}"


def customer_key(channel: str, customer_id: str) -> str:
    """Who placed a customer's first order (value: that order key); decides priority ``new``.
    In the validation ledger's slot: the ledger script sets it with the rest of the batch."""
    return f"{LEDGER_PREFIX}cust:{channel}:{customer_id}"


# --- Validation ledger: stock, coupons, subsidies, risk windows ----------------
# Global, not per partition: a SKU's stock is shared by the orders of every partition.
# Every ledger key carries the ONE hash tag {ledger}, so an order's whole check-and-hold
# (each line's stock, its single-use coupons, its customer's day subsidy and first order,
# the IP and duplicate windows) is a single-slot script, atomic, one call per batch, also
# on a Redis Cluster. The price: one cluster master carries the ledger (the script costs
# tens of microseconds of server time per order). Every script takes each ledger key it touches
# in KEYS, built by the functions below; the batch scripts (checks.lua, route.lua) get each
# distinct key of a batch once and their rows name it by its index in KEYS.
LEDGER_PREFIX = f"{PREFIX}:{{ledger}}:"
LEDGER_REPLAY_TTL_S = 24 * 3600  # decisions of a batch, for its redelivery
# The batch scripts' callers build a few keys per order: the names of SKUs, coupons and time
# buckets repeat from batch to batch and are made once (bounded: a catalogue may be large).
SKU_CACHE = 65_536
BUCKET_CACHE = 1024
# An order may wait far longer than that between its decision (or route) and its hand-off (or
# execution): a dead letter, a region hold, a stage down after a crash. Its record is also kept
# open, without a TTL, until its worker reports the order moved on (closed in its next script
# call; orderq/openrecords.py sweeps what a stopped worker left open, by the status record).
DECIDED_OPEN_KEY = f"{LEDGER_PREFIX}od:open"  # hash order key -> decision, of orders not handed off yet
ROUTED_OPEN_KEY = f"{LEDGER_PREFIX}rt:open"  # hash order key -> route record, of orders not executed yet
# (an order in review keeps its record as long as its status record: a reject releases by it)
# Windows, day totals and decisions live in time-bucketed hashes, one write per bucket per
# batch: inside a script, one write call costs several microseconds, one more field of it
# a fraction of one.
SUBSIDY_TTL_S = 2 * 24 * 3600  # a customer's day totals outlive their (Beijing) day
IP_WINDOW_MS = 3600 * 1000  # the sliding hour of ORDERQ_IP_ORDERS_PER_HOUR
BEIJING_OFFSET_MS = 8 * 3600 * 1000  # "one day" of the subsidy cap is a Beijing calendar day
DAY_MS = 24 * 3600 * 1000


def beijing_day(ms: int) -> int:
    """The Beijing calendar day (days since the epoch) of a time in ms: the subsidy cap's day."""
    return (ms + BEIJING_OFFSET_MS) // DAY_MS


@lru_cache(maxsize=SKU_CACHE)
def stock_key(sku: str) -> str:
    """Hash ``p`` physical, ``r`` reserved units of a SKU (no key: unknown SKU)."""
    return f"{LEDGER_PREFIX}sku:{sku}"


@lru_cache(maxsize=SKU_CACHE)
def holders_key(sku: str) -> str:
    """Hash order key -> units it holds of ``sku``: what a release or a recount settles, once."""
    return f"{LEDGER_PREFIX}sku:{sku}:h"


@lru_cache(maxsize=SKU_CACHE)
def coupon_key(code: str) -> str:
    """Hash ``pf`` platform, ``a`` amount (cents), ``x`` expiry (ms, 0 none), ``one`` single use, ``u`` used by."""
    return f"{LEDGER_PREFIX}cpn:{code}"


@lru_cache(maxsize=BUCKET_CACHE)
def subsidy_key(day: int) -> str:
    """Hash ``<channel>:<customer id>|g`` goods and ``|c`` coupon cents of each customer on
    (Beijing) day ``day`` (days since the epoch); one hash per day, expiring as a whole."""
    return f"{LEDGER_PREFIX}sub:{day}"


@lru_cache(maxsize=BUCKET_CACHE)
def ip_key(hour: int) -> str:
    """Hash IP -> accept times (ms) of its latest orders, the hour bucket ``hour`` (ms // 3600000)
    of the latest; each write carries the older times forward, so the newest bucket is whole."""
    return f"{LEDGER_PREFIX}ip:{hour}"


@lru_cache(maxsize=BUCKET_CACHE)
def dup_key(bucket: int) -> str:
    """Hash fingerprint (recipient+items+amount) -> ``<order key>|<accept ms>`` of the latest
    order, per bucket of ORDERQ_DUP_WINDOW_S (accept ms // window ms)."""
    return f"{LEDGER_PREFIX}dup:{bucket}"


@lru_cache(maxsize=BUCKET_CACHE)
def decided_key(hour: int) -> str:
    """Hash order key -> ``<outcome><extra score>|reason|...`` of the orders accepted in
    ``hour``: a redelivered batch gets its first decision back (LEDGER_REPLAY_TTL_S)."""
    return f"{LEDGER_PREFIX}od:{hour}"


@lru_cache(maxsize=SKU_CACHE)
def wh_holders_key(sku: str, warehouse: str) -> str:
    """Hash order key -> units of ``sku`` allocated to it in ``warehouse`` by the execute
    stage's routing (route.lua); the warehouse's next count settles them (restock.lua)."""
    return f"{LEDGER_PREFIX}sku:{sku}:h:{warehouse}"


@lru_cache(maxsize=BUCKET_CACHE)
def route_key(hour: int) -> str:
    """Hash order key -> msgpack of the route it was given and what it allocated, for the
    orders accepted in ``hour`` (ms // 3600000): an order routed a second time (whatever its
    delivery count) gets the same route back and allocates nothing twice (LEDGER_REPLAY_TTL_S)."""
    return f"{LEDGER_PREFIX}rt:{hour}"


# Warehouses: hash id -> JSON of the warehouse (location, provinces served,
# carriers), mirrored in every process by orderq/control.py. Gifts that ran out: hash
# SKU -> orders that shipped without it (in the ledger slot: counted once, by route.lua).
WAREHOUSES_KEY = f"{PREFIX}:warehouses"
GIFT_OOS_KEY = f"{LEDGER_PREFIX}gift_oos"
DEFAULT_WAREHOUSE = "default"  # where stock put without a warehouse lives
# Warehouse removal, in the ledger slot: the ids removed, which route.lua never
# picks (an executor's warehouse list may be a moment old), taken off when an id is set again.
RETIRED_WAREHOUSES_KEY = f"{LEDGER_PREFIX}wh:retired"


@lru_cache(maxsize=BUCKET_CACHE)
def wh_skus_key(warehouse: str) -> str:
    """Set of the SKUs counted (restock.lua) or allocated (route.lua) in ``warehouse``: what
    its removal checks for stock or open allocations (retire.lua), deleted with it."""
    return f"{LEDGER_PREFIX}wh:{warehouse}:skus"


def ledger_key(order_key: str) -> str:
    """msgpack wire.ReviewHold: what an order in review decided and holds; its reject releases by it."""
    return f"{LEDGER_PREFIX}o:{order_key}"


# --- Integrations: Shopify webhook dedup, downstream dispatch ------------------
# The dispatcher reads each configured action's outbox stream with its own group, created
# at id 0 like the others, so actions written before the dispatcher first ran are delivered.
GROUP_DISPATCH = "dispatch"
# Shopify retries an unanswered delivery for up to 48 hours: a webhook id is remembered a
# day longer, so a redelivery within Shopify's whole retry window is still a duplicate.
WEBHOOK_DEDUP_TTL_S = 3 * 24 * 3600


def webhook_key(p: Partition, source: str, webhook_id: str) -> str:
    """String: the order key a delivered webhook became (SET NX GET with a TTL). Placed in the
    partition of ``<source>-webhook:<webhook id>`` itself, not of the order: a redelivery whose
    body (even its order id) changed is still found."""
    return f"{p.base}:wh:{source}:{webhook_id}"


def dispatch_dead(p: Partition) -> str:
    """Stream: downstream deliveries given up after ORDERQ_MAX_DELIVERIES (or refused with a 4xx),
    with action, order key, last error and payload. Apart from ``p.dead`` (orders that could not
    be processed): these orders did execute."""
    return f"{p.base}:dl:dispatch"


def dead_release(p: Partition) -> str:
    """Hash: order key -> msgpack of what a discarded dead letter's order holds in the validation
    ledger (another slot). Set by the discard script (deadletter.lua), deleted once the ledger has
    released it: a discard cut short in between is completed by the next one."""
    return f"{p.base}:dlr"


# --- Pull connectors and the watched import folder (contract §7) ------------------------------
# Global: read by GET /v1/admin/connectors. Per connector, every key shares one hash tag, so the
# lease check and the cursor move are one script call in one slot, on a cluster too.
CONNECTORS_KEY = f"{PREFIX}:connectors"  # set: names of the configured connectors (the admin list)
IMPORT_LEASE_KEY = f"{PREFIX}:import:lease"  # SET NX PX: one process imports the watched folder at a time


def connector_key(name: str, part: str) -> str:
    """A connector's ``lease`` (string, SET NX PX: the one process that polls it), ``cursor``
    (string: the modification time in ms up to which every order is queued; moved only by the
    lease holder), ``state`` (hash: last poll, last error, counts, for operators) or ``closed``
    (hash: order key -> platform status of orders seen cancelled, refunded or closed)."""
    return f"{PREFIX}:{{conn:{name}}}:{part}"


def cancel_release_mark(order_key: str) -> str:
    """String in the ledger slot: a cancelled order's share of its day subsidy was given back
    (unreserve.lua's SET NX: once per order)."""
    return f"{LEDGER_PREFIX}cx:{order_key}"
