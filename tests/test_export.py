"""Export: peft adapter folders that peft and vLLM load, and LoRA (and QLoRA) merged into HF folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TEXTS, build_tiny_model
from lmsmith.errors import UserError
from lmsmith.train.config import LoraMethod
from lmsmith.train.export import merge_adapter, read_method, save_adapter, vllm_problems
from lmsmith.train.method_config import DoraMethod, QLoraMethod
from lmsmith.train.methods import apply_method
from lmsmith.train.model import load_causal_lm


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Qwen2 with the usual initialisation (std 0.02): logits of ordinary size, so fp32
    rounding stays far below the 1e-5 merge tolerance (conftest's std 0.2 model has logits 10x larger)."""
    from transformers import Qwen2ForCausalLM

    config = build_tiny_model(tiny_tokenizer).config
    config.initializer_range = 0.02
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export_base")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def input_ids(tiny_tokenizer) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer(SAMPLE_TEXTS[0], add_special_tokens=False)["input_ids"]])


def logits(model, input_ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def adapted(base_dir, method):
    """The saved tiny base, loaded as `method` trains it, with `method` applied and its adapters moved off
    their zero start."""
    base, _ = load_causal_lm(base_dir, method=method)
    model, _ = apply_method(base, method)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model


def test_lora_adapter_is_peft_and_vllm_loadable_and_merges_exactly(base_dir, tiny_tokenizer, input_ids, tmp_path):
    from peft import PeftModel

    method = LoraMethod(r=4, dropout=0.0, train_tokens="none")
    model = adapted(base_dir, method)
    expected = logits(model, input_ids)
    adapter_dir = save_adapter(model, tmp_path / "adapter", base_model=base_dir, method=method,
                               tokenizer=tiny_tokenizer)

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["modules_to_save"] is None and config["peft_type"] == "LORA"
    assert vllm_problems(adapter_dir) == []
    assert read_method(adapter_dir) == method

    base, _ = load_causal_lm(base_dir)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, adapter_dir), input_ids), expected,
                               atol=1e-6, rtol=0)
    merged_dir = merge_adapter(adapter_dir, tmp_path / "merged")  # base taken from adapter_config.json
    merged, merged_tokenizer = load_causal_lm(merged_dir)
    assert not hasattr(merged, "peft_config") and len(merged_tokenizer) == len(tiny_tokenizer)
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=0)
    assert (expected - logits(load_causal_lm(base_dir)[0], input_ids)).abs().max() > 1e-3


