"""The eval library's scoring core: answer extraction for multiple choice, bootstrap standard errors and
log-likelihood multiple choice on a local model, each checked against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import build_tiny_model
from lmsmith.eval.choices import extract_choice, score_choices
from lmsmith.eval.likelihood import ChoiceItem, continuation_logprobs, score_by_likelihood, split_pair
from lmsmith.eval.stats import bootstrap_stderr

TRICKY = {
    "答案是C": "C",
    "选C。": "C",
    "C和D都不对，应选A": "A",
    "CPA考试中…答案：B": "B",
    "The answer is (B).": "B",
    "Answer: D": "D",
    "B": "B",
    "（D）": "D",
    "答案：Ｃ": "C",  # full-width letter and colon
    "我认为A和C都有道理，但最终答案是C": "C",
    "首先排除B，然后排除D，答案为A": "A",
    "答案是A……不对，答案应该是D": "D",  # the last statement wins
    "排除选项A，答案C": "C",
    "正确答案为【B】": "B",
    "故选 B": "B",
    "选项D正确": "D",
    "I choose option C because margins rose.": "C",
    "The company (ABC Corp) grew 15%. Answer: A": "A",
    "A. 营业收入增长": "A",
    "无法确定": None,
    "CPA": None,
    "C和D都不对": None,  # two letters, no statement: a failure, not a guess
    "2023年营收12.5亿元": None,
}


@pytest.mark.parametrize("text, expected", TRICKY.items())
def test_extract_choice_reads_statements_not_letters_inside_words(text, expected):
    assert extract_choice(text) == expected


def test_choice_scores_count_failures_and_letters():
    answers = ["答案是A", "选B", "无法确定", "答案：A", "CPA"]
    scores = score_choices(answers, ["A", "B", "C", "D", "a"])
    assert scores.accuracy == pytest.approx(40.0)  # items 1 and 2 right; failures count as wrong
    assert scores.failure_rate == pytest.approx(40.0)
    assert scores.letters == {"A": 2, "B": 1, "C": 0, "D": 0}
    assert extract_choice("答案是E", letters="ABCDE") == "E" and extract_choice("答案是E") is None


def test_bootstrap_stderr_of_a_mean_matches_the_binomial_formula():
    values = [1.0] * 30 + [0.0] * 70
    expected = math.sqrt(0.3 * 0.7 / 100)
    assert bootstrap_stderr(values, resamples=4000) == pytest.approx(expected, rel=0.08)
    assert bootstrap_stderr(values) == bootstrap_stderr(values)  # seeded: reruns agree
    assert bootstrap_stderr([1.0]) is None and bootstrap_stderr([2.0, 2.0]) == 0.0
    median = bootstrap_stderr(list(range(50)), statistic=lambda xs: sorted(xs)[len(xs) // 2])
    assert 0 < median < 10


def test_split_pair_moves_the_prompts_trailing_space_to_the_option(tiny_tokenizer):
    head, tail = split_pair(tiny_tokenizer, "答案： ", "A")
    assert tiny_tokenizer.decode(head) == "答案：" and tiny_tokenizer.decode(tail) == " A"


def test_continuation_logprobs_equal_a_hand_computed_sum_and_padding_changes_nothing(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    context, option = "星辰科技2023年营业收入为", "12.5亿元"
    head, tail = split_pair(tiny_tokenizer, context, option)
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    by_hand = sum(float(logprobs[len(head) - 1 + k, token]) for k, token in enumerate(tail))
    pairs = [(context, option), ("短", "的选项"), (context + "不同的长上下文让这一行更长", option)]
    batched = continuation_logprobs(model, tiny_tokenizer, pairs, batch_size=3)
    one_by_one = [continuation_logprobs(model, tiny_tokenizer, [pair])[0] for pair in pairs]
    assert batched[0] == pytest.approx(by_hand, abs=1e-4)
    assert batched == pytest.approx(one_by_one, abs=1e-4)


def _items(count: int, seed: int) -> list[ChoiceItem]:
    rng = random.Random(seed)
    companies = ["星辰科技", "华信银行", "远航物流", "金桥证券", "东方能源", "青云医药"]
    items = []
    for index in range(count):
        values = rng.sample(range(10, 99), 4)
        gold = index % 4  # every position equally often, so chance is 25%
        prompt = f"{companies[index % len(companies)]}第{index}题的答案是"
        items.append(ChoiceItem(prompt=prompt, options=tuple(f"{v}亿元" for v in values), gold=gold))
    return items


def test_likelihood_picks_what_a_model_was_trained_to_prefer_and_is_at_chance_untrained(tiny_tokenizer):
    items = _items(24, seed=1)
    untrained = score_by_likelihood(build_tiny_model(tiny_tokenizer, seed=3).eval(), tiny_tokenizer, _items(200, 2))
    assert 12.0 <= untrained.acc <= 38.0, untrained.acc  # chance is 25, stderr about 3
    assert untrained.acc_stderr == pytest.approx(math.sqrt(untrained.acc * (100 - untrained.acc) / 200), rel=0.2)

    torch.manual_seed(0)
    model = build_tiny_model(tiny_tokenizer, seed=4)
    texts = [item.prompt + item.options[item.gold] for item in items]
    batch = tiny_tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = score_by_likelihood(model.eval(), tiny_tokenizer, items)
    assert trained.acc >= 90.0 and trained.acc_norm >= 90.0, (trained.acc, trained.acc_norm)
    assert trained.predictions[: 4] == [item.gold for item in items[:4]]
