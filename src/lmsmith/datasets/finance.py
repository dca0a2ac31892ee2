"""The embedded synthetic finance dataset: fictional listed companies and their multi-year statements,
rendered as report-style documents (for continued pretraining) and instruction samples (for SFT/eval).

Only the standard library is used. Everything is drawn from one `random.Random(seed)`, so the same
seed gives byte-identical output and nothing is downloaded. Companies, tickers and figures are
invented; any resemblance to a real issuer is accidental.

Amounts are integers in yuan and whole multiples of 1,000,000 (0.01亿元), so every figure printed as
`12.35亿元` is exact and every growth rate printed in a document or an answer can be recomputed from
the figures beside it.

About 18% of the documents carry labelled noise (`Document.noise`), the kind a cleaning stage has to
deal with: exact and near duplicates, HTML remnants, mixed number formats, boilerplate disclaimers,
fragments and PII. A clean document has `noise == []`.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Callable, Optional

LAST_YEAR = 2023
YI = Decimal(100_000_000)
AMOUNT_UNIT = 1_000_000  # every amount is a whole number of 0.01亿元

NOISE_LABELS = (
    "exact_duplicate",
    "near_duplicate",
    "html",
    "mixed_numbers",
    "boilerplate",
    "fragment",
    "pii",
)
TASKS = ("report", "yoy", "entities", "kbqa")
KBQA_SEED_OFFSET = 104_729  # grounded questions draw from a stream of their own: the other data stays as it was
KBQA_FORMS = ("{name}{year}年{metric}是多少？", "请问{name}{year}年的{metric}为多少？",
              "{name}在{year}年的{metric}是多少？")

# Chance that a base document is damaged in place, and chances of each extra noisy document it spawns.
# Together they put about 18% of all documents in the noisy class.
_IN_PLACE_NOISE = 0.11
_EXTRA_NOISE = {"exact_duplicate": 0.03, "near_duplicate": 0.03, "fragment": 0.03, "boilerplate": 0.008}
_ENGLISH_NAMED_SHARE = 0.3


@dataclass(frozen=True)
class Industry:
    key: str
    zh: str
    en: str
    name_endings: tuple[str, ...]
    en_endings: tuple[str, ...]
    business: str
    revenue_yi: tuple[float, float]  # first-year revenue, 亿元
    gross_margin: tuple[float, float]  # percent
    net_margin: tuple[float, float]  # percent of revenue
    rd_ratio: tuple[float, float]  # percent of revenue
    debt_ratio: tuple[float, float]  # percent
    asset_turnover: tuple[float, float]  # revenue / total assets


INDUSTRIES = (
    Industry("software", "软件与信息服务", "software", ("科技", "软件", "信息"), ("Technology", "Software"),
             "企业级软件、云服务与数据分析解决方案", (3, 60), (45, 75), (8, 25), (10, 25), (20, 45), (0.5, 0.9)),
    Industry("semiconductor", "半导体", "semiconductors", ("微电子", "半导体", "芯片"),
             ("Semiconductor", "Microelectronics"), "模拟芯片、功率器件及封装测试",
             (5, 120), (30, 55), (6, 22), (12, 30), (20, 50), (0.4, 0.8)),
    Industry("pharma", "医药生物", "pharmaceuticals", ("医药", "生物", "药业"), ("Pharma", "Biotech"),
             "创新药、仿制药及医疗器械的研发与销售", (5, 80), (50, 85), (8, 28), (8, 20), (15, 45), (0.4, 0.8)),
    Industry("new_energy", "新能源", "new energy", ("新能源", "光伏", "储能"), ("Energy", "Solar"),
             "光伏组件、储能系统及锂电池材料", (20, 300), (15, 30), (4, 14), (3, 7), (45, 70), (0.5, 1.0)),
    Industry("auto_parts", "汽车零部件", "auto parts", ("汽车", "精工", "动力"), ("Automotive", "Motion"),
             "汽车底盘、电驱动系统及智能座舱部件", (10, 150), (15, 28), (3, 10), (3, 7), (40, 65), (0.7, 1.2)),
    Industry("food", "食品饮料", "food and beverages", ("食品", "饮品", "乳业"), ("Foods", "Beverage"),
             "乳制品、饮料及休闲食品", (8, 200), (30, 60), (8, 25), (0.5, 2.5), (25, 50), (0.7, 1.3)),
    Industry("logistics", "物流", "logistics", ("物流", "供应链", "快运"), ("Logistics", "Supply Chain"),
             "综合物流、冷链运输及供应链管理服务", (20, 400), (8, 18), (2, 7), (0.5, 3), (45, 70), (1.0, 1.8)),
    Industry("chemicals", "化工新材料", "specialty chemicals", ("材料", "化工", "新材"), ("Materials", "Chemicals"),
             "高性能聚合物、电子化学品及特种涂料", (10, 180), (15, 35), (5, 15), (3, 6), (35, 60), (0.6, 1.1)),
    Industry("telecom", "通信设备", "telecom equipment", ("通信", "网络", "光电"), ("Networks", "Photonics"),
             "光模块、基站设备及网络通信解决方案", (10, 250), (25, 45), (5, 15), (8, 18), (40, 65), (0.5, 0.9)),
    Industry("appliances", "家用电器", "home appliances", ("电器", "智能家居", "家电"), ("Appliances", "Home"),
             "空调、冰箱及智能小家电", (30, 500), (20, 35), (5, 12), (3, 5), (50, 70), (0.8, 1.3)),
    Industry("media", "文化传媒", "media", ("传媒", "影视", "文化"), ("Media", "Studios"),
             "影视制作、数字内容发行及广告营销", (3, 40), (25, 50), (5, 18), (1, 5), (20, 45), (0.4, 0.8)),
    Industry("construction", "建筑工程", "construction", ("建设", "建工", "基建"), ("Construction", "Infrastructure"),
             "基础设施建设、工程总承包及装配式建筑", (50, 600), (8, 15), (2, 5), (2, 4), (65, 80), (0.6, 0.9)),
)

# Name stems and the romanisation used for a company's English name.
_STEMS = {
    "星辰": "Xingchen", "华澄": "Huacheng", "瑞丰": "Ruifeng", "东岳": "Dongyue", "宏远": "Hongyuan",
    "恒川": "Hengchuan", "天衡": "Tianheng", "中岳": "Zhongyue", "金桥": "Jinqiao", "海澜": "Hailan",
    "博创": "Bochuang", "云图": "Yuntu", "鼎盛": "Dingsheng", "长河": "Changhe", "晨光": "Chenguang",
    "嘉禾": "Jiahe", "明泰": "Mingtai", "安澜": "Anlan", "润泽": "Runze", "新元": "Xinyuan",
    "远景": "Yuanjing", "青山": "Qingshan", "北辰": "Beichen", "南风": "Nanfeng", "盛世": "Shengshi",
    "祥瑞": "Xiangrui", "同舟": "Tongzhou", "致远": "Zhiyuan", "天宇": "Tianyu", "汇通": "Huitong",
    "光启": "Guangqi", "启明": "Qiming", "聚源": "Juyuan", "华岳": "Huayue", "万象": "Wanxiang",
    "凌云": "Lingyun", "锦程": "Jincheng", "泰和": "Taihe", "通达": "Tongda", "永安": "Yong'an",
}
_CITIES = ("深圳", "杭州", "苏州", "成都", "武汉", "南京", "合肥", "西安", "青岛", "厦门", "长沙", "天津")
_BROKERS = ("明川证券研究所", "远帆证券", "恒岳证券研究所", "松石资本研究部", "青禾证券")
_MEDIA = ("财经快讯", "证券日报网", "金融观察", "Market Wire")
_SURNAMES = (("王", "wang"), ("李", "li"), ("张", "zhang"), ("刘", "liu"), ("陈", "chen"), ("杨", "yang"))
_MONTHS_EN = ("March", "April")

_DISCLAIMERS_ZH = (
    "免责声明：本文内容仅供参考，不构成任何投资建议。",
    "投资有风险，入市需谨慎。",
    "本报告仅供参考，据此操作风险自担。",
    "版权所有，未经授权禁止转载。",
    "更多资讯请扫码关注我们的公众号。",
)
_DISCLAIMERS_EN = (
    "Disclaimer: this article is for reference only and does not constitute investment advice.",
    "All rights reserved. Reproduction without permission is prohibited.",
)


@dataclass(frozen=True)
class Metric:
    """An amount-valued line of a statement (an attribute of `Statement`)."""

    key: str
    zh: str
    en: str


METRICS = (
    Metric("revenue", "营业收入", "revenue"),
    Metric("net_profit", "归母净利润", "net profit attributable to shareholders"),
    Metric("operating_cash_flow", "经营活动现金流量净额", "operating cash flow"),
    Metric("total_assets", "总资产", "total assets"),
    Metric("rd_expense", "研发投入", "R&D spending"),
)


@dataclass
class Company:
    ticker: str
    name: str
    name_en: Optional[str]
    industry: str
    industry_zh: str
    business: str
    city: str
    founded: int
    listed: int
    shares: int  # number of shares outstanding


@dataclass
class Statement:
    """One company-year. Amounts in yuan; ratios in percent with two decimals; EPS in yuan per share."""

    ticker: str
    year: int
    revenue: int
    net_profit: int  # attributable to shareholders of the parent (归母净利润)
    gross_margin: float
    operating_cash_flow: int
    total_assets: int
    debt_ratio: float
    rd_expense: int
    eps: float

    @property
    def group(self) -> str:
        return f"{self.ticker}:{self.year}"

    def amount(self, metric: Metric) -> int:
        return getattr(self, metric.key)


@dataclass
class Document:
    """A raw text for continued pretraining; `noise` lists the damage it carries ([] when clean)."""

    id: str
    text: str
    source: str
    group: str
    lang: str
    noise: list[str] = field(default_factory=list)


@dataclass
class Instruction:
    """A chat sample; the last message is the reference answer and `answer` the ground truth."""

    id: str
    task: str
    group: str
    messages: list[dict[str, str]]
    answer: dict


@dataclass
class FinanceDataset:
    companies: list[Company]
    statements: list[Statement]
    documents: list[Document]
    instructions: list[Instruction]

    @property
    def noise_rate(self) -> float:
        return sum(1 for doc in self.documents if doc.noise) / max(1, len(self.documents))


# ---------------------------------------------------------------------------------------------- numbers


def growth_percent(current: int, previous: int) -> Decimal:
    """Year-over-year growth in percent, rounded half-up to two decimals (what every text shows)."""
    growth = ((Decimal(current) - Decimal(previous)) / Decimal(previous) * 100).quantize(
        Decimal("0.01"), rounding=ROUND_HALF_UP
    )
    return abs(growth) if growth == 0 else growth  # never print "-0.00"


def yi(amount: int) -> str:
    """`12.35亿元`: the standard Chinese rendering of an amount."""
    return f"{Decimal(amount) / YI:.2f}亿元"


def rmb(amount: int) -> str:
    """`RMB 1.235 billion` / `RMB 850 million`: the standard English rendering of an amount."""
    if amount >= 1_000_000_000:
        billions = format((Decimal(amount) / 1_000_000_000).normalize(), "f")
        return f"RMB {billions} billion"
    return f"RMB {amount // 1_000_000} million"


def _full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


# The renderings a `mixed_numbers` document draws from: never the standard one, so the label is honest.
_MIXED_ZH: tuple[Callable[[int], str], ...] = (
    lambda a: f"{a:,}元",
    lambda a: f"{a // 10_000}万元",
    lambda a: f"{a // 10_000:,}万元",
    lambda a: _full_width(f"{Decimal(a) / YI:.2f}") + "亿元",
)
_MIXED_EN: tuple[Callable[[int], str], ...] = (
    lambda a: f"RMB {a:,}",
    lambda a: f"RMB {Decimal(a) / YI:.2f}亿",
    lambda a: f"RMB {a // 1_000_000:,} million",
)


def _change_zh(current: int, previous: int) -> str:
    growth = growth_percent(current, previous)
    return f"同比增长{growth:.2f}%" if growth >= 0 else f"同比下降{-growth:.2f}%"


def _change_en(current: int, previous: int) -> str:
    growth = growth_percent(current, previous)
    direction = "up" if growth >= 0 else "down"
    return f"{direction} {abs(growth):.2f}% year over year"


def _round_amount(value_yuan: float) -> int:
    return max(1, round(value_yuan / AMOUNT_UNIT)) * AMOUNT_UNIT


# -------------------------------------------------------------------------------------------- companies


def _make_companies(rng: random.Random, count: int) -> list[Company]:
    candidates = [
        (stem, ending, industry)
        for industry in INDUSTRIES
        for ending in industry.name_endings
        for stem in _STEMS
    ]
    if count > len(candidates):
        raise ValueError(f"at most {len(candidates)} companies can be generated, asked for {count}")
    rng.shuffle(candidates)
    tickers: set[str] = set()
    companies = []
    for stem, ending, industry in candidates[:count]:
        ticker = _new_ticker(rng, tickers)
        founded = rng.randint(1990, 2014)
        english = rng.random() < _ENGLISH_NAMED_SHARE
        companies.append(
            Company(
                ticker=ticker,
                name=stem + ending,
                name_en=f"{_STEMS[stem]} {rng.choice(industry.en_endings)}" if english else None,
                industry=industry.key,
                industry_zh=industry.zh,
                business=industry.business,
                city=rng.choice(_CITIES),
                founded=founded,
                listed=rng.randint(founded + 3, 2019),
                shares=0,  # set once the first year's profit is known
            )
        )
    return companies


def _new_ticker(rng: random.Random, taken: set[str]) -> str:
    while True:
        prefix, exchange = rng.choice(
            (("600", "SH"), ("601", "SH"), ("603", "SH"), ("688", "SH"), ("000", "SZ"), ("002", "SZ"), ("300", "SZ"))
        )
        ticker = f"{prefix}{rng.randint(0, 999):03d}.{exchange}"
        if ticker not in taken:
            taken.add(ticker)
            return ticker


def _industry(key: str) -> Industry:
    return next(industry for industry in INDUSTRIES if industry.key == key)


def _make_statements(rng: random.Random, company: Company, years: list[int]) -> list[Statement]:
    industry = _industry(company.industry)
    revenue = rng.uniform(*industry.revenue_yi) * 1e8
    trend = rng.uniform(-0.05, 0.2)
    gross_margin = rng.uniform(*industry.gross_margin)
    debt_ratio = rng.uniform(*industry.debt_ratio)
    # A company keeps its own profile from year to year; only small shocks move the ratios.
    net_margin = rng.uniform(*industry.net_margin)
    rd_ratio = rng.uniform(*industry.rd_ratio)
    statements = []
    for index, year in enumerate(years):
        if index:
            revenue *= 1 + min(0.6, max(-0.3, rng.gauss(trend, 0.12)))
        rounded_revenue = _round_amount(revenue)
        margin_this_year = max(0.5, net_margin * rng.uniform(0.75, 1.25))
        net_profit = _round_amount(rounded_revenue * margin_this_year / 100)
        if not company.shares:
            # Pick a share count that puts first-year EPS between 0.3 and 2 yuan.
            company.shares = _round_amount(net_profit / rng.uniform(0.3, 2.0))
        gross_margin = min(95.0, max(3.0, gross_margin + rng.gauss(0, 1.5)))
        debt_ratio = min(90.0, max(5.0, debt_ratio + rng.gauss(0, 2.0)))
        statements.append(
            Statement(
                ticker=company.ticker,
                year=year,
                revenue=rounded_revenue,
                net_profit=net_profit,
                gross_margin=round(gross_margin, 2),
                operating_cash_flow=_round_amount(net_profit * rng.uniform(0.5, 1.8)),
                total_assets=_round_amount(rounded_revenue / rng.uniform(*industry.asset_turnover)),
                debt_ratio=round(debt_ratio, 2),
                rd_expense=_round_amount(rounded_revenue * rd_ratio * rng.uniform(0.9, 1.1) / 100),
                eps=round(net_profit / company.shares, 2),
            )
        )
    return statements


def _disclosure_date(rng: random.Random, year: int) -> tuple[str, str]:
    """The annual report's publication date, in Chinese and in English."""
    month, day = rng.randint(3, 4), rng.randint(1, 28)
    return f"{year + 1}年{month}月{day}日", f"{_MONTHS_EN[month - 3]} {day}, {year + 1}"


