"""Every training method: analytic trainable-parameter counts, loss falling on tiny data, a save/load round
trip with identical logits, the optimiser it gets, and the one `method:` schema."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from conftest import SAMPLE_TEXTS, build_tiny_model
from lmsmith.errors import UserError
from lmsmith.train.config import FullMethod, LoraMethod, MethodConfig, OptimConfig
from lmsmith.train.method_config import (
    DoraMethod,
    FreezeMethod,
    Ia3Method,
    PrefixTuningMethod,
    PromptTuningMethod,
    QLoraMethod,
)
from lmsmith.train.methods import apply_method, build_optimizer, count_parameters, quantize_linear_layers
from lmsmith.train.objectives import causal_lm_loss

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2  # conftest.build_tiny_model's shape
HEAD_DIM = HIDDEN // HEADS
KV = KV_HEADS * HEAD_DIM
# (in, out) of q, k, v, o, gate, up, down in one layer
LINEARS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
# Qwen2 has biases on q, k and v only; two RMSNorms per layer.
LAYER_PARAMS = sum(i * o for i, o in LINEARS.values()) + HIDDEN + 2 * KV + 2 * HIDDEN


def lora_count(r: int, layers: int = LAYERS) -> int:
    return r * sum(i + o for i, o in LINEARS.values()) * layers


CASES = {
    "full": (FullMethod(), None),
    "freeze_last": (FreezeMethod(last_n_layers=1), LAYER_PARAMS + HIDDEN),  # + final norm
    "freeze_pattern": (FreezeMethod(pattern=r"mlp\.", train_final_norm=False), 3 * HIDDEN * INTER * LAYERS),
    "lora": (LoraMethod(r=4, dropout=0.0, train_tokens="none"), lora_count(4)),
    "lora_last_layer": (LoraMethod(r=4, dropout=0.0, layers_to_transform=[1], train_tokens="none"), lora_count(4, 1)),
    # DoRA adds one magnitude per output feature of every adapted linear.
    "dora": (DoraMethod(r=4, dropout=0.0, train_tokens="none"),
             lora_count(4) + sum(o for _, o in LINEARS.values()) * LAYERS),
    "qlora": (QLoraMethod(r=4, dropout=0.0, train_tokens="none"), lora_count(4)),
    # A key and a value vector per virtual token, layer and kv head.
    "prefix": (PrefixTuningMethod(num_virtual_tokens=4), 4 * LAYERS * 2 * KV),
    "prompt": (PromptTuningMethod(num_virtual_tokens=4), 4 * HIDDEN),
    # peft's qwen2 default: scale q and v outputs and the down projection's input.
    "ia3": (Ia3Method(), (HIDDEN + KV + INTER) * LAYERS),
}
LEARNING_RATES = {"prefix": 3e-2, "prompt": 1e-1, "ia3": 5e-2}


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    encoded = tiny_tokenizer(SAMPLE_TEXTS[:4], add_special_tokens=False, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


def mean_loss(model, batch) -> torch.Tensor:
    total, count = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    return total / count


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def fresh_base(tiny_tokenizer, method):
    base = build_tiny_model(tiny_tokenizer)
    if isinstance(method, QLoraMethod):
        quantize_linear_layers(base, method)  # the 4-bit rounding is deterministic
    return base


@pytest.mark.parametrize("case", list(CASES))
def test_method_counts_trains_and_round_trips(case, tiny_tokenizer, batch, tmp_path):
    from peft import PeftModel

    method, expected_trainable = CASES[case]
    base_total = count_parameters(build_tiny_model(tiny_tokenizer)).total
    torch.manual_seed(0)
    model, stats = apply_method(build_tiny_model(tiny_tokenizer), method)

    assert stats == count_parameters(model)
    if expected_trainable is None:
        assert stats.trainable == stats.total == base_total
    else:
        assert stats.trainable == expected_trainable
        # Adapters add their parameters to the base; freezing only switches some off.
        assert stats.total == base_total + (0 if case.startswith("freeze") else expected_trainable)
    assert 0 < stats.share <= 1

    optimizer = build_optimizer(model, method, OptimConfig(lr=LEARNING_RATES.get(case, 1e-2), weight_decay=0.0))
    model.train()
    with torch.no_grad():
        first = float(mean_loss(model, batch))
    for _ in range(6):
        loss = mean_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert float(mean_loss(model, batch)) < first - 0.05, case

    before = logits(model, batch)
    model.save_pretrained(tmp_path)
    if hasattr(model, "peft_config"):
        reloaded = PeftModel.from_pretrained(fresh_base(tiny_tokenizer, method), tmp_path)
    else:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, batch), before, atol=1e-6, rtol=0)


def test_qlora_stores_4bit_weights_and_gets_paged_8bit_adamw(tiny_tokenizer):
    import bitsandbytes as bnb

    method = QLoraMethod(r=4, train_tokens="none")
    model, stats = apply_method(build_tiny_model(tiny_tokenizer), method)
    base = model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantization
    assert q_proj.weight.dtype == torch.uint8  # two 4-bit weights per byte
    assert base.lm_head.__class__ is torch.nn.Linear  # the head stays full precision
    optimizer = build_optimizer(model, method, OptimConfig())
    assert isinstance(optimizer, bnb.optim.PagedAdamW8bit)
    plain = build_optimizer(model, method.model_copy(update={"paged_optimizer": False}), OptimConfig())
    assert isinstance(plain, torch.optim.AdamW)


def test_qlora_quantizes_like_from_pretrained_with_bitsandbytes_config(tiny_tokenizer, tiny_model_dir, batch):
    from transformers import AutoModelForCausalLM

    from lmsmith.train.methods import bnb_config, keep_fp32_cpu_kernel

    method = QLoraMethod()
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config(method),
                                                  dtype=torch.float32)
    keep_fp32_cpu_kernel(loaded)  # as apply_qlora does
    converted = quantize_linear_layers(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), method
    )
    torch.testing.assert_close(logits(converted, batch), logits(loaded, batch), atol=1e-5, rtol=0)


def test_optimizer_does_not_decay_norms_and_biases(tiny_tokenizer):
    model, _ = apply_method(build_tiny_model(tiny_tokenizer), FullMethod())
    optimizer = build_optimizer(model, FullMethod(), OptimConfig(weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    norm = model.model.layers[0].input_layernorm.weight
    assert any(p is norm for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(model).trainable


def test_freeze_refuses_what_selects_nothing(tiny_tokenizer):
    with pytest.raises(UserError, match="pattern.*matches no parameter"):
        apply_method(build_tiny_model(tiny_tokenizer), FreezeMethod(pattern="no_such_module"))
    with pytest.raises(UserError, match="last_n_layers: 5 exceeds"):
        apply_method(build_tiny_model(tiny_tokenizer), FreezeMethod(last_n_layers=5))
    with pytest.raises(ValidationError, match="invalid regex"):
        FreezeMethod(pattern="(")
    with pytest.raises(UserError, match="layers_to_transform.*out of range"):
        apply_method(build_tiny_model(tiny_tokenizer), LoraMethod(layers_to_transform=[2]))


def test_one_method_schema_with_lora_as_default():
    adapter = TypeAdapter(MethodConfig)
    assert isinstance(adapter.validate_python({"r": 8}), LoraMethod)  # `--set sft.method.r=8`
    assert adapter.validate_python({"r": 8}).r == 8
    parsed = {name: type(adapter.validate_python({"name": name})) for name in
              ("full", "freeze", "lora", "dora", "qlora", "prefix", "prompt", "ia3")}
    assert parsed == {"full": FullMethod, "freeze": FreezeMethod, "lora": LoraMethod, "dora": DoraMethod,
                      "qlora": QLoraMethod, "prefix": PrefixTuningMethod, "prompt": PromptTuningMethod,
                      "ia3": Ia3Method}
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "lora", "rank": 8})  # unknown field
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "bottleneck"})


def test_train_help_documents_every_method_and_field():
    import argparse

    from lmsmith.train.cli import add_train_parser
    from lmsmith.train.method_config import METHOD_CLASSES

    parser = argparse.ArgumentParser(prog="lmsmith")
    add_train_parser(parser.add_subparsers(dest="command"))
    train = parser._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for cls in METHOD_CLASSES:
        name = cls.model_fields["name"].default
        assert f"\n{name}: " in text, name
        for field in cls.model_fields:
            assert f"  {field} (" in text or field == "name", (name, field)
    assert "layers_to_transform" in text and "last 4" in text
    assert "--stage {pretrain,sft}" in text and "--resume" in text
    args = parser.parse_args(["train", "r.yaml", "--stage", "sft", "--set", "sft.method.r=8"])
    assert (args.stage, args.set, args.resume) == ("sft", ["sft.method.r=8"], None)


def test_resume_flag_forms():
    from lmsmith.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "r.yaml", "--resume"]).resume is True
    assert parser.parse_args(["train", "r.yaml", "--resume=auto"]).resume == "auto"
    assert parser.parse_args(["run", "r.yaml", "--resume=auto"]).resume == "auto"


def test_qlora_loads_a_bf16_checkpoint_in_4_bits_exactly_as_its_fp32_upcast(tiny_tokenizer, tmp_path):
    """QLoRA quantizes from the stored dtype (no full-precision copy) and gets the fp32 upcast's weights."""
    import bitsandbytes as bnb

    from lmsmith.train.model import load_causal_lm

    model = build_tiny_model(tiny_tokenizer).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tiny_tokenizer.save_pretrained(tmp_path / "bf16")
    method = QLoraMethod()
    loaded, _ = load_causal_lm(tmp_path / "bf16", method=method)
    reference = build_tiny_model(tiny_tokenizer).to(torch.bfloat16).float()  # same seed, same weights
    quantize_linear_layers(reference, method)
    pairs = [(a, b) for a, b in zip(loaded.modules(), reference.modules()) if isinstance(a, bnb.nn.Linear4bit)]
    assert pairs and all(isinstance(b, bnb.nn.Linear4bit) for _, b in pairs)
    for ours, theirs in pairs:
        torch.testing.assert_close(bnb.functional.dequantize_4bit(ours.weight.data, ours.weight.quant_state),
                                   bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state),
                                   atol=0, rtol=0)
    others = [p for n, p in loaded.named_parameters() if p.dtype.is_floating_point]
    assert others and all(p.dtype == torch.float32 for p in others)
