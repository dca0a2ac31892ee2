"""Tokenizer kinds (byte-level BPE, WordPiece, char), AutoTokenizer compatibility of saved model folders,
fit metrics, and extending a tokenizer and a model with domain vocabulary."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SAMPLE_TEXTS, build_tiny_model
from lmsmith.artifacts import Manifest
from lmsmith.errors import UserError
from lmsmith.pipeline import run_pipeline
from lmsmith.recipe import Recipe
from lmsmith.tokenizer.bpe import UNK, train_byte_bpe, train_char, train_wordpiece
from lmsmith.tokenizer.config import ExtendConfig, MineTermsConfig, TokenizerConfig
from lmsmith.tokenizer.extend import extend_model_embeddings, extend_tokenizer, mine_terms, read_term_list
from lmsmith.tokenizer.metrics import fertility, unk_rate
from test_tokenizer import corpus_rows, write_data_stage

PROBES = [
    "星辰科技2023年营业收入为12.50亿元,同比增长15.2%。",
    "Revenue  grew\n\t8.5%  in FY2023; it's up.  ",
    "  leading spaces, 12345678901 digits\r\nand 全角１２３ mixed",
    "未见过的字:龘 🙂 end",
]
TEXTS = [row["text"] for row in corpus_rows(40)] + SAMPLE_TEXTS


def saved_model_folder(tokenizer, path, architecture: str = "qwen2"):
    """Save a tiny model of `architecture` with `tokenizer` beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if architecture == "qwen2":
        model = build_tiny_model(tokenizer)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_autotokenizer_on_a_qwen2_folder_reproduces_byte_bpe_ids(tmp_path):
    from transformers import AutoTokenizer

    ours = train_byte_bpe(TEXTS, vocab_size=500)
    loaded = AutoTokenizer.from_pretrained(saved_model_folder(ours, tmp_path))
    assert type(loaded).__name__ == "Qwen2Tokenizer"  # transformers rebuilt it from Qwen's components
    for text in PROBES:
        assert encode(loaded, text) == encode(ours, text), text
        assert ours.decode(encode(ours, text)) == text  # byte-level: lossless, never unknown
    assert [ours.decode([i]) for i in encode(ours, "2023")] == ["2", "0", "2", "3"]
    assert unk_rate(ours, PROBES) == 0.0


def test_wordpiece_has_unknowns_and_survives_a_llama_folder(tmp_path):
    from transformers import AutoTokenizer

    wordpiece = train_wordpiece(TEXTS, vocab_size=400, min_frequency=1)
    assert wordpiece.unk_token == UNK and wordpiece.eos_token == "<|im_end|>"
    assert unk_rate(wordpiece, ["龘🙂"]) == 1.0
    assert 0 < unk_rate(wordpiece, PROBES) < 0.5
    assert [wordpiece.decode([i]) for i in encode(wordpiece, "12")] == ["1", "2"]
    loaded = AutoTokenizer.from_pretrained(saved_model_folder(wordpiece, tmp_path, "llama"))
    for text in PROBES:
        assert encode(loaded, text) == encode(wordpiece, text)
    chat = [{"role": "user", "content": "营业收入?"}, {"role": "assistant", "content": "12亿元"}]
    masks = loaded.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(masks["assistant_masks"]) > 0


def test_char_tokenizer_spells_one_character_per_token():
    char = train_char(TEXTS, vocab_size=320, min_frequency=1)
    text = "星辰科技 2023年,营业收入"
    ids = encode(char, text)
    assert len(ids) == len(text) and char.decode(ids) == text
    assert fertility(char, [text]) == 1.0
    assert encode(char, "龘") == [char.unk_token_id]
    assert len(char) <= 320


def test_fit_metrics_count_tokens_per_character_and_unknowns():
    char = train_char(["ab"] * 3, vocab_size=300, min_frequency=1)
    assert fertility(char, ["ab", "abab"]) == 1.0
    assert unk_rate(char, ["abcd"]) == pytest.approx(0.5)  # c and d were never seen
    assert fertility(char, []) is None and unk_rate(char, [""]) is None


