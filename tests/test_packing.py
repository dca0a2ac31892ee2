"""Packing several conversations into one row: position_ids restart per document, attention stays
inside each document, and the loss and gradients equal those of the unpacked examples."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from lmsmith.train.data import IGNORE_INDEX, Example, chat_example, collate, pack_examples
from lmsmith.train.forward import loss_sum

CONVERSATIONS = [
    [{"role": "user", "content": "星辰科技2023年营业收入是多少?"}, {"role": "assistant", "content": "12.5亿元。"}],
    [{"role": "system", "content": "你是财务分析助手。"},
     {"role": "user", "content": "请计算2023年营业收入的同比增长率。"},
     {"role": "assistant", "content": "同比增长15.2%,毛利率为42.3%。"}],
    [{"role": "user", "content": "华信银行2022年总资产?"}, {"role": "assistant", "content": "520亿元"}],
    [{"role": "user", "content": "revenue?"}, {"role": "assistant", "content": "1.2 billion yuan, up 8.5%."}],
    [{"role": "user", "content": "归母净利润?"}, {"role": "assistant", "content": "3.1亿元。"}],
]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer) -> list[Example]:
    return [chat_example(tiny_tokenizer, messages) for messages in CONVERSATIONS]


def test_pack_examples_fills_rows_without_losing_tokens(examples):
    capacity = max(len(e) for e in examples) + 20
    packed = pack_examples(examples, capacity)
    assert len(packed) < len(examples)
    assert all(len(row) <= capacity for row in packed)
    assert sorted(len(row) for row in packed) != sorted(len(e) for e in examples)
    assert sum(len(row) for row in packed) == sum(len(e) for e in examples)
    for row in packed:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        # Each document's positions count up from 0; its first token is never the previous one's target.
        assert starts[0] == 0
        assert all(row.labels[s] == IGNORE_INDEX for s in starts)
        lengths = [b - a for a, b in zip(starts, starts[1:] + [len(row)])]
        assert row.position_ids == [p for n in lengths for p in range(n)]
    targets = sum(sum(l != IGNORE_INDEX for l in e.labels) for e in examples)
    assert sum(sum(l != IGNORE_INDEX for l in row.labels) for row in packed) == targets


def test_a_too_long_example_gets_its_own_row(examples):
    packed = pack_examples(examples, capacity=len(examples[1]) - 1)
    assert any(row.input_ids == examples[1].input_ids for row in packed)


def test_packed_batch_has_no_attention_mask_and_counts_real_tokens(examples):
    packed = pack_examples(examples, capacity=64)
    batch = collate(packed, pad_id=0)
    assert batch.attention_mask is None and batch.position_ids is not None
    assert batch.tokens == sum(len(e) for e in examples)
    assert batch.target_tokens == sum(sum(l != IGNORE_INDEX for l in e.labels[1:]) for e in examples)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(tiny_tokenizer, examples, attention):
    model = build_tiny_model(tiny_tokenizer)
    model.set_attn_implementation(attention)
    pad = tiny_tokenizer.pad_token_id

    def run(batches):
        model.zero_grad()
        total = sum(loss_sum(model, batch)[0] for batch in batches)
        total.backward()
        return float(total.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    alone_loss, alone_grads = run([collate([e], pad) for e in examples])
    packed = pack_examples(examples, capacity=64)
    assert len(packed) >= 2  # rows of different lengths, so the batch is padded too
    packed_loss, packed_grads = run([collate(packed, pad)])
    assert packed_loss == pytest.approx(alone_loss, rel=1e-5)
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_documents_in_a_row_do_not_see_each_other(tiny_tokenizer, examples):
    """Changing the first document leaves the second one's logits untouched."""
    model = build_tiny_model(tiny_tokenizer).eval()
    first, second = examples[0], examples[2]
    other_first = chat_example(tiny_tokenizer, CONVERSATIONS[4])
    assert len(other_first) != len(first) or other_first.input_ids != first.input_ids

    def second_logits(lead: Example) -> torch.Tensor:
        row = pack_examples([lead, second], capacity=len(lead) + len(second))
        assert len(row) == 1
        batch = collate(row, tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        starts = [i for i, p in enumerate(row[0].position_ids) if p == 0]
        start = next(s for s in starts if row[0].input_ids[s : s + len(second)] == second.input_ids)
        return logits[start : start + len(second)]

    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
    torch.testing.assert_close(second_logits(first), alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second_logits(other_first), alone, atol=1e-5, rtol=1e-4)
