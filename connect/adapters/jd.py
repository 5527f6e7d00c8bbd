"""JD (JOS): ``jingdong.pop.order.search`` lists the orders modified in a window (``date_type``
1: modification time; at most a day here), 100 a page, read from the last page back. The list
carries each order whole (``optional_fields``). Requests carry their business parameters as
``360buy_param_json`` and are signed ``MD5(secret + sorted key+value + secret)``; JOS answers
errors inside a 200 (``error_response`` with a ``code``): throttling and the gateway's backend
faults are retried, the rest given up (``RETRY_CODES``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from connect.adapters.base import Adapter, Fetched, beijing, beijing_ms, give_up_or_retry, obj
from connect.http import call, json_of

OPTIONAL_FIELDS = (
    "orderId,venderId,orderType,payType,orderTotalPrice,orderSellerPrice,orderPayment,freightPrice,sellerDiscount,"
    "orderState,orderStateRemark,orderRemark,venderRemark,orderStartTime,paymentConfirmTime,modified,pin,"
    "open_id_buyer,consigneeInfo,itemInfoList,couponDetailList"
)
ORDER_STATES = "WAIT_SELLER_STOCK_OUT,WAIT_GOODS_RECEIVE_CONFIRM,FINISHED_L,TRADE_CANCELED,LOCKED"
# JOS gateway error codes (jos.jd.com, "网关系统错误码"): 1 服务不可用, 2 App Call Limited (the
# app's calls over its limit for the period: throttled), 65 平台连接后端服务超时, 66 平台连接后端服务
# 不可用, 67 平台连接后端服务处理过程中出现未知异常信息 are retried. Every other code is given up
# on: e.g. 12 无效签名, 19 无效access_token (an expired or revoked token, never a throttle),
# 21 无效app_key, 24 无权调用API, 61 参数值不合法.
RETRY_CODES = frozenset({"1", "2", "65", "66", "67"})


def sign(params: dict[str, str], secret: str) -> str:
    text = "".join(f"{k}{params[k]}" for k in sorted(params) if k != "sign")
    return hashlib.md5(f"{secret}{text}{secret}".encode()).hexdigest().upper()


class Jd(Adapter):
    platform = "jd"
    url = "https://api.jd.com/routerjson"
    max_window_s = 24 * 3600.0
    window_s = 1800.0
    credentials = ("app_key", "app_secret", "access_token")
    open_statuses = frozenset({"WAIT_SELLER_STOCK_OUT", "WAIT_GOODS_RECEIVE_CONFIRM", "FINISHED_L"})
    closed_statuses = frozenset({"TRADE_CANCELED", "LOCKED"})

    async def _page(self, start: dt.datetime, end: dt.datetime, page: int) -> tuple[list[dict[str, Any]], int]:
        biz = {
            "start_date": beijing(start),
            "end_date": beijing(end),
            "order_state": ORDER_STATES,
            "optional_fields": OPTIONAL_FIELDS,
            "page": str(page),
            "page_size": str(self.size),
            "dateType": "1",
            "sortType": "1",
        }

        async def one() -> dict[str, Any]:
            params = {
                "method": "jingdong.pop.order.search",
                "app_key": self.secrets["app_key"],
                "access_token": self.secrets["access_token"],
                "timestamp": beijing(dt.datetime.now(dt.UTC)),
                "v": "2.0",
                "sign_method": "md5",
                "360buy_param_json": json.dumps(biz, ensure_ascii=False, separators=(",", ":")),
            }
            params["sign"] = sign(params, self.secrets["app_secret"])  # a fresh timestamp on each try
            doc = json_of(await call(self.http, "POST", self.endpoint, data=params))
            err = doc.get("error_response")
            if err is not None:
                code = str(err.get("code", ""))
                raise give_up_or_retry(code, f"jingdong.pop.order.search: {code} {err.get('zh_desc', '')}", RETRY_CODES)
            return obj(obj(doc.get("jingdong_pop_order_search_responce")).get("searchorderinfo_result"))

        r = await self.call("pop.order.search", one)
        return r.get("orderInfoList", []), int(r.get("orderTotal", 0))

    async def read(self, start: dt.datetime, end: dt.datetime) -> list[Fetched]:
        listed = await self.paged_from_last(lambda p: self._page(start, end, p), 1, lambda o: str(o["orderId"]))
        return [
            Fetched(str(o["orderId"]), o["orderState"], self.kind_of(o["orderState"]), beijing_ms(o["modified"]), o)
            for o in listed
        ]
