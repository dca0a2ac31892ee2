"""What evaluation clients ask of `/v1/completions` and chat: echo, prompt and sampled logprobs with
top_logprobs, token-id prompts, batches of prompts, max_tokens 0 and n, checked against transformers'
own log-softmax on the tiny model, through the `openai` SDK and raw HTTP."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from lmsmith.serve.api import create_app, running_server
from lmsmith.serve.cache import MemoryCache
from lmsmith.serve.client import LocalClient

PROMPT = "星辰科技2023年营业收入为12.5亿元，同比增长15.2%。"


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from lmsmith.serve.engine import Engine

    engine = Engine.load(tiny_model_dir)
    app = create_app(LocalClient("tiny", engine), default_max_tokens=16, cache=MemoryCache(max_entries=16, ttl_s=60))
    with running_server(app) as url:
        yield url, engine
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_echo_with_max_tokens_zero_scores_the_prompt(server, hf):
    url, _ = server
    model, tokenizer = hf
    answer = post(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "echo": True, "max_tokens": 0,
                                           "logprobs": 2, "temperature": 0})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    ids = tokenizer(PROMPT)["input_ids"]
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert answer.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    want = log_softmax(model, ids)
    assert logprobs["token_logprobs"][1:] == pytest.approx(
        [float(want[i - 1, ids[i]]) for i in range(1, len(ids))], abs=2e-4)
    # Offsets are characters of the returned text: each token starts where the tokenizer says it does.
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(PROMPT)
    assert "".join(tokenizer.decode(ids[i:j]) for i, j in [(0, 5), (5, len(ids))]) == PROMPT
    tail = PROMPT.index("同比")
    inside = [i for i, offset in enumerate(offsets) if offset >= tail]
    assert tokenizer.decode([ids[i] for i in inside]) == PROMPT[tail:]
    for entry, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert 2 <= len(top) <= 3 and max(top.values()) >= entry  # the two best, and the token itself


def test_lm_eval_style_batch_of_token_id_prompts(server, hf):
    """lm-evaluation-harness's loglikelihood request: token ids in a batch, echo, max_tokens 1, logprobs 1."""
    url, _ = server
    model, tokenizer = hf
    prompts = [tokenizer(text)["input_ids"] for text in (PROMPT, "毛利率为42.3%", "资产负债率")]
    answer = post(url, "/v1/completions", {"model": "tiny", "prompt": prompts, "echo": True, "max_tokens": 1,
                                           "logprobs": 1, "temperature": 0, "seed": 1234})
    assert answer.status_code == 200, answer.text
    choices = sorted(answer.json()["choices"], key=lambda choice: choice["index"])
    assert [choice["index"] for choice in choices] == [0, 1, 2]
    for ids, choice in zip(prompts, choices):
        values = choice["logprobs"]["token_logprobs"]
        assert len(values) == len(ids) + 1  # the prompt and the one generated token
        want = log_softmax(model, ids)
        assert values[1:len(ids)] == pytest.approx([float(want[i - 1, ids[i]]) for i in range(1, len(ids))], abs=2e-4)
        greedy = int(want[-1].argmax())
        assert values[-1] == pytest.approx(float(want[-1, greedy]), abs=2e-4)
        assert values[-1] == max(choice["logprobs"]["top_logprobs"][-1].values())
        assert choice["text"].startswith(tokenizer.decode(ids, skip_special_tokens=True))


