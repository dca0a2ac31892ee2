"""Constrained decoding (issue 14): which library compiles JSON schemas to token masks fastest on a real
vocabulary, and what a grammar costs the engine's batched step.

    python bench/grammar_bench.py                  # both parts, on Qwen's 151,646-token vocabulary
    python bench/grammar_bench.py --part libraries
    python bench/grammar_bench.py --part engine --steps 64

Part `libraries`: llguidance (lmsmith's choice) against xgrammar (vLLM's default backend) and
outlines-core, each at its recommended settings (xgrammar's compiler with every core; outlines-core's
Rust index), on one finance schema: the one-time tokenizer wrap, the per-request compile, and the mask
per generated token, walking a valid answer token by token. The peers are bench-only:
`pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi outlines-core==0.2.14` (xgrammar's triton
dependency is for GPUs and is not needed to compute masks on CPU).

Part `engine`: lmsmith's engine decoding 8 requests at once on a random Qwen2 with the same vocabulary
(the mask's width is the vocabulary), milliseconds per decode step with no request constrained, one of
the eight constrained, and all eight.

The vocabulary is Qwen's, read from the `qwen.tiktoken` file inside the `dashscope` wheel on PyPI (no
model hub): `bench/qwen_vocab.py` builds the tokenizer once into a cache folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwen_vocab import qwen_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "company": {"type": "string"},
        "year": {"type": "integer", "minimum": 1990, "maximum": 2100},
        "revenue": {"type": "number"},
        "yoy": {"type": "number"},
        "currency": {"enum": ["CNY", "USD", "HKD"]},
        "segments": {"type": "array", "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "share": {"type": "number"}},
            "required": ["name", "share"], "additionalProperties": False}},
    },
    "required": ["company", "year", "revenue", "yoy", "currency", "segments"],
    "additionalProperties": False,
}
ANSWER = {"company": "贵州茅台酒股份有限公司", "year": 2023, "revenue": 1505.6, "yoy": 18.04, "currency": "CNY",
          "segments": [{"name": "茅台酒", "share": 0.86}, {"name": "系列酒", "share": 0.14}]}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def bench_libraries(tokenizer) -> dict:
    import numpy as np

    text = json.dumps(ANSWER, ensure_ascii=False)  # ", " and ": ", as chat templates write JSON
    ids = tokenizer.encode(text, add_special_tokens=False)
    vocab = len(tokenizer)
    results: dict[str, dict] = {}

    def walk(fill, consume) -> list[float]:
        times = []
        for token in ids:
            start = time.perf_counter()
            fill()
            times.append(time.perf_counter() - start)
            consume(token)
        return times

    def summary(name: str, init: float, compile_s: float, times: list[float]) -> None:
        results[name] = {"tokenizer_init_ms": _ms(init), "compile_ms": _ms(compile_s),
                         "mask_mean_us": round(statistics.mean(times) * 1e6, 1),
                         "mask_p50_us": round(statistics.median(times) * 1e6, 1),
                         "mask_max_us": round(max(times) * 1e6, 1),
                         "request_total_ms": _ms(compile_s + sum(times))}

    import llguidance
    import llguidance.hf

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    init = time.perf_counter() - start
    style = {**SCHEMA, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(style))
    compile_s = time.perf_counter() - start
    words = np.zeros((vocab + 31) // 32, dtype=np.int32)
    times = walk(lambda: matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes),
                 lambda token: matcher.consume_token(token) or sys.exit(f"llguidance refused {token}"))
    summary("llguidance", init, compile_s, times)

    try:
        import xgrammar
    except ImportError:
        print("xgrammar not installed: skipped (see the docstring)")
    else:
        start = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        init = time.perf_counter() - start
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
        xmatcher = xgrammar.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - start
        bitmask = xgrammar.allocate_token_bitmask(1, vocab)
        times = walk(lambda: xmatcher.fill_next_token_bitmask(bitmask),
                     lambda token: xmatcher.accept_token(token) or sys.exit(f"xgrammar refused {token}"))
        summary("xgrammar", init, compile_s, times)

    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        print("outlines-core not installed: skipped (see the docstring)")
    else:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        start = time.perf_counter()
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        pieces: dict[bytes, list[int]] = {}
        specials = set(tokenizer.all_special_ids)
        for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab)))):
            if token_id not in specials:
                pieces.setdefault(bytes(byte_of[char] for char in piece), []).append(token_id)
        vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, pieces)
        init = time.perf_counter() - start
        start = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r"[ ]?")
        guide = outlines_core.Guide(outlines_core.Index(regex, vocabulary))
        compile_s = time.perf_counter() - start
        mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
        times = walk(lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4), guide.advance)
        summary("outlines-core", init, compile_s, times)
    return {"answer_tokens": len(ids), "vocab": vocab, "results": results}


def bench_engine(tokenizer, steps: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lmsmith.serve.engine import Engine
    from lmsmith.serve.sampling import SamplingParams
    from lmsmith.serve.structured import plan_output

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    tokenizer.chat_template = tokenizer.chat_template or "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    engine = Engine(model, tokenizer)
    engine._eos_ids = frozenset()  # no early end: each of the 8 rows decodes exactly `steps` tokens
    # A schema the random model cannot finish early: every request decodes exactly `steps` tokens.
    grammar = plan_output({"type": "json_schema", "json_schema": {"name": "notes", "schema": {
        "type": "object", "properties": {"notes": {"type": "string"}}, "required": ["notes"]}}},
        None, None, None).grammar
    prompt = tokenizer.encode("请总结贵州茅台2023年年报的要点。", add_special_tokens=False)

    async def run(constrained: int) -> float:
        params = [SamplingParams(max_tokens=steps, temperature=1.0, seed=index,
                                 grammar=grammar if index < constrained else None) for index in range(8)]
        await asyncio.gather(*(engine.complete(prompt, p) for p in params[:1]))  # warm
        before = engine.stats()["steps"]
        start = time.perf_counter()
        answers = await asyncio.gather(*(engine.complete(prompt, p) for p in params))
        elapsed = time.perf_counter() - start
        assert all(answer.completion_tokens == steps for answer in answers), [a.finish_reason for a in answers]
        return _ms(elapsed / (engine.stats()["steps"] - before))

    def mask_cost(constrained: int) -> float:
        """Milliseconds `mask_rows` adds to a step for `constrained` of 8 rows (mid-string: the widest masks)."""
        from lmsmith.serve.engine.grammar import mask_rows

        constraints = [engine.constrain(grammar) for _ in range(constrained)]
        for constraint in constraints:
            for token in tokenizer.encode('{"notes": "', add_special_tokens=False):
                constraint.consume(token)
        logits = torch.randn(8, len(tokenizer))
        start = time.perf_counter()
        for _ in range(20):
            mask_rows(logits, list(enumerate(constraints)))
        return _ms((time.perf_counter() - start) / 20)

    try:
        mask_ms = {constrained: mask_cost(constrained) for constrained in (1, 8)}
        rows = {}
        for _ in range(3):  # alternate, keep the best of three: a shared machine drifts
            for constrained in (0, 1, 8):
                value = asyncio.run(run(constrained))
                rows[constrained] = min(rows.get(constrained, value), value)
    finally:
        engine.close()
    return {"model": "random Qwen2 4x256, tied embeddings", "batch": 8, "decode_steps": steps,
            "ms_per_step": {f"{k}_of_8_constrained": v for k, v in rows.items()},
            "mask_ms_per_step": {f"{k}_of_8_constrained": v for k, v in mask_ms.items()},
            "ratio_1_of_8": round(rows[1] / rows[0], 3), "ratio_8_of_8": round(rows[8] / rows[0], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["libraries", "engine", "both"], default="both")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per request in the engine part")
    args = parser.parse_args()
    tokenizer = qwen_tokenizer()
    out: dict = {"machine": platform.processor() or platform.machine()}
    if args.part in ("libraries", "both"):
        out["libraries"] = bench_libraries(tokenizer)
        for name, row in out["libraries"]["results"].items():
            print(f"{name:14s} " + "  ".join(f"{key} {value}" for key, value in row.items()))
    if args.part in ("engine", "both"):
        out["engine"] = bench_engine(tokenizer, args.steps)
        print("engine", out["engine"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
