"""Pretrain and sft: answer-only labels, padding vs eos, the loop's loss normalisation, LoRA and saving."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from lmsmith.artifacts import Manifest
from lmsmith.errors import UserError
from lmsmith.pipeline import run_pipeline
from lmsmith.recipe import Recipe
from lmsmith.tokenizer.chat import END_OF_TEXT, IM_END
from lmsmith.tokenizer.config import TokenizerConfig
from lmsmith.train.config import (
    FullMethod,
    LoraMethod,
    OptimConfig,
    PretrainConfig,
    SFTConfig,
    TinyModelConfig,
)
from lmsmith.train.data import IGNORE_INDEX, Example, StepPlan, chat_example, collate, pack_documents
from lmsmith.train.forward import accumulate_gradients, loss_sum
from lmsmith.train.loop import lr_factor
from lmsmith.train.methods import apply_method, count_parameters
from lmsmith.train.model import build_tiny_model, load_causal_lm, stop_token_ids
from test_tokenizer import sft_rows, write_data_stage

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def recipe(**sft_overrides) -> Recipe:
    return Recipe(
        tokenizer=TokenizerConfig(vocab_size=420),
        pretrain=PretrainConfig(model=TINY, seq_len=32, batch_size=8, epochs=100, max_steps=40,
                                log_every=5, val_every=10,
                                optim=OptimConfig(lr=5e-3, warmup_ratio=0.1)),
        sft=SFTConfig(**{"batch_size": 8, "epochs": 100, "max_steps": 30, "log_every": 5,
                         "optim": OptimConfig(lr=5e-3), **sft_overrides}),
    )


def metric_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    run_dir = write_data_stage(tmp_path_factory.mktemp("train_run"))
    run_pipeline(recipe(), run_dir, only="tokenizer")
    run_pipeline(recipe(), run_dir, only="pretrain")
    return run_dir


@pytest.fixture(scope="module")
def lora_run(pretrained_run) -> Path:
    run_pipeline(recipe(), pretrained_run, only="sft")
    return pretrained_run


@pytest.fixture(scope="module")
def trained_tokenizer(pretrained_run):
    from lmsmith.train.model import load_tokenizer

    return load_tokenizer(pretrained_run / "tokenizer" / "tokenizer")


# ---------------------------------------------------------------- examples and batches


def test_answer_only_labels_cover_exactly_the_answer_and_its_end(trained_tokenizer):
    messages = sft_rows(1)[0]["messages"]
    example = chat_example(trained_tokenizer, messages)
    supervised = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    # One contiguous run of targets, equal to the input tokens there.
    assert supervised == list(range(supervised[0], supervised[-1] + 1))
    assert all(example.labels[i] == example.input_ids[i] for i in supervised)
    assert trained_tokenizer.decode([example.input_ids[i] for i in supervised]) == messages[-1]["content"] + IM_END
    # Everything before the answer (system, user, assistant header) is prompt.
    prompt = trained_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert trained_tokenizer.decode(example.input_ids[: supervised[0]]) == prompt
    # The newline after <|im_end|> closes the turn in the template but is not a target.
    assert example.labels[-1] == IGNORE_INDEX and example.input_ids[supervised[-1]] == trained_tokenizer.eos_token_id


def test_eos_is_a_target_and_padding_never_masks_it(trained_tokenizer):
    eos, pad = trained_tokenizer.eos_token_id, trained_tokenizer.pad_token_id
    assert pad != eos
    rows = sft_rows(3)
    rows[1]["messages"][-1]["content"] += "补充说明:数据来自年度报告。"  # make lengths differ
    examples = [chat_example(trained_tokenizer, row["messages"]) for row in rows]
    batch = collate(examples, pad_id=pad)
    assert batch.attention_mask is not None
    for row, example in enumerate(examples):
        length = len(example)
        eos_positions = [i for i, label in enumerate(batch.labels[row].tolist()) if label == eos]
        # The answer's <|im_end|> is supervised in every row, padded or not.
        assert eos_positions and batch.input_ids[row, eos_positions[-1]] == eos
        assert (batch.input_ids[row, length:] == pad).all()
        assert (batch.labels[row, length:] == IGNORE_INDEX).all()
        assert (batch.attention_mask[row, length:] == 0).all() and (batch.attention_mask[row, :length] == 1).all()
    # A pad id equal to eos would be the dangerous case; labels still come from masks, not id comparisons.
    same = collate(examples, pad_id=eos)
    assert (same.labels == batch.labels).all()
    assert batch.target_tokens == sum(sum(l != IGNORE_INDEX for l in e.labels[1:]) for e in examples)


def test_eos_target_gets_gradient(trained_tokenizer):
    """Training moves probability toward <|im_end|> at the answer's end: the end of turn is learned."""
    torch.manual_seed(0)
    model = build_tiny_model(TINY, trained_tokenizer)
    example = chat_example(trained_tokenizer, sft_rows(1)[0]["messages"])
    batch = collate([example], trained_tokenizer.pad_token_id)
    end = example.labels.index(trained_tokenizer.eos_token_id)

    def eos_logprob() -> float:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids).logits[0, end - 1]
        return float(torch.log_softmax(logits, -1)[trained_tokenizer.eos_token_id])

    before = eos_logprob()
    # Small steps: at lr 0.5 plain SGD on a random model can overshoot and lower every target's probability.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        accumulate_gradients(model, [batch])
        optimizer.step()
        optimizer.zero_grad()
    assert eos_logprob() > before + 0.5