def test_term_list_and_mined_terms(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("# finance\n营业收入\n\n归母净利润\n营业收入\n", encoding="utf-8")
    assert read_term_list(path) == ["营业收入", "归母净利润"]
    path.write_text("bad term\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"terms.txt:1: .*whitespace"):
        read_term_list(path)

    tokenizer = train_byte_bpe(SAMPLE_TEXTS, vocab_size=300)  # small: domain words still split
    mined = mine_terms(tokenizer, TEXTS, top_k=5, min_count=3)
    assert 0 < len(mined) <= 5
    counts = [count for _, count in mined]
    assert counts == sorted(counts, reverse=True) and min(counts) >= 3
    for term, count in mined:
        assert len(encode(tokenizer, term)) > 1  # never a term that is already one token
        assert not term.isdigit() and sum(text.count(term) for text in TEXTS) >= count


def test_extension_adds_terms_and_initialises_rows_from_their_pieces(tmp_path):
    from transformers import AutoTokenizer

    old = train_byte_bpe(SAMPLE_TEXTS, vocab_size=300)
    terms = ["营业收入", "同比增长", "净利润"]
    new, added = extend_tokenizer(old, terms + ["营业收入"])
    assert added == terms and len(new) == len(old) + 3
    for term in terms:
        assert len(encode(new, term)) == 1
    assert fertility(new, SAMPLE_TEXTS) < fertility(old, SAMPLE_TEXTS)
    assert extend_tokenizer(new, terms)[1] == []  # already single tokens

    model = build_tiny_model(old)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    extend_model_embeddings(model, old, new, added)
    after_in, after_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert after_in.shape[0] == len(new) == model.config.vocab_size
    torch.testing.assert_close(after_in[: len(old)], before_in)
    for term in terms:
        pieces, new_id = encode(old, term), new.convert_tokens_to_ids(term)
        torch.testing.assert_close(after_in[new_id], before_in[pieces].mean(0))
        torch.testing.assert_close(after_out[new_id], before_out[pieces].mean(0))

    folder = saved_model_folder(new, tmp_path)
    loaded = AutoTokenizer.from_pretrained(folder)
    for text in PROBES + SAMPLE_TEXTS[:3]:
        assert encode(loaded, text) == encode(new, text)
        assert loaded.decode(encode(loaded, text)) == text


def test_stage_trains_each_kind(tmp_path):
    run_dir = write_data_stage(tmp_path)
    run_pipeline(Recipe(tokenizer=TokenizerConfig(kind="wordpiece", vocab_size=400)), run_dir, only="tokenizer")
    metrics = Manifest.read(run_dir / "tokenizer").metrics
    assert metrics["kind"] == "wordpiece" and metrics["vocab_size"] <= 400
    assert metrics["fertility_val"] > 0 and 0 <= metrics["unk_rate_val"] < 1


def test_stage_extends_a_model_folder_and_reports_before_and_after(tmp_path, tiny_model_dir):
    from lmsmith.train.model import load_causal_lm

    run_dir = write_data_stage(tmp_path / "run", docs=60)
    terms = tmp_path / "terms.txt"
    terms.write_text("管理层\n风险管理\n", encoding="utf-8")
    config = TokenizerConfig(extend=ExtendConfig(base=tiny_model_dir, terms=terms, mine=MineTermsConfig(top_k=6, min_count=3)))
    run_pipeline(Recipe(tokenizer=config), run_dir, only="tokenizer")
    manifest = Manifest.read(run_dir / "tokenizer")
    assert set(manifest.outputs) == {"tokenizer", "model", "terms"}
    m = manifest.metrics
    added = (run_dir / "tokenizer" / "added_terms.txt").read_text(encoding="utf-8").split()
    assert m["added_tokens"] == len(added) == m["vocab_size"] - m["vocab_size_before"] > 2
    assert {"管理层", "风险管理"} <= set(added)
    assert m["fertility_val"] < m["fertility_val_before"]
    assert m["unk_rate_val"] == m["unk_rate_val_before"] == 0.0
    model, tokenizer = load_causal_lm(run_dir / "tokenizer" / "model")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == m["vocab_size"]
    assert json.loads((run_dir / "tokenizer" / "model" / "config.json").read_text())["vocab_size"] == m["vocab_size"]
