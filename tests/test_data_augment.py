"""Augmentation: the synonym dictionary, EDA (jieba), back-translation (a fake transport and a real
`lmsmith serve`), oversampling with class weights, and `lmsmith data augment`."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from lmsmith.data.augment import (
    AugmentConfig,
    BackTranslationConfig,
    BackTranslator,
    Eda,
    EdaConfig,
    OversampleConfig,
    SynonymDictionary,
    augment,
    back_translate_rows,
    class_weights,
    oversample,
    parse_target,
)
from lmsmith.data.quality import embedded_rows
from lmsmith.data.cli.quality import add_quality_commands
from lmsmith.jsonl import read_jsonl, write_jsonl
from lmsmith.datasets.finance import TASKS
from lmsmith.errors import UserError

NUMBER = re.compile(r"\d+(?:\.\d+)?%?")
TEXT = "星辰科技（600123.SH）2023年实现营业收入12.35亿元，同比增长15.20%；归母净利润1.2亿元。公司持续加大研发投入，维持增持评级。"


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_quality_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def eda() -> Eda:
    return Eda(EdaConfig(num_aug=4, seed=7))


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    before, _, _ = embedded_rows(companies=4)
    return [row for row in before if "messages" in row]


# ------------------------------------------------------------------------------------------ dictionary


def test_synonym_groups_are_symmetric_and_mappings_are_not(tmp_path):
    groups = tmp_path / "groups.yaml"
    groups.write_text("- [营收, 营业收入, 销售收入]\n", encoding="utf-8")
    dictionary = SynonymDictionary.load(groups)
    assert dictionary.synonyms["营收"] == ["营业收入", "销售收入"]
    assert "营收" in dictionary.synonyms["销售收入"]
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("净利润: [净利]\n", encoding="utf-8")
    assert SynonymDictionary.load(mapping).synonyms == {"净利润": ["净利"]}
    shipped = SynonymDictionary.load()
    assert "营收" in shipped.synonyms["营业收入"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- [营收, 营业收入]\n- [孤单]\n", r"groups\.yaml:2: a synonym group must be a list of at least two"),
        ("- [营收, 营业收入]\n- [a, 3]\n", r"groups\.yaml:2: a synonym must be a non-empty string"),
        ("just a string\n", r"groups\.yaml:1: expected a list of synonym groups"),
        ("- [营收, 营业收入\n", r"groups\.yaml:\d+: invalid YAML"),
    ],
)
def test_bad_synonym_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "groups.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        SynonymDictionary.load(path)


# ------------------------------------------------------------------------------------------------- EDA


def test_jieba_keeps_dictionary_words_whole(eda):
    tokens = eda.tokens(TEXT)
    assert "归母净利润" in tokens and "营业收入" in tokens and "12.35" in tokens
    assert "".join(tokens) == TEXT
    english = eda.tokens("Net profit was RMB 2 billion and net profit rose.")
    assert "net profit" in english  # a multi-word dictionary phrase is one token


def test_each_operation_does_what_it_says(eda):
    original = eda.tokens(TEXT)
    synonym = eda.augment_text(TEXT, "synonym", random.Random(1))
    assert synonym != TEXT and any(s in synonym for w in original for s in eda.dictionary.synonyms.get(w, []))
    swapped = eda.tokens(eda.augment_text(TEXT, "swap", random.Random(1)))
    assert Counter(swapped) == Counter(original) and swapped != original
    deleted = eda.augment_text(TEXT, "delete", random.Random(1))
    assert len(deleted) < len(TEXT)
    inserted = eda.augment_text(TEXT, "insert", random.Random(1))
    assert len(inserted) > len(TEXT)
    added = Counter(eda.tokens(inserted)) - Counter(original)
    assert added and all(word in eda.dictionary.words for word in added)


def test_eda_never_changes_numbers_or_answers(eda, instructions):
    for row in instructions[:40]:
        for variant in eda.variants(row):
            user = variant["messages"][0]["content"]
            assert Counter(NUMBER.findall(user)) == Counter(NUMBER.findall(row["messages"][0]["content"]))
            assert variant["messages"][-1] == row["messages"][-1]
            assert variant["answer"] == row["answer"]
            assert variant["id"].startswith(row["id"] + "#eda")
            assert variant["augmented"]["source_id"] == row["id"]


def test_eda_is_deterministic_and_seeded(instructions):
    rows = instructions[:10]
    first = [v for row in rows for v in Eda(EdaConfig(seed=1)).variants(row)]
    again = [v for row in rows for v in Eda(EdaConfig(seed=1)).variants(row)]
    other = [v for row in rows for v in Eda(EdaConfig(seed=2)).variants(row)]
    assert first == again
    assert [v["messages"] for v in first] != [v["messages"] for v in other]


def test_eda_on_corpus_rows(eda):
    variants = eda.variants({"id": "d1", "text": TEXT, "noise": []})
    assert variants and all(v["text"] != TEXT and v["noise"] == [] for v in variants)
    assert len({v["text"] for v in variants}) == len(variants)


# ------------------------------------------------------------------------------------------ oversample


def test_oversample_to_uniform_with_class_weights():
    rows = [{"id": f"{task}{i}", "task": task} for task, n in (("a", 60), ("b", 20), ("c", 10)) for i in range(n)]
    result, report = oversample(rows, OversampleConfig(seed=3))
    assert Counter(row["task"] for row in result) == {"a": 60, "b": 60, "c": 60}
    assert len({row["id"] for row in result}) == len(result)
    copies = [row for row in result if "augmented" in row]
    assert Counter(row["augmented"]["source_id"] for row in copies if row["task"] == "c") == {f"c{i}": 5 for i in range(10)}
    assert report["weights"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert report["weights_without_oversampling"] == {"a": 0.5, "b": 1.5, "c": 3.0}
    assert oversample(rows, OversampleConfig(seed=3))[0] == result


def test_oversample_target_shares_and_cap():
    rows = [{"id": f"{task}{i}", "task": task} for task, n in (("a", 60), ("b", 20), ("c", 10)) for i in range(n)]
    result, _ = oversample(rows, OversampleConfig(target={"a": 0.5, "b": 0.25, "c": 0.25}))
    assert Counter(row["task"] for row in result) == {"a": 60, "b": 30, "c": 30}
    capped, report = oversample(rows, OversampleConfig(max_factor=2))
    assert report["counts_after"] == {"a": 60, "b": 40, "c": 20}
    assert Counter(row["task"] for row in capped) == report["counts_after"]
    with pytest.raises(UserError, match="no record has task = z"):
        oversample(rows, OversampleConfig(target={"a": 1, "z": 1}))
    with pytest.raises(UserError, match="has no 'industry'"):
        oversample(rows, OversampleConfig(field="industry"))


def test_class_weights_formula():
    assert class_weights({"x": 30, "y": 10}) == {"x": round(40 / 60, 6), "y": 2.0}
    assert parse_target("a=0.5,b=0.5") == {"a": 0.5, "b": 0.5}
    with pytest.raises(UserError, match="--target"):
        parse_target("a=half")


# ------------------------------------------------------------------------------------ back-translation


def fake_endpoint(log: list[dict], status: list[int] | None = None) -> httpx.MockTransport:
    """An OpenAI-style server that 'translates' by tagging the text with the target language."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        log.append({"path": request.url.path, "auth": request.headers.get("authorization"), **body})
        if status:
            return httpx.Response(status.pop(0), json={"error": {"message": "busy"}})
        language = re.search(r"into (\w+)", body["messages"][0]["content"]).group(1)
        text = body["messages"][1]["content"]
        out = "" if "EMPTY" in text else f"[{language}] {text}"
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": out}}]})

    return httpx.MockTransport(handle)


