"""Eval metrics, the shared generation loop, and the eval stage on a fabricated run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model
from lmsmith.artifacts import Manifest
from lmsmith.errors import UserError
from lmsmith.eval.data import Instruction, read_instructions, spread_over_tasks
from lmsmith.eval.metrics import (
    _windows,
    bleu4,
    extract_number,
    numeric_match,
    perplexity,
    rouge_l,
)
from lmsmith.generation import generate_chat, render_prompts

CONVERSATIONS = [
    [{"role": "user", "content": "请计算2023年营业收入的同比增长率。"}],
    [{"role": "system", "content": "你是财务分析师。"}, {"role": "user", "content": "毛利率为多少?"}],
    [{"role": "user", "content": "The company reported revenue of 1.2 billion yuan in 2023, up 8.5% year over year."}],
]


def perturbed_model(tokenizer, seed: int = 1, std: float = 0.3):
    """The tiny model with large random weights, so greedy decoding produces varied tokens."""
    model = build_tiny_model(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


# --- text metrics ---------------------------------------------------------------------------------

def test_bleu_is_100_for_identical_and_near_0_for_disjoint_texts():
    references = ["星辰科技2023年营业收入为12.5亿元,同比增长15.2%。", "毛利率为42.3%。"]
    assert bleu4(references, references) == pytest.approx(100.0)
    assert bleu4(["今天天气很好我们去公园散步吧"] * 2, references) < 1.0


def test_rouge_l_is_character_level_on_chinese():
    # LCS("收入大幅增长", "营业收入增长") = 收入增长 (4 chars): P = R = 4/6.
    assert rouge_l(["收入大幅增长"], ["营业收入增长"]) == pytest.approx(100 * 4 / 6)
    # LCS("利润增长", "净利润同比增长") = 利润增长: P = 4/4, R = 4/7, F = 2PR/(P+R) = 8/11.
    assert rouge_l(["利润增长"], ["净利润同比增长"]) == pytest.approx(100 * 8 / 11)
    assert rouge_l(["完全无关"], ["营业收入"]) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("同比增长率为15.00%。", 15.0),
        ("增长率 = -3.2%", -3.2),
        ("１５％", 15.0),
        ("同比增长率为1,234.5%", 1234.5),
        ("同比下降3.2%", -3.2),
        ("(14.4-12.5)/12.5×100%=15.2%", 15.2),
        ("2022-2023年同比增长−4.5%", -4.5),
        ("营业收入12.5亿元,同比增长8.1 %,净利润3.1亿元", 8.1),
        ("营业收入为12.5亿元", 1.25e9),  # in base units: the scale word applies
        ("＋8.5％", 8.5),
        ("revenue was down 2.1% year over year", -2.1),
        ("同比-0.35%", -0.35),
        ("没有数字", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == (None if expected is None else pytest.approx(expected))


def test_numeric_match_uses_relative_tolerance():
    assert numeric_match("同比增长15.23%", 15.2345, rel_tol=0.01)
    assert not numeric_match("同比增长16.0%", 15.2345, rel_tol=0.01)
    assert numeric_match("0.00%", 0.004, rel_tol=0.01)  # rounding allowance near zero
    assert not numeric_match("无法计算", 15.2, rel_tol=0.01)


# --- perplexity -----------------------------------------------------------------------------------

class ZeroLogits(torch.nn.Module):
    """A 'model' whose next-token distribution is always uniform over `vocab` tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.seen_widths: list[int] = []

    def forward(self, input_ids, attention_mask=None):
        self.seen_widths.append(input_ids.shape[1])
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_of_zero_logits_is_the_vocab_size(tiny_tokenizer):
    vocab = len(tiny_tokenizer) + 100  # padded embedding tables are wider than the tokenizer
    model = ZeroLogits(vocab=vocab)
    documents = ["星辰科技2023年营业收入为12.5亿元,同比增长15.2%。" * 6, "毛利率为42.3%。", "x"]
    result = perplexity(model, tiny_tokenizer, documents, max_length=16, batch_size=3)
    assert result.perplexity == pytest.approx(vocab)
    lengths = [len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents]
    assert result.tokens == sum(length - 1 for length in lengths)  # every token but each first, once
    assert max(model.seen_widths) <= 16


