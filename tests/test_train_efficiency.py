"""The chunked linear + cross-entropy and gradient checkpointing change memory, never the numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_model
from lmsmith.train.data import chat_example, collate
from lmsmith.train.efficiency import chunked_linear_cross_entropy, enable_gradient_checkpointing
from lmsmith.train.forward import loss_sum
from test_packing import CONVERSATIONS


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_plain_ones(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=bias)
    hidden = torch.randn(77, 24, requires_grad=True)  # 77 rows: the last chunk is partial
    targets = torch.randint(0, 300, (77,))

    def grads(loss):
        head.zero_grad()
        hidden.grad = None
        (loss * 0.3).backward()  # a scaled loss, as the loop divides by the step's target count
        found = [hidden.grad.clone(), head.weight.grad.clone()]
        return found + ([head.bias.grad.clone()] if bias else [])

    chunked = chunked_linear_cross_entropy(hidden, head, targets, chunk_size=16)
    chunked_grads = grads(chunked)
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    plain_grads = grads(plain)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_loss_with_a_frozen_head_only_backpropagates_to_the_hidden_states():
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(10, 8, requires_grad=True)
    chunked_linear_cross_entropy(hidden, head, torch.randint(0, 50, (10,)), chunk_size=3).backward()
    assert hidden.grad is not None and head.weight.grad is None


def test_chunked_loss_takes_the_checkpointed_path_for_wrapped_heads():
    """A head that is not a plain nn.Linear (a peft wrapper, say) runs per chunk under checkpointing."""
    linear = torch.nn.Linear(8, 40)
    head = torch.nn.Sequential(linear)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 40, (13,))
    chunked_linear_cross_entropy(hidden, head, targets, chunk_size=4).backward()
    chunked = hidden.grad.clone(), linear.weight.grad.clone()
    hidden.grad = None
    linear.zero_grad()
    F.cross_entropy(head(hidden), targets, reduction="sum").backward()
    torch.testing.assert_close(chunked[0], hidden.grad)
    torch.testing.assert_close(chunked[1], linear.weight.grad)


def test_model_loss_is_the_same_chunked_or_not_and_under_gradient_checkpointing(tiny_tokenizer):
    examples = [chat_example(tiny_tokenizer, messages) for messages in CONVERSATIONS]
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    model = build_tiny_model(tiny_tokenizer)
    model.train()  # the tiny model has no dropout, so train mode is deterministic

    def run(chunk_size):
        model.zero_grad()
        loss, count = loss_sum(model, batch, chunk_size=chunk_size)
        (loss / count).backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = run(None)
    chunk_loss, chunk_grads = run(7)
    enable_gradient_checkpointing(model)
    assert model.is_activation_checkpointing
    ckpt_loss, ckpt_grads = run(7)
    assert chunk_loss == pytest.approx(plain_loss, rel=1e-5)
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b, c in zip(plain_grads, chunk_grads, ckpt_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-4)


def test_chunked_loss_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(1)
    head = torch.nn.Linear(32, 200, bias=False)
    hidden = torch.randn(40, 32)
    targets = torch.randint(0, 200, (40,))
    exact = float(F.cross_entropy(head(hidden), targets, reduction="sum"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = chunked_linear_cross_entropy(hidden, head, targets, chunk_size=8)
    assert mixed.dtype == torch.float32
    assert float(mixed) == pytest.approx(exact, rel=2e-2)
