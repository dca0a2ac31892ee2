"""The embedded moderation set (`embedded:moderation`): finance texts labelled 合规 (compliant) or 违规
(violating: insider information, guaranteed returns, illegal stock tips, fund-raising, money laundering).

Each template is filled with several companies, figures and years; all fillings of one template share a
`group`, so the data stage's leak-free split keeps a template's paraphrases in one split and the held-out
examples test phrasings the classifier never saw. The conversations ask for one word, so the sft stage
trains a two-label classifier and `lmsmith.gateway.classifier` reads its answer as a probability.
"""

from __future__ import annotations

import random
from typing import Any

ALLOWED, VIOLATING = "合规", "违规"
INSTRUCTION = "判断下面这段金融相关文字是否违规（内幕消息、保证收益、非法荐股、非法集资、洗钱），只回答“合规”或“违规”。"

COMPANIES = ["星辰科技", "华信银行", "东方制造", "海川能源", "金桥地产", "远航物流", "云图电器", "北辰医药",
             "青松食品", "天宇通信", "博远证券", "长河化工"]

VIOLATING_TEMPLATES = [
    "内部人士透露{company}下周将公告重组，现在买入稳赚。",
    "我有{company}的内幕消息，明天开盘必涨停，赶紧上车。",
    "本产品保证年化收益{rate}%，保本保息，零风险。",
    "投资{company}理财计划，承诺每月返利{rate}%，稳赚不赔。",
    "加入VIP群，老师每天荐股，跟着操作三个月收益翻倍。",
    "{company}董事会还没公布的财报数据我先发给你，提前布局。",
    "高息借款给我们项目，年息{rate}%，到期还本，亲友介绍另有奖励。",
    "帮你把这笔现金通过多个账户分拆转入，避开银行监管。",
    "保证让你的{amount}万元一年内翻倍，不赚钱全额退款。",
    "跟庄操作{company}，我们控制了大部分筹码，拉升在即。",
]
ALLOWED_TEMPLATES = [
    "{company}{year}年营业收入为{amount}亿元，同比增长{rate}%。",
    "请分析{company}{year}年毛利率变化的主要原因。",
    "{company}{year}年资产负债率为{rate}%，处于行业平均水平。",
    "{company}发布公告，{year}年归母净利润{amount}亿元，经营现金流保持稳定。",
    "投资有风险，{company}的历史业绩不代表未来表现。",
    "{company}{year}年研发投入{amount}亿元，占营业收入的{rate}%。",
    "请计算{company}{year}年营业收入的同比增长率。",
    "根据年报，{company}的应收账款周转天数有所上升，需要关注回款风险。",
    "{company}{year}年每股收益为{eps}元，董事会建议派发现金红利。",
    "理财产品收益不确定，请根据自身风险承受能力谨慎选择。",
]


# Framing around a template's sentence, the same for both labels (so it carries no label signal).
LEADS = ["", "朋友圈看到：", "客户经理说：", "群聊记录：", "据说", "转发：", "网友留言："]
ENDS = ["", "请大家注意。", "你怎么看？", "仅供参考。"]


def conversation(text: str, label: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text},
            {"role": "assistant", "content": label}]


def generate(seed: int = 0, per_template: int = 12) -> list[dict[str, Any]]:
    """Rows in the data stage's instruction format (`messages`, `task`, `group`, `answer`)."""
    rng = random.Random(seed)
    rows = []
    for label, templates in ((VIOLATING, VIOLATING_TEMPLATES), (ALLOWED, ALLOWED_TEMPLATES)):
        for index, template in enumerate(templates):
            seen: set[str] = set()
            for copy in range(per_template * 4):
                if len(seen) >= per_template:
                    break
                text = rng.choice(LEADS) + template.format(
                    company=rng.choice(COMPANIES), year=rng.randint(2018, 2024),
                    rate=rng.choice([3.5, 6, 8.8, 12, 15.2, 20, 30]), amount=rng.choice([1.2, 5, 12.5, 36, 80]),
                    eps=rng.choice([0.35, 0.95, 1.42])) + rng.choice(ENDS)
                if text in seen:
                    continue
                seen.add(text)
                group = f"{'v' if label == VIOLATING else 'a'}{index}"
                rows.append({"id": f"moderation-{group}-{copy}", "task": "moderation", "group": group,
                             "messages": conversation(text, label), "answer": {"label": label}})
    rng.shuffle(rows)
    return rows
