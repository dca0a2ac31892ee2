"""Dynamic INT8: size, save/reload round trip, closeness to fp32, and the compress stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmsmith.compress.stage import serialized_weight_bytes
from lmsmith.generation import (
    QUANTIZED_MARKER,
    QUANTIZED_STATE,
    generate_chat,
    is_quantized_folder,
    load_causal_lm,
    load_tokenizer,
    quantize_dynamic_int8,
    save_quantized,
)
from test_eval import CONVERSATIONS, fabricate_data, perturbed_model, save_model, write_manifest


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_tokenizer):
    fp32 = perturbed_model(tiny_tokenizer, std=0.05)
    int8 = quantize_dynamic_int8(copy.deepcopy(fp32))
    folder = save_quantized(int8, tiny_tokenizer, tmp_path_factory.mktemp("int8") / "int8")
    return fp32, int8, folder


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        return model(**encoded).logits


def test_int8_weights_are_smaller_than_fp32(quantized):
    fp32, _, folder = quantized
    int8_bytes = (folder / QUANTIZED_STATE).stat().st_size
    assert int8_bytes < 0.7 * serialized_weight_bytes(fp32)


def test_int8_folder_reloads_to_the_same_model(quantized, tiny_tokenizer):
    _, int8, folder = quantized
    assert is_quantized_folder(folder) and json.loads((folder / QUANTIZED_MARKER).read_text())["weight_dtype"] == "qint8"
    reloaded = load_causal_lm(folder)
    assert isinstance(reloaded.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    text = "星辰科技2023年营业收入为12.5亿元,同比增长15.2%。"
    assert torch.equal(_logits(int8, tiny_tokenizer, text), _logits(reloaded, tiny_tokenizer, text))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    in_memory = generate_chat(int8, tiny_tokenizer, CONVERSATIONS, max_new_tokens=8)
    from_disk = generate_chat(reloaded, tokenizer, CONVERSATIONS, max_new_tokens=8)
    assert in_memory.texts == from_disk.texts and in_memory.new_tokens == from_disk.new_tokens


def test_int8_logits_stay_close_to_fp32(quantized, tiny_tokenizer):
    fp32, int8, _ = quantized
    text = "归母净利润3.1亿元,毛利率为42.3%,经营活动现金流量净额为2.8亿元。"
    reference, approx = _logits(fp32, tiny_tokenizer, text), _logits(int8, tiny_tokenizer, text)
    assert not torch.equal(reference, approx)  # it really is quantized
    relative = (approx - reference).norm() / reference.norm()
    assert relative < 0.05
    assert torch.nn.functional.cosine_similarity(approx.flatten(), reference.flatten(), dim=0) > 0.99


def test_compress_stage_on_a_fabricated_run(tmp_path, tiny_tokenizer):
    from lmsmith.compress.config import CompressConfig
    from lmsmith.compress.stage import run
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe

    run_dir = tmp_path / "run"
    fabricate_data(run_dir)
    save_model(run_dir / "sft" / "merged", perturbed_model(tiny_tokenizer, std=0.05), tiny_tokenizer)
    write_manifest(run_dir, "sft", {"model": "merged"})
    stage_dir = run_dir / "compress"
    stage_dir.mkdir()

    config = CompressConfig(bench_new_tokens=4, bench_prompts=2, max_samples=3, max_new_tokens=6, ppl_docs=2)
    result = run(config, StageContext(run_dir=run_dir, stage_dir=stage_dir, recipe=Recipe()))

    assert result.outputs == {"model": "int8", "results": "results.json"}
    assert is_quantized_folder(stage_dir / "int8")
    results = json.loads((stage_dir / "results.json").read_text())
    assert results["sizes"]["int8_bytes"] < results["sizes"]["fp32_bytes"]
    assert results["reload_max_abs_diff"] <= 1e-5
    assert all(value > 0 for value in results["speed"].values())
    assert set(results["speed"]) == {"fp32_tok_s_b1", "fp32_tok_s_bn", "int8_tok_s_b1", "int8_tok_s_bn"}
    labels = [row[0] for row in results["table"]["rows"]]
    assert labels[:3] == ["weights (MB)", "decode tok/s, batch 1", "decode tok/s, batch 2"]
    assert {"ROUGE-L F (char)", "BLEU-4", "perplexity"} <= set(labels)
    assert result.metrics["size_ratio"] > 1
    assert result.metrics["delta_perplexity"] == pytest.approx(
        results["quality"]["int8"]["perplexity"] - results["quality"]["fp32"]["perplexity"], abs=1e-3)
