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


def test_text_metrics_on_hand_computed_cases():
    from lmsmith.eval.metrics import chrf, edit_rates, exact_match

    # One substitution in a 10-character reference; 3 deletions against 6 characters.
    assert edit_rates(["营业收入12.5亿元", "abc"], ["营业收入12.6亿元", "abcdef"]) == pytest.approx([10.0, 50.0])
    assert edit_rates(["", "ＡＢＣ"], ["abc", "ABC"]) == pytest.approx([100.0, 0.0])  # NFKC folds full width
    assert exact_match([" 答案  A ", "答案B"], ["答案 A", "答案 B"]) == [100.0, 0.0]
    assert chrf(["营业收入增长"], ["营业收入增长"]) == pytest.approx(100.0)
    assert 0.0 < chrf(["营业收入增长"], ["营业收入下降"]) < 100.0


@pytest.mark.parametrize("text, value", [
    ("净利润为1.2亿元", 1.2e8),
    ("净利润(1,234)万元", -1.234e7),       # an accounting negative, in 万
    ("亏损（1,200）元", -1200.0),           # full-width parentheses
    ("revenue of 3.5 million", 3.5e6),
    ("营收 120,000,000 元", 1.2e8),
    ("１２．５亿", 1.25e9),                 # full-width digits
    ("同比下降3.2%", -3.2),
    ("增长15.2%，营收12亿", 15.2),          # a percentage is the answer when there is one
])
def test_numbers_are_read_with_scales_and_signs(text, value):
    from lmsmith.eval.metrics import extract_number, numeric_match

    assert extract_number(text) == pytest.approx(value)
    assert numeric_match(text, value * 1.004, rel_tol=0.01) and not numeric_match(text, value * 1.1, rel_tol=0.01)


def test_classification_scores_by_hand():
    from lmsmith.eval.labels import classification_scores

    gold = ["利好", "利好", "利空", "中性", "利空"]
    predicted = ["利好", "利空", "利空", None, "利空"]
    scores = classification_scores(gold, predicted, labels=["利好", "利空", "中性"])
    assert scores["accuracy"] == pytest.approx(0.6)
    # 利好: P 1/1, R 1/2 → F1 2/3; 利空: P 2/3, R 2/2 → F1 0.8; 中性: 0 → macro (2/3 + 0.8 + 0) / 3
    assert scores["per_label"]["利好"]["f1"] == pytest.approx(0.6667, abs=1e-4)
    assert scores["per_label"]["利空"]["f1"] == pytest.approx(0.8)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 3, abs=1e-4)
    assert scores["confusion"]["利好"] == {"利好": 1, "利空": 1, "中性": 0, "<other>": 0}
    assert scores["confusion"]["中性"]["<other>"] == 1


def test_entity_scores_by_hand():
    from lmsmith.eval.labels import entity_scores

    gold = [["B-COMPANY", "I-COMPANY", "O", "B-AMOUNT"], ["B-METRIC", "O"]]
    predicted = [["B-COMPANY", "I-COMPANY", "O", "O"], ["B-METRIC", "B-AMOUNT"]]
    scores = entity_scores(gold, predicted)
    # gold: COMPANY, AMOUNT, METRIC; predicted: COMPANY (right), METRIC (right), AMOUNT (wrong span)
    assert (scores["precision"], scores["recall"]) == pytest.approx((2 / 3, 2 / 3), abs=1e-4)
    assert scores["per_type"]["AMOUNT"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["per_type"]["COMPANY"]["f1"] == 1.0
    with pytest.raises(ValueError, match="sequence 1: 2 gold tags but 1 predicted"):
        entity_scores(gold, [predicted[0], ["O"]])


def test_corpus_score_bootstraps_from_summed_statistics_equal_the_recomputed_ones():
    from lmsmith.eval.labels import entity_scores, span_counts
    from lmsmith.eval.metrics import bleu4, chrf, corpus_statistics
    from lmsmith.eval.stats import bootstrap_stderr, bootstrap_stderr_of_sums

    hypotheses = ["营业收入12.5亿元，同比增长15.2%", "归母净利润3.1亿元", "毛利率为42.3%", "资产负债率61.2%", "EPS 0.95元"]
    references = ["营业收入为12.5亿元，同比增长15.2%。", "归母净利润为3.1亿元。", "毛利率42.3%。", "资产负债率为61.2%。",
                  "基本每股收益0.95元。"]
    pairs = list(zip(hypotheses, references))
    for name, metric in (("bleu4", bleu4), ("chrf", chrf)):
        stats, from_sums = corpus_statistics(name, hypotheses, references)
        assert from_sums(stats.sum(axis=0)) == pytest.approx(metric(hypotheses, references))
        slow = bootstrap_stderr(pairs, lambda sample, m=metric: m([h for h, _ in sample], [r for _, r in sample]),
                                resamples=60)
        assert bootstrap_stderr_of_sums(stats, from_sums, resamples=60) == pytest.approx(slow, rel=1e-9)
    gold = [["B-ORG", "I-ORG", "O", "B-NUM"], ["O", "B-ORG", "O", "O"], ["B-NUM", "I-NUM", "O", "B-ORG"]]
    predicted = [["B-ORG", "I-ORG", "O", "O"], ["O", "B-ORG", "I-ORG", "O"], ["B-NUM", "I-NUM", "O", "B-ORG"]]
    counts = span_counts(gold, predicted)
    assert counts.tolist() == [[1, 1, 2], [0, 1, 1], [2, 2, 2]]
    f1 = lambda sums: 2 * sums[0] / (sums[1] + sums[2]) if sums[1] + sums[2] else 0.0  # noqa: E731
    assert f1(counts.sum(axis=0)) == pytest.approx(entity_scores(gold, predicted)["f1"], abs=1e-4)
    slow = bootstrap_stderr(list(zip(gold, predicted)), lambda sample: entity_scores(
        [g for g, _ in sample], [p for _, p in sample])["f1"], resamples=60)
    assert bootstrap_stderr_of_sums(counts, f1, resamples=60) == pytest.approx(slow, abs=2e-4)  # seqeval rounds to 4 places