def test_pack_documents_separates_and_blocks():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6]], separator_id=0, seq_len=3, keep_remainder=False)
    assert [b.input_ids for b in blocks] == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert all(b.labels == b.input_ids for b in blocks)
    with_rest = pack_documents([[1, 2, 3, 4]], separator_id=0, seq_len=3, keep_remainder=True)
    assert [b.input_ids for b in with_rest] == [[1, 2, 3], [4, 0]]


def test_step_plan_is_deterministic_and_groups_lengths():
    rng = random.Random(0)
    examples = [Example(input_ids=[1] * n, labels=[1] * n) for n in (rng.randint(2, 60) for _ in range(100))]
    plan = StepPlan(examples, pad_id=0, batch_size=10, grad_accum_steps=2, epochs=1.5, seed=3)
    assert len(plan) == math.ceil(5 * 1.5) == 8
    first = [[b.input_ids.shape for b in step] for step in plan]
    again = [[b.input_ids.shape for b in step] for step in plan]
    assert first == again and len(first) == 8 and all(len(step) == 2 for step in first)
    padding = sum(int((b.input_ids == 0).sum()) for step in plan for b in step)
    tokens = sum(b.input_ids.numel() for step in plan for b in step)
    # Random batches of lengths 2..60 would be about half padding; grouping keeps it small.
    assert padding / tokens < 0.1
    other_seed = [[b.input_ids.shape for b in step] for step in StepPlan(examples, 0, 10, 2, 1.5, seed=4)]
    assert other_seed != first
    assert len(StepPlan(examples, 0, 10, epochs=3, max_steps=7)) == 7


def test_lr_schedule_warms_up_then_decays_to_floor():
    factors = [lr_factor(step, 100, warmup_ratio=0.1, min_lr_ratio=0.1) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)


# ---------------------------------------------------------------- the loop


def test_loss_is_normalised_by_target_tokens_across_micro_batches(trained_tokenizer):
    """One batch, or the same examples as two micro-batches of different lengths: same loss and gradient."""
    torch.manual_seed(0)
    model = build_tiny_model(TINY, trained_tokenizer)
    rows = sft_rows(4)
    rows[0]["messages"][-1]["content"] += "这是一个更长的回答,用来制造不同的长度。" * 2
    examples = [chat_example(trained_tokenizer, row["messages"]) for row in rows]
    pad = trained_tokenizer.pad_token_id

    def run(micro_batches):
        model.zero_grad()
        total, targets = accumulate_gradients(model, micro_batches)
        return total / targets, [p.grad.clone() for p in model.parameters()]

    loss_one, grads_one = run([collate(examples, pad)])
    loss_two, grads_two = run([collate(examples[:1], pad), collate(examples[1:], pad)])
    assert loss_one == pytest.approx(loss_two, abs=1e-5)
    for a, b in zip(grads_one, grads_two):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # A per-micro-batch mean would weigh the short batch's tokens differently, so the test can tell.
    per_batch_mean = sum(
        float(loss_sum(model, collate(part, pad))[0].detach()) / collate(part, pad).target_tokens
        for part in (examples[:1], examples[1:])
    ) / 2
    assert abs(per_batch_mean - loss_one) > 1e-3