def test_back_translation_round_trip_with_a_fake_endpoint():
    log: list[dict] = []
    config = BackTranslationConfig(base_url="http://fake/v1/", model="m1", api_key="k", pivot_language="English")
    rows = [
        {"id": "q1", "task": "yoy", "messages": [{"role": "user", "content": "问题"}, {"role": "assistant", "content": "答"}],
         "answer": {"value": 1.0}},
        {"id": "d1", "text": "EMPTY comes back"},
    ]
    new_rows, counts = back_translate_rows(rows, config, transport=fake_endpoint(log))
    assert counts == {"produced": 1, "skipped": 1, "requests": 3}
    assert [entry["path"] for entry in log] == ["/v1/chat/completions"] * 3
    assert all(entry["model"] == "m1" and entry["auth"] == "Bearer k" for entry in log)
    assert "into English" in log[0]["messages"][0]["content"] and "into Chinese" in log[1]["messages"][0]["content"]
    (row,) = new_rows
    assert row["id"] == "q1#bt" and row["messages"][0]["content"] == "[Chinese] [English] 问题"
    assert row["messages"][1]["content"] == "答" and row["augmented"]["pivot"] == "English"


def test_back_translation_retries_then_reports_errors():
    log: list[dict] = []
    config = BackTranslationConfig(base_url="http://fake/v1", model="m", retries=1)
    with BackTranslator(config, transport=fake_endpoint(log, status=[503])) as translator:
        assert translator.translate("你好", "English") == "[English] 你好"
    assert len(log) == 2
    with BackTranslator(config, transport=fake_endpoint([], status=[400])) as translator:
        with pytest.raises(UserError, match="answered 400"):
            translator.translate("你好", "English")
    with pytest.raises(ValueError, match="base_url"):
        BackTranslationConfig(base_url="localhost:8000", model="m")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_tiny_model(tiny_model_dir):
    """`lmsmith serve` on the tiny model, in a subprocess; yields its API root."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmsmith.cli", "serve", str(tiny_model_dir), "--port", str(port), "--max-new-tokens", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.time() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"lmsmith serve exited: {process.stdout.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail("lmsmith serve did not become ready in 120 s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def served_model_name(base_url: str) -> str:
    return httpx.get(f"{base_url}/models", timeout=10).json()["data"][0]["id"]


@pytest.mark.slow
def test_back_translation_against_lmsmith_serve(served_tiny_model):
    config = BackTranslationConfig(base_url=served_tiny_model, model=served_model_name(served_tiny_model), max_tokens=8)
    with BackTranslator(config) as translator:
        pivot = translator.translate("营业收入同比增长", "English")
    assert isinstance(pivot, str)
    rows = [{"id": "r1", "text": "营业收入同比增长15.20%。"}, {"id": "r2", "text": "归母净利润1.2亿元。"}]
    new_rows, counts = back_translate_rows(rows, config)
    assert counts.get("produced", 0) + counts.get("skipped", 0) == 2
    assert 2 <= counts["requests"] <= 4  # one or two hops per record, nothing retried
    for row in new_rows:
        assert row["id"].endswith("#bt") and row["text"].strip() and row["augmented"]["method"] == "back_translation"


def test_cli_back_translate_hides_the_key(served_tiny_model, tmp_path):
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"id": "r1", "text": "营业收入同比增长15.20%。"}])
    out = tmp_path / "bt"
    assert run_cli("augment", str(source), "--out", str(out), "--back-translate", "--base-url", served_tiny_model,
                   "--model", served_model_name(served_tiny_model), "--api-key", "s3cret-key", "--max-tokens", "8") == 0
    manifest_text = (out / "manifest.json").read_text(encoding="utf-8")
    assert "s3cret-key" not in manifest_text
    manifest = json.loads(manifest_text)
    assert manifest["counts"]["back_translation"]["requests"] >= 1
    assert manifest["counts"]["output"] == len(read_jsonl(out / "augmented.jsonl"))


# ------------------------------------------------------------------------------------------------ CLI


def test_augment_runs_eda_then_oversampling(instructions, tmp_path):
    rows, counts = augment(instructions, AugmentConfig(eda=EdaConfig(num_aug=2), oversample=OversampleConfig()), tmp_path)
    assert counts["input"] == len(instructions)
    assert counts["output"] == len(rows) == len(instructions) + counts["eda"] + counts["oversample"]
    assert len(set(Counter(row["task"] for row in rows).values())) == 1  # uniform over tasks at the end
    weights = json.loads((tmp_path / "class_weights.json").read_text(encoding="utf-8"))
    assert set(weights["weights"]) == set(TASKS)


def test_cli_augment(tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [{"id": f"t{i}", "task": "yoy" if i < 6 else "report", "text": TEXT} for i in range(8)]
    write_jsonl(source, rows)
    out = tmp_path / "aug"
    assert run_cli("augment", str(source), "--out", str(out), "--eda", "--num-aug", "2", "--operations",
                   "synonym,swap", "--oversample", "task", "--diversify") == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    written = read_jsonl(out / "augmented.jsonl")
    assert manifest["counts"]["output"] == len(written)
    assert set(manifest["counts"]["eda_by_operation"]) <= {"synonym", "swap"}
    assert json.loads((out / "class_weights.json").read_text(encoding="utf-8"))["counts_after"]["report"] == \
        Counter(row["task"] for row in written)["report"]
    with pytest.raises(UserError, match="nothing to do"):
        run_cli("augment", str(source), "--out", str(out))
    with pytest.raises(UserError, match="--num-aug"):
        run_cli("augment", str(source), "--out", str(out), "--eda", "--num-aug", "0")
    with pytest.raises(UserError, match="--base-url"):
        run_cli("augment", str(source), "--out", str(out), "--back-translate")


def test_an_api_key_never_reaches_a_dump_or_manifest(tmp_path):
    from lmsmith.artifacts import Manifest
    from lmsmith.recipe import Recipe

    secret = "sk-live-0123456789abcdef"
    recipe = Recipe(data={"augment": {"back_translation": {"base_url": "http://fake/v1", "model": "m",
                                                           "api_key": secret}}})
    assert recipe.data.augment.back_translation.api_key.get_secret_value() == secret
    Manifest(stage="data", config=recipe.data.model_dump(mode="json"), config_hash="h", inputs={}, outputs={},
             metrics={}, wall_time_s=0.0).write(tmp_path)
    dumps = [recipe.model_dump_json(), json.dumps(recipe.data.identity()), str(recipe), repr(recipe.data),
             (tmp_path / "manifest.json").read_text()]
    assert not any(secret in dump for dump in dumps)
    translator = BackTranslator(recipe.data.augment.back_translation)
    try:
        assert translator._client.headers["Authorization"] == f"Bearer {secret}"  # used, only where it is sent
    finally:
        translator.close()