# -------------------------------------------------------------------------------------------- documents


@dataclass
class _Context:
    """What the document and instruction templates need about one company-year."""

    company: Company
    current: Statement
    previous: Optional[Statement]
    date_zh: str
    date_en: str

    @property
    def rd_ratio(self) -> str:
        return f"{Decimal(self.current.rd_expense) / Decimal(self.current.revenue) * 100:.2f}"


def _annual_summary_zh(ctx: _Context, rng: random.Random, fmt: Callable[[int], str]) -> str:
    c, s, p = ctx.company, ctx.current, ctx.previous
    rev_change = f"，{_change_zh(s.revenue, p.revenue)}" if p else ""
    np_change = f"，{_change_zh(s.net_profit, p.net_profit)}" if p else ""
    if rng.random() < 0.5:
        return (
            f"{c.name}（{c.ticker}）{s.year}年年度报告摘要\n"
            f"报告期内，公司实现营业收入{fmt(s.revenue)}{rev_change}；"
            f"实现归属于上市公司股东的净利润{fmt(s.net_profit)}{np_change}。"
            f"综合毛利率为{s.gross_margin:.2f}%，经营活动产生的现金流量净额为{fmt(s.operating_cash_flow)}。"
            f"截至{s.year}年12月31日，公司总资产为{fmt(s.total_assets)}，资产负债率为{s.debt_ratio:.2f}%。"
            f"报告期内研发投入{fmt(s.rd_expense)}，占营业收入的比例为{ctx.rd_ratio}%；"
            f"基本每股收益为{s.eps:.2f}元。"
        )
    return (
        f"{s.year}年度经营情况讨论与分析（{c.name}，股票代码{c.ticker}）\n"
        f"{s.year}年，公司围绕{c.business}持续投入，全年营业收入达到{fmt(s.revenue)}{rev_change}，"
        f"归母净利润{fmt(s.net_profit)}{np_change}，毛利率{s.gross_margin:.2f}%。"
        f"经营活动现金流量净额{fmt(s.operating_cash_flow)}，期末总资产{fmt(s.total_assets)}，"
        f"资产负债率{s.debt_ratio:.2f}%。研发投入{fmt(s.rd_expense)}，基本每股收益{s.eps:.2f}元。"
    )


