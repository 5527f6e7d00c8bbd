"""The service answers exactly as its own ``/openapi.json`` says: schemathesis, a
schema-driven fuzzer, runs every operation of the document against a real ingress on
the real Valkey, once per kind of token (none, a channel's, another channel's, the
admin's), with every check it has — status codes listed, bodies and headers matching
their schemas, valid requests taken and invalid ones refused, ``Allow`` on 405, auth
enforced — and no 5xx. Deterministic (schemathesis's deterministic mode): the same
cases every run.

What the document cannot carry is told to the fuzzer below, each with its reason: four
operations whose schema-valid requests may still be refused 422 (state, uniqueness,
sums, a channel's own format), bodies past the byte cap, and whole numbers spelt as
integers. Nothing else is relaxed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import schemathesis

from ingress import openapi
from tests.conftest import ADMIN, ADMIN_TOKEN, CHANNEL_TOKENS, ROOT

TOKENS = {"none": None, "channel": CHANNEL_TOKENS["tmall"], "other_channel": CHANNEL_TOKENS["jd"], "admin": ADMIN_TOKEN}
MAX_EXAMPLES = 3  # random cases per operation; the coverage phase adds its boundary cases on top

# Statuses the fuzzer may see for a request its own schema-driven generator thinks valid
# (positive) or invalid (negative), on top of its defaults.
POSITIVE = '["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]'
CONFIG = f"""
# Valid by the schema, refused 422 by state or data the schema cannot carry:
[[operations]]
# a warehouse's count names a warehouse that must be configured (PUT /v1/admin/warehouses)
include-path = "/v1/admin/stock"
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = {POSITIVE}

[[operations]]
# warehouse ids unique within the list (JSON Schema's uniqueItems compares whole items)
include-path = "/v1/admin/warehouses"
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = {POSITIVE}

[[operations]]
# an order's money bounds across its fields (the goods total, paid plus coupons)
include-path = "/v1/orders"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {POSITIVE}

[[operations]]
# a channel's own payload format is its mapping file (mappings/<channel>.toml), not this document
include-path-regex = "^/v1/channels/"
checks.positive_data_acceptance.expected-statuses = {POSITIVE}
"""


# The coverage phase (every boundary and mutation of every schema) runs where a kind of token
# gets past auth; elsewhere that kind's answers are 401 / 403 before anything is read, and
# the random phase checks them.
ORDER_WRITES = "^/v1/(orders(/batch)?|channels/.*|webhooks/.*)$"
ADMIN_ONLY = "^/(v1/(admin|review|stats).*|dashboard.*)$"
SHALLOW = {"channel": ADMIN_ONLY, "admin": ORDER_WRITES}
MAX_BODY = 65_536  # ORDERQ_MAX_BODY_BYTES's default
REQUEST_TIMEOUT_S = 60  # a loaded machine is slow; a hang still fails


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """A body past ORDERQ_MAX_BODY_BYTES (e.g. 10,000 stock items, which the schema allows) is
    answered 413 unread (tests/test_ingress_api.py holds that); sent here it would only
    measure how the client's socket takes a reset in mid-send."""
    body = case.body
    if isinstance(body, (dict, list)):
        return len(msgspec.json.encode(body)) <= MAX_BODY
    return not isinstance(body, (bytes, str)) or len(body) <= MAX_BODY


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """JSON Schema 2020-12 counts ``2.0`` as an integer; msgspec (like the contract's JSON
    readers) takes an integer only as ``2``. The fuzzer spells whole numbers as integers."""
    if isinstance(case.body, (dict, list)):
        case.body = _whole_as_int(case.body)
    return case


def _whole_as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole_as_int(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_as_int(v) for k, v in value.items()}
    return value


async def test_every_route_has_its_operation(ingress):
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        doc = (await c.get("/openapi.json")).json()
        assert (await c.get("/v1/stats", headers=ADMIN)).status_code == 200
    listed = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert listed == set(openapi.OPERATIONS), "a route without its entry in ingress/openapi.py OPERATIONS"


@pytest.mark.timeout(600)
@pytest.mark.long  # ~55 s on this machine: in `make reliability`, keeping `make test` within 10 minutes
async def test_the_service_answers_as_its_document_says_to_every_kind_of_token(ingress, tmp_path: Path):
    base = await ingress()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.test_openapi_fuzz"}
    t0 = time.monotonic()
    runs = await asyncio.gather(*(_fuzz(base, tmp_path / kind, kind, env) for kind in TOKENS))
    took = time.monotonic() - t0
    failed = [f"--- {kind}: exit {rc}\n{report}" for kind, rc, report in runs if rc != 0]
    assert not failed, f"schemathesis found mismatches ({took:.0f}s):\n" + "\n".join(failed)


async def _fuzz(base: str, workdir: Path, kind: str, env: dict[str, str]) -> tuple[str, int | None, str]:
    """One schemathesis run with ``kind``'s token: (kind, exit code, the end of its report)."""
    token = TOKENS[kind]
    phases = "coverage,fuzzing" if kind in SHALLOW else "fuzzing"
    workdir.mkdir()
    config = workdir / "schemathesis.toml"
    # where this kind's token stops at auth, the random phase alone
    shallow = SHALLOW.get(kind)
    if shallow is not None:  # where this kind's token stops at auth, the random phase alone
        skip = f'[[operations]]\ninclude-path-regex = "{shallow}"\nphases.coverage.enabled = false\n'
    config.write_text(CONFIG + (skip if shallow is not None else ""), encoding="utf-8")
    # fmt: off
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(config),
        "run", f"{base}/openapi.json", "--checks", "all", "--phases", phases,
        "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--workers", "1", "--warnings", "off",
        "--request-timeout", str(REQUEST_TIMEOUT_S),
        *(["--header", f"Authorization: Bearer {token}"] if token else []),
    ]
    # fmt: on
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, cwd=config.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 540)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode == 0 and "generated" not in text:  # ran nothing: a broken document, not a pass
        return kind, -1, text[-5_000:]
    return kind, proc.returncode, text[-20_000:]
