"""The consumer side of a request: token deltas become text chunks, stop strings end the request early."""

from __future__ import annotations

from lmsmith.serve.engine.output import TextAssembler
from lmsmith.serve.engine.request import TokenDelta

TEXT = "星辰科技2023年营业收入为12.5亿元,同比增长15.2%。"


def feed_all(tokenizer, ids, stop=(), last_reason="length"):
    assembler = TextAssembler(tokenizer, stop)
    chunks = []
    for index, token in enumerate(ids):
        reason = last_reason if index == len(ids) - 1 else None
        chunk = assembler.feed(TokenDelta(token, 7, index + 1, reason))
        if chunk is not None:
            chunks.append(chunk)
            if chunk.finish_reason is not None:
                break
    return assembler, chunks


def test_text_arrives_whole_characters_and_adds_up(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    assembler, chunks = feed_all(tiny_tokenizer, ids)
    assert "".join(chunk.text for chunk in chunks) == TEXT
    assert all("\ufffd" not in chunk.text for chunk in chunks)
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == len(ids)
    assert not assembler.stopped_early


def test_an_end_of_sequence_token_is_not_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("毛利率", add_special_tokens=False) + [tiny_tokenizer.eos_token_id]
    _, chunks = feed_all(tiny_tokenizer, ids, last_reason="stop")
    assert "".join(chunk.text for chunk in chunks) == "毛利率"
    assert chunks[-1].finish_reason == "stop"


def test_a_stop_string_ends_the_request_before_the_engine_does(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    assembler, chunks = feed_all(tiny_tokenizer, ids, stop=("营业",))
    assert "".join(chunk.text for chunk in chunks) == "星辰科技2023年"
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens < len(ids)
    assert assembler.stopped_early  # the caller must cancel the sequence with reason "stop"


def test_a_cancelled_request_ends_without_text(tiny_tokenizer):
    assembler = TextAssembler(tiny_tokenizer, ())
    chunk = assembler.feed(TokenDelta(None, 7, 3, "cancelled"))
    assert (chunk.text, chunk.finish_reason, chunk.completion_tokens) == ("", "cancelled", 3)
