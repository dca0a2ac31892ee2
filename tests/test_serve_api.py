"""The serving API in-process (uvicorn on a thread), driven by the official `openai` SDK and httpx:
text completions, async and streamed clients, embeddings, readiness, metrics, errors, the response cache
(in-memory LRU and a real redis-server) and long documents (map-reduce)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time

import httpx
import numpy as np
import pytest
import torch

from lmsmith.serve.api import create_app, running_server
from lmsmith.serve.cache import CachedAnswer, MemoryCache, RedisCache
from lmsmith.serve.client import LocalClient
from lmsmith.serve.config import LongDocConfig, PushBack
from lmsmith.serve.embeddings import Embedder
from lmsmith.serve.long_doc import split_document, token_windows

QUESTION = [{"role": "user", "content": "星辰科技2023年营业收入是多少?"}]
PROMPT = "华信银行2022年总资产为"
MAX_TOKENS = 24
DOCUMENT = (
    "星辰科技2023年营业收入为12.5亿元,同比增长15.2%。归母净利润3.1亿元,毛利率为42.3%。"
    "华信银行2022年总资产为520亿元,资产负债率为61.2%。The company reported revenue of 1.2 billion yuan. "
) * 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def hf_greedy_ids(hf_model, prompt_ids: list[int], max_new_tokens: int = MAX_TOKENS) -> tuple[str, int]:
    model, tokenizer = hf_model
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, len(prompt_ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from lmsmith.serve.engine import Engine

    engine = Engine.load(tiny_model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def embedder():
    embedder = Embedder()
    yield embedder
    embedder.close()


@pytest.fixture(scope="module")
def server(engine, tiny_model_dir, embedder):
    """The API over the shared engine, with the in-memory cache; yields (base URL, app)."""
    app = create_app(LocalClient(tiny_model_dir.name, engine), default_max_tokens=MAX_TOKENS,
                     cache=MemoryCache(max_entries=64, ttl_s=600), embedder=embedder)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, label_text = sample.partition("{")
        if sample_name != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if all(found.get(key, "").strip('"') == want for key, want in labels.items()):
            return float(value)
    return 0.0


# ----- OpenAI SDK: completions, async, streaming -----

def test_text_completions_plain_and_streamed_equal_hf_greedy(client, tiny_model_dir, hf_model):
    _, tokenizer = hf_model
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected, new_tokens = hf_greedy_ids(hf_model, prompt_ids)

    plain = client.completions.create(model=tiny_model_dir.name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert plain.object == "text_completion"
    assert plain.choices[0].text == expected
    assert plain.usage.prompt_tokens == len(prompt_ids) and plain.usage.completion_tokens == new_tokens

    stream = client.completions.create(model=tiny_model_dir.name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    events = list(stream)
    assert "".join(event.choices[0].text for event in events if event.choices) == expected
    assert [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == new_tokens


def test_async_client_runs_requests_concurrently(server, tiny_model_dir, engine, hf_model):
    import openai

    _, tokenizer = hf_model
    questions = ["华信银行", "毛利率", "Revenue growth?", "营业收入"]

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0) as aclient:
            async def ask(text: str) -> str:
                stream = await aclient.chat.completions.create(
                    model=tiny_model_dir.name, messages=[{"role": "user", "content": text}],
                    max_tokens=MAX_TOKENS, temperature=0, stream=True,
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            return list(await asyncio.gather(*(ask(text) for text in questions)))

    answers = asyncio.run(ask_all())
    for text, answer in zip(questions, answers):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               return_dict=False)
        assert answer == hf_greedy_ids(hf_model, prompt)[0]


def test_top_k_and_repetition_penalty_ride_in_the_body(client, tiny_model_dir, hf_model):
    model, tokenizer = hf_model
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    greedy = hf_greedy_ids(hf_model, prompt)[0]
    ask = dict(model=tiny_model_dir.name, messages=QUESTION, max_tokens=MAX_TOKENS)
    # top_k 1 leaves only the argmax, however hot the temperature.
    top1 = client.chat.completions.create(temperature=1.5, extra_body={"top_k": 1}, **ask)
    assert top1.choices[0].message.content == greedy
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                repetition_penalty=1.5)
    penalized = tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)
    assert penalized != greedy  # otherwise the test could not tell the penalty was applied
    reply = client.chat.completions.create(temperature=0, extra_body={"repetition_penalty": 1.5}, **ask)
    assert reply.choices[0].message.content == penalized


# ----- embeddings -----

def test_embeddings_are_384_dimensional_and_match_sentence_transformers(client, embedder):
    texts = ["营业收入同比增长", "revenue grew year over year", "the weather is nice"]
    reply = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the SDK asks for base64
    vectors = np.array([item.embedding for item in reply.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    direct = embedder._load().encode(texts, normalize_embeddings=True)
    assert np.allclose(vectors, direct, atol=1e-5)
    assert reply.usage.prompt_tokens > len(texts)

    as_floats = httpx.post(f"{client.base_url}embeddings",
                           json={"model": "all-MiniLM-L6-v2", "input": texts[0], "encoding_format": "float"}).json()
    assert np.allclose(as_floats["data"][0]["embedding"], vectors[0], atol=1e-6)
    raw = httpx.post(f"{client.base_url}embeddings",
                     json={"model": "all-MiniLM-L6-v2", "input": texts[0], "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"), vectors[0], atol=1e-6)
    wrong = httpx.post(f"{client.base_url}embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 8})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "dimensions"


# ----- readiness, metrics, errors -----

def test_a_500_body_carries_a_request_id_not_the_exception_text(engine, tiny_model_dir, monkeypatch):
    local = LocalClient(tiny_model_dir.name, engine)

    def broken() -> list:
        raise RuntimeError("cannot open /srv/secret/keys.db")

    monkeypatch.setattr(local, "model_cards", broken)
    with running_server(create_app(local)) as url:
        reply = httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "req-42"})
    assert reply.status_code == 500 and reply.headers["X-Request-Id"] == "req-42"
    message = reply.json()["error"]["message"]
    assert "req-42" in message and "secret" not in message and "RuntimeError" not in message


def test_readyz_is_503_until_the_model_is_attached(engine, tiny_model_dir):
    local = LocalClient(tiny_model_dir.name)
    with running_server(create_app(local)) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 503
        early = httpx.post(f"{url}/v1/chat/completions", json={"model": tiny_model_dir.name, "messages": QUESTION})
        assert early.status_code == 503 and early.json()["error"]["type"] == "server_error"
        local.attach(engine)
        assert httpx.get(f"{url}/readyz").status_code == 200
        reply = httpx.post(f"{url}/v1/chat/completions",
                           json={"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.headers["x-request-id"]
        assert httpx.get(f"{url}/healthz", headers={"X-Request-Id": "abc"}).headers["x-request-id"] == "abc"


def test_metrics_report_latencies_tokens_and_engine_gauges(client, server, tiny_model_dir):
    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    client.chat.completions.create(model=tiny_model_dir.name, messages=[{"role": "user", "content": "毛利率是多少"}],
                                   max_tokens=8, temperature=0.7)
    response = httpx.get(f"{url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    model = tiny_model_dir.name
    done = sum(metric_value(text, "lmsmith_requests_total", endpoint="chat", model=model, finish_reason=reason)
               for reason in ("stop", "length"))
    done_before = sum(metric_value(before, "lmsmith_requests_total", endpoint="chat", model=model, finish_reason=reason)
                      for reason in ("stop", "length"))
    assert done == done_before + 1
    for histogram in ("lmsmith_time_to_first_token_seconds", "lmsmith_e2e_request_latency_seconds"):
        assert metric_value(text, f"{histogram}_count", model=model) == \
            metric_value(before, f"{histogram}_count", model=model) + 1
    assert metric_value(text, "lmsmith_generation_tokens_total", model=model) > \
        metric_value(before, "lmsmith_generation_tokens_total", model=model)
    assert "lmsmith_time_per_output_token_seconds_bucket" in text
    assert "lmsmith_num_requests_waiting 0.0" in text and "lmsmith_num_requests_running" in text
    assert metric_value(text, "lmsmith_engine_last_batch_size") >= 1  # the engine's batch, read at scrape time
    assert metric_value(text, "lmsmith_engine_kv_slots_total") >= 1
    assert metric_value(text, "lmsmith_http_requests_total", method="POST", route="/v1/chat/completions",
                        status="200") >= 1


def test_errors_use_openai_schema(client, server, tiny_model_dir):
    import openai

    url, _ = server
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nope", prompt="x")
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model=tiny_model_dir.name, prompt="a", suffix="b")
    assert unsupported.value.body["param"] == "suffix" and "not supported" in unsupported.value.body["message"]
    with pytest.raises(openai.BadRequestError) as nothing:
        client.completions.create(model=tiny_model_dir.name, prompt="a", max_tokens=0)
    assert nothing.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad_ids:
        client.completions.create(model=tiny_model_dir.name, prompt=[[1, 2], []])
    assert bad_ids.value.body["param"] == "prompt"
    bad_long_doc = httpx.post(f"{url}/v1/chat/completions", json={
        "model": tiny_model_dir.name, "messages": QUESTION, "long_doc": {"chunk_tokens": 32, "overlap": 32}})
    assert bad_long_doc.status_code == 400 and bad_long_doc.json()["error"]["param"] == "long_doc"
    assert "overlap" in bad_long_doc.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=tiny_model_dir.name, prompt="营业收入同比增长率 " * 400)
    assert too_long.value.body["code"] == "context_length_exceeded"
    missing = httpx.delete(f"{url}/admin/loras/ghost")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


# ----- response cache -----

def test_memory_cache_serves_repeats_without_the_engine_and_replays_streams(client, server, engine, tiny_model_dir):
    url, _ = server
    ask = dict(model=tiny_model_dir.name, messages=[{"role": "user", "content": "资产负债率"}], max_tokens=16)
    first = client.chat.completions.create(temperature=0, **ask)
    metrics_before = httpx.get(f"{url}/metrics").text
    completed = engine.stats()["completed"]

    again = client.chat.completions.create(temperature=0, **ask)
    streamed = list(client.chat.completions.create(temperature=0, stream=True,
                                                   stream_options={"include_usage": True}, **ask))
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage == first.usage
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == first.choices[0].message.content
    assert streamed[-1].usage == first.usage
    assert engine.stats()["completed"] == completed  # the engine never saw the repeats
    metrics = httpx.get(f"{url}/metrics").text
    assert metric_value(metrics, "lmsmith_cache_hits_total", backend="memory") == \
        metric_value(metrics_before, "lmsmith_cache_hits_total", backend="memory") + 2

    # Sampling without a seed is not deterministic: never cached. A seeded request is.
    client.chat.completions.create(temperature=1.0, **ask)
    client.chat.completions.create(temperature=1.0, **ask)
    assert engine.stats()["completed"] == completed + 2
    seeded = [client.chat.completions.create(temperature=1.0, seed=5, **ask).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1] and engine.stats()["completed"] == completed + 3


def test_memory_cache_evicts_least_recent_and_expires():
    now = [0.0]
    cache = MemoryCache(max_entries=2, ttl_s=10, clock=lambda: now[0])
    answer = CachedAnswer("x", "stop", 3, 1)

    async def scenario() -> None:
        await cache.put("a", answer)
        await cache.put("b", answer)
        assert await cache.get("a") == answer  # a is now the most recent
        await cache.put("c", answer)
        assert await cache.get("b") is None and await cache.get("a") == answer
        now[0] = 10.0
        assert await cache.get("a") is None and len(cache) == 1

    asyncio.run(scenario())


def test_redis_cache_round_trip_and_ttl(redis_url):
    async def scenario() -> None:
        cache = RedisCache(redis_url, ttl_s=0.3, prefix="t:")
        await cache.ping()
        answer = CachedAnswer("营业收入", "length", 5, 4)
        await cache.put("k", answer)
        assert await cache.get("k") == answer
        assert await cache.get("other") is None
        await asyncio.sleep(0.5)
        assert await cache.get("k") is None  # redis expired it
        await cache.close()

    asyncio.run(scenario())


def test_redis_cache_is_shared_by_two_servers(redis_url, engine, tiny_model_dir):
    import openai

    ask = dict(model=tiny_model_dir.name, messages=[{"role": "user", "content": "经营活动现金流"}], max_tokens=12,
               temperature=0)
    answers, hits = [], []
    for _ in range(2):  # a second server with its own app and metrics, same redis
        app = create_app(LocalClient(tiny_model_dir.name, engine), cache=RedisCache(redis_url, ttl_s=60))
        with running_server(app) as url:
            sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            completed = engine.stats()["completed"]
            answers.append(sdk.chat.completions.create(**ask).choices[0].message.content)
            hits.append((metric_value(httpx.get(f"{url}/metrics").text, "lmsmith_cache_hits_total", backend="redis"),
                         engine.stats()["completed"] - completed))
    assert answers[0] == answers[1]
    assert hits == [(0.0, 1), (1.0, 0)]


# ----- long documents -----

def test_sliding_windows_cover_the_document_with_overlap(tiny_tokenizer):
    assert token_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert token_windows(4, 4, 2) == [(0, 4)]
    total = len(tiny_tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"])
    windows = split_document(DOCUMENT, tiny_tokenizer, chunk_tokens=64, overlap=16)
    assert [w.start for w in windows] == list(range(0, windows[-1].start + 1, 48))
    assert windows[-1].end == total and all(w.end - w.start == 64 for w in windows[:-1])
    for before, after in zip(windows, windows[1:]):
        assert "\ufffd" not in before.text
        assert before.char_start < after.char_start < before.char_end  # the next chunk starts inside this one
        assert DOCUMENT[after.char_start:before.char_end] == after.text[: before.char_end - after.char_start]
    assert DOCUMENT.startswith(windows[0].text) and DOCUMENT.endswith(windows[-1].text)


def test_long_doc_maps_each_chunk_then_reduces(server, engine, tiny_model_dir, tiny_tokenizer):
    url, _ = server
    options = {"chunk_tokens": 64, "overlap": 16, "map_max_tokens": 6}
    chunks = len(split_document(DOCUMENT, tiny_tokenizer, 64, 16))
    assert chunks >= 4
    completed = engine.stats()["completed"]
    body = {"model": tiny_model_dir.name, "messages": [{"role": "system", "content": "你是财务分析助手。"},
                                                       {"role": "user", "content": DOCUMENT}],
            "max_tokens": 10, "temperature": 0, "long_doc": options}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    # One call per chunk, one reduce: the short partials fit one reduce prompt.
    assert engine.stats()["completed"] - completed == chunks + 1
    choice = reply["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] >= 1
    document_tokens = len(tiny_tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"])
    assert reply["usage"]["prompt_tokens"] > document_tokens  # every chunk (with overlap) was read

    # Streamed, the final reduce arrives as SSE; with temperature 0 it is the same answer.
    streamed = ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body | {"stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                streamed += "".join(c["delta"].get("content") or "" for c in event["choices"])
    assert streamed == choice["message"]["content"]


def test_long_doc_starts_by_itself_over_the_configured_size(engine, tiny_model_dir, tiny_tokenizer):
    config = LongDocConfig(auto=True, max_input_tokens=100, chunk_tokens=64, overlap=8, map_max_tokens=4)
    app = create_app(LocalClient(tiny_model_dir.name, engine), long_doc=config)
    with running_server(app) as url:
        completed = engine.stats()["completed"]
        short = httpx.post(f"{url}/v1/completions", json={"model": tiny_model_dir.name, "prompt": PROMPT,
                                                          "max_tokens": 4, "temperature": 0})
        assert short.status_code == 200 and engine.stats()["completed"] == completed + 1
        long = httpx.post(f"{url}/v1/completions", json={"model": tiny_model_dir.name, "prompt": DOCUMENT * 2,
                                                         "max_tokens": 4, "temperature": 0}, timeout=120)
        assert long.status_code == 200, long.text
        chunks = len(split_document(DOCUMENT * 2, tiny_tokenizer, 64, 8))
        assert engine.stats()["completed"] - completed - 1 >= chunks + 1
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_value(metrics, "lmsmith_long_doc_chunks_total") == chunks


def test_fields_we_do_not_honour_are_refused_by_name_and_odd_input_is_a_400(server, tiny_model_dir):
    url, _ = server
    base = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 2}
    for field, value in (("functions", [{"name": "f", "parameters": {}}]), ("function_call", "auto"),
                         ("presence_penalty", 0.5), ("logit_bias", {"5": 10}), ("audio", {"voice": "x"})):
        reply = httpx.post(f"{url}/v1/chat/completions", json={**base, field: value})
        assert reply.status_code == 400 and reply.json()["error"]["message"].startswith(field), (field, reply.text)
    # Their "off" values ask for nothing and are accepted.
    assert httpx.post(f"{url}/v1/chat/completions", json={**base, "functions": [], "presence_penalty": 0,
                                                          "response_format": None, "user": "u-1"}).status_code == 200
    tool_turn = {**base, "messages": [*QUESTION, {"role": "assistant", "content": None,
                                                  "tool_calls": [{"id": "c1", "type": "function"}]}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=tool_turn).status_code == 400
    surrogate = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(
        {**base, "messages": [{"role": "user", "content": "\ud800"}]}), headers={"content-type": "application/json"})
    assert surrogate.status_code == 400 and "lone surrogate" in surrogate.json()["error"]["message"]
    big_seed = httpx.post(f"{url}/v1/chat/completions", json={**base, "seed": 2**63 + 5, "temperature": 1})
    assert big_seed.status_code == 200  # a uint64 seed is a seed
    assert httpx.post(f"{url}/v1/chat/completions", json={**base, "seed": 2**70}).status_code == 400


def test_a_10mb_body_gets_413_at_once_while_another_request_is_served(engine, tiny_model_dir):
    import threading

    app = create_app(LocalClient(tiny_model_dir.name, engine), default_max_tokens=4)
    with running_server(app) as url:
        served: list[int] = []
        small = threading.Thread(target=lambda: served.append(httpx.post(
            f"{url}/v1/chat/completions", json={"model": tiny_model_dir.name, "messages": QUESTION}, timeout=30
        ).status_code))
        small.start()
        started = time.perf_counter()
        big = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (10 * 1024 * 1024),
                         headers={"content-type": "application/json"}, timeout=30)
        elapsed = time.perf_counter() - started
        small.join(timeout=30)
    assert big.status_code == 413 and elapsed < 1.0, elapsed
    assert "at most 8,388,608" in big.json()["error"]["message"]
    assert served == [200]


def test_overload_pushes_back_with_503_and_retry_after_then_recovers(engine, tiny_model_dir):
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(LocalClient(tiny_model_dir.name, engine, push_back=PushBack(max_waiting=2)), default_max_tokens=48)
    body = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 48, "temperature": 0}
    with running_server(app) as url:
        with ThreadPoolExecutor(48) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120),
                                    range(48)))
        statuses = [reply.status_code for reply in replies]
        after = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    pushed = next(reply for reply in replies if reply.status_code == 503)
    assert pushed.headers["Retry-After"] == "1" and "overloaded" in pushed.json()["error"]["message"]
    assert after.status_code == 200  # recovered once the burst is over


def test_a_request_waiting_past_its_deadline_is_dropped_and_its_slot_freed(tiny_model_dir):
    from lmsmith.serve.engine import Engine, EngineConfig, Overloaded
    from lmsmith.serve.sampling import SamplingParams

    engine = Engine.load(tiny_model_dir, config=EngineConfig(max_slots=1, max_queue_wait_s=0.2))
    try:
        async def drain(stream) -> None:
            async for _ in stream:
                pass

        async def scenario():
            running = asyncio.ensure_future(drain(engine.stream([5, 6, 7], SamplingParams(max_tokens=300, temperature=0))))
            await asyncio.sleep(0.05)  # it holds the only slot
            with pytest.raises(Overloaded, match="waited over 0.2 s"):
                await drain(engine.stream([8, 9], SamplingParams(max_tokens=2, temperature=0)))
            await running

        asyncio.run(scenario())
        assert engine.stats()["waiting"] == 0 and engine.stats()["kv_slots_free"] == 1
    finally:
        engine.close()


def test_a_request_past_its_own_timeout_gets_504_and_frees_its_slot(tiny_model_dir):
    import threading

    from lmsmith.serve.engine import DeadlineExceeded, Engine, EngineConfig
    from lmsmith.serve.sampling import SamplingParams

    engine = Engine.load(tiny_model_dir, config=EngineConfig(max_slots=1))
    try:
        async def drain(stream) -> None:
            async for _ in stream:
                pass

        # running: dropped mid-answer once its timeout passes
        with pytest.raises(DeadlineExceeded, match="timeout of 0.1 s"):
            asyncio.run(drain(engine.stream([5, 6, 7], SamplingParams(max_tokens=400, temperature=0, timeout_s=0.1))))
        assert engine.stats()["kv_slots_free"] == 1 and engine.stats()["running"] == 0
        # waiting behind another request, over HTTP: a 504 naming the timeout
        app = create_app(LocalClient(tiny_model_dir.name, engine), default_max_tokens=8)
        with running_server(app) as url:
            body = {"model": tiny_model_dir.name, "messages": QUESTION, "temperature": 0}
            answers: list[httpx.Response] = []
            late = threading.Thread(target=lambda: answers.append(httpx.post(
                f"{url}/v1/chat/completions", json={**body, "max_tokens": 2, "timeout": 0.05}, timeout=60)))
            with holding_the_only_slot(engine):
                late.start()
                deadline = time.monotonic() + 30
                while engine.stats()["waiting"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(0.1)  # past its timeout while still queued
            late.join()
            [late] = answers
            assert late.status_code == 504 and "timeout of 0.05 s" in late.json()["error"]["message"], late.text
            assert httpx.post(f"{url}/v1/chat/completions", json={**body, "timeout": 0}).status_code == 400
        assert engine.stats()["waiting"] == 0 and engine.stats()["kv_slots_free"] == 1
    finally:
        engine.close()


@contextlib.contextmanager
def holding_the_only_slot(engine):
    """A request whose consumer blocks the engine's worker on its first token: it keeps the only KV slot
    and every later request stays queued until the block ends, however slow the machine is."""
    import threading

    from lmsmith.serve.sampling import SamplingParams

    release = threading.Event()
    engine.submit([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), lambda event: release.wait(30))
    try:
        yield
    finally:
        release.set()


def test_the_queue_is_bounded_by_waiting_prompt_tokens(tiny_model_dir):
    import threading

    from lmsmith.serve.engine import Engine, EngineConfig

    engine = Engine.load(tiny_model_dir, config=EngineConfig(max_slots=1))
    try:
        client = LocalClient(tiny_model_dir.name, engine, push_back=PushBack(max_waiting=None, max_waiting_tokens=4))
        app = create_app(client, default_max_tokens=8)
        with running_server(app) as url:
            replies: list[int] = []
            queued = threading.Thread(target=lambda: replies.append(httpx.post(f"{url}/v1/completions", json={
                "model": tiny_model_dir.name, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0},
                timeout=120).status_code))
            body = {"model": tiny_model_dir.name, "messages": QUESTION, "temperature": 0, "max_tokens": 2}
            with holding_the_only_slot(engine):
                queued.start()
                deadline = time.monotonic() + 30
                while engine.stats()["waiting_tokens"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert engine.stats()["waiting_tokens"] == 3
                pushed = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            queued.join()
            assert pushed.status_code == 503 and "prompt tokens are already waiting" in pushed.text
            assert pushed.headers["Retry-After"] == "1"
            assert replies == [200]  # the queued request is served once the slot frees
            assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        engine.close()


def test_headers_trickled_slower_than_the_header_timeout_lose_the_connection(engine, tiny_model_dir):
    app = create_app(LocalClient(tiny_model_dir.name, engine), default_max_tokens=4)
    with running_server(app, header_timeout_s=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            closed_after = None
            for _ in range(20):  # a header byte every 0.2 s: uvicorn's keep-alive timer alone would never fire
                time.sleep(0.2)
                try:
                    sock.sendall(b"X")
                    if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                        closed_after = time.monotonic() - started
                        break
                except BlockingIOError:
                    continue
                except OSError:
                    closed_after = time.monotonic() - started
                    break
        assert closed_after is not None and closed_after < 1.5, closed_after
        assert httpx.get(f"{url}/healthz").status_code == 200  # a normal client is unaffected
