"""The tokenizer stage: BPE training on a fabricated data stage, the saved folder, and the chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmsmith.artifacts import Manifest, describe_outputs
from lmsmith.errors import UserError
from lmsmith.jsonl import write_jsonl
from lmsmith.pipeline import run_pipeline
from lmsmith.recipe import Recipe
from lmsmith.tokenizer.chat import END_OF_TEXT, IM_END, IM_START, PAD, ensure_chat_template
from lmsmith.tokenizer.config import TokenizerConfig
from lmsmith.tokenizer.records import read_conversations, read_corpus_texts

COMPANIES = ["星辰科技", "华信银行", "东方能源", "长城医药"]
METRICS = ["营业收入", "归母净利润", "总资产"]
SYSTEM = "你是一名金融分析师。"


def corpus_rows(count: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + count):
        company, metric = COMPANIES[i % 4], METRICS[i % 3]
        text = (
            f"{company}{2019 + i % 5}年{metric}为{10 + i * 1.7:.2f}亿元,同比增长{i % 17 + 0.5:.1f}%。"
            f"毛利率为{20 + i % 30}.{i % 10}%,管理层表示将继续加强风险管理。Revenue grew steadily."
        )
        rows.append({"id": f"doc-{i}", "text": text, "source": "test", "noise": []})
    return rows


def sft_rows(count: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + count):
        company, metric = COMPANIES[i % 4], METRICS[i % 3]
        value = 10 + i * 1.3
        rows.append({
            "id": f"sft-{i}",
            "task": "extract",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{company}{2020 + i % 4}年的{metric}是多少?"},
                {"role": "assistant", "content": f"{company}{2020 + i % 4}年的{metric}为{value:.2f}亿元。"},
            ],
            "answer": {"value": round(value, 2)},
        })
    return rows


def write_data_stage(run_dir: Path, docs: int = 48, instructions: int = 32) -> Path:
    """A hand-made `data` stage folder: corpus and sft splits plus a manifest pointing at them."""
    stage_dir = run_dir / "data"
    splits = {"train": (0, 0.75), "val": (1, 0.125), "test": (2, 0.125)}
    outputs = {}
    offset_docs = offset_sft = 0
    for split, (_, share) in splits.items():
        n_docs, n_sft = max(2, int(docs * share)), max(2, int(instructions * share))
        write_jsonl(stage_dir / "corpus" / f"{split}.jsonl", corpus_rows(n_docs, offset_docs))
        write_jsonl(stage_dir / "sft" / f"{split}.jsonl", sft_rows(n_sft, offset_sft))
        offset_docs, offset_sft = offset_docs + n_docs, offset_sft + n_sft
        outputs[f"corpus_{split}"] = f"corpus/{split}.jsonl"
        outputs[f"sft_{split}"] = f"sft/{split}.jsonl"
    Manifest(
        stage="data", config={}, config_hash="handmade", inputs={}, outputs=describe_outputs(stage_dir, outputs)
    ).write(stage_dir)
    return run_dir


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    run_dir = write_data_stage(tmp_path_factory.mktemp("tokenizer_run"))
    run_pipeline(Recipe(tokenizer=TokenizerConfig(vocab_size=420)), run_dir, only="tokenizer")
    return run_dir


@pytest.fixture(scope="module")
def trained_tokenizer(tokenizer_run):
    from transformers import AutoTokenizer

    manifest = Manifest.read(tokenizer_run / "tokenizer")
    return AutoTokenizer.from_pretrained(manifest.output_path(tokenizer_run / "tokenizer", "tokenizer"))


def test_stage_writes_a_loadable_tokenizer_with_metrics(tokenizer_run, trained_tokenizer):
    manifest = Manifest.read(tokenizer_run / "tokenizer")
    assert manifest.outputs["tokenizer"]["path"] == "tokenizer"
    assert manifest.metrics["vocab_size"] == len(trained_tokenizer)
    # BPE learned merges beyond the 256 byte symbols and 4 special tokens.
    assert 300 < len(trained_tokenizer) <= 420
    val_texts = read_corpus_texts(tokenizer_run / "data" / "corpus" / "val.jsonl")
    tokens = sum(len(trained_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in val_texts)
    expected = tokens / sum(len(t) for t in val_texts)
    assert manifest.metrics["fertility_val"] == pytest.approx(expected, abs=1e-4)
    # Merges make Chinese text cheaper than its 3 UTF-8 bytes per character.
    assert manifest.metrics["fertility_val"] < 2.0


def test_round_trip_is_lossless(trained_tokenizer):
    texts = ["星辰科技2023年营业收入为12.50亿元,同比增长15.2%。", "Revenue  grew\n\t8.5%  ", "未见过的字:龘 🙂"]
    for text in texts:
        ids = trained_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert trained_tokenizer.decode(ids) == text


def test_special_tokens_are_single_distinct_ids(trained_tokenizer):
    ids = [trained_tokenizer.convert_tokens_to_ids(token) for token in (END_OF_TEXT, IM_START, IM_END, PAD)]
    assert len(set(ids)) == 4 and all(isinstance(i, int) for i in ids)
    assert trained_tokenizer.eos_token == IM_END
    assert trained_tokenizer.pad_token == PAD
    assert trained_tokenizer.pad_token_id != trained_tokenizer.eos_token_id
    encoded = trained_tokenizer(f"{IM_START}user\n你好{IM_END}", add_special_tokens=False)["input_ids"]
    assert encoded[0] == ids[1] and encoded[-1] == ids[2]


def test_digits_are_split_one_by_one(trained_tokenizer):
    ids = trained_tokenizer("2023", add_special_tokens=False)["input_ids"]
    assert [trained_tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "3"]


def test_chat_template_survives_reload_and_marks_the_answer(trained_tokenizer):
    assert "{% generation" in trained_tokenizer.chat_template.replace("{%-", "{%")
    messages = sft_rows(1)[0]["messages"]
    rendered = trained_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        f"{IM_START}system\n{SYSTEM}{IM_END}\n"
        f"{IM_START}user\n{messages[1]['content']}{IM_END}\n"
        f"{IM_START}assistant\n{messages[2]['content']}{IM_END}\n"
    )
    encoded = trained_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    answer = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert trained_tokenizer.decode(answer) == messages[2]["content"] + IM_END
    prompt = trained_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"{IM_START}assistant\n")


def test_ensure_chat_template_adds_chatml_or_explains(trained_tokenizer, tiny_tokenizer):
    import copy

    bare = copy.deepcopy(trained_tokenizer)
    bare.chat_template = None
    ensure_chat_template(bare, "somewhere")
    assert "{% generation" in bare.chat_template.replace("{%-", "{%")

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["plain text only"], trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    plain = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(UserError, match="somewhere: the tokenizer has no chat template.*model.chat_template"):
        ensure_chat_template(plain, "somewhere")
    with pytest.raises(UserError, match="chatml needs"):
        ensure_chat_template(plain, "somewhere", "chatml")
    plain.eos_token = plain.convert_ids_to_tokens(0)
    assert ensure_chat_template(plain, "somewhere", "plain") == "plain"
    text = plain.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                     tokenize=False)
    assert text == f"User: q\nAssistant: a{plain.eos_token}\n"
    assert ensure_chat_template(plain, "somewhere") == "own"  # auto keeps whatever template is there


def test_malformed_records_name_file_and_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "ok"}\n\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"corpus\.jsonl:3: .*'text'"):
        read_corpus_texts(corpus)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.jsonl:2: invalid JSON"):
        read_corpus_texts(broken)
    sft = tmp_path / "sft.jsonl"
    write_jsonl(sft, [{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}])
    with pytest.raises(UserError, match=r"sft\.jsonl:1: the last message must have role 'assistant'"):
        read_conversations(sft)


def test_stage_needs_text(tmp_path):
    run_dir = tmp_path
    for split in ("train", "val", "test"):
        write_jsonl(run_dir / "data" / "corpus" / f"{split}.jsonl", [])
        write_jsonl(run_dir / "data" / "sft" / f"{split}.jsonl", [])
    outputs = {f"{kind}_{split}": f"{'corpus' if kind == 'corpus' else 'sft'}/{split}.jsonl"
               for kind in ("corpus", "sft") for split in ("train", "val", "test")}
    Manifest(stage="data", config={}, config_hash="x", inputs={},
             outputs=describe_outputs(run_dir / "data", outputs)).write(run_dir / "data")
    with pytest.raises(UserError, match="no text"):
        run_pipeline(Recipe(tokenizer={}), run_dir, only="tokenizer")


DP_SFT = {"method": {"name": "lora", "train_tokens": "none"}, "privacy": {"noise_multiplier": 1.0, "delta": 1e-5}}


def test_a_dp_recipe_refuses_a_vocabulary_trained_on_the_instructions(tmp_path):
    from lmsmith.recipe import validate_recipe

    with pytest.raises(UserError, match=r"tokenizer\.train_on includes instructions while sft\.privacy is set.*"
                                        r"train_on: \[corpus\] or extend an existing tokenizer"):
        validate_recipe({"tokenizer": {}, "pretrain": {}, "sft": DP_SFT})
    recipe = validate_recipe({"tokenizer": {"train_on": ["corpus"]}, "pretrain": {}, "sft": DP_SFT})
    assert recipe.tokenizer.train_on == ["corpus"]
    # Extending mines corpus_train only, so the default train_on does not matter there.
    terms = tmp_path / "terms.txt"
    terms.write_text("营业收入\n", encoding="utf-8")
    validate_recipe({"tokenizer": {"extend": {"base": str(tmp_path), "terms": str(terms)}}, "pretrain": {},
                     "sft": DP_SFT})
    assert validate_recipe({"tokenizer": {}, "pretrain": {}, "sft": {}}).tokenizer.train_on == ["corpus", "instructions"]
    with pytest.raises(UserError, match="tokenizer.train_on"):
        validate_recipe({"tokenizer": {"train_on": []}})


def test_train_on_corpus_keeps_the_instructions_out_of_the_vocabulary(tmp_path, monkeypatch):
    from lmsmith.tokenizer import stage

    seen: list[str] = []
    real_train = stage.train_tokenizer

    def train_and_record(kind, texts, *rest):
        seen.extend(texts)
        return real_train(kind, texts, *rest)

    monkeypatch.setattr(stage, "train_tokenizer", train_and_record)
    run_dir = write_data_stage(tmp_path)
    corpus_docs = len(read_corpus_texts(run_dir / "data" / "corpus" / "train.jsonl"))
    run_pipeline(Recipe(tokenizer=TokenizerConfig(vocab_size=300)), run_dir, only="tokenizer")
    assert any(SYSTEM in text for text in seen)  # the system prompt lives only in the instructions
    seen.clear()
    run_pipeline(Recipe(tokenizer=TokenizerConfig(vocab_size=300, train_on=["corpus"])), run_dir, only="tokenizer")
    assert len(seen) == corpus_docs and not any(SYSTEM in text for text in seen)
    metrics = Manifest.read(run_dir / "tokenizer").metrics
    assert metrics["train_on"] == ["corpus"] and metrics["train_texts"] == corpus_docs


def test_extend_mines_terms_from_corpus_train_only(tmp_path, monkeypatch, tokenizer_run):
    from lmsmith.tokenizer import stage
    from lmsmith.tokenizer.config import ExtendConfig, MineTermsConfig

    def no_instructions(path):
        raise AssertionError(f"extend read the instructions: {path}")

    mined_from: list[str] = []
    real_mine = stage.mine_terms

    def mine_and_record(tokenizer, texts, **settings):
        mined_from.extend(texts)
        return real_mine(tokenizer, texts, **settings)

    monkeypatch.setattr(stage, "read_conversations", no_instructions)
    monkeypatch.setattr(stage, "mine_terms", mine_and_record)
    run_dir = write_data_stage(tmp_path)
    base = Manifest.read(tokenizer_run / "tokenizer").output_path(tokenizer_run / "tokenizer", "tokenizer")
    config = TokenizerConfig(extend=ExtendConfig(base=base, mine=MineTermsConfig(top_k=4, min_count=3)))
    run_pipeline(Recipe(tokenizer=config), run_dir, only="tokenizer")
    assert mined_from == read_corpus_texts(run_dir / "data" / "corpus" / "train.jsonl")