def _analyst_note_zh(ctx: _Context, rng: random.Random, fmt: Callable[[int], str]) -> str:
    c, s, p = ctx.company, ctx.current, ctx.previous
    assert p is not None
    growth = growth_percent(s.revenue, p.revenue)
    headline = "业绩高速增长" if growth >= 20 else "业绩稳健增长" if growth >= 0 else "收入承压，静待修复"
    margin_view = "盈利能力有所提升" if s.gross_margin >= p.gross_margin else "盈利能力略有下滑"
    view = rng.choice(
        (
            f"我们看好公司在{c.industry_zh}领域的长期竞争力，维持“增持”评级。",
            "考虑到行业景气度变化，我们维持“中性”评级。",
            f"公司在{c.business}方面的布局有望持续兑现，维持“买入”评级。",
        )
    )
    return (
        f"【{rng.choice(_BROKERS)}】{c.name}（{c.ticker}）{s.year}年报点评：{headline}\n"
        f"公司{s.year}年实现营业收入{fmt(s.revenue)}（{p.year}年为{fmt(p.revenue)}），"
        f"{_change_zh(s.revenue, p.revenue)}；归母净利润{fmt(s.net_profit)}（{p.year}年为{fmt(p.net_profit)}），"
        f"{_change_zh(s.net_profit, p.net_profit)}。毛利率由{p.gross_margin:.2f}%变为{s.gross_margin:.2f}%，"
        f"{margin_view}。研发投入{fmt(s.rd_expense)}，{_change_zh(s.rd_expense, p.rd_expense)}。{view}"
    )


