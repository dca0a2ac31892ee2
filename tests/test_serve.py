"""The serving layer: text streaming helpers, the engine, the HTTP API (driven by the official `openai`
client against a real `lmsmith serve` subprocess), model-folder resolution and the pipeline's serve stage."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmsmith.artifacts import Manifest, describe_outputs
from lmsmith.errors import UserError
from lmsmith.models import resolve_model, resolve_model_dir
from lmsmith.serve.sampling import SamplingParams, sample_next_token
from lmsmith.serve.text import IncrementalDetokenizer, StopStringFilter

QUESTION = [{"role": "user", "content": "星辰科技2023年营业收入是多少?"}]
OTHER_QUESTION = [{"role": "user", "content": "华信银行"}]
MAX_TOKENS = 32


# ----- references -----

@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tokenizer


def hf_greedy(hf_model, messages, max_new_tokens=MAX_TOKENS) -> tuple[str, int, int]:
    """transformers' own greedy `generate`: (text, new tokens incl. eos, prompt tokens)."""
    model, tokenizer = hf_model
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, len(prompt):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new), len(prompt)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONIOENCODING": "utf-8"}


# ----- text streaming -----

def test_detokenizer_never_emits_half_a_chinese_character(tiny_tokenizer):
    # Characters the tiny BPE never saw in training are split into their UTF-8 bytes.
    text = "星辰科技2023年營業收入為12.5億元,龍騰集團同比增长15.2%。"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    # The test only means something if some tokens carry part of a character.
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)
    detokenizer = IncrementalDetokenizer(tiny_tokenizer)
    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text
    assert "" in deltas[:-1]  # something was held back until its character was complete


def test_stop_strings_are_cut_even_across_pieces():
    stops = StopStringFilter(["<|end|>", "###"])
    assert stops.feed("Revenue rose <") == "Revenue rose "
    assert stops.feed("|en") == ""
    assert stops.feed("d|> and more") == ""
    assert stops.stopped and stops.flush() == ""

    no_hit = StopStringFilter(["###"])
    assert no_hit.feed("a #") == "a "
    assert no_hit.feed("# b") == "## b"
    assert no_hit.feed("#") == ""
    assert no_hit.flush() == "#"
    assert not no_hit.stopped


def test_sampling_greedy_and_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert sample_next_token(logits, SamplingParams(temperature=0), None) == 0
    generator = torch.Generator().manual_seed(0)
    nucleus = SamplingParams(temperature=1.0, top_p=0.7)
    drawn = {sample_next_token(logits, nucleus, generator) for _ in range(300)}
    assert drawn == {0, 1}
    everything = {sample_next_token(logits, SamplingParams(temperature=1.0), generator) for _ in range(300)}
    assert everything == {0, 1, 2, 3}


# ----- model folders -----