@pytest.mark.parametrize("length, window, stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 4), (50, 8, 7), (33, 5, 1)])
def test_windows_score_every_token_once(length, window, stride):
    scored = []
    for start, end, first in _windows(length, window, stride):
        assert end - start <= window and start < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, length))


def test_perplexity_matches_the_models_own_loss(tiny_tokenizer):
    model = perturbed_model(tiny_tokenizer, std=0.05)
    text = "归母净利润3.1亿元,毛利率为42.3%,经营活动现金流量净额为2.8亿元。"
    ids = tiny_tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, tiny_tokenizer, [text]).perplexity == pytest.approx(math.exp(loss), rel=1e-4)


# --- generation -----------------------------------------------------------------------------------

def test_greedy_generation_equals_hf_generate_on_a_mixed_length_batch(tiny_tokenizer):
    model = perturbed_model(tiny_tokenizer)
    tokenizer = tiny_tokenizer
    prompts = render_prompts(tokenizer, CONVERSATIONS)
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(encoded["attention_mask"].sum(-1).tolist())) == 3  # really mixed lengths
    width = encoded["input_ids"].shape[1]

    # Make a token that the second row emits mid-way an extra eos, so stopping is exercised too.
    free_run = model.generate(**encoded, max_new_tokens=10, do_sample=False)[:, width:]
    stop_token = int(free_run[1, 4])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_token]

    expected = model.generate(**encoded, max_new_tokens=10, do_sample=False)[:, width:].tolist()
    ours = generate_chat(model, tokenizer, CONVERSATIONS, max_new_tokens=10, batch_size=3)

    eos = {tokenizer.eos_token_id, stop_token}
    for row, text, count in zip(expected, ours.texts, ours.new_tokens):
        stop = next((i for i, token in enumerate(row) if token in eos), None)
        content = row if stop is None else row[:stop]
        assert count == (len(row) if stop is None else stop + 1)
        assert text == tokenizer.decode(content, skip_special_tokens=True).strip()
    assert ours.new_tokens[1] <= 5
    assert ours.wall_s > 0


def test_generation_does_not_depend_on_batching(tiny_tokenizer):
    model = perturbed_model(tiny_tokenizer, seed=3, std=0.1)
    batched = generate_chat(model, tiny_tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=3)
    single = generate_chat(model, tiny_tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=1)
    assert batched.texts == single.texts


def test_sampled_generation_is_reproducible_from_its_seed(tiny_tokenizer):
    model = perturbed_model(tiny_tokenizer, std=0.05)
    kwargs = dict(max_new_tokens=8, batch_size=3, do_sample=True, temperature=1.0, top_p=0.9)
    first = generate_chat(model, tiny_tokenizer, CONVERSATIONS, seed=7, **kwargs)
    again = generate_chat(model, tiny_tokenizer, CONVERSATIONS, seed=7, **kwargs)
    other = generate_chat(model, tiny_tokenizer, CONVERSATIONS, seed=8, **kwargs)
    assert first.texts == again.texts
    assert first.texts != other.texts


def test_fixed_length_decoding_ignores_eos(tiny_tokenizer):
    model = perturbed_model(tiny_tokenizer)
    model.generation_config.eos_token_id = list(range(len(tiny_tokenizer)))  # every token would stop
    stopped = generate_chat(model, tiny_tokenizer, CONVERSATIONS, max_new_tokens=5)
    fixed = generate_chat(model, tiny_tokenizer, CONVERSATIONS, max_new_tokens=5, stop_at_eos=False)
    assert stopped.new_tokens == [1, 1, 1]
    assert fixed.new_tokens == [5, 5, 5]


# --- held-out data --------------------------------------------------------------------------------

def _instruction(task: str, index: int) -> Instruction:
    return Instruction(id=f"{task}-{index}", task=task, prompt=[{"role": "user", "content": "q"}],
                       reference="a", answer={})


