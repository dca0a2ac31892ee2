"""Serving benchmark (issue 5): the lmsmith engine server against `transformers serve --continuous-batching`
and plain HF `generate` per request, under one load, side by side.

    python bench/serve_bench.py                      # CPU preset: random 108M Qwen2, 8 concurrent requests
    python bench/serve_bench.py --preset gpu         # random Qwen2-0.5B architecture, bf16, 256 concurrent
    python bench/serve_bench.py --backends lmsmith --num-requests 64 --concurrency 16 --request-rate 4

The load generator works like `vllm bench serve`: requests arrive as a Poisson process at
`--request-rate` per second (inf: all at once) and at most `--concurrency` are in flight. Each is a
streamed chat completion (greedy, `max_tokens` fixed); the client records when every piece arrives. It
reports request throughput, output tokens/s, and TTFT, TPOT, ITL and end-to-end latency (mean, p50, p99).
Output tokens come from the server's usage report, else from re-tokenizing the text.

Backends:
- `lmsmith`: `lmsmith serve MODEL` in a subprocess (the continuous-batching engine);
- `transformers-cb`: `transformers serve --continuous-batching MODEL` in a subprocess;
- `hf-generate`: in this process, `model.generate` per request, one request at a time (no batching),
  with a streamer that timestamps each token, i.e. what a naive server does.

The model is random-init (nothing is downloaded) with a byte-level BPE tokenizer trained here; both are
written to a temporary folder. Prints a table and one JSON object (`--json-out` writes it to a file).

`--overload` (lmsmith only) measures push-back: first the capacity (3 x `--concurrency` requests, all at
once, at most `--concurrency` in flight: completed requests per second), then two fresh servers, one with
push-back (`--max-waiting` one batch, `--max-queue-wait-s` twice the SLO) and one with every queue limit
lifted, each get Poisson arrivals at `--overload-factor` (2) x capacity for `--overload-seconds` (60) with
no client-side cap. It reports the statuses, goodput (requests answered 200 within the end-to-end SLO,
per second of arrivals and as a share of them, as `vllm bench serve --goodput` counts), latency of the
200s, the server's RSS sampled every second, and the next request after the burst.

`--rounds N` repeats the batching backends N times in alternating order (A B, B A, ...), because a
shared machine's speed drifts by tens of percent over minutes: each round's ratio compares neighbours in
time, and the table shows each metric's median over the rounds. `hf-generate` runs in the first round only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from bench_models import PRESETS, WORDS, build_model  # beside this file

# ----- the load -----

@dataclass
class Record:
    """What the client saw of one request."""

    start: float
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str | None = None
    status: int | None = None  # the HTTP status (None: no answer, e.g. a connection error)


Send = Callable[[list[dict[str, str]], int], Awaitable[Record]]


def make_prompts(count: int, prompt_tokens: int, tokenizer: Any, seed: int = 1) -> list[list[dict[str, str]]]:
    """Chat prompts of about `prompt_tokens` tokens each (random finance words)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < prompt_tokens:
            words.append(rng.choice(WORDS))
        prompts.append([{"role": "user", "content": " ".join(words)}])
    return prompts