def test_qlora_merges_into_the_weights_it_was_trained_against(base_dir, input_ids, tmp_path):
    from peft import PeftModel

    method = QLoraMethod(r=4, dropout=0.0, train_tokens="none")
    model = adapted(base_dir, method)
    model.train()
    with torch.no_grad():
        trained = model(input_ids=input_ids).logits
    expected = logits(model, input_ids)
    # Eval mode stays on the fp32 path training used (not bitsandbytes' bf16 CPU inference kernel).
    torch.testing.assert_close(expected, trained, atol=1e-6, rtol=0)
    adapter_dir = save_adapter(model, tmp_path / "adapter", base_model=base_dir, method=method)
    merged_dir = merge_adapter(adapter_dir, tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    on_disk, _ = load_causal_lm(merged_dir)
    assert all(type(m) is not __import__("bitsandbytes").nn.Linear4bit for m in on_disk.modules())
    torch.testing.assert_close(logits(on_disk, input_ids), expected, atol=1e-5, rtol=0)
    # Merged onto the full-precision base instead, the answer is measurably off: the 4-bit rounding matters.
    plain_dir = tmp_path / "plain"
    PeftModel.from_pretrained(load_causal_lm(base_dir)[0], adapter_dir).merge_and_unload().save_pretrained(plain_dir)
    off_base = __import__("transformers").AutoModelForCausalLM.from_pretrained(plain_dir)
    assert (logits(off_base, input_ids) - expected).abs().max() > 1e-3


def test_vllm_problems_name_what_a_server_cannot_load(base_dir, tmp_path):
    dora = save_adapter(adapted(base_dir, DoraMethod(r=4, train_tokens="none")), tmp_path / "dora",
                        base_model=base_dir)
    assert any("use_dora" in problem for problem in vllm_problems(dora))
    rows = save_adapter(adapted(base_dir, LoraMethod(r=4, train_tokens="all")), tmp_path / "rows",
                        base_model=base_dir)
    assert any("trainable_token_indices" in problem for problem in vllm_problems(rows))
    # Recorded at save time, per runtime: peft loads both, vLLM and llama.cpp say why not.
    saved = json.loads((rows / "lmsmith_compatibility.json").read_text())
    assert saved["peft"] == [] and saved["vllm"] == vllm_problems(rows)
    assert saved["llama.cpp"] == ["trained embedding rows: `lmsmith export --to gguf-lora` merges them into the base GGUF"]
    assert any(problem.startswith("DoRA") for problem in json.loads((dora / "lmsmith_compatibility.json").read_text())["llama.cpp"])
    plain = save_adapter(adapted(base_dir, LoraMethod(r=4, train_tokens="none")), tmp_path / "plain", base_model=base_dir)
    assert json.loads((plain / "lmsmith_compatibility.json").read_text()) == {"peft": [], "vllm": [], "llama.cpp": []}
    with pytest.raises(UserError, match="no adapter"):
        save_adapter(load_causal_lm(base_dir)[0], tmp_path / "none", base_model=base_dir)
    with pytest.raises(UserError, match="not a peft adapter folder"):
        merge_adapter(tmp_path, tmp_path / "out")


def fabricated_run(tmp_path, base_dir, method, tokenizer) -> tuple[Path, torch.nn.Module]:
    """A run folder whose sft stage holds `method`'s adapter (saved as the stage saves it)."""
    from lmsmith.artifacts import Manifest, describe_outputs

    model = adapted(base_dir, method)
    stage_dir = tmp_path / "run" / "sft"
    save_adapter(model, stage_dir / "adapter", base_model=base_dir, method=method, tokenizer=tokenizer)
    Manifest(stage="sft", config={}, config_hash="handmade", inputs={},
             outputs=describe_outputs(stage_dir, {"adapter": "adapter"})).write(stage_dir)
    return tmp_path / "run", model


@pytest.mark.parametrize("method", [LoraMethod(r=4, train_tokens="all"), QLoraMethod(r=4, train_tokens="none")],
                         ids=["lora-with-token-rows", "qlora"])
def test_lmsmith_export_hf_matches_the_adapter_model(method, base_dir, tiny_tokenizer, input_ids, tmp_path, capsys):
    from lmsmith.cli import main

    run, model = fabricated_run(tmp_path, base_dir, method, tiny_tokenizer)
    if method.train_tokens == "all":
        # trainable token rows moved too, so the merge has to carry them
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "trainable_tokens" in name:
                    param.add_(0.3)
        save_adapter(model, run / "sft" / "adapter", base_model=base_dir, method=method, tokenizer=tiny_tokenizer)
    expected = logits(model, input_ids)
    assert main(["export", str(run), "--to", "hf"]) == 0
    out = run / "exports" / "hf"
    record = json.loads((out / "export.json").read_text())
    assert record["verify_max_abs_logit_diff"] < 1e-4
    exported, _ = load_causal_lm(out)
    torch.testing.assert_close(logits(exported, input_ids), expected, atol=1e-5, rtol=0)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf"]) == 2  # an existing export is never overwritten silently
    assert "--force" in capsys.readouterr().err


def test_lmsmith_export_adapter_and_vllm(base_dir, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmsmith.cli import main

    method = LoraMethod(r=4, train_tokens="all")
    rows, with_rows = fabricated_run(tmp_path / "rows", base_dir, method, tiny_tokenizer)
    with torch.no_grad():  # trained token rows that matter
        for name, param in with_rows.named_parameters():
            if "trainable_tokens" in name:
                param.add_(0.3)
    save_adapter(with_rows, rows / "sft" / "adapter", base_model=base_dir, method=method, tokenizer=tiny_tokenizer)
    assert main(["export", str(rows), "--to", "vllm"]) == 0
    split = rows / "exports" / "vllm"
    assert "--lora-modules" in capsys.readouterr().out
    assert vllm_problems(split / "adapter") == [] and (split / "base" / "config.json").is_file()
    assert json.loads((split / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(split / "base")
    assert json.loads((split / "export.json").read_text())["verify_max_abs_logit_diff"] < 1e-4
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(split / "base"), split / "adapter")
    ids = torch.tensor([tiny_tokenizer(SAMPLE_TEXTS[1], add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(logits(served, ids), logits(with_rows, ids), atol=1e-4, rtol=0)
    dora, _ = fabricated_run(tmp_path / "dora", base_dir, DoraMethod(r=4, train_tokens="none"), tiny_tokenizer)
    assert main(["export", str(dora), "--to", "vllm"]) == 2
    assert "use_dora" in capsys.readouterr().err

    plain, _ = fabricated_run(tmp_path / "plain", base_dir, LoraMethod(r=4, train_tokens="none"), tiny_tokenizer)
    out = tmp_path / "for-vllm"
    assert main(["export", str(plain), "--to", "vllm", "--out", str(out)]) == 0
    assert "--lora-modules" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute() and vllm_problems(out) == []
    monkeypatch.chdir(tmp_path / "rows")  # the adapter loads from any working directory
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    PeftModel.from_pretrained(base, out)
    assert main(["export", str(plain / "sft" / "adapter"), "--to", "adapter", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and (tmp_path / "a" / "export.json").is_file()
    before = sorted(p.name for p in (plain / "sft" / "adapter").iterdir())
    assert main(["export", str(plain / "sft" / "adapter"), "--to", "adapter"]) == 0
    assert (plain / "sft" / "adapter-adapter" / "export.json").is_file()  # beside it, never inside
    assert sorted(p.name for p in (plain / "sft" / "adapter").iterdir()) == before


def test_a_failed_verification_replaces_nothing(base_dir, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    from lmsmith.cli import main
    from lmsmith.train import export_run

    run, _ = fabricated_run(tmp_path, base_dir, LoraMethod(r=4, train_tokens="none"), tiny_tokenizer)
    assert main(["export", str(run), "--to", "hf"]) == 0
    out = run / "exports" / "hf"
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export_run, "verify_merge", lambda *args: 0.5)  # a merge that went wrong
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf", "--force"]) == 2
    assert "differ from the adapter model's by 0.5" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good