def test_spread_over_tasks_is_round_robin_and_deterministic():
    rows = [_instruction("yoy", i) for i in range(5)] + [_instruction("ratio", i) for i in range(2)]
    chosen = [row.id for row in spread_over_tasks(rows, 5)]
    assert chosen == ["ratio-0", "yoy-0", "ratio-1", "yoy-1", "yoy-2"]
    assert spread_over_tasks(rows, None) == rows


def test_bad_instruction_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    good = {"id": "a", "task": "qa", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"id": "b", "task": "qa", "messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError, match=r"test\.jsonl:2: the last message must be the assistant"):
        read_instructions(path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(UserError, match=r"test\.jsonl:2: invalid JSON"):
        read_instructions(path)


# --- the stage on a fabricated run ----------------------------------------------------------------

SFT_ROWS = [
    {"id": "y1", "task": "yoy", "answer": {"value": 15.2},
     "messages": [{"role": "user", "content": "星辰科技2023年营业收入为12.5亿元,请计算同比增长率。"},
                  {"role": "assistant", "content": "同比增长率为15.2%。"}]},
    {"id": "y2", "task": "yoy", "answer": {"value": -3.2},
     "messages": [{"role": "user", "content": "华信银行总资产的同比增长率是多少?"},
                  {"role": "assistant", "content": "同比增长率为-3.2%。"}]},
    {"id": "s1", "task": "summary", "answer": {},
     "messages": [{"role": "system", "content": "你是财务分析师。"},
                  {"role": "user", "content": "请概括:归母净利润3.1亿元,毛利率为42.3%。"},
                  {"role": "assistant", "content": "归母净利润3.1亿元,毛利率42.3%。"}]},
    {"id": "s2", "task": "summary", "answer": {},
     "messages": [{"role": "user", "content": "请概括:资产负债率为61.2%。"},
                  {"role": "assistant", "content": "资产负债率61.2%。"}]},
]
CORPUS_ROWS = [{"id": f"c{i}", "text": text, "source": "test", "noise": []}
               for i, text in enumerate(["星辰科技2023年营业收入为12.5亿元,同比增长15.2%。",
                                         "华信银行2022年总资产为520亿元,资产负债率为61.2%。",
                                         "The company reported revenue of 1.2 billion yuan in 2023."])]


def write_manifest(run_dir: Path, stage: str, outputs: dict[str, str], metrics: dict | None = None,
                   wall_time_s: float = 1.0) -> None:
    stage_dir = run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    Manifest(stage=stage, config={}, config_hash=stage, inputs={},
             outputs={name: {"path": path, "hash": "h"} for name, path in outputs.items()},
             metrics=metrics or {}, wall_time_s=wall_time_s).write(stage_dir)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def fabricate_data(run_dir: Path) -> None:
    write_jsonl(run_dir / "data" / "sft" / "test.jsonl", SFT_ROWS)
    write_jsonl(run_dir / "data" / "corpus" / "test.jsonl", CORPUS_ROWS)
    write_manifest(run_dir, "data", {"sft_test": "sft/test.jsonl", "corpus_test": "corpus/test.jsonl"},
                   {"sft_test": len(SFT_ROWS), "corpus_test": len(CORPUS_ROWS)})


def save_model(folder: Path, model, tokenizer) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_eval_stage_compares_base_tuned_and_int8_on_the_held_out_split(tmp_path, tiny_tokenizer, tiny_model_dir):
    from lmsmith.eval.config import EvalConfig
    from lmsmith.eval.stage import run
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe

    run_dir = tmp_path / "run"
    fabricate_data(run_dir)
    import shutil

    shutil.copytree(tiny_model_dir, run_dir / "pretrain" / "model")
    write_manifest(run_dir, "pretrain", {"model": "model"})
    tuned = perturbed_model(tiny_tokenizer, std=0.05)
    save_model(run_dir / "sft" / "merged", tuned, tiny_tokenizer)
    write_manifest(run_dir, "sft", {"model": "merged"}, {"trainable_params": 1234})
    from lmsmith.compress.config import DynamicInt8
    from lmsmith.compress.folder import save_variant
    from lmsmith.compress.methods import dynamic_int8

    save_variant(dynamic_int8(tuned, DynamicInt8(name="int8"), None).model, tiny_tokenizer, run_dir / "compress" / "int8")
    write_manifest(run_dir, "compress", {"variant.int8": "int8"})
    stage_dir = run_dir / "eval"
    stage_dir.mkdir()

    config = EvalConfig(tasks=["held-out"], max_items=3, max_new_tokens=6, batch_size=2, speed_requests=2,
                        variants=["int8"])
    recipe = Recipe(pretrain={}, sft={}, compress={}, eval=config)
    result = run(config, StageContext(run_dir=run_dir, stage_dir=stage_dir, recipe=recipe))

    assert set(result.outputs) == {"results", "table", "html", "plots", "tasks"}
    results = json.loads((stage_dir / "results.json").read_text())
    assert list(results["models"]) == ["base", "tuned", "int8"]
    assert results["models"]["int8"]["size_bytes"] < results["models"]["tuned"]["size_bytes"]
    assert results["models"]["int8"]["params"] == results["models"]["tuned"]["params"]
    assert results["models"]["tuned"]["trainable_params"] == 1234 and results["models"]["base"]["trainable_params"] is None
    assert {name: info["items"] for name, info in results["tasks"].items()} == {
        "held-out-answers": 3, "held-out-numeric": 2, "held-out-perplexity": 3}
    perplexity = {label: results["tasks"]["held-out-perplexity"]["scores"][label]["perplexity"]
                  for label in ("base", "tuned", "int8")}
    assert perplexity["base"] != perplexity["tuned"] and perplexity["tuned"] == pytest.approx(perplexity["int8"], rel=0.05)
    assert result.metrics["tuned.held-out-perplexity.perplexity"] == pytest.approx(perplexity["tuned"], abs=1e-3)
    assert set(results["tuned_beats_base"]) >= {"held-out-answers rougeL", "held-out-numeric numeric_acc"}
    table = (stage_dir / "table.md").read_text()
    assert "| model | held-out-answers rougeL |" in table and "| int8 |" in table and "1,234" in table
    assert (stage_dir / "plots" / "scores.png").is_file() and (stage_dir / "report.html").is_file()


def test_eval_stage_writes_the_finance_suite_held_out_of_the_runs_companies(tmp_path, tiny_tokenizer, tiny_model_dir):
    from lmsmith.eval.stage import task_files
    from lmsmith.eval.tasks import load_task, read_items
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe

    run_dir = tmp_path / "run"
    fabricate_data(run_dir)
    recipe = Recipe(data={"embedded": {"seed": 3, "companies": 40}}, sft={"base_model": str(tiny_model_dir)})
    ctx = StageContext(run_dir=run_dir, stage_dir=run_dir / "eval", recipe=recipe)
    paths = task_files(["finance-suite"], ctx, tmp_path / "tasks", max_items=5)
    tasks = [load_task(path) for path in paths]
    assert [task.name for task in tasks] == ["finance-mc", "finance-yoy", "finance-entities", "finance-report",
                                             "finance-news", "finance-kbqa", "finance-kbqa-closed",
                                             "finance-retrieval"]
    assert all(task.limit == 5 for task in tasks)
    suite_text = "".join((tmp_path / "tasks" / "finance-suite").glob("*.jsonl").__next__().read_text()
                         for _ in range(1))
    from lmsmith.datasets.finance import generate

    trained = generate(3, 40, 5).companies
    assert not any(company.name in suite_text for company in trained)
    assert len(read_items(tasks[0])) >= 300  # the limit applies when scoring, not to the file


def test_tokenizer_loaded_from_a_model_folder_keeps_its_trained_ids(tiny_model_dir, tiny_tokenizer):
    from lmsmith.generation import load_tokenizer

    text = "星辰科技2023年营业收入为12.5亿元"
    loaded = load_tokenizer(tiny_model_dir)  # config.json (qwen2) sits beside the tokenizer
    assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert loaded.padding_side == "left" and loaded.chat_template == tiny_tokenizer.chat_template