async def run_load(send: Send, prompts: list[list[dict[str, str]]], max_tokens: int, request_rate: float,
                   concurrency: int, seed: int = 2) -> tuple[list[Record], float]:
    """Poisson arrivals at `request_rate`/s, at most `concurrency` in flight; (records, wall seconds)."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency)

    async def one(messages: list[dict[str, str]]) -> Record:
        async with limit:
            return await send(messages, max_tokens)

    tasks = []
    started = time.perf_counter()
    for messages in prompts:
        tasks.append(asyncio.create_task(one(messages)))
        if math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - started


def http_sender(client: httpx.AsyncClient, url: str, model: str, tokenizer: Any) -> Send:
    """Streamed OpenAI chat completions against `url`."""

    async def send(messages: list[dict[str, str]], max_tokens: int) -> Record:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        record = Record(start=time.perf_counter())
        text, last, usage = [], None, None
        try:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                record.status = response.status_code
                if response.status_code != 200:
                    record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return record
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            now = time.perf_counter()
                            if record.ttft is None:
                                record.ttft = now - record.start
                            else:
                                record.gaps.append(now - last)
                            last = now
                            text.append(piece)
        except httpx.HTTPError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            return record
        record.e2e = time.perf_counter() - record.start
        completion = (usage or {}).get("completion_tokens")
        record.output_tokens = completion or len(tokenizer("".join(text))["input_ids"])
        return record

    return send


def hf_generate_sender(model: Any, tokenizer: Any) -> tuple[Send, ThreadPoolExecutor]:
    """`model.generate` per request on one worker thread: requests queue, nothing is batched."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    worker = ThreadPoolExecutor(1, thread_name_prefix="hf-generate")

    class TokenClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: Any) -> None:
            if not self._prompt_seen:  # generate first hands the streamer the prompt
                self._prompt_seen = True
                return
            self.times.extend([time.perf_counter()] * int(value.numel()))

        def end(self) -> None:
            pass

    def generate(messages: list[dict[str, str]], max_tokens: int, record: Record) -> None:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        clock = TokenClock()
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, streamer=clock,
                           pad_token_id=tokenizer.pad_token_id)
        record.ttft = clock.times[0] - record.start
        record.gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
        record.e2e = time.perf_counter() - record.start
        record.output_tokens = len(clock.times)

    async def send(messages: list[dict[str, str]], max_tokens: int) -> Record:
        record = Record(start=time.perf_counter())
        await asyncio.get_running_loop().run_in_executor(worker, generate, messages, max_tokens, record)
        return record

    return send, worker