def test_n_answers_per_prompt(server, client):
    url, _ = server
    answer = client.completions.create(model="tiny", prompt=["营业收入", "净利润"], n=3, max_tokens=6,
                                       temperature=1.0, seed=7)
    assert sorted(choice.index for choice in answer.choices) == list(range(6))
    assert len({choice.text for choice in answer.choices[:3]}) > 1  # seeds seed, seed+1, seed+2 differ
    again = client.completions.create(model="tiny", prompt=["营业收入", "净利润"], n=3, max_tokens=6,
                                      temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in answer.choices]
    one = client.completions.create(model="tiny", prompt="营业收入", max_tokens=6, temperature=1.0, seed=7)
    assert answer.usage.prompt_tokens == one.usage.prompt_tokens + client.completions.create(
        model="tiny", prompt="净利润", max_tokens=1).usage.prompt_tokens  # each prompt counted once
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "毛利率"}], n=2,
                                          max_tokens=4, temperature=0)
    assert [choice.index for choice in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy twice


def test_chat_logprobs_and_top_logprobs(server, client, hf, tiny_model_dir):
    model, tokenizer = hf
    messages = [{"role": "user", "content": "星辰科技2023年营业收入是多少?"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 3 for entry in content)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    generated = tokenizer(  # the greedy tokens, re-read from their strings' bytes
        "".join(bytes(entry.bytes).decode("utf-8", "replace") for entry in content), add_special_tokens=False
    )["input_ids"]
    assert len(content) >= 1
    want = log_softmax(model, list(prompt))
    assert content[0].logprob == pytest.approx(float(want[-1].max()), abs=2e-4)  # greedy: the best token
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob, abs=1e-6)
    assert generated  # the answer's bytes are real text
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_streamed_echo_and_logprobs_equal_the_whole_answer(server):
    url, _ = server
    body = {"model": "tiny", "prompt": [PROMPT, "毛利率"], "n": 2, "echo": True, "logprobs": 1, "max_tokens": 8,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    texts: dict[int, str] = {}
    values: dict[int, list] = {}
    finished: dict[int, str] = {}
    usage = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
                if choice["logprobs"]:
                    values.setdefault(choice["index"], []).extend(choice["logprobs"]["token_logprobs"])
                if choice["finish_reason"]:
                    finished[choice["index"]] = choice["finish_reason"]
    whole = post(url, "/v1/completions", body | {"stream": False}).json()
    assert sorted(finished) == [0, 1, 2, 3]
    for choice in whole["choices"]:
        assert texts[choice["index"]] == choice["text"]
        assert values[choice["index"]] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-6)
    assert usage == whole["usage"]


def test_requests_it_cannot_honour_are_refused(server):
    url, engine = server
    cases = [
        ({"prompt": [[1, engine.vocab_size]]}, "prompt", "outside the model's vocabulary"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt": "x", "echo": True, "max_tokens": 0, "stream": True}, "stream", "nothing to stream"),
        ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
        ({"prompt": "x", "logprobs": 1, "long_doc": True}, "long_doc", "no logprobs"),
    ]
    for extra, param, message in cases:
        answer = post(url, "/v1/completions", {"model": "tiny"} | extra)
        assert answer.status_code == 400, (extra, answer.text)
        assert answer.json()["error"]["param"] == param and message in answer.json()["error"]["message"], answer.text
    chat = post(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                              "top_logprobs": 2})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "top_logprobs"


def test_logprob_answers_are_not_served_from_the_cache(server):
    url, engine = server
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 0}
    first = post(url, "/v1/completions", body).json()
    completed = engine.stats()["completed"]
    second = post(url, "/v1/completions", body).json()
    assert engine.stats()["completed"] == completed + 1
    assert second["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]


def test_lmsmith_eval_scores_lmsmith_serve_like_the_local_model(server, tmp_path, tiny_model_dir):
    """The whole loop: `lmsmith eval` against this server (log-likelihood through echo + logprobs, answers
    and timing through chat) equals the same model loaded locally."""
    from lmsmith.eval.suite import SuiteConfig, run_suite

    url, _ = server
    rows = ["question,A,B,C,D,answer"] + [f"第{i}题：毛利率等于什么？,毛利/营收{i},净利/营收,营收/资产,负债/资产,{'ABCD'[i % 4]}"
                                          for i in range(8)]
    (tmp_path / "mc.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "mc.yaml").write_text("name: mc\ntype: multiple_choice\ndataset: mc.csv\nscoring: [loglikelihood, generate]\n"
                                      "max_new_tokens: 4\n", encoding="utf-8")
    results = run_suite(SuiteConfig(task=[str(tmp_path / "mc.yaml")], model=[str(tiny_model_dir), f"{url}/v1#tiny"],
                                    out=tmp_path / "out", speed_requests=2))
    local, remote = (results["tasks"]["mc"]["scores"][spec] for spec in (str(tiny_model_dir), f"{url}/v1#tiny"))
    assert remote["acc_route"] == "loglikelihood" and remote["acc"] == local["acc"]
    assert remote["ll_letter_distribution"] == local["ll_letter_distribution"]
    assert remote["gen_acc"] == local["gen_acc"]  # greedy answers through chat equal the local decode's
    speed = results["models"][f"{url}/v1#tiny"]["speed"]
    assert speed["tok_s_b1"] > 0 and speed["tok_s_b8"] > 0 and speed["latency_p99_ms"] >= speed["latency_p50_ms"]


def test_merged_streams_end_with_any_error_and_close_cleanly():
    import asyncio

    from lmsmith.serve.api import _merged
    from lmsmith.serve.engine import Chunk

    closed: list[int] = []

    async def answer(index: int, fail: bool):
        try:
            yield Chunk("x", 1, 1)
            if fail:
                raise ValueError("adapter removed")  # not an EngineError: must not hang the other choice
            await asyncio.sleep(0.01)
            yield Chunk("", 1, 1, "stop")
        finally:
            closed.append(index)

    async def read_all():
        return [item async for item in _merged([answer(0, False), answer(1, True)])]

    items = asyncio.run(read_all())
    assert any(isinstance(item, ValueError) for _, item in items) and (0, None) in items
    assert sorted(closed) == [0, 1]

    async def leave_early():
        merged = _merged([answer(0, False), answer(1, False)])
        await merged.__anext__()
        await merged.aclose()  # a client that disconnects: no RuntimeError, every stream closed

    closed.clear()
    asyncio.run(leave_early())
    assert sorted(closed) == [0, 1]


def test_streamed_chat_usage_counts_the_prompt_once(server):
    url, _ = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "毛利率"}], "n": 3, "max_tokens": 4,
            "temperature": 0}
    whole = post(url, "/v1/chat/completions", body).json()["usage"]
    usage = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json=body | {"stream": True, "stream_options": {"include_usage": True}}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    single = post(url, "/v1/chat/completions", body | {"n": 1}).json()["usage"]
    assert usage == whole and whole["prompt_tokens"] == single["prompt_tokens"]


def test_tokens_that_decode_alike_keep_their_best_logprob(tiny_tokenizer):
    from lmsmith.serve.engine.request import TokenLogprob
    from lmsmith.serve.logprobs import CompletionLogprobs

    # Two byte pieces of Chinese characters both read U+FFFD on their own.
    pieces = [token for token in range(len(tiny_tokenizer)) if tiny_tokenizer.decode([token]) == "\ufffd"][:3]
    assert len(pieces) == 3
    entry = TokenLogprob(pieces[2], -3.0, ((pieces[0], -0.5), (pieces[1], -1.0)))
    top = CompletionLogprobs(tiny_tokenizer)._top(entry)
    assert top == {"\ufffd": -0.5}
