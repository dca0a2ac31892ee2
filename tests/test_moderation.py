"""Moderation by term list: folding (full-width, traditional), block/mask/flag on requests, and answers
stopped mid-stream with finish_reason content_filter without leaking any part of the term."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.testclient import TestClient

from lmsmith.gateway.moderation import DEFAULT_TERMS, TermModerator, fold, read_terms
from lmsmith.serve.api import create_app
from lmsmith.serve.client import LocalClient
from lmsmith.serve.engine import Chunk, Engine

QUESTION = [{"role": "user", "content": "毛利率为多少?"}]


def test_folding_catches_full_width_and_traditional_forms():
    moderator = TermModerator(["内幕消息", "insider tip"])
    for text in ("听说有内幕消息", "聽說有內幕消息", "ＩＮＳＩＤＥＲ ＴＩＰ here", "an Insider Tip"):
        assert moderator.spans(text), text
    assert not moderator.spans("内部消息")
    assert fold("ＡＢ１")[0] == "ab1"
    masked = moderator.decide("聽說有內幕消息嗎", "mask")
    assert masked.action == "mask" and masked.text == "聽說有****嗎"  # the user's own characters, masked
    assert "稳赚不赔" in read_terms(DEFAULT_TERMS) and "# " not in "".join(read_terms("default"))


def chunks_of(pieces: list[str]):
    async def generate():
        for index, piece in enumerate(pieces):
            yield Chunk(piece, 3, index + 1, "stop" if index == len(pieces) - 1 else None)
    return generate()


def drain(stream) -> list[Chunk]:
    async def collect():
        return [chunk async for chunk in stream]
    return asyncio.run(collect())


@pytest.mark.parametrize("pieces", [["收益", "稳赚", "不赔哦"], ["收益稳", "赚不", "赔哦"], ["收益稳赚不赔哦"]])
def test_a_stream_stops_before_a_term_split_across_pieces(pieces):
    decisions = []
    moderator = TermModerator(["稳赚不赔"])
    out = drain(moderator.stream(chunks_of(pieces), decisions.append))
    sent = "".join(chunk.text for chunk in out)
    assert sent == "收益" and out[-1].finish_reason == "content_filter" and decisions == ["block"]
    masked = drain(TermModerator(["稳赚不赔"], output_action="mask").stream(chunks_of(pieces), decisions.append))
    assert "".join(chunk.text for chunk in masked) == "收益****哦" and masked[-1].finish_reason == "stop"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = Engine.load(tiny_model_dir)
    yield engine
    engine.close()


def test_requests_are_blocked_masked_or_flagged(engine, tiny_model_dir):
    body = {"model": tiny_model_dir.name, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": "有沒有內幕消息？"}]}
    for action, status in (("block", 400), ("mask", 200), ("flag", 200)):
        moderator = TermModerator(["内幕消息"], input_action=action, output_action="off")
        app = create_app(LocalClient(tiny_model_dir.name, engine), moderator=moderator)
        with TestClient(app) as http:
            reply = http.post("/v1/chat/completions", json=body)
            metrics = http.get("/metrics").text
        assert reply.status_code == status, action
        assert f'lmsmith_moderation_decisions_total{{action="{action}",direction="input"}} 1.0' in metrics
        if action == "block":
            assert reply.json()["error"]["code"] == "content_filter" and "內幕" not in reply.text


def test_an_answer_is_stopped_with_content_filter_streamed_or_not(engine, tiny_model_dir):
    plain = create_app(LocalClient(tiny_model_dir.name, engine))
    body = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    with TestClient(plain) as http:
        answer = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert len(answer) >= 6, answer
    term = answer[3:6]
    moderated = create_app(LocalClient(tiny_model_dir.name, engine), moderator=TermModerator([term]))
    with TestClient(moderated) as http:
        whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        streamed = http.post("/v1/chat/completions", json={**body, "stream": True}).text
    cut = answer[: answer.index(term)]
    assert whole["finish_reason"] == "content_filter" and whole["message"]["content"] == cut
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    text = "".join(event["choices"][0]["delta"].get("content") or "" for event in events if event["choices"])
    assert text == cut and term not in text
    assert [event["choices"][0]["finish_reason"] for event in events if event["choices"]][-1] == "content_filter"