def _news_zh(ctx: _Context, rng: random.Random, fmt: Callable[[int], str]) -> str:
    c, s, p = ctx.company, ctx.current, ctx.previous
    change = f"，{_change_zh(s.revenue, p.revenue)}" if p else ""
    dividend = (
        f"公司拟每10股派发现金红利{rng.randint(1, 30) / 10:.1f}元（含税）。" if rng.random() < 0.4 else ""
    )
    return (
        f"{ctx.date_zh}，{c.name}发布{s.year}年年度报告。公司全年营业收入{fmt(s.revenue)}{change}；"
        f"归母净利润{fmt(s.net_profit)}；基本每股收益{s.eps:.2f}元。{dividend}"
    )


def _analyst_note_en(ctx: _Context, rng: random.Random, fmt: Callable[[int], str]) -> str:
    c, s, p = ctx.company, ctx.current, ctx.previous
    assert p is not None and c.name_en
    rating = rng.choice(("Overweight", "Neutral", "Buy"))
    return (
        f"{c.name_en} ({c.ticker}) FY{s.year} review\n"
        f"Revenue reached {fmt(s.revenue)} against {fmt(p.revenue)} in FY{p.year}, "
        f"{_change_en(s.revenue, p.revenue)}. Net profit attributable to shareholders was {fmt(s.net_profit)}, "
        f"{_change_en(s.net_profit, p.net_profit)}. Gross margin moved from {p.gross_margin:.2f}% to "
        f"{s.gross_margin:.2f}%, and R&D spending was {fmt(s.rd_expense)}. We rate the stock {rating}."
    )