# ----- servers -----

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Subprocess:
    def __init__(self, command: list[str], ready_path: str, log: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.ready_path = ready_path
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.command[0]} did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(backend: str, model_dir: Path, args: argparse.Namespace, logs: Path,
                 extra: tuple[str, ...] = ()) -> tuple[Subprocess, str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    bin_dir = Path(sys.executable).parent
    if backend == "lmsmith":
        command = [sys.executable, "-m", "lmsmith.cli", "serve", str(model_dir), "--port", "{port}",
                   "--device", args.device, "--dtype", args.dtype, "--embedding-model", "none",
                   "--max-slots", str(max(args.concurrency, 1)), *extra]
        server = Subprocess(command, "/readyz", logs / "lmsmith.log", env)
        return server, model_dir.name
    # transformers serve lists models from the hub cache folder; it must exist even offline.
    (Path.home() / ".cache" / "huggingface" / "hub").mkdir(parents=True, exist_ok=True)
    command = [str(bin_dir / "transformers"), "serve", "--continuous-batching", "--host", "127.0.0.1",
               "--port", "{port}", "--device", args.device, "--dtype", args.dtype, str(model_dir)]
    server = Subprocess(command, "/health", logs / "transformers.log", env)
    return server, str(model_dir)


# ----- report -----

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def summarize(records: list[Record], duration: float) -> dict[str, Any]:
    done = [r for r in records if r.error is None and r.e2e is not None]
    tokens = sum(r.output_tokens for r in done)

    def stats(values: list[float]) -> dict[str, float | None]:
        ms = [v * 1000 for v in values]
        return {"mean_ms": statistics.fmean(ms) if ms else None, "p50_ms": percentile(ms, 50),
                "p99_ms": percentile(ms, 99)}

    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.ttft is not None and r.output_tokens > 1]
    return {
        "completed": len(done),
        "errors": len(records) - len(done),
        "first_error": next((r.error for r in records if r.error), None),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tokens": tokens,
        "output_tok_s": tokens / duration,
        "ttft": stats([r.ttft for r in done if r.ttft is not None]),
        "tpot": stats(tpot),
        "itl": stats([gap for r in done for gap in r.gaps]),
        "e2e": stats([r.e2e for r in done]),
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    rows = [("completed / errors", lambda r: f"{int(r['completed'])} / {int(r['errors'])}"),
            ("request throughput (req/s)", lambda r: f"{r['request_throughput']:.2f}"),
            ("output tok/s", lambda r: f"{r['output_tok_s']:.1f}")]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for q in ("p50", "p99"):
            rows.append((f"{metric.upper()} {q} (ms)",
                         lambda r, m=metric, q=q: "-" if r[m][f"{q}_ms"] is None else f"{r[m][f'{q}_ms']:.1f}"))
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  " + "  ".join(f"{name:>16}" for name in names))
    for label, cell in rows:
        print(f"{label:{width}}  " + "  ".join(f"{cell(results[name]):>16}" for name in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--backends", nargs="+", default=["lmsmith", "transformers-cb", "hf-generate"],
                        choices=["lmsmith", "transformers-cb", "hf-generate"])
    parser.add_argument("--model-dir", type=Path, help="Serve this HF folder instead of building the random model.")
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--concurrency", type=int, help="Most requests in flight (the cap).")
    parser.add_argument("--request-rate", type=float, help="Poisson arrival rate, requests/s (inf: all at once).")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--hf-requests", type=int, help="hf-generate: run only this many requests (it is slow).")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--rounds", type=int, default=1, help="Repeat the batching backends, alternating order.")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--overload", action="store_true",
                        help="Overload mode: lmsmith only, arrivals at --overload-factor x measured capacity for "
                             "--overload-seconds, with push-back and without; goodput, statuses, memory.")
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument("--overload-factor", type=float, default=2.0)
    parser.add_argument("--overload-max-waiting", type=int, help="Push-back run's --max-waiting (default: the slots).")
    parser.add_argument("--slo-e2e-s", type=float,
                        help="Goodput's latency target, end to end (default: twice the unloaded p50).")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    for key in ("num_requests", "concurrency", "request_rate", "prompt_tokens", "max_tokens", "device", "dtype",
                "hf_requests"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    try:
        model_dir = args.model_dir or work / "qwen2-random"
        parameters = None
        if args.model_dir is None:
            print(f"building a random {args.preset} model in {model_dir}", file=sys.stderr)
            parameters = build_model(model_dir, preset)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = make_prompts(args.num_requests, args.prompt_tokens, tokenizer)
        if args.overload:
            report = asyncio.run(run_overload(args, model_dir, tokenizer, prompts, work))
            report |= {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": args.preset,
                       "parameters": parameters, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                       "slots": args.concurrency, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
            print_overload(report)
            print(json.dumps(report, indent=2))
            if args.json_out:
                args.json_out.write_text(json.dumps(report, indent=2))
            return
        rounds = run_rounds(args, model_dir, tokenizer, prompts, work)
        results = {backend: median_summary([r[backend] for r in rounds if backend in r]) for backend in args.backends}
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "load_average_1m": os.getloadavg()[0]},
            "preset": args.preset, "parameters": parameters, "device": args.device, "dtype": args.dtype,
            "num_requests": args.num_requests, "concurrency": args.concurrency,
            "request_rate": str(args.request_rate), "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "rounds": rounds, "results": results,
        }
        if "lmsmith" in results:
            report["ratios_output_tok_s"] = round_ratios(rounds)
        print_table(results)
        for name, ratios in report.get("ratios_output_tok_s", {}).items():
            each = ", ".join(f"{ratio:.2f}" for ratio in ratios["rounds"])
            print(f"{name} output tok/s: {ratios['median']:.2f}x (median; rounds: {each})")
        print(json.dumps(report, indent=2))
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_rounds(args: argparse.Namespace, model_dir: Path, tokenizer: Any, prompts: list[list[dict[str, str]]],
               work: Path) -> list[dict[str, dict[str, Any]]]:
    """Each round runs every batching backend once, in alternating order; hf-generate only in round 1."""
    batching = [backend for backend in args.backends if backend != "hf-generate"]
    rounds = []
    for index in range(max(args.rounds, 1)):
        order = batching if index % 2 == 0 else batching[::-1]
        if index == 0 and "hf-generate" in args.backends:
            order = order + ["hf-generate"]
        results: dict[str, dict[str, Any]] = {}
        for backend in order:
            print(f"round {index + 1}: running {backend}", file=sys.stderr)
            results[backend] = asyncio.run(run_backend(backend, model_dir, tokenizer, prompts, args, work))
            results[backend]["load_average_1m"] = os.getloadavg()[0]
        rounds.append(results)
    return rounds


