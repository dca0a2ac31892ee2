"""Cleaning operators, their registry and validation, the dedup key and the grouped split."""

from __future__ import annotations

import numpy as np
import pytest

from lmsmith.data.config import DataConfig
from lmsmith.data.steps.numbers import normalize_amounts
from lmsmith.data.steps import (
    DEFAULT_OPS,
    REGISTRY,
    Mapper,
    OpConfig,
    build_op,
    build_ops,
    describe_ops,
    register,
    validate_op_spec,
)
from lmsmith.data.record import dedup_key
from lmsmith.data.split import SPLITS, group_key, split_of_keys
from lmsmith.errors import UserError
from lmsmith.recipe import validate_recipe


def op(name: str, **params):
    return build_op(validate_op_spec({"op": name, **params}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("营业收入1.2亿元", "营业收入120000000元"),
        ("发行3.5万股", "发行35000股"),
        ("总额1.5万亿", "总额1500000000000"),
        ("合计1亿2000万元", "合计120000000元"),
        ("120,000,000元", "120000000元"),
        ("123,500万元", "1235000000元"),
        ("12.345678901亿", "1234567890.1"),
        ("净利润-1.2亿元", "净利润-120000000元"),
        ("12.35亿元,1.20亿元", "1235000000元,120000000元"),
        ("revenue of 1.2 billion yuan", "revenue of 1200000000 yuan"),
        ("RMB 1,235 million", "RMB 1235000000"),
        ("RMB1.2bn", "RMB1200000000"),
        ("3 Thousand units", "3000 units"),
        # percentages stay percentages
        ("毛利率为35.20%", "毛利率为35.20%"),
        ("同比增长1,234.5%", "同比增长1234.5%"),
        # years, plain decimals and lists are not touched
        ("2023年营业收入", "2023年营业收入"),
        ("2022,2023年", "2022,2023年"),
        ("基本每股收益0.85元", "基本每股收益0.85元"),
        ("12,3456", "12,3456"),
        ("版本1.2.3", "版本1.2.3"),
        ("5 millionaires", "5 millionaires"),
        ("一亿元", "一亿元"),
    ],
)
def test_normalize_numbers_table(text, expected):
    assert op("normalize_numbers").map(text) == expected


def test_normalize_numbers_switches():
    assert normalize_amounts("1.2亿 and 1.2 billion, 1,000", chinese=False) == "1.2亿 and 1200000000, 1000"
    assert normalize_amounts("1,200万", chinese=False) == "1200万"
    assert normalize_amounts("1.2 billion", english=False) == "1.2 billion"
    assert normalize_amounts("1,000元", separators=False) == "1,000元"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("电话13812345678。", "电话[PHONE]。"),
        ("电话138-1234-5678", "电话[PHONE]"),
        ("tel. +86 13812345678.", "tel. [PHONE]."),
        ("邮箱li.28@huitong-ir.com。", "邮箱[EMAIL]。"),
        ("write to a.b+c@mail.example.com.cn now", "write to [EMAIL] now"),
        ("营收13812345678元", "营收13812345678元"),  # an amount, not a phone
        ("编号12345678901", "编号12345678901"),  # 12… is no mobile prefix
        ("订单138123456789", "订单138123456789"),  # too long
        ("ratio 0.13812345678", "ratio 0.13812345678"),  # a decimal
        ("tel.13812345678", "tel.[PHONE]"),
    ],
)
def test_mask_pii_table(text, expected):
    assert op("mask_pii").map(text) == expected


def test_mask_pii_custom_tokens():
    assert op("mask_pii", phone_token="<P>", email_token="<E>").map("13912345678 x@y.cn") == "<P> <E>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('<div class="a"><p>第一段</p><p>第二段&nbsp;完</p></div>', "第一段\n第二段 完"),
        ("第一行<br/>\n第二行", "第一行\n第二行"),
        ("A &amp; B <!-- note --><script>var x = 1;</script>", "A & B"),
        ("营收<10亿, 3 < 5 > 2", "营收<10亿, 3 < 5 > 2"),
        ("no markup here", "no markup here"),
    ],
)
def test_strip_html_table(text, expected):
    assert op("strip_html").map(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("营收１２．３５亿元，同比增长（预计）", "营收12.35亿元,同比增长(预计)"),
        ("a\u3000\u3000b\t c", "a b c"),
        ("zero\u200bwidth\ufeff", "zerowidth"),
        ("line one  \n\n\n\n  line two\r\n", "line one\n\nline two"),
    ],
)
def test_unicode_normalize_table(text, expected):
    assert op("unicode_normalize").map(text) == expected


def test_unicode_normalize_nfc_keeps_full_width():
    assert op("unicode_normalize", form="NFC").map("１２，") == "１２，"


def test_remove_boilerplate_keeps_the_content():
    mapper = op("remove_boilerplate")
    text = "营业收入12.35亿元，同比增长5.00%。本报告仅供参考，不构成任何投资建议。\n投资有风险，入市需谨慎。"
    assert mapper.map(text) == "营业收入12.35亿元，同比增长5.00%。"
    english = "Revenue was RMB 1.235 billion. Disclaimer: this is for reference only. EPS was RMB 0.85."
    assert mapper.map(english) == "Revenue was RMB 1.235 billion. EPS was RMB 0.85."
    assert mapper.map("免责声明：本文仅供参考。版权所有，未经授权禁止转载。") == ""
    assert op("remove_boilerplate", extra_keywords=["广告"]).map("正文。这是广告。") == "正文。"


