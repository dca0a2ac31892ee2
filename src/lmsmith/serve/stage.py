"""The pipeline's serve stage: a smoke check of the tuned model behind the real HTTP API.

It starts the FastAPI app (`lmsmith.serve.api`) under uvicorn on a background thread, asks held-out SFT
questions over HTTP with httpx, once as a plain JSON request and at least once streamed, and records what
came back. The transcript shows the report what a client of the served model actually gets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import mean
from typing import Any

import httpx

from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.serve.api import create_app, running_server
from lmsmith.serve.config import ServeConfig
from lmsmith.serve.engine import Engine

TRANSCRIPT = "transcript.json"
REQUEST_TIMEOUT_S = 300.0


def run(config: ServeConfig, ctx: StageContext) -> StageResult:
    questions = read_questions(ctx.artifact("data", "sft_test"), config.smoke_questions)
    model_name = ctx.run_dir.resolve().name
    if config.variant is None:
        model_dir = ctx.artifact("sft", "model")
    else:
        from lmsmith.compress.stage import variant_output

        try:
            model_dir = ctx.artifact("compress", variant_output(config.variant))
        except KeyError:
            raise UserError(f"serve.variant: the compress stage made no variant {config.variant!r}") from None
        model_name = f"{model_name}-{config.variant}"
    engine = Engine.load(model_dir, device=config.device, dtype=config.dtype, config=config.engine_config())
    app = create_app(engine, model_name, default_max_tokens=config.max_new_tokens)
    plan = _plan(questions)
    entries: list[dict[str, Any]] = []
    try:
        with running_server(app, host=config.host, port=config.port) as url:
            console.print(f"serving {model_name} at {url}/v1", soft_wrap=True)
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client, \
                    track("serve: smoke questions", total=len(plan)) as tracker:
                for row, streamed in plan:
                    entry = ask(client, model_name, row, config.max_new_tokens, streamed)
                    entries.append(entry)
                    tracker.advance(latency_s=entry["latency_s"], ok=entry["error"] is None)
    finally:
        engine.close()
    transcript = {"model": model_name, "model_dir": str(model_dir), "entries": entries}
    (ctx.stage_dir / TRANSCRIPT).write_text(json.dumps(transcript, indent=2, ensure_ascii=False), encoding="utf-8")
    return StageResult(outputs={"transcript": TRANSCRIPT}, metrics=summarize(entries))


def read_questions(path: Path, limit: int) -> list[dict[str, Any]]:
    """The first `limit` SFT rows; each must end with the assistant's reference answer."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if (
                not isinstance(messages, list)
                or len(messages) < 2
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
                or messages[-1]["role"] != "assistant"
            ):
                raise UserError(
                    f"{path}:{number}: expected `messages` with roles and contents, ending with the assistant's answer"
                )
            rows.append(row)
    return rows


def _plan(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bool]]:
    """Alternate plain and streamed requests; a single question is asked both ways."""
    plan = [(row, index % 2 == 1) for index, row in enumerate(rows)]
    if len(rows) == 1:
        plan.append((rows[0], True))
    return plan


def ask(client: httpx.Client, model: str, row: dict[str, Any], max_tokens: int, streamed: bool) -> dict[str, Any]:
    """One chat completion over HTTP (greedy); the transcript entry, errors included rather than raised."""
    prompt = [{"role": m["role"], "content": m["content"]} for m in row["messages"][:-1]]
    body = {"model": model, "messages": prompt, "max_tokens": max_tokens, "temperature": 0}
    entry: dict[str, Any] = {
        "id": row.get("id"),
        "task": row.get("task"),
        "mode": "stream" if streamed else "json",
        "question": prompt[-1]["content"],
        "reference": row["messages"][-1]["content"],
        "answer": None,
        "finish_reason": None,
        "latency_s": None,
        "first_token_s": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "error": None,
    }
    started = time.perf_counter()
    try:
        entry |= _ask_streamed(client, body, started) if streamed else _ask_plain(client, body)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
    entry["latency_s"] = round(time.perf_counter() - started, 4)
    return entry


def _ask_plain(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json=body)
    reply = response.json()
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}: {reply.get('error', {}).get('message', reply)}")
    choice = reply["choices"][0]
    return {
        "answer": choice["message"]["content"],
        "finish_reason": choice["finish_reason"],
        "prompt_tokens": reply["usage"]["prompt_tokens"],
        "completion_tokens": reply["usage"]["completion_tokens"],
    }


def _ask_streamed(client: httpx.Client, body: dict[str, Any], started: float) -> dict[str, Any]:
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    result: dict[str, Any] = {"answer": "", "first_token_s": None}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise ValueError(f"HTTP {response.status_code}: {response.text}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise ValueError(event["error"].get("message", "stream error"))
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    if result["first_token_s"] is None:
                        result["first_token_s"] = round(time.perf_counter() - started, 4)
                    result["answer"] += text
                if choice.get("finish_reason"):
                    result["finish_reason"] = choice["finish_reason"]
            if event.get("usage"):
                result["prompt_tokens"] = event["usage"]["prompt_tokens"]
                result["completion_tokens"] = event["usage"]["completion_tokens"]
    return result


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    answered = [entry for entry in entries if entry["error"] is None]
    latency = sum(entry["latency_s"] for entry in answered)
    tokens = sum(entry["completion_tokens"] or 0 for entry in answered)
    first_tokens = [entry["first_token_s"] for entry in answered if entry["first_token_s"] is not None]
    return {
        "requests": len(entries),
        "errors": len(entries) - len(answered),
        "streamed_requests": sum(1 for entry in entries if entry["mode"] == "stream"),
        "mean_latency_s": round(mean(entry["latency_s"] for entry in answered), 4) if answered else None,
        "mean_first_token_s": round(mean(first_tokens), 4) if first_tokens else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / latency, 2) if latency > 0 else None,
    }