def median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number's median over the rounds (nested latency dicts too); the first round's other fields."""
    merged = dict(summaries[0])
    for key, value in summaries[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(s[key] for s in summaries)
        elif isinstance(value, dict):
            merged[key] = {}
            for name in value:
                present = [s[key][name] for s in summaries if s[key].get(name) is not None]
                merged[key][name] = statistics.median(present) if present else None
    merged["rounds"] = len(summaries)
    return merged


def round_ratios(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """lmsmith's output tok/s over each other backend's, per round (same round only) and the median."""
    ratios: dict[str, list[float]] = {}
    for results in rounds:
        ours = results["lmsmith"]["output_tok_s"]
        for name, result in results.items():
            if name != "lmsmith" and result["output_tok_s"] > 0:
                ratios.setdefault(f"lmsmith/{name}", []).append(ours / result["output_tok_s"])
    return {name: {"rounds": values, "median": statistics.median(values)} for name, values in ratios.items()}


async def run_backend(backend: str, model_dir: Path, tokenizer: Any, prompts: list[list[dict[str, str]]],
                      args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if backend == "hf-generate":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device).eval()
        send, worker = hf_generate_sender(model, tokenizer)
        subset = prompts[: args.hf_requests or len(prompts)]
        try:
            await send(subset[0], 4)  # warm-up
            records, duration = await run_load(send, subset, args.max_tokens, args.request_rate, args.concurrency)
        finally:
            worker.shutdown()
        return summarize(records, duration) | {"requests_run": len(subset)}
    server, model_name = start_server(backend, model_dir, args, work)
    try:
        await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
        limits = httpx.Limits(max_connections=args.concurrency + 8)
        async with httpx.AsyncClient(timeout=httpx.Timeout(1800, connect=30), limits=limits) as client:
            send = http_sender(client, server.url, model_name, tokenizer)
            await send(prompts[0], 4)  # warm-up (lazy loading, first-call allocations)
            records, duration = await run_load(send, prompts, args.max_tokens, args.request_rate, args.concurrency)
        return summarize(records, duration) | {"requests_run": len(prompts)}
    finally:
        server.stop()


# ----- overload: arrivals past capacity, with and without push-back -----

OVERLOAD_SETTINGS = {
    # one batch may wait behind the running one; a request that still waits 2 SLOs long is dropped
    "push-back": lambda args, slo: ("--max-waiting", str(args.overload_max_waiting or args.concurrency),
                                    "--max-queue-wait-s", f"{2 * slo:.1f}"),
    "no push-back": lambda args, slo: ("--max-waiting", "none", "--max-waiting-tokens", "none",
                                       "--max-queue-wait-s", "none"),
}


async def open_loop(send: Send, prompts: list[list[dict[str, str]]], max_tokens: int, rate: float,
                    seconds: float, seed: int = 3) -> tuple[list[Record], float]:
    """Poisson arrivals at `rate`/s for `seconds`, no cap on requests in flight (the server must push back)."""
    rng = random.Random(seed)
    tasks = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        tasks.append(asyncio.create_task(send(prompts[len(tasks) % len(prompts)], max_tokens)))
        await asyncio.sleep(rng.expovariate(rate))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - started


async def sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        samples.append(process.memory_info().rss / 2**20)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


def overload_summary(records: list[Record], duration: float, slo: float, rss: list[float]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for record in records:
        key = str(record.status) if record.status is not None else "no answer"
        statuses[key] = statuses.get(key, 0) + 1
    served = [r for r in records if r.status == 200 and r.error is None and r.e2e is not None]
    good = [r for r in served if r.e2e <= slo]
    pushed = [r for r in records if r.status in (429, 503)]
    return {
        "arrivals": len(records), "statuses": statuses,
        "server_errors_5xx": sum(1 for r in records if r.status is not None and r.status >= 500 and r.status != 503),
        "pushed_back_with_retry_after": len(pushed),
        "goodput_req_s": len(good) / duration, "goodput_share": len(good) / max(len(records), 1),
        "served_req_s": len(served) / duration,
        "e2e_p50_s": percentile([r.e2e for r in served], 50), "e2e_p99_s": percentile([r.e2e for r in served], 99),
        "ttft_p50_s": percentile([r.ttft for r in served if r.ttft is not None], 50),
        "ttft_p99_s": percentile([r.ttft for r in served if r.ttft is not None], 99),
        "rss_mb_start": rss[0] if rss else None, "rss_mb_max": max(rss) if rss else None,
        "rss_mb_end": rss[-1] if rss else None,
    }


@contextlib.asynccontextmanager
async def lmsmith_serving(args: argparse.Namespace, model_dir: Path, tokenizer: Any, work: Path,
                          extra: tuple[str, ...], warm_prompt: list[dict[str, str]]):
    """A fresh `lmsmith serve` with `extra` flags, warmed up; yields (send, server)."""
    server, model_name = start_server("lmsmith", model_dir, args, work, extra)
    try:
        await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(1800, connect=30), limits=limits) as client:
            send = http_sender(client, server.url, model_name, tokenizer)
            await send(warm_prompt, 4)
            yield send, server
    finally:
        server.stop()


async def run_overload(args: argparse.Namespace, model_dir: Path, tokenizer: Any,
                       prompts: list[list[dict[str, str]]], work: Path) -> dict[str, Any]:
    """Capacity first (a closed loop at `concurrency`, all at once), then for each setting a fresh server
    gets Poisson arrivals at `overload_factor` x capacity for `overload_seconds`."""
    async with lmsmith_serving(args, model_dir, tokenizer, work, (), prompts[0]) as (send, _):
        records, duration = await run_load(send, prompts[: 3 * args.concurrency], args.max_tokens, math.inf,
                                           args.concurrency)
    capacity = len([r for r in records if r.error is None]) / duration
    slo = args.slo_e2e_s or 2 * percentile([r.e2e for r in records if r.e2e], 50)
    rate = args.overload_factor * capacity
    report: dict[str, Any] = {"capacity_req_s": capacity, "slo_e2e_s": slo, "arrival_rate_req_s": rate}
    print(f"capacity {capacity:.2f} req/s; SLO e2e {slo:.1f} s; arrivals at {rate:.2f} req/s", file=sys.stderr)
    for label, flags in OVERLOAD_SETTINGS.items():
        extra = flags(args, slo)
        async with lmsmith_serving(args, model_dir, tokenizer, work, extra, prompts[0]) as (send, server):
            rss: list[float] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(server.process.pid, rss, stop))
            print(f"{label}: {args.overload_seconds:g} s of arrivals ({' '.join(extra)})", file=sys.stderr)
            records, _ = await open_loop(send, prompts, args.max_tokens, rate, args.overload_seconds)
            stop.set()
            await sampler
            result = overload_summary(records, args.overload_seconds, slo, rss)
            started = time.perf_counter()
            after = await send(prompts[1], args.max_tokens)
            result["recovery"] = {"status": after.status, "e2e_s": time.perf_counter() - started}
            result["server_flags"] = " ".join(extra)
            report[label] = result
    return report


def print_overload(report: dict[str, Any]) -> None:
    labels = [label for label in OVERLOAD_SETTINGS if label in report]
    rows = [
        ("arrivals", lambda r: str(r["arrivals"])),
        ("statuses", lambda r: ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))),
        ("5xx other than 503", lambda r: str(r["server_errors_5xx"])),
        ("goodput req/s (share of arrivals)", lambda r: f"{r['goodput_req_s']:.2f} ({r['goodput_share']:.0%})"),
        ("e2e p50 / p99 of 200s (s)", lambda r: f"{r['e2e_p50_s'] or 0:.1f} / {r['e2e_p99_s'] or 0:.1f}"),
        ("TTFT p50 / p99 of 200s (s)", lambda r: f"{r['ttft_p50_s'] or 0:.1f} / {r['ttft_p99_s'] or 0:.1f}"),
        ("server RSS start / max / end (MB)",
         lambda r: f"{r['rss_mb_start']:.0f} / {r['rss_mb_max']:.0f} / {r['rss_mb_end']:.0f}"),
        ("next request after the burst", lambda r: f"{r['recovery']['status']} in {r['recovery']['e2e_s']:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"capacity {report['capacity_req_s']:.2f} req/s, arrivals {report['arrival_rate_req_s']:.2f} req/s, "
          f"SLO e2e {report['slo_e2e_s']:.1f} s")
    print(f"{'':{width}}  " + "  ".join(f"{label:>28}" for label in labels))
    for name, cell in rows:
        print(f"{name:{width}}  " + "  ".join(f"{cell(report[label]):>28}" for label in labels))


if __name__ == "__main__":
    main()
