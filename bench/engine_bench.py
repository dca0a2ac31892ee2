"""The engine in-process against HF `generate`: one stream, and many requests at once (no HTTP).

    python bench/engine_bench.py                     # CPU: the 108M model of serve_bench, fp32, 8 at once
    python bench/engine_bench.py --preset gpu        # random Qwen2-0.5B architecture, bf16, 256 at once
    PYTHONPATH=src python bench/engine_bench.py --preset gpu --json-out $OUT/engine.json   # on the device

The issue's GPU targets are the engine's: one stream >= 1,500 tok/s and >= 20,000 output tok/s at 256
concurrent requests, against HF `generate` (batch 1, and one padded batch of `--hf-batch` requests). This
needs only torch and transformers, so it runs on a device image without the serving stack. Every request
has `--prompt-tokens` random prompt ids and decodes greedily until `--max-tokens` (a random model almost
never ends early; tok/s counts the tokens each side actually produced). Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_models  # noqa: E402  (the random models the serving benchmark uses)

DEFAULTS = {"cpu": dict(concurrency=8, hf_batch=8, prompt_tokens=128, max_tokens=256),
            "gpu": dict(concurrency=256, hf_batch=32, prompt_tokens=128, max_tokens=256)}


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (count, length), generator=generator).tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_generate(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> tuple[int, float]:
    """(tokens produced, seconds) for one `generate` call over `prompts` as a batch (same lengths: no padding)."""
    device = next(model.parameters()).device
    inputs = torch.tensor(prompts, device=device)
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                                min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
    synchronize(device)
    return (output.shape[1] - inputs.shape[1]) * len(prompts), time.perf_counter() - started


def engine_run(engine, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    """(tokens produced, seconds) with every request submitted at once; waits for all to finish."""
    from lmsmith.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    finished: queue.SimpleQueue = queue.SimpleQueue()

    def sink(event) -> None:
        if not hasattr(event, "finish_reason") or event.finish_reason is not None:
            finished.put(event)

    started = time.perf_counter()
    for prompt in prompts:
        engine.submit(prompt, params, sink)
    events = [finished.get(timeout=3600) for _ in prompts]
    elapsed = time.perf_counter() - started
    failures = [event for event in events if not hasattr(event, "completion_tokens")]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[0]}")
    return sum(event.completion_tokens for event in events), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(DEFAULTS), default="cpu")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--hf-batch", type=int)
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--dtype", help="Override the preset's dtype (float32, bfloat16).")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    preset = bench_models.PRESETS[args.preset]
    dtype = getattr(torch, args.dtype or preset["dtype"])
    device = torch.device(preset["device"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmsmith.serve.engine import Engine, EngineConfig

    with tempfile.TemporaryDirectory(prefix="engine_bench_") as work:
        folder = Path(work) / "model"
        parameters = bench_models.build_model(folder, preset)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    vocab = model.config.vocab_size
    single = random_prompts(1, args.prompt_tokens, vocab, seed=1)
    many = random_prompts(args.concurrency, args.prompt_tokens, vocab, seed=2)
    rows: dict[str, tuple[int, float]] = {}

    hf_generate(model, single, 8, tokenizer.pad_token_id)  # warm-up
    rows["HF generate, batch 1"] = hf_generate(model, single, args.max_tokens, tokenizer.pad_token_id)
    rows[f"HF generate, batch {args.hf_batch}"] = hf_generate(model, many[: args.hf_batch], args.max_tokens,
                                                               tokenizer.pad_token_id)
    engine = Engine(model, tokenizer, EngineConfig(max_slots=args.concurrency,
                                                   max_model_len=args.prompt_tokens + args.max_tokens + 8))
    try:
        # Warm-up. On CUDA the full load once, so every (batch, key length) graph is captured before timing.
        warm_tokens = args.max_tokens if device.type == "cuda" else 8
        engine_run(engine, single, warm_tokens)
        engine_run(engine, many, warm_tokens)
        rows["lmsmith engine, 1 stream"] = engine_run(engine, single, args.max_tokens)
        rows[f"lmsmith engine, {args.concurrency} at once"] = engine_run(engine, many, args.max_tokens)
        stats = engine.stats()
    finally:
        engine.close()

    results = {name: {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
               for name, (tokens, seconds) in rows.items()}
    names = list(results)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": args.preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "dtype": str(dtype).removeprefix("torch."), "parameters": parameters, "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "results": results,
        "ratios": {"1 stream vs HF batch 1": results[names[2]]["tok_s"] / results[names[0]]["tok_s"],
                   f"{args.concurrency} at once vs HF batch {args.hf_batch}":
                       results[names[3]]["tok_s"] / results[names[1]]["tok_s"]},
        "engine_stats": {key: stats[key] for key in ("steps", "cuda_graphs", "bucketed_decode_steps")},
    }
    width = max(len(name) for name in names)
    for name in names:
        print(f"{name:{width}}  {results[name]['tok_s']:10.1f} tok/s  ({results[name]['tokens']} tokens)")
    for name, ratio in report["ratios"].items():
        print(f"{name}: {ratio:.2f}x")
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