def test_min_length_counts_non_space_characters():
    flt = op("min_length", chars=5)
    assert flt.reject("a b c d e") is None
    assert flt.reject("ab  c") == "3 chars < 5"


def test_default_chain_cleans_a_noisy_document():
    ops = build_ops(list(DEFAULT_OPS))
    text = (
        '<p>星辰科技2023年营业收入１２．３５亿元，归母净利润120,000,000元。</p>'
        "<p>联系人：王先生，电话138-1234-5678，邮箱ir@xc-ir.com。</p><p>投资有风险，入市需谨慎。</p>"
    )
    for operator in ops:
        if isinstance(operator, Mapper):
            text = operator.map(text)
    assert text == "星辰科技2023年营业收入1235000000元,归母净利润120000000元。\n联系人:王先生,电话[PHONE],邮箱[EMAIL]。"


def test_op_specs_are_validated_and_completed():
    assert validate_op_spec({"op": "min_length"}) == {"op": "min_length", "apply_to": "both", "chars": 50}
    with pytest.raises(ValueError, match="unknown operator 'strip_htm'; available: .*strip_html"):
        validate_op_spec({"op": "strip_htm"})
    with pytest.raises(ValueError, match="missing 'op'"):
        validate_op_spec({"chars": 3})
    with pytest.raises(ValueError, match=r"min_length\.chars: Input should be greater than or equal to 1"):
        validate_op_spec({"op": "min_length", "chars": 0})
    with pytest.raises(ValueError, match=r"mask_pii\.token: unknown parameter"):
        validate_op_spec({"op": "mask_pii", "token": "x"})
    assert set(describe_ops()) == set(REGISTRY)
    assert all(describe_ops().values())


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([{"op": "strip_html"}, {"op": "nope"}], "recipe: data.ops.1: unknown operator 'nope'"),
        ([{"op": "min_length", "chars": -3}], "recipe: data.ops.0: min_length.chars:"),
        ([{"op": "strip_html", "apply_to": "everything"}], "recipe: data.ops.0: strip_html.apply_to:"),
        (["strip_html"], "recipe: data.ops.0:"),
    ],
)
def test_recipe_rejects_bad_ops_naming_the_field(ops, message):
    with pytest.raises(UserError) as error:
        validate_recipe({"data": {"ops": ops}})
    assert str(error.value).startswith(message)


def test_recipe_default_ops_are_the_default_chain():
    config = DataConfig()
    assert [spec["op"] for spec in config.ops] == [spec["op"] for spec in DEFAULT_OPS]
    assert config.ops[-1] == {"op": "min_length", "apply_to": "corpus", "chars": 50}


def test_recipe_rejects_unsupported_input_files(tmp_path):
    (tmp_path / "corpus.xlsx").write_text("a,b\n")
    with pytest.raises(UserError, match="data.corpus: .*corpus.xlsx: corpus must be a .jsonl, .json, .csv, .parquet"):
        validate_recipe({"data": {"corpus": "corpus.xlsx"}}, base_dir=tmp_path)
    with pytest.raises(UserError, match="data.instructions: file not found"):
        validate_recipe({"data": {"instructions": "missing.jsonl"}}, base_dir=tmp_path)
    with pytest.raises(UserError, match="unknown embedded dataset"):
        validate_recipe({"data": {"corpus": "embedded:legal"}})


def test_a_registered_operator_is_usable_from_a_recipe():
    class ShoutConfig(OpConfig):
        suffix: str = "!"

    @register("test_shout")
    class Shout(Mapper):
        """Upper-case the text."""

        Config = ShoutConfig

        def map(self, text: str) -> str:
            return text.upper() + self.config.suffix

    try:
        recipe = validate_recipe({"data": {"ops": [{"op": "test_shout", "suffix": "?"}]}})
        assert build_ops(recipe.data.ops)[0].map("abc") == "ABC?"
        with pytest.raises(ValueError, match="already registered"):
            register("test_shout")(Shout)
    finally:
        REGISTRY.pop("test_shout", None)


def test_dedup_key_ignores_width_case_punctuation_and_spaces():
    assert dedup_key("营业收入12.35亿元，同比增长。") == dedup_key("营业收入 12.35亿元, 同比增长.")
    assert dedup_key("Revenue UP") == dedup_key("revenue up!")
    assert dedup_key("营业收入12.35亿元") != dedup_key("营收12.35亿元")


def assign_groups(groups, ratios, seed):
    """Group name → split name, as the stream assigns them (`split_of_keys` over hashed group keys)."""
    names = sorted(set(groups))
    keys = np.array([group_key(name) for name in names], dtype=np.uint64)
    distinct, index = split_of_keys(keys, ratios, seed)
    return {name: SPLITS[int(index[at])] for name, at in zip(names, np.searchsorted(distinct, keys))}


def test_assign_groups_is_deterministic_and_follows_the_ratios():
    groups = [f"T{i}:{year}" for i in range(50) for year in range(2019, 2023)]
    first = assign_groups(groups, (0.8, 0.1, 0.1), seed=0)
    assert first == assign_groups(list(reversed(groups)), (0.8, 0.1, 0.1), seed=0)
    assert first != assign_groups(groups, (0.8, 0.1, 0.1), seed=1)
    sizes = {split: list(first.values()).count(split) for split in ("train", "val", "test")}
    assert sizes == {"train": 160, "val": 20, "test": 20}
    assert set(assign_groups(["only"], (0.8, 0.1, 0.1), seed=0).values()) == {"train"}
    assert assign_groups(groups, (0.0, 0.0, 1.0), seed=0) == {group: "test" for group in groups}
