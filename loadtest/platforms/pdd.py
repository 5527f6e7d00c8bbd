"""Pinduoduo POP: ``pdd.order.number.list.increment.get`` (``start_updated_at``/``end_updated_at``
in Unix seconds, at most 30 minutes apart, the end at least ``lag_s`` (3 minutes on the real
platform) before the platform's clock; pages from 1, 100 at most) returning whole orders with the
receiver's fields encrypted, and ``pdd.open.decrypt.batch``. Signed ``MD5(secret + sorted
key+value + secret)``; throttling is error 70031."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loadtest.platforms.base import SECRETS, Platform, SimOrder, decrypt, encrypt, form_or_query, json_response
from loadtest.platforms.taobao import beijing

MAX_WINDOW_S = 1800
ENCRYPTED = ("receiver_name", "receiver_phone", "receiver_address", "address")


def pop_sign(params: dict[str, str], secret: str) -> str:
    import hashlib

    text = "".join(f"{k}{params[k]}" for k in sorted(params) if k != "sign")
    return hashlib.md5(f"{secret}{text}{secret}".encode()).hexdigest().upper()


def error(code: int, msg: str) -> Response:
    return json_response({"error_response": {"error_code": code, "error_msg": msg, "request_id": str(time.time_ns())}})


class PddSim(Platform):
    name = "pdd"
    sample = "pdd"
    open_status = "1"
    moved_status = "2"
    closed_status = "refunded"

    def new_order(self, n: int, modified: int) -> SimOrder:
        t = self.template_copy()
        sn = f"{dt.datetime.fromtimestamp(modified, dt.UTC):%y%m%d}-{n:015d}"
        t.update(order_sn=sn, created_time=beijing(modified), confirm_time=beijing(modified))
        t["receiver_phone"] = f"136{n:08d}"
        for f in ENCRYPTED:
            t[f] = encrypt(str(t[f]), "~")
        o = SimOrder(sn, modified, 0.0, self.open_status, t)
        self.set_status(o, self.open_status, modified)
        return o

    def set_status(self, o: SimOrder, status: str, modified: int) -> None:
        o.status, o.modified = status, modified
        if status == "refunded":
            o.payload["refund_status"] = 4
        else:
            o.payload["order_status"] = int(status)
        o.payload["updated_at"] = beijing(modified)

    def routes(self) -> list[Route]:
        return [Route("/api/router", self.router, methods=["POST"])]

    async def router(self, request: Request) -> Response:
        p = await form_or_query(request)
        fault = self.gate()
        if fault == "5xx":
            return Response("service unavailable", status_code=503)
        if fault == "throttle":
            return error(70031, "调用过于频繁, 请调整调用频率")
        if p.get("client_id") != SECRETS["client_id"]:
            return error(10016, "client_id不存在")
        if p.get("sign") != pop_sign(p, SECRETS["client_secret"]):
            return error(10019, "签名错误")
        if p.get("access_token") != SECRETS["access_token"]:
            return error(10019, "access_token已过期")
        if p.get("type") == "pdd.order.number.list.increment.get":
            return self.increment(p)
        if p.get("type") == "pdd.open.decrypt.batch":
            items = json.loads(p.get("data_list", "[]"))
            if len(items) > 100:
                return error(50001, "data_list 最多 100 条")
            out = [
                {**d, "decrypted_data": decrypt(d["encrypted_data"], "~"), "error_code": 0, "data_type": 0}
                for d in items
            ]
            return json_response({"open_decrypt_batch_response": {"data_decrypt_list": out}})
        return error(10001, "接口不存在")

    def increment(self, p: dict[str, str]) -> Response:
        try:
            start, end = int(p["start_updated_at"]), int(p["end_updated_at"])
            page, size = int(p.get("page", "1")), int(p.get("page_size", "100"))
        except (KeyError, ValueError) as exc:
            return error(50001, f"业务参数错误: {exc}")
        if not 0 <= end - start <= MAX_WINDOW_S:
            return error(50001, "业务参数错误: 开始时间与结束时间间隔不能超过 30 分钟")
        if end > time.time() - self.lag_s:
            return error(50001, f"业务参数错误: end_updated_at 须早于系统时间 {self.lag_s:g} 秒")
        if not 1 <= size <= 100 or page < 1:
            return error(50001, "业务参数错误: page_size 1..100")
        listed = self.window(start, end, desc=False)
        self.stats.pages += 1
        chunk: list[dict[str, Any]] = [o.payload for o in listed[(page - 1) * size : page * size]]
        body = {"total_count": len(listed), "has_next": page * size < len(listed), "order_sn_list": chunk}
        answer = json_response({"order_sn_increment_get_response": body})
        self.after_page(listed)  # after the answer is rendered: the next page sees the change
        return answer
