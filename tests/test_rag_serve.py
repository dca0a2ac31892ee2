"""A knowledge-base model name on `lmsmith serve`: grounded answers with citations through the openai SDK,
streaming and not, refusals the KB cannot back, and `/v1/rag/search`."""

from __future__ import annotations

import httpx
import pytest

from lmsmith.rag.grounding import GroundedModel, RagSettings
from lmsmith.rag.kb import KnowledgeBase
from lmsmith.serve.api import create_app, running_server
from lmsmith.serve.client import LocalClient

from test_rag import write_docs

QUESTION = "华信银行的不良贷款率是多少？"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from lmsmith.serve.engine import Engine

    folder = tmp_path_factory.mktemp("kb") / "kb"
    KnowledgeBase.build([write_docs(tmp_path_factory.mktemp("docs"))], folder)
    engine = Engine.load(tiny_model_dir, device="cpu")
    grounded = GroundedModel("finance-rag", folder, RagSettings(top_k=2))
    app = create_app(LocalClient("tiny", engine), default_max_tokens=8, kbs={"finance-rag": grounded})
    with running_server(app) as url:
        yield url, engine
    engine.close()


def sdk(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused")


def test_a_kb_model_answers_with_citations_through_the_sdk(server):
    url, _ = server
    client = sdk(url)
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=4, temperature=0)
    grounded = client.chat.completions.create(model="finance-rag", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=4, temperature=0)
    assert grounded.model == "finance-rag"
    citations = grounded.model_extra["citations"]
    assert citations[0]["index"] == 1 and citations[0]["doc_id"] == "huaxin.txt"
    assert "不良贷款率" in citations[0]["text"] and citations[0]["end"] > citations[0]["start"]
    assert len(citations) <= 2
    # the chunks went into the prompt
    assert grounded.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_streaming_sends_the_citations_first(server):
    url, _ = server
    events = list(sdk(url).chat.completions.create(
        model="finance-rag", messages=[{"role": "user", "content": QUESTION}], max_tokens=4, temperature=0,
        stream=True))
    assert events[0].model_extra["citations"][0]["doc_id"] == "huaxin.txt"
    assert all("citations" not in event.model_extra for event in events[1:])
    assert events[-1].choices[0].finish_reason in ("stop", "length")


def test_a_question_the_kb_cannot_back_is_refused_without_the_model(server):
    url, engine = server
    before = engine.stats()["completed"]
    reply = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "finance-rag", "messages": [{"role": "user", "content": "月球背面的温度"}]}, timeout=60).json()
    assert reply["choices"][0]["message"]["content"] == RagSettings().refusal
    assert reply["citations"] == [] and engine.stats()["completed"] == before


def test_rag_search_and_models(server):
    url, _ = server
    found = httpx.post(f"{url}/v1/rag/search", json={"model": "finance-rag", "query": "储能工厂投资", "k": 1}).json()
    assert found["data"][0]["doc_id"] == "tianyu.txt" and found["data"][0]["score"] > 0
    missing = httpx.post(f"{url}/v1/rag/search", json={"model": "nope", "query": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    cards = {card["id"]: card for card in httpx.get(f"{url}/v1/models").json()["data"]}
    assert cards["finance-rag"]["parent"] == "tiny"


def test_a_system_message_is_kept_after_the_sources(tmp_path):
    folder = tmp_path / "kb"
    KnowledgeBase.build([write_docs(tmp_path / "docs")], folder)
    grounding = GroundedModel("kb", folder).ground_now(
        [{"role": "system", "content": "回答要简短。"}, {"role": "user", "content": QUESTION}], None)
    assert grounding.messages[0]["role"] == "system" and grounding.messages[0]["content"].endswith("回答要简短。")
    assert "[1] huaxin\n华信银行" in grounding.messages[0]["content"] and len(grounding.messages) == 2


@pytest.mark.slow  # a whole `lmsmith` process
def test_rag_ask_answers_from_the_kb_with_a_local_model(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    KnowledgeBase.build([write_docs(tmp_path / "docs")], tmp_path / "kb")
    run = [sys.executable, "-m", "lmsmith.cli", "rag", "ask", str(tmp_path / "kb")]
    asked = subprocess.run(run + [QUESTION, "--model", str(tiny_model_dir), "--json", "--max-new-tokens", "4"],
                           check=True, capture_output=True, text=True)
    reply = json.loads(asked.stdout.strip().splitlines()[-1])
    assert reply["citations"][0]["doc_id"] == "huaxin.txt" and isinstance(reply["answer"], str)
    refused = subprocess.run(run + ["月球背面的温度", "--model", str(tiny_model_dir), "--json"],
                             check=True, capture_output=True, text=True)
    assert json.loads(refused.stdout.strip().splitlines()[-1]) == {"answer": RagSettings().refusal, "citations": []}