# ---------------------------------------------------------------- stages


def test_pretrain_loss_falls_and_logs_every_metric(pretrained_run):
    manifest = Manifest.read(pretrained_run / "pretrain")
    assert set(manifest.outputs) == {"model", "metrics", "alerts", "tensorboard"}
    rows = metric_rows(pretrained_run / "pretrain" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(5, 41, 5))
    assert [row["step"] for row in rows if "val_loss" in row] == [10, 20, 30, 40]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert "val_loss" in rows[-1] and manifest.metrics["val_loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-4)
    assert manifest.metrics["val_ppl"] == pytest.approx(math.exp(manifest.metrics["val_loss"]), rel=1e-3)
    # Better than a uniform guess over the vocabulary.
    assert rows[-1]["val_loss"] < math.log(420)


def test_pretrained_model_round_trips_through_disk(pretrained_run):
    model, tokenizer = load_causal_lm(pretrained_run / "pretrain" / "model")
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids(END_OF_TEXT) in model.generation_config.eos_token_id
    again, _ = load_causal_lm(pretrained_run / "pretrain" / "model")
    ids = torch.tensor([tokenizer("星辰科技2021年营业收入")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, atol=0, rtol=0)


def test_model_folder_tokenizer_gives_the_tokenizer_stage_ids(pretrained_run, trained_tokenizer):
    """transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer; the ids must not change."""
    from transformers import AutoTokenizer

    in_model_folder = AutoTokenizer.from_pretrained(pretrained_run / "pretrain" / "model")
    tricky = [
        "公司2023年营业收入12.50亿元，同比增长15.2%。星辰科技（300407.SZ）",
        "Revenue  grew\n\n\t8.5%  in FY2023; it's up.",
        '{"entities": [{"type": "date", "text": "March 23, 2021"}]}',
        "Cafe\u0301 🙂 龘",  # a decomposed accent: NFC must treat it the same way in both
    ]
    for text in tricky:
        assert in_model_folder(text)["input_ids"] == trained_tokenizer(text)["input_ids"], text
    assert in_model_folder.chat_template == trained_tokenizer.chat_template


def test_pretrain_is_deterministic(pretrained_run, tmp_path):
    for stage in ("data", "tokenizer"):
        shutil.copytree(pretrained_run / stage, tmp_path / stage)
    run_pipeline(recipe(), tmp_path, only="pretrain")
    assert metric_rows(tmp_path / "pretrain" / "metrics.jsonl")[-1]["loss"] == pytest.approx(
        metric_rows(pretrained_run / "pretrain" / "metrics.jsonl")[-1]["loss"], abs=1e-6
    )


def test_lora_trainable_count_matches_the_analytic_count(trained_tokenizer):
    hidden, inter, head_dim = TINY.hidden_size, TINY.intermediate_size, TINY.hidden_size // TINY.num_heads
    q_out, kv_out = TINY.num_heads * head_dim, TINY.num_kv_heads * head_dim
    # (in, out) of q, k, v, o, gate, up, down; a rank-r adapter adds r * (in + out) to each.
    shapes = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden),
              (hidden, inter), (hidden, inter), (inter, hidden)]
    per_layer = sum(r_in + r_out for r_in, r_out in shapes)
    used = [1, 5, 9, 5]
    cases = (
        (LoraMethod(r=4, train_tokens="none"), TINY.num_layers, 0),
        (LoraMethod(r=8, layers_to_transform=[1], train_tokens="none"), 1, 0),
        # One embedding row per distinct used token; the tied output head shares it.
        (LoraMethod(r=4, train_tokens="used"), TINY.num_layers, 3 * hidden),
        (LoraMethod(r=4, train_tokens="all"), TINY.num_layers, len(trained_tokenizer) * hidden),
    )
    base_total = count_parameters(build_tiny_model(TINY, trained_tokenizer)).total
    for method, layers, embedding_rows in cases:
        model, _ = apply_method(build_tiny_model(TINY, trained_tokenizer), method, used_token_ids=used)
        counted = count_parameters(model)
        assert counted.trainable == method.r * per_layer * layers + embedding_rows, method
        assert counted.total == base_total + counted.trainable
    full = count_parameters(apply_method(build_tiny_model(TINY, trained_tokenizer), FullMethod())[0])
    assert full.trainable == full.total == base_total