@pytest.fixture()
def run_dir(tmp_path, tiny_model_dir) -> Path:
    """A fabricated run folder: data (sft_test with three questions) and sft (the merged model)."""
    run = tmp_path / "finance-run"
    data_dir = run / "data"
    (data_dir / "sft").mkdir(parents=True)
    rows = [
        {"id": f"q{i}", "task": "qa", "answer": {},
         "messages": [{"role": "system", "content": "你是财务分析助手。"}, {"role": "user", "content": question},
                      {"role": "assistant", "content": f"参考答案{i}"}]}
        for i, question in enumerate(["星辰科技2023年营业收入是多少?", "华信银行的毛利率", "Revenue growth?", "毛利率"])
    ]
    (data_dir / "sft" / "test.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )
    Manifest(stage="data", config={}, config_hash="h", inputs={},
             outputs=describe_outputs(data_dir, {"sft_test": "sft/test.jsonl"})).write(data_dir)
    sft_dir = run / "sft"
    shutil.copytree(tiny_model_dir, sft_dir / "merged")
    Manifest(stage="sft", config={}, config_hash="h", inputs={"stage:data": "x"},
             outputs=describe_outputs(sft_dir, {"model": "merged"})).write(sft_dir)
    return run


def test_run_folder_resolves_to_its_sft_model(run_dir, tiny_model_dir, tmp_path):
    resolved = resolve_model(run_dir)
    assert resolved.path == (run_dir / "sft" / "merged").resolve()
    assert resolved.name == "finance-run"
    assert resolve_model_dir(tiny_model_dir) == tiny_model_dir.resolve()
    assert resolve_model(tiny_model_dir).name == tiny_model_dir.name

    with pytest.raises(UserError, match="no such run folder"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: neither a run folder"):
        resolve_model(tmp_path / "empty")
    manifest = json.loads((run_dir / "sft" / "manifest.json").read_text())
    manifest["outputs"].pop("model")
    (run_dir / "sft" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no 'model' output"):
        resolve_model(run_dir)


# ----- the engine, in-process -----

@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from lmsmith.serve.engine import Engine

    engine = Engine.load(tiny_model_dir)
    try:
        yield engine
    finally:
        engine.close()


def test_engine_greedy_matches_hf_generate_and_honours_stop_strings(engine, hf_model):
    text, new_tokens, prompt_tokens = hf_greedy(hf_model, OTHER_QUESTION)
    prompt = engine.encode_chat(OTHER_QUESTION)
    chunks = list(engine.stream_sync(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0)))
    assert "".join(chunk.text for chunk in chunks) == text
    assert chunks[-1].finish_reason == ("stop" if new_tokens < MAX_TOKENS else "length")
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (prompt_tokens, new_tokens)
    assert len(chunks) > 3  # it streamed, rather than arriving in one piece

    stop = text.strip("\n")[1:3]
    stopped = asyncio.run(engine.complete(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=(stop,))))
    assert stopped.text == text[: text.index(stop)]
    assert stopped.finish_reason == "stop"


def test_leaving_a_stream_cancels_its_request(engine):
    prompt = engine.encode_chat(QUESTION)
    # A request that ended on a stop string leaves the engine at its next step: let earlier ones settle.
    deadline = time.monotonic() + 5
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    before = engine.stats()

    async def read_one_chunk_then_leave() -> dict[str, int]:
        stream = engine.stream(prompt, SamplingParams(max_tokens=400, temperature=0))
        async for _ in stream:
            break
        await stream.aclose()
        # Keep this event loop alive while waiting, so only leaving the stream can have cancelled it.
        deadline = time.monotonic() + 5
        while engine.stats()["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return engine.stats()

    after = asyncio.run(read_one_chunk_then_leave())
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]
    assert after["completion_tokens"] - before["completion_tokens"] < 400
    assert after["running"] == 0 and after["waiting"] == 0


# ----- the HTTP API, as a subprocess, through the openai client -----

@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """`lmsmith serve MODEL_DIR --port FREE` in a subprocess; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmsmith.cli", "serve", str(tiny_model_dir), "--port", str(port),
             "--max-new-tokens", str(MAX_TOKENS)],
            stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"lmsmith serve exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lmsmith serve did not become healthy:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_plain_and_streamed_answers_equal_hf_greedy(client, tiny_model_dir, hf_model):
    name = tiny_model_dir.name
    expected, new_tokens, prompt_tokens = hf_greedy(hf_model, QUESTION)

    plain = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert plain.object == "chat.completion" and plain.model == name
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].finish_reason == ("stop" if new_tokens < MAX_TOKENS else "length")
    assert plain.usage.prompt_tokens == prompt_tokens
    assert plain.usage.completion_tokens == new_tokens
    assert plain.usage.total_tokens == prompt_tokens + new_tokens

    stream = client.chat.completions.create(
        model=name, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1
    assert "".join(c.choices[0].delta.content for c in content_chunks) == expected
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == new_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens

    # Without max_tokens the server's --max-new-tokens applies.
    default = client.chat.completions.create(model=name, messages=QUESTION, temperature=0)
    assert default.choices[0].message.content == expected


def test_concurrent_requests_queue_and_each_get_their_own_answer(client, server, tiny_model_dir, hf_model):
    from concurrent.futures import ThreadPoolExecutor

    questions = [[{"role": "user", "content": text}] for text in ("华信银行", "毛利率", "Revenue growth?", "hello")]

    def ask(messages, streamed: bool) -> str:
        kwargs = dict(model=tiny_model_dir.name, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        if streamed:
            chunks = client.chat.completions.create(stream=True, **kwargs)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        answers = list(pool.map(ask, questions, [True, False, True, False]))
    assert answers == [hf_greedy(hf_model, messages)[0] for messages in questions]
    engine = httpx.get(f"{server}/healthz").json()["engine"]
    assert engine["running"] == 0 and engine["waiting"] == 0


def test_sse_wire_format_ends_with_done(server, tiny_model_dir):
    body = {"model": tiny_model_dir.name, "messages": OTHER_QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_seed_makes_sampling_repeatable(client, tiny_model_dir):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=tiny_model_dir.name, messages=QUESTION, temperature=1.5, top_p=0.95, seed=seed, max_tokens=16
        )
        return reply.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert {sample(seed) for seed in range(8, 14)} != {first}


def test_stop_sequences_through_the_api(client, tiny_model_dir, hf_model):
    expected, _, _ = hf_greedy(hf_model, OTHER_QUESTION)
    stop = expected.strip("\n")[1:3]
    reply = client.chat.completions.create(
        model=tiny_model_dir.name, messages=OTHER_QUESTION, temperature=0, max_tokens=MAX_TOKENS, stop=[stop]
    )
    assert reply.choices[0].message.content == expected[: expected.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_models_endpoint_lists_the_served_model(client, server, tiny_model_dir):
    assert [model.id for model in client.models.list().data] == [tiny_model_dir.name, "all-MiniLM-L6-v2"]
    assert client.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["model"] == tiny_model_dir.name


def _assert_openai_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    return error


def test_bad_requests_get_openai_errors(client, server, tiny_model_dir):
    import openai

    name = tiny_model_dir.name
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert unknown.value.status_code == 404
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(model=name, messages=QUESTION, temperature=5)
    assert hot.value.body["param"] == "temperature"

    url = f"{server}/v1/chat/completions"
    _assert_openai_error(httpx.post(url, json={"model": name}), 400, "messages")
    _assert_openai_error(httpx.post(url, json={"model": name, "messages": [{"role": "robot", "content": "hi"}]}),
                         400, "messages[0].role")
    _assert_openai_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}),
                         400, None)
    too_long = [{"role": "user", "content": "营业收入同比增长率 " * 400}]
    error = _assert_openai_error(httpx.post(url, json={"model": name, "messages": too_long}), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    _assert_openai_error(httpx.get(f"{server}/v1/nothing-here"), 404, None)
    assert httpx.get(f"{server}/healthz").json()["engine"]["failed"] == 0


def test_client_disconnect_cancels_generation(server, tiny_model_dir):
    before = httpx.get(f"{server}/healthz").json()["engine"]
    body = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 450, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if '"content":' in line:
                break  # leave after the first generated text
    deadline = time.monotonic() + 10
    while True:
        after = httpx.get(f"{server}/healthz").json()["engine"]
        if after["cancelled"] > before["cancelled"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]
    assert after["completion_tokens"] - before["completion_tokens"] < 450


# ----- the pipeline stage -----

def test_serve_stage_writes_a_transcript_of_real_answers(run_dir, hf_model):
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe
    from lmsmith.serve.config import ServeConfig
    from lmsmith.serve.stage import run

    stage_dir = run_dir / "serve"
    stage_dir.mkdir()
    ctx = StageContext(run_dir=run_dir, stage_dir=stage_dir, recipe=Recipe())
    result = run(ServeConfig(port=0, smoke_questions=3, max_new_tokens=MAX_TOKENS), ctx)

    assert result.outputs == {"transcript": "transcript.json"}
    transcript = json.loads((stage_dir / "transcript.json").read_text(encoding="utf-8"))
    assert transcript["model"] == "finance-run"
    entries = transcript["entries"]
    assert [entry["id"] for entry in entries] == ["q0", "q1", "q2"]
    assert [entry["mode"] for entry in entries] == ["json", "stream", "json"]
    test_rows = [json.loads(line) for line in (run_dir / "data" / "sft" / "test.jsonl").read_text().splitlines()]
    for entry, row in zip(entries, test_rows):
        assert entry["error"] is None
        assert entry["question"] == row["messages"][-2]["content"]
        assert entry["reference"] == row["messages"][-1]["content"]
        expected, new_tokens, prompt_tokens = hf_greedy(hf_model, row["messages"][:-1])
        assert entry["answer"] == expected
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == (prompt_tokens, new_tokens)
        assert entry["latency_s"] > 0
    assert entries[1]["answer"], "the streamed question must produce text for first_token_s to mean anything"
    assert 0 < entries[1]["first_token_s"] <= entries[1]["latency_s"]
    metrics = result.metrics
    assert metrics["requests"] == 3 and metrics["errors"] == 0 and metrics["streamed_requests"] == 1
    assert metrics["tokens_per_s"] > 0 and metrics["mean_latency_s"] > 0
    assert metrics["completion_tokens"] == sum(entry["completion_tokens"] for entry in entries)
