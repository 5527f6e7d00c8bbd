"""Risk signals that need only the order itself, the weights table, and the duplicate
fingerprint. The windows that need history (IP burst, duplicates) are counted in the
ledger script (orderq/lua/checks.lua); their weights live here too.
"""

from __future__ import annotations

import re
import unicodedata
from hashlib import blake2b

from orderq.schema import Order, cents

# Every risk signal's weight, in one table. An order whose total reaches
# ORDERQ_RISK_REVIEW_SCORE (80) goes to review. One signal alone sends an order to
# review only when it is a strong one on its own (half price: the 2 a.m. mis-pricing);
# the weaker ones need company (virtual phone + IP burst = 90; IP burst + pickup = 80).
WEIGHTS: dict[str, int] = {
    "risk_virtual_phone": 40,
    "risk_ip_burst": 50,
    "risk_pickup_point_address": 30,
    "risk_price_anomaly": 80,
}

VIRTUAL_PREFIXES = ("162", "165", "167", "170", "171")  # virtual carriers (MVNO number ranges)
PICKUP_WORDS = ("代收点", "驿站", "自提")
# A door or room number: "1201室", "5-1201", "5幢1201", "2单元302", or an address ending
# in a 3-4 digit number. A street number ("328号") alone does not say which door.
_DOOR = re.compile(r"\d+\s*(?:室|房|户)|\d+\s*[-－—–]\s*\d+|(?:栋|幢|座|单元|楼)\s*\d{2,}|\d{3,}\s*$")
_NOT_DIGIT = re.compile(r"\D")


def phone_digits(phone: str | None) -> str:
    """Digits of a phone number without the +86 / 0086 country code."""
    if not phone:
        return ""
    # (isdecimal: exactly the characters \d matches; most numbers need no substitution)
    d = phone if phone.isdecimal() else _NOT_DIGIT.sub("", phone)
    if len(d) > 11:
        for cc in ("0086", "86"):
            if d.startswith(cc):
                return d[len(cc) :]
    return d


def virtual_phone(order: Order) -> bool:
    ship, own = order.ship_to.phone, order.customer.phone
    if phone_digits(ship).startswith(VIRTUAL_PREFIXES):
        return True
    return bool(own) and own != ship and phone_digits(own).startswith(VIRTUAL_PREFIXES)


def pickup_point_address(order: Order) -> bool:
    """An address naming a pickup point with no door/room number."""
    addr = order.ship_to.address
    return any(w in addr for w in PICKUP_WORDS) and not _DOOR.search(unicodedata.normalize("NFKC", addr))


def price_anomaly(order: Order) -> bool:
    """A line paid under half its unit price."""
    for line in order.lines:
        if line.unit_price and line.paid_price and 2 * cents(line.paid_price) < cents(line.unit_price):
            return True
    return False


def assess(order: Order) -> tuple[int, list[str]]:
    """Score and reasons of the signals the order alone shows."""
    reasons = []
    if virtual_phone(order):
        reasons.append("risk_virtual_phone")
    if pickup_point_address(order):
        reasons.append("risk_pickup_point_address")
    if price_anomaly(order):
        reasons.append("risk_price_anomaly")
    return sum(WEIGHTS[r] for r in reasons), reasons


def fingerprint(order: Order, lines: dict[str, int]) -> str:
    """Recipient (name, phone, address), items and amount: equal for the same buyer's
    order arriving twice, whatever its key, channel or spacing of the address."""
    st = order.ship_to
    address = "".join(unicodedata.normalize("NFKC", st.address).split()).lower()  # (split: what \s matches)
    if len(lines) == 1:  # (most orders: no sort, no generator)
        ((sku, qty),) = lines.items()
        items = f"{sku}*{qty}"
    else:
        items = ",".join([f"{sku}*{qty}" for sku, qty in sorted(lines.items())])
    raw = f"{st.name.strip()}\x1f{phone_digits(st.phone)}\x1f{address}\x1f{items}\x1f{cents(order.paid_amount)}"
    return blake2b(raw.encode(), digest_size=12).hexdigest()
