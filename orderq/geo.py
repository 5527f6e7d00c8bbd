"""Where an address is, roughly: a small gazetteer of Chinese provinces and big cities, and
straight-line distance. Orders carry province and city names, not coordinates; routing
needs only "which warehouse is nearest", so a city's centre (else its province capital's)
is close enough. Names match with or without their suffix (江苏省 = 江苏 = Jiangsu).
"""

from __future__ import annotations

import math

EARTH_KM = 6371.0

# province -> (latitude, longitude) of its capital; each name in Chinese and pinyin
PROVINCES: dict[str, tuple[float, float]] = {
    "北京|beijing": (39.904, 116.407),
    "天津|tianjin": (39.084, 117.201),
    "上海|shanghai": (31.230, 121.474),
    "重庆|chongqing": (29.563, 106.551),
    "河北|hebei": (38.042, 114.515),
    "山西|shanxi": (37.871, 112.549),
    "辽宁|liaoning": (41.805, 123.431),
    "吉林|jilin": (43.817, 125.324),
    "黑龙江|heilongjiang": (45.803, 126.535),
    "江苏|jiangsu": (32.060, 118.797),
    "浙江|zhejiang": (30.274, 120.155),
    "安徽|anhui": (31.821, 117.227),
    "福建|fujian": (26.075, 119.296),
    "江西|jiangxi": (28.682, 115.858),
    "山东|shandong": (36.651, 117.120),
    "河南|henan": (34.746, 113.625),
    "湖北|hubei": (30.593, 114.305),
    "湖南|hunan": (28.228, 112.939),
    "广东|guangdong": (23.129, 113.264),
    "海南|hainan": (20.044, 110.199),
    "四川|sichuan": (30.573, 104.066),
    "贵州|guizhou": (26.647, 106.630),
    "云南|yunnan": (25.038, 102.718),
    "陕西|shaanxi": (34.341, 108.940),
    "甘肃|gansu": (36.061, 103.834),
    "青海|qinghai": (36.617, 101.778),
    "台湾|taiwan": (25.033, 121.565),
    "内蒙古|neimenggu|inner mongolia": (40.842, 111.749),
    "广西|guangxi": (22.817, 108.367),
    "西藏|xizang|tibet": (29.652, 91.172),
    "宁夏|ningxia": (38.487, 106.231),
    "新疆|xinjiang": (43.825, 87.617),
    "香港|hong kong|xianggang": (22.319, 114.169),
    "澳门|macau|macao|aomen": (22.199, 113.544),
}

CITIES: dict[str, tuple[float, float]] = {
    "苏州|suzhou": (31.299, 120.585),
    "无锡|wuxi": (31.491, 120.312),
    "常州|changzhou": (31.811, 119.974),
    "南通|nantong": (31.980, 120.894),
    "徐州|xuzhou": (34.205, 117.284),
    "南京|nanjing": (32.060, 118.797),
    "杭州|hangzhou": (30.274, 120.155),
    "宁波|ningbo": (29.868, 121.544),
    "温州|wenzhou": (27.994, 120.699),
    "嘉兴|jiaxing": (30.746, 120.756),
    "义乌|yiwu": (29.306, 120.075),
    "合肥|hefei": (31.821, 117.227),
    "广州|guangzhou": (23.129, 113.264),
    "深圳|shenzhen": (22.543, 114.058),
    "东莞|dongguan": (23.021, 113.752),
    "佛山|foshan": (23.022, 113.122),
    "珠海|zhuhai": (22.271, 113.577),
    "厦门|xiamen": (24.480, 118.089),
    "福州|fuzhou": (26.075, 119.296),
    "济南|jinan": (36.651, 117.120),
    "青岛|qingdao": (36.067, 120.383),
    "郑州|zhengzhou": (34.746, 113.625),
    "武汉|wuhan": (30.593, 114.305),
    "长沙|changsha": (28.228, 112.939),
    "成都|chengdu": (30.573, 104.066),
    "西安|xi'an|xian": (34.341, 108.940),
    "沈阳|shenyang": (41.805, 123.431),
    "大连|dalian": (38.914, 121.615),
    "哈尔滨|harbin|haerbin": (45.803, 126.535),
    "长春|changchun": (43.817, 125.324),
    "石家庄|shijiazhuang": (38.042, 114.515),
    "太原|taiyuan": (37.871, 112.549),
    "昆明|kunming": (25.038, 102.718),
    "贵阳|guiyang": (26.647, 106.630),
    "南宁|nanning": (22.817, 108.367),
    "南昌|nanchang": (28.682, 115.858),
    "兰州|lanzhou": (36.061, 103.834),
    "西宁|xining": (36.617, 101.778),
    "银川|yinchuan": (38.487, 106.231),
    "呼和浩特|hohhot|huhehaote": (40.842, 111.749),
    "乌鲁木齐|urumqi|wulumuqi": (43.825, 87.617),
    "喀什|kashgar|kashi": (39.470, 75.990),
    "拉萨|lhasa|lasa": (29.652, 91.172),
    "海口|haikou": (20.044, 110.199),
    "三亚|sanya": (18.253, 109.512),
}

# administrative suffixes dropped before a name is looked up (longest first)
SUFFIXES = (
    "维吾尔自治区",
    "壮族自治区",
    "回族自治区",
    "特别行政区",
    "自治区",
    "自治州",
    "省",
    "市",
    "地区",
    "盟",
    " province",
    " city",
    " shi",
    " sheng",
)


def _index(table: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    return {name: at for names, at in table.items() for name in names.split("|")}


_PROVINCE = _index(PROVINCES)
_CITY = _index(CITIES)


def normalise(name: str) -> str:
    """``"江苏省"`` -> ``"江苏"``, ``"Xinjiang Uyghur"`` -> ``"xinjiang uyghur"``."""
    n = name.strip().lower()
    for suffix in SUFFIXES:
        if n.endswith(suffix) and len(n) > len(suffix):
            return n[: -len(suffix)].strip()
    return n


def _lookup(table: dict[str, tuple[float, float]], name: str) -> tuple[float, float] | None:
    n = normalise(name)
    if not n:
        return None
    if n in table:
        return table[n]
    for known, at in table.items():  # "内蒙古自治区" / "xinjiang uyghur": a known name it starts with
        if n.startswith(known):
            return at
    return None


def locate(province: str, city: str | None = None) -> tuple[float, float] | None:
    """(latitude, longitude) of a city (else of its province's capital); None: unknown place."""
    if city:
        at = _lookup(_CITY, city)
        if at:
            return at
    return _lookup(_PROVINCE, province)


def km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance in kilometres (haversine)."""
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(h)))


def same_region(name: str, names: tuple[str, ...]) -> bool:
    """Whether province ``name`` is one of ``names`` (each matched without its suffix, or as a
    prefix: "新疆" matches "新疆维吾尔自治区")."""
    n = normalise(name)
    return any(n == m or n.startswith(m) for m in (normalise(x) for x in names) if m and n)
