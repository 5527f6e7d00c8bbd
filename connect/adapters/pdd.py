"""Pinduoduo: ``pdd.order.number.list.increment.get`` lists the orders updated in a window of at
most 30 minutes, whose end must lag Pinduoduo's clock by 3 minutes, read from its last page back
(both as Pinduoduo's documentation asks, to miss no order). The list carries each order whole,
with the receiver's fields encrypted: ``pdd.open.decrypt.batch`` decrypts them, 100 at a time.
Requests are signed ``MD5(secret + sorted key+value + secret)``; frequency limits and system
busy are retried, the rest given up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from typing import Any

from connect.adapters.base import Adapter, Fetched, beijing_ms, give_up_or_retry, obj
from connect.errors import Retry
from connect.http import call, json_of

ENCRYPTED = ("receiver_name", "receiver_phone", "receiver_address", "address")
DECRYPT_BATCH = 100
# 70031 call frequency limited, 70032 app limited, 52101 system busy, 52102/52103 timeouts
RETRY_CODES = frozenset({"70031", "70032", "70033", "52101", "52102", "52103", "50000"})


def sign(params: dict[str, str], secret: str) -> str:
    text = "".join(f"{k}{params[k]}" for k in sorted(params) if k != "sign")
    return hashlib.md5(f"{secret}{text}{secret}".encode()).hexdigest().upper()


class Pdd(Adapter):
    platform = "pdd"
    url = "https://gw-api.pinduoduo.com/api/router"
    max_window_s = 1800.0
    window_s = 1800.0
    lag_s = 180.0
    credentials = ("client_id", "client_secret", "access_token")
    # order_status 1 waiting to ship, 2 shipped, 3 received; refund_status 4 refunded
    open_statuses = frozenset({"1", "2", "3"})

    async def _pop(self, method: str, **biz: Any) -> dict[str, Any]:
        params = {
            "type": method,
            "client_id": self.secrets["client_id"],
            "access_token": self.secrets["access_token"],
            "timestamp": str(int(time.time())),
            "data_type": "JSON",
            **{k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in biz.items()},
        }
        params["sign"] = sign(params, self.secrets["client_secret"])
        doc = json_of(await call(self.http, "POST", self.endpoint, data=params))
        err = doc.get("error_response")
        if err is not None:
            code = str(err.get("error_code", ""))
            raise give_up_or_retry(code, f"{method}: {code} {err.get('error_msg', '')}", RETRY_CODES)
        return obj(doc)

    def kind_of_order(self, o: dict[str, Any]) -> tuple[str, str]:
        status = str(o.get("order_status"))
        if str(o.get("refund_status")) == "4":
            return "refunded", "closed"
        return status, self.kind_of(status)

    async def _page(self, start: dt.datetime, end: dt.datetime, page: int) -> tuple[list[dict[str, Any]], int]:
        async def one() -> dict[str, Any]:
            return await self._pop(
                "pdd.order.number.list.increment.get",
                is_lucky_flag="0",
                order_status="5",
                refund_status="5",
                start_updated_at=str(int(start.timestamp())),
                end_updated_at=str(int(end.timestamp())),
                page=str(page),
                page_size=str(self.size),
                use_has_next="false",
            )

        r = (await self.call("order.number.list.increment.get", one))["order_sn_increment_get_response"]
        return r.get("order_sn_list", []), int(r.get("total_count", 0))

    async def _decrypt(self, orders: list[dict[str, Any]]) -> None:
        wanted = [(o, f) for o in orders for f in ENCRYPTED if isinstance(o.get(f), str) and o[f].startswith("~")]
        for i in range(0, len(wanted), DECRYPT_BATCH):
            part = wanted[i : i + DECRYPT_BATCH]
            data = [{"data_tag": o["order_sn"], "encrypted_data": o[f]} for o, f in part]

            async def one(data: list[dict[str, str]] = data) -> dict[str, Any]:
                return await self._pop("pdd.open.decrypt.batch", data_list=data)

            r = (await self.call("open.decrypt.batch", one))["open_decrypt_batch_response"]
            plain = {(d["data_tag"], d["encrypted_data"]): d for d in r["data_decrypt_list"]}
            for o, f in part:
                d = plain.get((o["order_sn"], o[f]))
                if d is None or int(d.get("error_code", 0)) != 0:
                    raise Retry(f"pdd.open.decrypt.batch: {o['order_sn']}.{f} not decrypted", "decrypt")
                o[f] = d["decrypted_data"]

    async def read(self, start: dt.datetime, end: dt.datetime) -> list[Fetched]:
        listed = await self.paged_from_last(lambda p: self._page(start, end, p), 1, lambda o: o["order_sn"])
        out = []
        for o in listed:
            status, kind = self.kind_of_order(o)
            out.append(Fetched(o["order_sn"], status, kind, beijing_ms(o["updated_at"]), o))
        await self._decrypt([f.payload for f in out if f.kind == "open"])
        return out
