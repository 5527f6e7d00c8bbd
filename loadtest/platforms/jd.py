"""JD JOS: ``jingdong.pop.order.search`` on one router URL, business parameters in
``360buy_param_json`` (``start_date``/``end_date`` in Beijing time, ``dateType`` 1 for the
modification time, at most a day here; pages from 1, 100 at most), signed ``MD5(secret + sorted
key+value + secret)``; throttling is JOS code 19, in a 200 answer."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loadtest.platforms.base import SECRETS, Platform, SimOrder, form_or_query, json_response
from loadtest.platforms.pdd import pop_sign
from loadtest.platforms.taobao import beijing, parse_beijing

MAX_WINDOW_S = 24 * 3600


def error(code: int, zh: str, en: str = "") -> Response:
    return json_response({"error_response": {"code": str(code), "zh_desc": zh, "en_desc": en or zh}})


class JdSim(Platform):
    name = "jd"
    sample = "jd"
    open_status = "WAIT_SELLER_STOCK_OUT"
    moved_status = "WAIT_GOODS_RECEIVE_CONFIRM"
    closed_status = "TRADE_CANCELED"

    def new_order(self, n: int, modified: int) -> SimOrder:
        t = self.template_copy()
        oid = 290_000_000_000 + n
        t.update(orderId=oid, orderStartTime=beijing(modified), paymentConfirmTime=beijing(modified))
        t["pin"] = f"jd_sim_{n}"
        o = SimOrder(str(oid), modified, 0.0, self.open_status, t)
        self.set_status(o, self.open_status, modified)
        return o

    def set_status(self, o: SimOrder, status: str, modified: int) -> None:
        o.status, o.modified = status, modified
        o.payload["orderState"], o.payload["modified"] = status, beijing(modified)

    def routes(self) -> list[Route]:
        return [Route("/routerjson", self.router, methods=["POST"])]

    async def router(self, request: Request) -> Response:
        p = await form_or_query(request)
        fault = self.gate()
        if fault == "5xx":
            return Response("bad gateway", status_code=502)
        if fault == "throttle":
            return error(2, "限制时间内调用失败次数", "App Call Limited")
        if p.get("app_key") != SECRETS["app_key"]:
            return error(21, "无效app_key", "Invalid app_key")
        if p.get("sign") != pop_sign(p, SECRETS["app_secret"]):
            return error(12, "无效签名", "Invalid Signature")
        if p.get("access_token") != SECRETS["access_token"]:
            return error(19, "无效access_token", "Invalid access_token")
        if p.get("method") != "jingdong.pop.order.search":
            return error(15, "不存在的方法名", "Invalid Method")
        try:
            biz = json.loads(p["360buy_param_json"])
            start, end = parse_beijing(biz["start_date"]), parse_beijing(biz["end_date"])
            page, size = int(biz.get("page", "1")), int(biz.get("page_size", "20"))
        except (KeyError, ValueError) as exc:
            return error(61, f"参数值不合法: {exc}")
        if not 0 <= end - start <= MAX_WINDOW_S or str(biz.get("dateType")) != "1":
            return error(61, "参数值不合法: 按修改时间查询 (dateType=1), 时间跨度不超过一天")
        if not 1 <= size <= 100 or page < 1:
            return error(61, "参数值不合法: page_size 1..100")
        states = set(str(biz.get("order_state", "")).split(","))
        listed = [o for o in self.window(start, end, desc=True) if o.status in states]
        self.stats.pages += 1
        chunk: list[dict[str, Any]] = [o.payload for o in listed[(page - 1) * size : page * size]]
        result = {"orderInfoList": chunk, "orderTotal": len(listed)}
        answer = json_response({"jingdong_pop_order_search_responce": {"code": "0", "searchorderinfo_result": result}})
        self.after_page(listed)  # after the answer is rendered: the next page sees the change
        return answer
