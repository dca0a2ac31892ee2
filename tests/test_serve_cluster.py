"""Multi-LoRA and upstream mode with real processes: two `lmsmith serve` upstreams (the first with
`--lora`), fronted by `lmsmith serve --upstream A,B/v1 --cache memory`; everything through HTTP and the
official `openai` SDK."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

MAX_TOKENS = 16
QUESTION = [{"role": "user", "content": "星辰科技2023年营业收入是多少?"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`lmsmith serve ARGS --port FREE` as a subprocess, ready once /readyz answers 200."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONIOENCODING": "utf-8"} | (env or {})
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lmsmith.cli", "serve", *args, "--port", str(self.port),
                 "--max-new-tokens", str(MAX_TOKENS), "--embedding-model", "none"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"lmsmith serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lmsmith serve did not become ready:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A peft LoRA on q/v projections with non-zero B, so the adapter visibly changes greedy answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, adapter_dir, tmp_path_factory):
    """(upstream A with adapter 'fin', upstream B, the front): started together, stopped together."""
    logs = tmp_path_factory.mktemp("cluster_logs")
    a = Server([str(tiny_model_dir), "--lora", f"fin={adapter_dir}", "--adapter-root", str(adapter_dir.parent)],
               logs / "a.log")
    b = Server([str(tiny_model_dir)], logs / "b.log")
    servers = [a, b]
    try:
        a.wait_ready()
        b.wait_ready()
        front = Server(["--upstream", f"{a.url},{b.url}/v1", "--health-interval", "30", "--cache", "memory"],
                       logs / "front.log")
        servers.append(front)
        front.wait_ready()
        yield a, b, front
    finally:
        for server in servers:
            server.stop()


def sdk(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def hf_greedy(model, tokenizer, messages) -> str:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)


def upstream_stats(front) -> dict[str, dict]:
    pool = httpx.get(f"{front.url}/healthz").json()["engine"]["upstreams"]
    return {entry["url"]: entry for entry in pool}


# ----- multi-LoRA -----

@pytest.mark.slow
def test_lora_from_the_command_line_and_admin_endpoints(cluster, tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, _, _ = cluster
    client = sdk(a.url)
    models = {model.id: model for model in client.models.list().data}
    assert set(models) == {tiny_model_dir.name, "fin"}
    assert models["fin"].model_extra["parent"] == tiny_model_dir.name

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_answer = hf_greedy(base, tokenizer, QUESTION)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    tuned_answer = hf_greedy(tuned, tokenizer, QUESTION)
    assert tuned_answer != base_answer  # otherwise the test could not tell adapters apart

    def ask(model: str) -> str:
        reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
        return reply.choices[0].message.content

    # Requests for the base and the adapter run side by side.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [tiny_model_dir.name, "fin", tiny_model_dir.name, "fin"]))
    assert answers == [base_answer, tuned_answer, base_answer, tuned_answer]

    # Over the API an adapter is named relative to --adapter-root, never by a path of the server's.
    loaded = httpx.post(f"{a.url}/admin/loras", json={"name": "fin2", "path": adapter_dir.name}, timeout=60)
    assert loaded.status_code == 200 and "fin2" in loaded.json()["models"]
    assert ask("fin2") == tuned_answer
    assert [card["id"] for card in httpx.get(f"{a.url}/admin/loras").json()["data"]] == ["fin", "fin2"]
    assert httpx.delete(f"{a.url}/admin/loras/fin2").status_code == 200
    gone = httpx.post(f"{a.url}/v1/chat/completions", json={"model": "fin2", "messages": QUESTION})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"

    duplicate = httpx.post(f"{a.url}/admin/loras", json={"name": "fin", "path": adapter_dir.name})
    assert duplicate.status_code == 400 and duplicate.json()["error"]["code"] == "adapter_exists"
    missing = httpx.post(f"{a.url}/admin/loras", json={"name": "x", "path": f"{adapter_dir.name}/nope"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "path"
    outside = httpx.post(f"{a.url}/admin/loras", json={"name": "x", "path": str(tiny_model_dir)})
    assert outside.status_code == 400 and str(tiny_model_dir) not in outside.json()["error"]["message"].replace(
        f"'{tiny_model_dir}'", "")


@pytest.mark.slow
def test_cli_rejects_a_model_and_upstreams_together(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "lmsmith.cli", "serve", str(tiny_model_dir), "--upstream",
                             "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not both" in result.stderr
    bad_lora = subprocess.run([sys.executable, "-m", "lmsmith.cli", "serve", str(tiny_model_dir), "--lora", "nopath"],
                              capture_output=True, text=True, timeout=60)
    assert bad_lora.returncode == 2 and "NAME=PATH" in bad_lora.stderr


# ----- upstream mode -----

def test_front_answers_equal_direct_answers(cluster, tiny_model_dir):
    a, b, front = cluster
    direct, fronted = sdk(a.url), sdk(front.url)
    name = tiny_model_dir.name
    assert {m.id for m in fronted.models.list().data} == {name, "fin"}
    for model in (name, "fin"):
        b_requests = upstream_stats(front)[b.url]["requests"]
        expected = direct.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
        plain = fronted.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
        assert plain.choices[0].message.content == expected.choices[0].message.content
        assert plain.usage == expected.usage
        streamed = list(fronted.chat.completions.create(model=model, messages=QUESTION, temperature=0.0, seed=3,
                                                        max_tokens=MAX_TOKENS, stream=True,
                                                        stream_options={"include_usage": True}))
        assert len([c for c in streamed if c.choices and c.choices[0].delta.content]) > 1  # passed through in pieces
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            expected.choices[0].message.content
        assert streamed[-1].usage == expected.usage
        if model == "fin":  # the adapter lives only on A: the front sent every 'fin' request there
            assert upstream_stats(front)[b.url]["requests"] == b_requests
    text = direct.completions.create(model=name, prompt="华信银行", temperature=0, max_tokens=MAX_TOKENS)
    assert fronted.completions.create(model=name, prompt="华信银行", temperature=0,
                                      max_tokens=MAX_TOKENS).choices[0].text == text.choices[0].text


def test_least_outstanding_balancing_spreads_concurrent_requests(cluster, tiny_model_dir):
    a, b, front = cluster
    before = upstream_stats(front)
    client = sdk(front.url)
    questions = [f"第{i}个问题:毛利率是多少?" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: client.chat.completions.create(
            model=tiny_model_dir.name, messages=[{"role": "user", "content": q}], temperature=0.8,
            max_tokens=MAX_TOKENS).choices[0].message.content, questions))
    assert len(answers) == 8
    after = upstream_stats(front)
    taken = {url: after[url]["requests"] - before[url]["requests"] for url in (a.url, b.url)}
    assert sum(taken.values()) == 8
    assert min(taken.values()) >= 2, taken
    assert all(entry["outstanding"] == 0 for entry in after.values())


def test_front_caches_and_exports_upstream_metrics(cluster, tiny_model_dir):
    _, _, front = cluster
    client = sdk(front.url)
    ask = dict(model=tiny_model_dir.name, messages=[{"role": "user", "content": "资产负债率"}], temperature=0,
               max_tokens=MAX_TOKENS)
    first = client.chat.completions.create(**ask).choices[0].message.content
    before = sum(entry["requests"] for entry in upstream_stats(front).values())
    assert client.chat.completions.create(**ask).choices[0].message.content == first
    assert sum(entry["requests"] for entry in upstream_stats(front).values()) == before  # answered by the cache
    metrics = httpx.get(f"{front.url}/metrics").text
    assert 'lmsmith_cache_hits_total{backend="memory"} 1.0' in metrics
    assert metrics.count("lmsmith_upstream_healthy{") == 2
    assert "lmsmith_time_to_first_token_seconds_count" in metrics


def test_killed_upstream_is_skipped_by_retry(cluster, tiny_model_dir):
    a, b, front = cluster
    client = sdk(front.url)
    expected = sdk(a.url).chat.completions.create(model=tiny_model_dir.name, messages=QUESTION, temperature=0.5,
                                                  seed=11, max_tokens=MAX_TOKENS).choices[0].message.content
    b.stop()
    answers = [client.chat.completions.create(model=tiny_model_dir.name, messages=QUESTION, temperature=0.5,
                                              seed=100 + i, max_tokens=MAX_TOKENS).choices[0].message.content
               for i in range(4)]
    assert len(answers) == 4
    pool = upstream_stats(front)
    # Health checks are 30 s apart: only a failed connection and a retry on A can have found B gone.
    assert pool[b.url]["failures"] == 1 and pool[b.url]["healthy"] is False and pool[a.url]["healthy"] is True
    assert httpx.get(f"{front.url}/readyz").status_code == 200
    same = client.chat.completions.create(model=tiny_model_dir.name, messages=QUESTION, temperature=0.5, seed=11,
                                          max_tokens=MAX_TOKENS)
    assert same.choices[0].message.content == expected


@pytest.mark.slow
def test_two_server_processes_share_one_key_store_and_redis_limits(tiny_model_dir, tmp_path, redis_url):
    """The gateway across replicas: one key store (the state folder), rate-limit counters in Redis."""
    from lmsmith.gateway.keys import KeyStore

    key, _ = KeyStore(tmp_path / "state").create("shared", "user", rpm=3)
    env = {"LMSMITH_STATE_DIR": str(tmp_path / "state"), "LMSMITH_LIMITS_REDIS_URL": redis_url}
    servers = [Server([str(tiny_model_dir)], tmp_path / f"{name}.log", env) for name in ("a", "b")]
    try:
        for server in servers:
            server.wait_ready()
        body = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 1}
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{servers[0].url}/v1/chat/completions", json=body).status_code == 401
        from conftest import fresh_minute

        fresh_minute()
        statuses = [httpx.post(f"{servers[i % 2].url}/v1/chat/completions", json=body, headers=headers,
                               timeout=60).status_code for i in range(5)]
    finally:
        for server in servers:
            server.stop()
    assert statuses == [200, 200, 200, 429, 429]  # three in all, whichever replica took them