def _news_en(ctx: _Context, rng: random.Random, fmt: Callable[[int], str]) -> str:
    c, s, p = ctx.company, ctx.current, ctx.previous
    assert c.name_en
    change = f", {_change_en(s.revenue, p.revenue)}" if p else ""
    return (
        f"{ctx.date_en} - {c.name_en} ({c.ticker}) reported FY{s.year} revenue of {fmt(s.revenue)}{change}. "
        f"Net profit attributable to shareholders was {fmt(s.net_profit)}, gross margin {s.gross_margin:.2f}%, "
        f"and basic EPS RMB {s.eps:.2f}. Operating cash flow came in at {fmt(s.operating_cash_flow)}; "
        f"total assets stood at {fmt(s.total_assets)} with a debt-to-asset ratio of {s.debt_ratio:.2f}%."
    )


def _profile(company: Company) -> str:
    exchange = "上海证券交易所" if company.ticker.endswith(".SH") else "深圳证券交易所"
    english = f"公司英文名称为{company.name_en}。" if company.name_en else ""
    return (
        f"{company.name}（股票代码：{company.ticker}）成立于{company.founded}年，总部位于{company.city}，"
        f"{company.listed}年在{exchange}上市，所属行业为{company.industry_zh}，主营{company.business}。{english}"
        "公司坚持以客户为中心，持续加大研发投入，已形成覆盖全国的销售与服务网络。"
    )


# ----------------------------------------------------------------------------------------------- noise


