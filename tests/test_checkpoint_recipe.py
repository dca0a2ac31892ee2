"""Fine-tuning a local HF checkpoint: recipes/finetune-checkpoint.yaml runs data → sft → eval → compress →
serve → report with the checkpoint's own tokenizer and chat template, on Qwen2 and Llama folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TEXTS
from lmsmith.errors import UserError
from lmsmith.recipe import load_recipe, validate_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "finetune-checkpoint.yaml"

# Qwen2.5's layout: a default system turn, ChatML turns, and no {% generation %} markers.
QWEN_LIKE_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Llama 3's layout: header tokens, <|eot_id|> ends a turn while the tokenizer's eos is <|end_of_text|>.
LLAMA_LIKE_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


def byte_bpe(specials: list[str], **tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(SAMPLE_TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)


def qwen_checkpoint(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = QWEN_LIKE_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama_checkpoint(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = byte_bpe(specials, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                         additional_special_tokens=specials[2:])  # no pad token, as Llama ships
    tokenizer.chat_template = LLAMA_LIKE_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert tokenizer.pad_token is None
    return path


SMALL_RUN = [
    "data.embedded.companies=6", "data.embedded.years=2",
    "sft.max_steps=12", "sft.batch_size=4", "sft.val_generations=0", "sft.optim.lr=5e-3", "sft.log_every=4",
    "eval.max_items=4", "eval.max_new_tokens=8", "eval.speed_requests=1",
    "compress.max_items=2", "compress.max_new_tokens=8", "compress.speed_requests=1", "compress.speed_batch=2",
    "compress.speed_new_tokens=4", "compress.agreement_texts=2", "compress.peak_memory=false",
    "compress.variants.1.calibration_samples=4",
    "serve.smoke_questions=2", "serve.max_new_tokens=8",
]


@pytest.mark.slow
@pytest.mark.parametrize("build", [qwen_checkpoint, llama_checkpoint], ids=["qwen2", "llama"])
def test_finetune_checkpoint_recipe_runs_to_a_served_model(build, tmp_path):
    from lmsmith.cli import main

    checkpoint = build(tmp_path / "checkpoint")
    run_dir = tmp_path / "run"
    args = ["run", str(RECIPE), "--out", str(run_dir), "--set", f"model.path={checkpoint}"]
    for item in SMALL_RUN:
        args += ["--set", item]
    assert main(args) == 0

    stages = sorted(p.name for p in run_dir.iterdir() if (p / "manifest.json").is_file())
    assert stages == ["compress", "data", "eval", "report", "serve", "sft"]  # no tokenizer, no pretrain
    sft = json.loads((run_dir / "sft" / "manifest.json").read_text())
    assert sft["metrics"]["chat_template"] == "own" and sft["metrics"]["base_model"] == str(checkpoint)
    adapter_config = json.loads((run_dir / "sft" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(checkpoint)  # absolute: loads from anywhere
    merged = run_dir / "sft" / "merged"
    saved_template = (merged / "chat_template.jinja").read_text()
    assert saved_template == build(tmp_path / "again").joinpath("chat_template.jinja").read_text()
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert {label: model["describe"] for label, model in results["models"].items()} == {
        "base": str(checkpoint), "tuned": "sft/model"}
    compressed = json.loads((run_dir / "compress" / "results.json").read_text())
    assert list(compressed["models"]) == ["source", "int8", "static-int8"]
    assert json.loads((run_dir / "compress" / "static-int8" / "manifest.json").read_text())["method"] == "static_int8"
    assert set(results["tasks"]) >= {"held-out-answers", "finance-mc", "finance-report"}
    transcript = json.loads((run_dir / "serve" / "transcript.json").read_text())
    assert len(transcript["entries"]) == 2 and all("answer" in entry for entry in transcript["entries"])
    # Generation stops at the template's end of turn, not only at the tokenizer's eos.
    generation = json.loads((merged / "generation_config.json").read_text())
    end_of_turn = "<|im_end|>" if build is qwen_checkpoint else "<|eot_id|>"
    from lmsmith.train.model import load_tokenizer

    tokenizer = load_tokenizer(merged)
    assert tokenizer.convert_tokens_to_ids(end_of_turn) in generation["eos_token_id"]


@pytest.mark.parametrize("build", [qwen_checkpoint, llama_checkpoint], ids=["qwen2", "llama"])
def test_answer_only_labels_without_generation_markers(build, tmp_path):
    """The checkpoint's template has no {% generation %} markers: the answer's tokens, its end of turn
    included, are still exactly the targets, in every assistant turn."""
    from lmsmith.train.data import IGNORE_INDEX, chat_example
    from lmsmith.train.model import load_tokenizer

    tokenizer = load_tokenizer(build(tmp_path / "checkpoint"))
    messages = [{"role": "user", "content": "营业收入是多少?"}, {"role": "assistant", "content": "12.5亿元。"},
                {"role": "user", "content": "同比增长?"}, {"role": "assistant", "content": "增长15.2%"}]
    example = chat_example(tokenizer, messages)
    targets = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    end = "<|im_end|>" if build is qwen_checkpoint else "<|eot_id|>"
    assert tokenizer.decode(targets) == f"12.5亿元。{end}增长15.2%{end}"
    assert example.input_ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                                          add_special_tokens=False)["input_ids"]


def test_checkpoint_without_template_needs_one_and_plain_works(tmp_path):
    from lmsmith.tokenizer.chat import ensure_chat_template
    from lmsmith.train.model import load_tokenizer, stop_token_ids

    folder = llama_checkpoint(tmp_path / "checkpoint")
    (folder / "chat_template.jinja").unlink()
    tokenizer = load_tokenizer(folder)
    assert not tokenizer.chat_template
    with pytest.raises(UserError, match="no chat template.*model.chat_template: plain"):
        ensure_chat_template(tokenizer, "model.path")
    assert ensure_chat_template(tokenizer, "model.path", "plain") == "plain"
    assert tokenizer.eos_token_id in stop_token_ids(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token  # Llama ships without a pad token


def test_recipe_stage_rules(tmp_path):
    checkpoint = qwen_checkpoint(tmp_path / "checkpoint")
    recipe = validate_recipe({"model": {"path": str(checkpoint)}, "data": {}, "sft": {}, "eval": {}})
    assert recipe.stages() == ["data", "sft", "eval"]
    with pytest.raises(UserError, match="no model to fine-tune"):
        validate_recipe({"data": {}, "sft": {}})
    with pytest.raises(UserError, match="tokenizer: trains a new vocabulary.*tokenizer.extend"):
        validate_recipe({"model": {"path": str(checkpoint)}, "data": {}, "tokenizer": {}, "sft": {}})
    with pytest.raises(UserError, match="model.path: Field required"):
        validate_recipe({"model": None, "data": {}, "sft": {}})
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text(f"model: {{path: {checkpoint}}}\ndata:\nsft:\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"--set sft.epochs=: \[: invalid YAML value"):
        load_recipe(yaml_file, overrides=["sft.epochs=: ["])


def test_a_template_that_refuses_a_conversation_is_a_user_error(tmp_path):
    from lmsmith.train.data import chat_example
    from lmsmith.train.model import load_tokenizer

    tokenizer = load_tokenizer(qwen_checkpoint(tmp_path / "checkpoint"))
    tokenizer.chat_template = ("{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('System role not "
                               "supported') }}{%- endif -%}" + QWEN_LIKE_TEMPLATE)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}]
    with pytest.raises(UserError, match="cannot render a system/user/assistant conversation: System role not"):
        chat_example(tokenizer, messages)


def test_a_changed_checkpoint_reruns_the_stages_built_on_it_and_an_unused_one_is_refused(tmp_path):
    from lmsmith.pipeline import _stage_inputs
    from lmsmith.stages import get_stage

    first, second = qwen_checkpoint(tmp_path / "a"), llama_checkpoint(tmp_path / "b")
    make = lambda path, template="auto": validate_recipe(  # noqa: E731
        {"model": {"path": str(path), "chat_template": template}, "data": {}, "sft": {}, "eval": {}})
    for stage in ("sft", "eval"):
        spec = get_stage(stage)
        inputs = {str(path): _stage_inputs(spec, getattr(make(path), stage), tmp_path, make(path))
                  for path in (first, second)}
        assert inputs[str(first)]["file:model.path"] != inputs[str(second)]["file:model.path"]
        plain = make(first, "plain")
        assert _stage_inputs(spec, getattr(plain, stage), tmp_path, plain)["model.chat_template"] == "plain"
    with pytest.raises(UserError, match="model.path: .* is not used \\(sft starts from .*b\\)"):
        validate_recipe({"model": {"path": str(first)}, "data": {}, "sft": {"base_model": str(second)}})
