"""Douyin (Doudian): ``/order/searchList`` (``update_time_start``/``update_time_end`` in Unix
seconds, at most a day here; ``page`` from 0, ``size`` 100 at most; newest first), ``/order/
orderDetail`` and ``/order/batchDecrypt`` (50 at most), each ``POST`` with the business
parameters as the JSON body and the method, app key, timestamp and an HMAC-SHA256 signature in
the query. Receiver fields come encrypted (``#…#``); errors are the platform's ``code`` and
``sub_code`` in a 200 answer (connect/adapters/douyin.py: RETRY_CODES), throttling ``code`` 60000."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loadtest.platforms.base import SECRETS, Platform, SimOrder, decrypt, encrypt, json_response

MAX_WINDOW_S = 24 * 3600


def dy_sign(q: dict[str, str], body: str, secret: str) -> str:
    signed = (
        f"app_key{q.get('app_key')}method{q.get('method')}param_json{body}timestamp{q.get('timestamp')}v{q.get('v')}"
    )
    text = f"{secret}{signed}{secret}"
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def answer(
    data: Any = None, code: int = 10000, msg: str = "success", sub_code: str = "", sub_msg: str = ""
) -> Response:
    err = 0 if code == 10000 else code
    doc = {"code": code, "err_no": err, "msg": msg, "message": msg, "sub_code": sub_code, "sub_msg": sub_msg}
    return json_response({**doc, "data": data or {}})


def invalid(sub_msg: str) -> Response:
    """A business parameter the platform refuses (order.searchList's isv.parameter-invalid codes)."""
    return answer(code=40004, msg="非法的参数", sub_code="isv.parameter-invalid", sub_msg=sub_msg)


class DouyinSim(Platform):
    name = "douyin"
    sample = "douyin"
    open_status = "2"
    moved_status = "3"
    closed_status = "4"

    def new_order(self, n: int, modified: int) -> SimOrder:
        t = self.template_copy()
        oid = str(6_930_000_000_000_000_000 + n)
        t.update(order_id=oid, create_time=modified, pay_time=modified)
        t["doudian_open_id"] = f"1@#sim{n}=="
        t["post_receiver"] = encrypt(t["post_receiver"], "#")
        t["post_tel"] = encrypt(f"137{n:08d}", "#")
        if isinstance(t.get("post_addr"), dict) and "detail" in t["post_addr"]:
            t["post_addr"]["detail"] = encrypt(t["post_addr"]["detail"], "#")
        o = SimOrder(oid, modified, 0.0, self.open_status, t)
        self.set_status(o, self.open_status, modified)
        return o

    def set_status(self, o: SimOrder, status: str, modified: int) -> None:
        o.status, o.modified = status, modified
        o.payload["order_status"], o.payload["update_time"] = int(status), modified

    def routes(self) -> list[Route]:
        return [Route("/order/{name}", self.router, methods=["POST"])]

    async def router(self, request: Request) -> Response:
        q = dict(request.query_params)
        body = (await request.body()).decode()
        fault = self.gate()
        if fault == "5xx":
            return Response("internal error", status_code=500)
        if fault == "throttle":
            return answer(code=60000, msg="触发限流，请稍后重试")
        if q.get("app_key") != SECRETS["app_key"]:
            return answer(
                code=40003, msg="非法的参数", sub_code="isv.app-id-invalid", sub_msg="认证失败，app_key格式不正确"
            )
        if q.get("sign") != dy_sign(q, body, SECRETS["app_secret"]):
            return answer(code=40003, msg="非法的参数", sub_code="isv.signature-invalid", sub_msg="签名校验失败")
        if q.get("access_token") != SECRETS["access_token"]:
            return answer(
                code=40003, msg="非法的参数", sub_code="isv.access-token-expired", sub_msg="access_token已过期"
            )
        try:
            params = json.loads(body or "{}")
        except ValueError:
            return answer(
                code=40003, msg="非法的参数", sub_code="isv.parameter-format-invalid", sub_msg="业务参数json解析失败"
            )
        method = q.get("method")
        if method == "order.searchList" and request.path_params["name"] == "searchList":
            return self.search(params)
        if method == "order.orderDetail":
            o = self.orders.get(str(params.get("shop_order_id")))
            if o is None:
                return invalid("订单不存在")
            return answer({"shop_order_detail": o.payload})
        if method == "order.batchDecrypt":
            infos = params.get("cipher_infos", [])
            if len(infos) > 50:
                return invalid("cipher_infos 最多 50 条")
            out = [{**c, "decrypt_text": decrypt(c["cipher_text"], "#"), "err_no": 0, "err_msg": ""} for c in infos]
            return answer({"decrypt_infos": out, "custom_err": {"err_code": 0, "err_msg": ""}})
        return answer(code=70000, msg="接口服务已下线", sub_code="isp.api-service-off", sub_msg="API不存在或API已下线")

    def search(self, params: dict[str, Any]) -> Response:
        try:
            start, end = int(params["update_time_start"]), int(params["update_time_end"])
            page, size = int(params.get("page", 0)), int(params.get("size", 10))
        except (KeyError, ValueError, TypeError) as exc:
            return invalid(f"参数错误: {exc}")
        if not 0 <= end - start <= MAX_WINDOW_S:
            return invalid("更新时间跨度不超过一天")
        if not 1 <= size <= 100 or page < 0:
            return invalid("单页最大支持100，页码从0开始")
        listed = self.window(start, end, desc=not params.get("order_asc", False))
        self.stats.pages += 1
        chunk = []
        for o in listed[page * size : (page + 1) * size]:  # the list keeps the receiver encrypted, like the detail
            chunk.append(o.payload)
        out = answer({"shop_order_list": chunk, "page": page, "size": size, "total": len(listed)})
        self.after_page(listed)
        return out