def test_lora_rejects_layers_out_of_range(trained_tokenizer):
    with pytest.raises(UserError, match="layers_to_transform.*out of range"):
        apply_method(build_tiny_model(TINY, trained_tokenizer), LoraMethod(layers_to_transform=[5]))


def test_sft_lora_learns_and_saves_adapter_and_merged_model(lora_run):
    manifest = Manifest.read(lora_run / "sft")
    assert set(manifest.outputs) == {"model", "adapter", "metrics", "alerts", "tensorboard"}
    assert manifest.outputs["model"]["path"] == "merged"
    rows = metric_rows(lora_run / "sft" / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert 0 < manifest.metrics["trainable_share"] < 0.5
    assert manifest.metrics["trainable_params"] < manifest.metrics["total_params"]


def test_merged_model_matches_the_adapter_model(lora_run):
    from peft import PeftModel

    base, tokenizer = load_causal_lm(lora_run / "pretrain" / "model")
    with torch.no_grad():
        ids = torch.tensor([tokenizer.apply_chat_template(sft_rows(1)[0]["messages"], tokenize=True,
                                                          return_dict=True)["input_ids"]])
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, lora_run / "sft" / "adapter").eval()
        adapter_logits = adapted(ids).logits
        merged, _ = load_causal_lm(lora_run / "sft" / "merged")
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter did change the model


def test_sft_full_method_has_no_adapter(pretrained_run, tmp_path):
    for stage in ("data", "tokenizer", "pretrain"):
        shutil.copytree(pretrained_run / stage, tmp_path / stage)
    run_pipeline(recipe(method=FullMethod(), max_steps=10), tmp_path, only="sft")
    manifest = Manifest.read(tmp_path / "sft")
    assert "adapter" not in manifest.outputs
    assert manifest.metrics["trainable_share"] == 1.0
    rows = metric_rows(tmp_path / "sft" / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_sft_rejects_when_every_conversation_is_too_long(pretrained_run, tmp_path):
    for stage in ("data", "tokenizer", "pretrain"):
        shutil.copytree(pretrained_run / stage, tmp_path / stage)
    with pytest.raises(UserError, match="sft.max_len"):
        run_pipeline(recipe(max_len=16), tmp_path, only="sft")


def test_stages_continue_from_a_local_base_model(pretrained_run, tiny_model_dir, tmp_path):
    """`base_model` replaces the from-scratch model (pretrain) and the pretrain output (sft)."""
    for stage in ("data", "tokenizer"):
        shutil.copytree(pretrained_run / stage, tmp_path / stage)
    settings = Recipe(pretrain=PretrainConfig(base_model=tiny_model_dir, seq_len=32, batch_size=8, max_steps=3),
                      sft=SFTConfig(base_model=tiny_model_dir, method=FullMethod(), batch_size=8, max_steps=3))
    run_pipeline(settings, tmp_path, only="pretrain")
    run_pipeline(settings, tmp_path, only="sft")
    base_config = json.loads((tiny_model_dir / "config.json").read_text())
    for folder in (tmp_path / "pretrain" / "model", tmp_path / "sft" / "merged"):
        saved = json.loads((folder / "config.json").read_text())
        assert saved["hidden_size"] == base_config["hidden_size"] != TINY.hidden_size
        assert saved["vocab_size"] == base_config["vocab_size"]
