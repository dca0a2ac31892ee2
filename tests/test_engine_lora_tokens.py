"""Adapters that trained embedding rows beside their LoRA matrices (lmsmith's default `train_tokens: used`)."""

from __future__ import annotations

import json

import pytest
import torch

from lmsmith.errors import UserError
from lmsmith.serve.engine import Engine, EngineConfig, SamplingParams
from tests.conftest import build_tiny_model
from tests.test_engine import generate_ids, hf_greedy_ids

GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 45)), [30, 31]]


def base_folder(tokenizer, folder, tied: bool):
    model = build_tiny_model(tokenizer, hidden_size=64, layers=2, seed=7).eval()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def token_adapter(base, folder, token_ids: list[int]) -> None:
    """A LoRA on q/v plus new rows for `token_ids`, saved by peft as lmsmith's training does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        trainable_token_indices=token_ids)
    peft_model = get_peft_model(base, config)
    for name, parameter in peft_model.named_parameters():
        if "trainable_tokens_delta" in name:
            parameter.data = torch.randn_like(parameter) * 0.8
    peft_model.save_pretrained(folder)


@pytest.mark.parametrize("tied", [False, True], ids=["untied-head", "tied-head"])
@pytest.mark.parametrize("bucketed", [False, True], ids=["eager", "graph-shaped"])
def test_token_rows_of_an_adapter_match_peft_and_leave_other_requests_alone(tiny_tokenizer, tmp_path, tied,
                                                                             bucketed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = base_folder(tiny_tokenizer, model_dir, tied)
    base_answers = [hf_greedy_ids(base, prompt, GREEDY.max_tokens) for prompt in PROMPTS]
    # Rows the prompts read and the answers write, so both the embedding and the head matter.
    token_ids = sorted({*PROMPTS[0], *PROMPTS[2], *(i for answer in base_answers for i in answer[:4])})
    token_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir, token_ids)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    expected = [hf_greedy_ids(reference, prompt, GREEDY.max_tokens) for prompt in PROMPTS]
    assert expected != base_answers

    engine = Engine.load(model_dir, device="cpu",
                         config=EngineConfig(max_slots=8, bucketed_decode=bucketed, graph_key_len_step=32))
    try:
        info = engine.add_lora("fin", adapter_dir)
        assert "embed_tokens" in info.target_modules and ("lm_head" in info.target_modules) == tied
        loras = ["fin", None] * len(PROMPTS)
        got = generate_ids(engine, [p for p in PROMPTS for _ in (0, 1)], GREEDY, loras)
    finally:
        engine.close()
    assert got[0::2] == expected
    assert got[1::2] == base_answers


def test_token_rows_that_do_not_fit_the_base_are_refused(tiny_tokenizer, tmp_path):
    model_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = base_folder(tiny_tokenizer, model_dir, tied=False)
    token_adapter(base, adapter_dir, [3, 4, 5])
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["trainable_token_indices"] = [3, 4]
    config_file.write_text(json.dumps(config))
    engine = Engine.load(model_dir, device="cpu", config=EngineConfig(max_slots=2))
    try:
        with pytest.raises(UserError, match=r"token rows have shape \(3, 64\); expected \(2, 64\)"):
            engine.add_lora("bad", adapter_dir)
    finally:
        engine.close()


def test_an_adapter_from_lmsmith_training_serves_like_its_merged_model(tiny_tokenizer, tmp_path):
    """The whole path a user takes: lmsmith's LoRA with `train_tokens: used`, saved, then `--lora` vs merged."""
    from lmsmith.train.config import LoraMethod
    from lmsmith.train.export import merge_adapter, save_adapter
    from lmsmith.train.methods import apply_method
    from lmsmith.train.model import load_causal_lm

    model_dir = tmp_path / "base"
    base = base_folder(tiny_tokenizer, model_dir, tied=True)
    method = LoraMethod(r=4, dropout=0.0, train_tokens="used")
    model, _ = apply_method(load_causal_lm(model_dir)[0], method, used_token_ids=sorted({*PROMPTS[0], *PROMPTS[2]}))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.normal_(std=0.3)
    adapter_dir = save_adapter(model, tmp_path / "adapter", base_model=model_dir, method=method, tokenizer=tiny_tokenizer)
    merged = load_causal_lm(merge_adapter(adapter_dir, tmp_path / "merged"))[0]
    expected = [hf_greedy_ids(merged, prompt, GREEDY.max_tokens) for prompt in PROMPTS]
    assert expected != [hf_greedy_ids(base, prompt, GREEDY.max_tokens) for prompt in PROMPTS]

    engine = Engine.load(model_dir, device="cpu", config=EngineConfig(max_slots=4))
    try:
        engine.add_lora("fin", adapter_dir)
        got = generate_ids(engine, PROMPTS, GREEDY, ["fin"] * len(PROMPTS))
    finally:
        engine.close()
    assert got == expected
