"""Douyin (Doudian open platform): ``order.searchList`` lists the orders by ``update_time``
(newest first, pages from 0, read from the last back), then ``order.orderDetail`` gives each
open order whole, and ``order.batchDecrypt`` turns its encrypted receiver fields (name, phone,
address) into text, 50 at a time. Requests are signed with HMAC-SHA256 over the method, the
sorted ``param_json``, the timestamp and the version; errors come in a 200 (``code`` other than
10000, with ``sub_code``): throttling and service faults are retried, the rest given up
(``RETRY_CODES``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from typing import Any

from connect.adapters.base import Adapter, Fetched, gather_limited, give_up_or_retry
from connect.adapters.base import obj as json_object
from connect.errors import Retry
from connect.http import call, json_of

DECRYPT_BATCH = 50
# Doudian open platform error codes ("平台基础错误码汇总", op.jinritemai.com guide docs): 20000 服务不
# 可用 (isp.service-error:…, e.g. order.searchList's 20004/20005 系统繁忙，请稍后重试), 20001 内部服务
# 超时 and 60000 触发限流，请稍后重试 are retried. Every other code is given up on: 30001 操作权限不足,
# 30002 IP 不在白名单, 40001-40004 missing or invalid parameters (40003: isv.signature-invalid,
# isv.access-token-expired …), 50001 平台处理失败, 50002 业务处理失败 (isv.business-failed:…, a
# business refusal, not a busy server), 70000 接口服务已下线, 80000 安全错误, 90000 其他异常.
RETRY_CODES = frozenset({"20000", "20001", "60000"})


def param_json(params: dict[str, Any]) -> str:
    return json.dumps(params, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def sign(app_key: str, secret: str, method: str, pj: str, timestamp: str, v: str = "2") -> str:
    text = f"{secret}app_key{app_key}method{method}param_json{pj}timestamp{timestamp}v{v}{secret}"
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def cipher_fields(o: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(object, field) of the receiver's encrypted fields still holding cipher text (``#…#``)."""
    out = [(o, f) for f in ("post_receiver", "post_tel")]
    addr = o.get("post_addr")
    if isinstance(addr, dict):
        out.append((addr, "detail"))
    return [(obj, f) for obj, f in out if isinstance(obj.get(f), str) and obj[f].startswith("#")]


class Douyin(Adapter):
    platform = "douyin"
    url = "https://openapi-fxg.jinritemai.com"
    max_window_s = 24 * 3600.0
    window_s = 1800.0
    credentials = ("app_key", "app_secret", "access_token")
    # order_status: 1 unpaid, 2 paid (to ship), 3 shipped, 4 cancelled, 5 completed
    open_statuses = frozenset({"2", "3", "5", "101", "105"})
    closed_statuses = frozenset({"4"})

    async def _api(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        pj = param_json(params)
        ts = str(int(time.time()))
        query = {
            "app_key": self.secrets["app_key"],
            "method": method,
            "v": "2",
            "timestamp": ts,
            "access_token": self.secrets["access_token"],
            "sign_method": "hmac-sha256",
            "sign": sign(self.secrets["app_key"], self.secrets["app_secret"], method, pj, ts),
        }
        url = f"{self.endpoint}/{method.replace('.', '/')}"
        resp = await call(
            self.http, "POST", url, params=query, content=pj, headers={"Content-Type": "application/json"}
        )
        doc = json_of(resp)
        code = str(doc.get("code", "10000"))
        if doc.get("err_no", 0) != 0 or code != "10000":
            msg = doc.get("msg") or doc.get("message", "")
            reason = f"{method}: {code} {msg} {doc.get('sub_code', '')} {doc.get('sub_msg', '')}".rstrip()
            raise give_up_or_retry(code, reason, RETRY_CODES)
        return json_object(doc.get("data"))

    async def _page(self, start: dt.datetime, end: dt.datetime, page: int) -> tuple[list[dict[str, Any]], int]:
        params = {
            "update_time_start": int(start.timestamp()),
            "update_time_end": int(end.timestamp()),
            "order_by": "update_time",
            "order_asc": False,
            "page": page,
            "size": self.size,
        }
        d = await self.call("order.searchList", lambda: self._api("order.searchList", params))
        return d.get("shop_order_list", []), int(d.get("total", 0))

    async def _detail(self, order_id: str) -> dict[str, Any]:
        d = await self.call("order.orderDetail", lambda: self._api("order.orderDetail", {"shop_order_id": order_id}))
        return json_object(d.get("shop_order_detail"))

    async def _decrypt(self, orders: list[dict[str, Any]]) -> None:
        wanted = [(o["order_id"], obj, f) for o in orders for obj, f in cipher_fields(o)]
        for i in range(0, len(wanted), DECRYPT_BATCH):
            part = wanted[i : i + DECRYPT_BATCH]
            infos = [{"auth_id": oid, "cipher_text": obj[f]} for oid, obj, f in part]

            async def one(infos: list[dict[str, Any]] = infos) -> dict[str, Any]:
                return await self._api("order.batchDecrypt", {"cipher_infos": infos})

            d = await self.call("order.batchDecrypt", one)
            plain = {(x["auth_id"], x["cipher_text"]): x for x in d.get("decrypt_infos", [])}
            for oid, obj, f in part:
                x = plain.get((oid, obj[f]))
                if x is None or int(x.get("err_no", 0)) != 0:
                    raise Retry(f"order.batchDecrypt: {oid}.{f} not decrypted", "decrypt")
                obj[f] = x["decrypt_text"]

    async def read(self, start: dt.datetime, end: dt.datetime) -> list[Fetched]:
        listed = await self.paged_from_last(lambda p: self._page(start, end, p), 0, lambda o: str(o["order_id"]))
        out = []
        for o in listed:
            status = str(o["order_status"])
            out.append(Fetched(str(o["order_id"]), status, self.kind_of(status), int(o["update_time"]) * 1000, o))
        wanted = [f for f in out if f.kind == "open" and self.fresh(f)]
        details = await gather_limited(self.DETAIL_IN_FLIGHT, [self._detail(f.order_id) for f in wanted])
        for f, detail in zip(wanted, details, strict=True):
            f.payload = detail
            f.status = str(detail["order_status"])
            f.kind = self.kind_of(f.status)
        await self._decrypt([f.payload for f in wanted if f.kind == "open"])
        return out
