"""GGUF export with the `gguf` package alone: weights within their quantization error, logits of the
model rebuilt from the file's metadata and dequantized tensors equal to the source's, the tokenizer and
chat template as llama.cpp reads them, and `lmsmith export --to gguf` on a run with an adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXTS, build_tiny_model
from lmsmith.compress.gguf_file import read_gguf_model, reorder_for_interleaved_rope, write_gguf
from lmsmith.errors import UserError


def save_tiny(folder, tokenizer, architecture: str):
    """A tiny model of `architecture` with the usual initialisation (std 0.02), hidden 64: whole Q8_0 blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM

    config = build_tiny_model(tokenizer).config
    config.initializer_range = 0.02
    torch.manual_seed(0)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{key: getattr(config, key) for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "eos_token_id", "pad_token_id")},
            initializer_range=0.02, tie_word_embeddings=True))
    else:
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def probe(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(SAMPLE_TEXTS[0], add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
@pytest.mark.parametrize("quant, relative, agreement", [("f16", 2e-3, 1.0), ("q8_0", 2e-2, 0.9), ("q4_0", 0.2, 0.5)])
def test_round_trip_matches_the_hf_model(tmp_path, tiny_tokenizer, architecture, quant, relative, agreement):
    source = save_tiny(tmp_path / "model", tiny_tokenizer, architecture)
    written = write_gguf(tmp_path / "model", tmp_path / f"m.{quant}.gguf", quant)
    assert written.kept_higher == {} and written.tensors > 0
    rebuilt = read_gguf_model(written.path)
    ids = probe(tiny_tokenizer)
    with torch.no_grad():
        want, got = source(input_ids=ids).logits, rebuilt(input_ids=ids).logits
    assert float((got - want).abs().max()) <= relative * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= agreement
    # Each matrix within its type's rounding: half a step of the block's scale (Q8_0: max/127 per block).
    source_state, rebuilt_state = source.state_dict(), rebuilt.state_dict()
    for name, weight in source_state.items():
        if weight.ndim == 2 and quant == "q8_0":
            blocks = weight.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            error = (rebuilt_state[name].reshape(-1, 32) - blocks).abs()
            # Half a step, plus the fp16 rounding of the block scale times the largest quant (127).
            assert bool((error <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7).all()), name
        elif weight.ndim == 1:
            torch.testing.assert_close(rebuilt_state[name], weight, atol=0, rtol=0)  # norms and biases stay f32


def test_sizes_shrink_with_the_quantization(tmp_path, tiny_tokenizer):
    save_tiny(tmp_path / "model", tiny_tokenizer, "qwen2")
    sizes = {quant: write_gguf(tmp_path / "model", tmp_path / f"{quant}.gguf", quant).bytes
             for quant in ("f32", "f16", "q8_0", "q4_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]
    assert sizes["f16"] / sizes["q8_0"] > 1.6


def test_llama_rows_are_interleaved_for_llama_cpp_rope():
    # One head of dimension 4: HF rotates (r0, r2) and (r1, r3); llama.cpp rotates adjacent rows.
    weight = np.arange(8, dtype=np.float32).reshape(4, 2)
    interleaved = reorder_for_interleaved_rope(weight, heads=1)
    assert interleaved[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    np.testing.assert_array_equal(reorder_for_interleaved_rope(interleaved, heads=1, inverse=True), weight)


def test_tokenizer_and_chat_template_are_in_the_metadata(tmp_path, tiny_tokenizer):
    import gguf

    save_tiny(tmp_path / "model", tiny_tokenizer, "qwen2")
    written = write_gguf(tmp_path / "model", tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(str(written.path))

    def field(key):
        return reader.fields[key].contents()

    tokens = field("tokenizer.ggml.tokens")
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "qwen2"
    assert tokens[: len(tiny_tokenizer)] == tiny_tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokenizer))))
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field("tokenizer.ggml.eos_token_id") == im_end
    assert field("tokenizer.ggml.token_type")[im_end] == gguf.TokenType.CONTROL
    merges = json.loads((tmp_path / "model" / "tokenizer.json").read_text())["model"]["merges"]
    assert len(field("tokenizer.ggml.merges")) == len(merges)
    assert field("tokenizer.chat_template") == tiny_tokenizer.chat_template
    assert field("general.architecture") == "qwen2" and field("qwen2.block_count") == 2


def test_what_cannot_be_written_is_refused(tmp_path, tiny_tokenizer):
    save_tiny(tmp_path / "model", tiny_tokenizer, "qwen2")
    with pytest.raises(UserError, match="choose one of"):
        write_gguf(tmp_path / "model", tmp_path / "m.gguf", "q3_k")
    spec = json.loads((tmp_path / "model" / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (tmp_path / "model" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="llama.cpp knows pre-tokenizers by name"):
        write_gguf(tmp_path / "model", tmp_path / "m.gguf", "f16")


def adapter_run(tmp_path, tokenizer, method):
    """A run whose sft adapter (on a saved tiny Qwen2 base) has a trained model's size: fabricated_run's
    lora_B (std 0.2) scaled down, trained token rows (if any) moved a little."""
    from test_export import fabricated_run

    from lmsmith.train.export import save_adapter

    base = tmp_path / "base"
    save_tiny(base, tokenizer, "qwen2")
    run, adapted = fabricated_run(tmp_path, base, method, tokenizer)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
            if "trainable_tokens" in name:
                param.add_(0.05)
    save_adapter(adapted, run / "sft" / "adapter", base_model=base, method=method, tokenizer=tokenizer)
    return run, adapted


def test_lmsmith_export_gguf_merges_the_adapter_and_verifies(tmp_path, tiny_tokenizer, capsys):

    from lmsmith.cli import main
    from lmsmith.train.method_config import LoraMethod

    run, adapted = adapter_run(tmp_path, tiny_tokenizer, LoraMethod(r=4, train_tokens="none"))
    assert main(["export", str(run), "--to", "gguf", "--quant", "q8_0"]) == 0
    out = run / "exports" / "gguf"
    record = json.loads((out / "export.json").read_text())
    assert record["quant"] == "q8_0" and (out / record["file"]).is_file()
    assert record["verify"]["argmax_agreement"] >= 0.9
    ids = probe(tiny_tokenizer)
    with torch.no_grad():
        want = adapted.eval()(input_ids=ids).logits
        got = read_gguf_model(out / record["file"])(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())  # the adapter is in the file


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_a_lora_adapter_as_gguf_lora_on_its_gguf_base(tmp_path, tiny_tokenizer, architecture, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmsmith.compress.gguf_file import write_gguf_lora

    save_tiny(tmp_path / "base", tiny_tokenizer, architecture)
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_rslora=True))
    peft_model.save_pretrained(tmp_path / "adapter")
    base_file = write_gguf(tmp_path / "base", tmp_path / "base.gguf", "f16")
    lora_file = write_gguf_lora(tmp_path / "adapter", tmp_path / "lora.gguf", "f16")
    assert lora_file.tensors == 2 * 7 * 2  # A and B of seven projections in two layers
    ids = probe(tiny_tokenizer)
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
        got = read_gguf_model(base_file.path, lora=lora_file.path)(input_ids=ids).logits
        plain = read_gguf_model(base_file.path)(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())  # f16 base and f16 LoRA
    assert float((plain - want).abs().max()) > 5 * float((got - want).abs().max())  # the LoRA matters
    with pytest.raises(UserError, match="DoRA"):
        settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(settings | {"use_dora": True}))
        write_gguf_lora(tmp_path / "adapter", tmp_path / "lora2.gguf")


def test_lmsmith_export_gguf_lora_splits_trained_token_rows_into_the_base(tmp_path, tiny_tokenizer):

    from lmsmith.cli import main
    from lmsmith.train.method_config import LoraMethod

    run, adapted = adapter_run(tmp_path, tiny_tokenizer, LoraMethod(r=4, train_tokens="all"))
    assert main(["export", str(run), "--to", "gguf-lora", "--quant", "f16"]) == 0
    out = run / "exports" / "gguf-lora"
    record = json.loads((out / "export.json").read_text())
    assert "split" in record and record["verify"]["argmax_agreement"] >= 0.99
    ids = probe(tiny_tokenizer)
    with torch.no_grad():
        want = adapted.eval()(input_ids=ids).logits
        got = read_gguf_model(out / record["base_file"], lora=out / record["lora_file"])(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())
