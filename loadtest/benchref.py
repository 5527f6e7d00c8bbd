"""The reference endpoint ``orderq bench --reference`` measures orderq against.

The naive design orderq must beat: a bare Starlette app on uvicorn (uvloop, httptools,
one worker) that decodes an order with msgspec and XADDs it to one stream, one round
trip per request; the batch route XADDs all its orders in one pipeline. No auth, no
dedup, no status record, no priority: the floor of what "accept an order" costs on
this stack. Run it as ``python -m loadtest.benchref --port P --redis-url URL --stream KEY``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orderq.schema import batch_decoder, json_encoder, order_decoder


def _json(content: Any, status: int) -> Response:
    return Response(json_encoder.encode(content), status, media_type="application/json")


def build_app(redis_url: str, stream: str) -> Starlette:
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["r"] = aioredis.from_url(redis_url, decode_responses=False, health_check_interval=0)
        try:
            yield
        finally:
            await state["r"].aclose()

    async def post_order(request: Request) -> Response:
        body = await request.body()
        try:
            order = order_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _json({"error": {"code": "invalid_order", "message": str(exc), "details": []}}, 422)
        key = order.key
        await state["r"].xadd(stream, {"k": key, "d": body})
        return _json({"order_key": key, "status": "accepted", "duplicate": False, "stage": "normal"}, 202)

    async def post_batch(request: Request) -> Response:
        body = await request.body()
        try:
            batch = batch_decoder.decode(body)
            orders = [(order_decoder.decode(raw), raw) for raw in batch.orders]
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _json({"error": {"code": "invalid_batch", "message": str(exc), "details": []}}, 422)
        pipe = state["r"].pipeline(transaction=False)
        for order, raw in orders:
            pipe.xadd(stream, {"k": order.key, "d": bytes(raw)})
        await pipe.execute()
        results = [{"order_key": o.key, "status": "accepted", "error": None} for o, _ in orders]
        return _json({"results": results, "accepted": len(orders), "duplicates": 0, "invalid": 0, "shed": 0}, 202)

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"}, 200)

    routes = [
        Route("/v1/orders", post_order, methods=["POST"]),
        Route("/v1/orders/batch", post_batch, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m loadtest.benchref", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--stream", required=True, help="stream key the orders are XADDed to")
    args = ap.parse_args(argv)
    uvicorn.run(
        build_app(args.redis_url, args.stream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        backlog=2048,
    )


if __name__ == "__main__":
    main()