def _with_html(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    if rng.random() < 0.5:
        body = "".join(f"<p>{line.replace('，', '，&nbsp;', 1)}</p>" for line in lines)
        return f'<div class="article-content">{body}</div>'
    return "<br/>\n".join(lines) + '\n<span style="color:#999">&copy; 2024</span>'


def _with_boilerplate(rng: random.Random, text: str, lang: str) -> str:
    pool = _DISCLAIMERS_EN if lang == "en" else _DISCLAIMERS_ZH
    disclaimer = " ".join(rng.sample(pool, k=min(len(pool), rng.randint(1, 2))))
    return f"{disclaimer}\n{text}" if rng.random() < 0.3 else f"{text}\n{disclaimer}"


def _mobile(rng: random.Random) -> str:
    digits = f"1{rng.choice('35789')}{rng.randint(0, 999_999_999):09d}"
    style = rng.randint(0, 2)
    if style == 0:
        return digits
    if style == 1:
        return f"{digits[:3]}-{digits[3:7]}-{digits[7:]}"
    return f"+86 {digits}"


def _with_pii(rng: random.Random, text: str, company: Company, lang: str) -> str:
    surname, romanised = rng.choice(_SURNAMES)
    domain = (company.name_en or _STEMS[company.name[:2]]).split()[0].lower().replace("'", "")
    email = f"{romanised}.{rng.randint(1, 99)}@{domain}-ir.com"
    if lang == "en":
        contact = f"Investor relations: {email}, tel. {_mobile(rng)}."
    else:
        title = rng.choice(("先生", "女士"))
        contact = f"投资者关系联系人：{surname}{title}，电话{_mobile(rng)}，邮箱{email}。"
    return f"{text}\n{contact}"


_SYNONYMS = (("同比增长", "较上年增长"), ("营业收入", "营收"), ("归母净利润", "归属于母公司股东的净利润"),
             ("revenue", "sales"), ("reported", "posted"))


def _near_duplicate(rng: random.Random, text: str, lang: str) -> str:
    """A small edit: spacing/punctuation only (exact dedup after normalisation catches it) or a word-level
    change (it does not)."""
    edit = rng.randint(0, 2)
    if edit == 0:
        return text.replace("，", ", ").replace("；", "; ").replace("。", "。 ").strip()
    if edit == 1:
        return f"{text}（来源：{rng.choice(_MEDIA)}）" if lang == "zh" else f"{text} (Source: {rng.choice(_MEDIA)})"
    for old, new in _SYNONYMS:
        if old in text:
            return text.replace(old, new, 1)
    return text + ("（完）" if lang == "zh" else " (End)")


def _fragment(rng: random.Random, text: str) -> str:
    length = rng.randint(10, 70)
    start = rng.randint(0, max(0, len(text) - length))
    return text[start:start + length].strip()


def _standalone_boilerplate(rng: random.Random) -> str:
    return "".join(rng.sample(_DISCLAIMERS_ZH, k=3))


# ------------------------------------------------------------------------------------------ instructions


def _report_instruction(ctx: _Context) -> Instruction:
    c, s, p = ctx.company, ctx.current, ctx.previous

    def last_year(metric: str) -> str:
        return f"（上年：{yi(getattr(p, metric))}）" if p else ""

    prompt = (
        f"请根据以下财务数据，撰写{c.name}{s.year}年的业绩摘要。\n"
        f"营业收入：{yi(s.revenue)}{last_year('revenue')}\n"
        f"归母净利润：{yi(s.net_profit)}{last_year('net_profit')}\n"
        f"毛利率：{s.gross_margin:.2f}%\n"
        f"经营活动现金流量净额：{yi(s.operating_cash_flow)}\n"
        f"总资产：{yi(s.total_assets)}\n"
        f"资产负债率：{s.debt_ratio:.2f}%\n"
        f"研发投入：{yi(s.rd_expense)}\n"
        f"基本每股收益：{s.eps:.2f}元"
    )
    rev_change = f"，{_change_zh(s.revenue, p.revenue)}" if p else ""
    np_change = f"，{_change_zh(s.net_profit, p.net_profit)}" if p else ""
    report = (
        f"{c.name}{s.year}年实现营业收入{yi(s.revenue)}{rev_change}；归母净利润{yi(s.net_profit)}{np_change}；"
        f"毛利率{s.gross_margin:.2f}%；经营活动现金流量净额{yi(s.operating_cash_flow)}；"
        f"总资产{yi(s.total_assets)}，资产负债率{s.debt_ratio:.2f}%；研发投入{yi(s.rd_expense)}；"
        f"基本每股收益{s.eps:.2f}元。"
    )
    return Instruction(
        id=f"fin-report-{c.ticker}-{s.year}",
        task="report",
        group=s.group,
        messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": report}],
        answer={"text": report},
    )


def yoy_answer_text(current: int, previous: int) -> str:
    """The one template every yoy answer follows, so a small model can learn its form."""
    growth = growth_percent(current, previous)
    return (
        f"（本期−上期）/上期 = ({yi(current)}−{yi(previous)})/{yi(previous)} = {growth:.2f}%，"
        f"{_change_zh(current, previous)}。"
    )


def _yoy_instruction(ctx: _Context, metric: Metric, rng: random.Random) -> Instruction:
    c, s, p = ctx.company, ctx.current, ctx.previous
    assert p is not None
    current, previous = s.amount(metric), p.amount(metric)
    prompt = rng.choice(
        (
            f"{c.name}{p.year}年{metric.zh}为{yi(previous)}，{s.year}年为{yi(current)}。"
            f"请计算{s.year}年{metric.zh}的同比增长率。",
            f"已知{c.name}{s.year}年{metric.zh}{yi(current)}，上年同期{yi(previous)}，求同比增长率。",
            f"{c.name}（{c.ticker}）{metric.zh}：{p.year}年{yi(previous)}，{s.year}年{yi(current)}。"
            f"{s.year}年同比增长多少？",
        )
    )
    return Instruction(
        id=f"fin-yoy-{c.ticker}-{s.year}-{metric.key}",
        task="yoy",
        group=s.group,
        messages=[
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": yoy_answer_text(current, previous)},
        ],
        answer={"value": float(growth_percent(current, previous))},
    )


def _entities_instruction(ctx: _Context, rng: random.Random) -> Instruction:
    c, s = ctx.company, ctx.current
    first, second = rng.sample(METRICS, k=2)
    # The passage as (text, entity type or None); the entities are the typed pieces, in order.
    pieces: list[tuple[str, Optional[str]]]
    if c.name_en and rng.random() < 0.5:
        pieces = [
            ("On ", None), (ctx.date_en, "date"), (", ", None), (c.name_en, "company"), (" said its ", None),
            (f"FY{s.year}", "date"), (" ", None), (first.en, "metric"), (" reached ", None),
            (rmb(s.amount(first)), "amount"), (" and ", None), (second.en, "metric"), (" was ", None),
            (rmb(s.amount(second)), "amount"), (".", None),
        ]
    else:
        pieces = [
            (ctx.date_zh, "date"), ("，", None), (c.name, "company"), ("公告称，", None), (f"{s.year}年", "date"),
            ("公司", None), (first.zh, "metric"), ("为", None), (yi(s.amount(first)), "amount"), ("，", None),
            (second.zh, "metric"), ("为", None), (yi(s.amount(second)), "amount"), ("。", None),
        ]
    entities = [{"type": kind, "text": text} for text, kind in pieces if kind]
    parts = [text for text, _ in pieces]
    answer = {"entities": entities}
    prompt = "从下面这段文字中抽取公司、指标、金额和日期实体，以JSON格式输出。\n" + "".join(parts)
    return Instruction(
        id=f"fin-entities-{c.ticker}-{s.year}",
        task="entities",
        group=s.group,
        messages=[
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
        ],
        answer=answer,
    )


# -------------------------------------------------------------------------------------------- assembly


class _DocumentWriter:
    """Numbers documents in order and adds the noisy variants each clean document spawns."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.documents: list[Document] = []

    def _append(self, text: str, source: str, group: str, lang: str, noise: list[str]) -> Document:
        doc = Document(f"fin-doc-{len(self.documents):05d}", text, source, group, lang, noise)
        self.documents.append(doc)
        return doc

    def add(
        self,
        render: Callable[[Callable[[int], str]], str],
        source: str,
        group: str,
        lang: str,
        company: Company,
        has_amounts: bool = True,
    ) -> None:
        """Render a document (with in-place noise now and then), then maybe spawn noisy copies of it."""
        rng = self.rng
        standard = rmb if lang == "en" else yi
        noise: list[str] = []
        if rng.random() < _IN_PLACE_NOISE:
            damage = ("html", "mixed_numbers", "boilerplate", "pii") if has_amounts else ("html", "boilerplate", "pii")
            kinds = rng.sample(damage, k=rng.choice((1, 1, 1, 2)))
            noise = [kind for kind in NOISE_LABELS if kind in kinds]
        clean_text = render(standard)
        if "mixed_numbers" in noise:
            mixed = _MIXED_EN if lang == "en" else _MIXED_ZH
            text = render(lambda amount: rng.choice(mixed)(amount))
        else:
            text = clean_text
        if "pii" in noise:
            text = _with_pii(rng, text, company, lang)
        if "boilerplate" in noise:
            text = _with_boilerplate(rng, text, lang)
        if "html" in noise:
            text = _with_html(rng, text)
        self._append(text, source, group, lang, noise)

        if rng.random() < _EXTRA_NOISE["exact_duplicate"]:
            self._append(text, source, group, lang, sorted(noise + ["exact_duplicate"], key=NOISE_LABELS.index))
        if rng.random() < _EXTRA_NOISE["near_duplicate"]:
            self._append(_near_duplicate(rng, text, lang), source, group, lang,
                         sorted(noise + ["near_duplicate"], key=NOISE_LABELS.index))
        if rng.random() < _EXTRA_NOISE["fragment"]:
            self._append(_fragment(rng, clean_text), source, group, lang, ["fragment"])
        if rng.random() < _EXTRA_NOISE["boilerplate"]:
            self._append(_standalone_boilerplate(rng), "finance/boilerplate", group, "zh", ["boilerplate"])


def generate(seed: int = 0, companies: int = 60, years: int = 5) -> FinanceDataset:
    """Build the dataset: `companies` fictional issuers, `years` fiscal years ending in 2023."""
    if companies < 1 or years < 2:
        raise ValueError("need at least 1 company and 2 years")
    rng = random.Random(seed)
    year_range = list(range(LAST_YEAR - years + 1, LAST_YEAR + 1))
    company_list = _make_companies(rng, companies)
    writer = _DocumentWriter(rng)
    statements: list[Statement] = []
    instructions: list[Instruction] = []
    for company in company_list:
        company_statements = _make_statements(rng, company, year_range)
        statements.extend(company_statements)
        writer.add(lambda fmt: _profile(company), "finance/profile", company.ticker, "zh", company,
                   has_amounts=False)
        previous: Optional[Statement] = None
        for statement in company_statements:
            date_zh, date_en = _disclosure_date(rng, statement.year)
            ctx = _Context(company, statement, previous, date_zh, date_en)
            group = statement.group
            english = company.name_en is not None
            writer.add(lambda fmt: _annual_summary_zh(ctx, rng, fmt), "finance/annual_summary", group, "zh", company)
            if previous is not None:
                note = _analyst_note_en if english else _analyst_note_zh
                writer.add(lambda fmt: note(ctx, rng, fmt), "finance/analyst_note", group,
                           "en" if english else "zh", company)
            news = _news_en if english else _news_zh
            writer.add(lambda fmt: news(ctx, rng, fmt), "finance/news", group, "en" if english else "zh", company)

            instructions.append(_report_instruction(ctx))
            if previous is not None:
                metrics = rng.sample(METRICS, k=2 if rng.random() < 0.5 else 1)
                instructions.extend(_yoy_instruction(ctx, metric, rng) for metric in metrics)
            instructions.append(_entities_instruction(ctx, rng))
            previous = statement
    instructions += kbqa_instructions(company_list, statements, instructions, random.Random(seed + KBQA_SEED_OFFSET))
    return FinanceDataset(company_list, statements, writer.documents, instructions)


def report_title(company: Company, year: int) -> str:
    """The title of a company-year's report paragraph, as a knowledge base of reports labels it."""
    return f"{company.name}{year}年业绩摘要"


def kbqa_instructions(companies: list[Company], statements: list[Statement], instructions: list[Instruction],
                      rng: random.Random, share: float = 1.0, distractors: int = 1) -> list[Instruction]:
    """Questions answered from numbered sources, in the form `lmsmith serve --kb` grounds them: the
    company-year's report paragraph among `distractors` others (the suite retrieves as many: sft.max_len
    must hold them), the answer the figure with the source's number."""
    from lmsmith.rag.grounding import DEFAULT_PROMPT, source_block, with_sources

    by_ticker = {company.ticker: company for company in companies}
    by_key = {(s.ticker, s.year): s for s in statements}
    reports = [row for row in instructions if row.task == "report"]
    found = []
    for row in reports:
        if len(reports) <= distractors or rng.random() >= share:
            continue
        ticker, year = row.id.removeprefix("fin-report-").rsplit("-", 1)
        company, statement = by_ticker[ticker], by_key[(ticker, int(year))]
        sources = [row, *rng.sample([other for other in reports if other is not row], distractors)]
        rng.shuffle(sources)

        def label(source: Instruction) -> str:
            source_ticker, source_year = source.id.removeprefix("fin-report-").rsplit("-", 1)
            return report_title(by_ticker[source_ticker], int(source_year))

        blocks = [source_block(index, label(source), source.answer["text"]) for index, source in enumerate(sources, 1)]
        metric = rng.choice(METRICS)
        question = rng.choice(KBQA_FORMS).format(name=company.name, year=year, metric=metric.zh)
        value = statement.amount(metric)
        found.append(Instruction(
            id=f"fin-kbqa-{ticker}-{year}-{metric.key}",
            task="kbqa",
            group=statement.group,
            messages=[{"role": "system", "content": with_sources(DEFAULT_PROMPT, blocks)},
                      {"role": "user", "content": question},
                      {"role": "assistant",
                       "content": f"{company.name}{year}年{metric.zh}为{yi(value)}[{sources.index(row) + 1}]。"}],
            answer={"value": float(value), "source": f"report-{ticker}-{year}"},
        ))
    return found


def write_jsonl(dataset: FinanceDataset, out_dir: str | Path) -> dict[str, Path]:
    """Write companies, statements, documents and instructions as `<name>.jsonl` files in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "companies": dataset.companies,
        "statements": dataset.statements,
        "documents": dataset.documents,
        "instructions": dataset.instructions,
    }
    paths = {}
    for name, rows in tables.items():
        path = out_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the embedded synthetic finance dataset as jsonl.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--companies", type=int, default=60)
    parser.add_argument("--years", type=int, default=5)
    args = parser.parse_args(argv)
    dataset = generate(args.seed, args.companies, args.years)
    for name, path in write_jsonl(dataset, args.out_dir).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
