"""Objectives: causal-LM loss as (sum, count), class weights, and chunked distillation against naive references."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import SAMPLE_TEXTS, build_tiny_model
from lmsmith.errors import UserError
from lmsmith.train.objectives import (
    causal_lm_loss,
    check_shared_vocabulary,
    distillation_loss,
    load_class_weights,
    sample_weights_for,
)


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    encoded = tiny_tokenizer(SAMPLE_TEXTS[:3], add_special_tokens=False, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    labels[:, :2] = -100  # a prompt the loss skips
    return encoded["input_ids"], labels, encoded["attention_mask"]


def naive_token_losses(model, input_ids, labels, attention_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"), targets != -100


def grads(model) -> list[torch.Tensor]:
    result = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return result


def test_causal_lm_loss_is_a_sum_and_count_with_chunked_gradients(tiny_tokenizer, batch):
    model = build_tiny_model(tiny_tokenizer)
    input_ids, labels, mask = batch
    total, count = causal_lm_loss(model, input_ids, labels, mask, chunk_tokens=5)
    total.backward()
    chunked = grads(model)
    losses, selected = naive_token_losses(model, input_ids, labels, mask)
    reference = losses[selected].sum()
    reference.backward()
    assert count == int(selected.sum()) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total, reference, atol=1e-4, rtol=1e-6)
    for got, want in zip(chunked, grads(model)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_class_weights_scale_each_sequence(tiny_tokenizer, batch, tmp_path):
    path = tmp_path / "class_weights.json"
    path.write_text(json.dumps({"field": "task", "weights": {"extract": 2.0, "yoy": 0.5}}))
    weights = sample_weights_for(["extract", "yoy", "unseen"], load_class_weights(path))
    assert weights.tolist() == [2.0, 0.5, 1.0]
    model = build_tiny_model(tiny_tokenizer)
    input_ids, labels, mask = batch
    with torch.no_grad():
        total, count = causal_lm_loss(model, input_ids, labels, mask, sample_weights=weights)
        losses, selected = naive_token_losses(model, input_ids, labels, mask)
    per_sequence = (losses * selected).sum(dim=1)
    torch.testing.assert_close(total, (per_sequence * weights).sum(), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(count, (selected.sum(dim=1) * weights).sum())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"counts": {}}))
    with pytest.raises(UserError, match="not a class_weights.json"):
        load_class_weights(bad)


def test_distillation_has_zero_kl_when_student_is_the_teacher(tiny_tokenizer, batch):
    student = build_tiny_model(tiny_tokenizer)
    teacher = copy.deepcopy(student)
    input_ids, labels, mask = batch
    with torch.no_grad():
        kl_only, count = distillation_loss(student, teacher, input_ids, labels, mask, temperature=2.0, alpha=1.0)
        ce_only, _ = distillation_loss(student, teacher, input_ids, labels, mask, alpha=0.0)
        ce, _ = causal_lm_loss(student, input_ids, labels, mask)
    assert count > 0 and abs(float(kl_only)) < 1e-4
    torch.testing.assert_close(ce_only, ce)


@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.5), (1.0, 0.9)])
def test_chunked_distillation_matches_a_naive_reference(tiny_tokenizer, batch, temperature, alpha):
    student, teacher = build_tiny_model(tiny_tokenizer, seed=1), build_tiny_model(tiny_tokenizer, seed=2)
    input_ids, labels, mask = batch
    loss, count = distillation_loss(student, teacher, input_ids, labels, mask, temperature=temperature,
                                    alpha=alpha, chunk_tokens=4)
    loss.backward()
    chunked = grads(student)
    assert not any(p.grad is not None for p in teacher.parameters())

    logits = student(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    selected = labels[:, 1:] != -100
    s, t, y = logits[selected], teacher_logits[selected], labels[:, 1:][selected]
    p_teacher = F.softmax(t / temperature, dim=-1)
    kl = (p_teacher * (F.log_softmax(t / temperature, -1) - F.log_softmax(s / temperature, -1))).sum()
    reference = alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(s, y, reduction="sum")
    reference.backward()
    assert count == int(selected.sum())
    torch.testing.assert_close(loss, reference, atol=1e-4, rtol=1e-5)
    assert float(loss) > 0
    for got, want in zip(chunked, grads(student)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_teacher_must_share_the_vocabulary(tiny_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    student = build_tiny_model(tiny_tokenizer)
    other = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tiny_tokenizer) + 7, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UserError, match="share a tokenizer"):
        check_shared_vocabulary(student, other)
