"""The compress stage: dynamic INT8 quantization of the fine-tuned model, measured against fp32.

torch's `quantize_dynamic` swaps every `nn.Linear` for an int8-weight Linear that quantizes activations
on the fly (fbgemm/onednn kernels on CPU). We measure what that buys and costs: bytes of serialized
weights, greedy decode tokens/s at batch 1 and batched, and the change in ROUGE-L, BLEU-4 and
perplexity on held-out data. The quantized model is saved in `int8/`, which
`lmsmith.generation.load_causal_lm` reads back.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from lmsmith.compress.config import CompressConfig
from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.eval.data import read_documents, read_instructions, spread_over_tasks
from lmsmith.eval.metrics import perplexity
from lmsmith.eval.scoring import score_group
from lmsmith.generation import (
    QUANTIZED_STATE,
    generate_chat,
    load_causal_lm,
    load_tokenizer,
    quantize_dynamic_int8,
    save_quantized,
)
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.report.tables import Table, format_number

INT8_DIR = "int8"
MB = 1024 * 1024
RELOAD_TOLERANCE = 1e-5
# Numeric answers (yoy) count as right within 1% relative error, as in the eval stage's default.
NUMERIC_REL_TOL = 0.01


def serialized_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights written as safetensors (tied tensors stored once, as HF does)."""
    from safetensors.torch import save

    unique: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        unique[name] = tensor.detach().contiguous()
    return len(save(unique))


def max_logit_difference(a: torch.nn.Module, b: torch.nn.Module, tokenizer, text: str) -> float:
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        return float((a(**encoded).logits - b(**encoded).logits).abs().max())


def decode_speed(
    model: torch.nn.Module, tokenizer, prompts: list, new_tokens: int, batch_size: int, repeats: int
) -> float:
    """Greedy tokens/s over `prompts` at `batch_size`, exactly `new_tokens` each.

    A short warm-up run comes first (lazy kernel and cache set-up), then the best of `repeats` timed
    runs: on a shared CPU, interference only ever slows a run down, so the fastest is the least noisy.
    """
    generate_chat(model, tokenizer, prompts[:batch_size], max_new_tokens=min(4, new_tokens),
                  batch_size=batch_size, stop_at_eos=False)
    return max(
        generate_chat(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=batch_size,
                      stop_at_eos=False).tokens_per_s
        for _ in range(repeats)
    )


def _ratio(new: float | None, old: float | None) -> float | None:
    return None if not new or not old else new / old


def _delta(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else new - old


def measure_speed(
    models: dict[str, torch.nn.Module], tokenizer, prompts: list, config: CompressConfig
) -> dict[str, float]:
    """`{label}_tok_s_b1` (one prompt at a time) and `{label}_tok_s_bn` (all prompts in one batch)."""
    speed: dict[str, float] = {}
    with track("compress: decode speed", 2 * len(models)) as tracker:
        for label, model in models.items():
            for suffix, batch in (("b1", 1), ("bn", len(prompts))):
                key = f"{label}_tok_s_{suffix}"
                speed[key] = decode_speed(
                    model, tokenizer, prompts, config.bench_new_tokens, batch, config.bench_repeats
                )
                tracker.advance(1, **{key: speed[key]})
    return speed


def measure_quality(
    models: dict[str, torch.nn.Module], tokenizer, instructions: list, documents: list[str], config: CompressConfig
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Per model: answer scores on the held-out instructions and perplexity on the documents."""
    quality: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    for label, model in models.items():
        generation = generate_chat(
            model, tokenizer, [row.prompt for row in instructions], max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size, progress=f"{label}: answers",
        )
        answers[label] = generation.texts
        quality[label] = score_group(instructions, generation.texts, NUMERIC_REL_TOL)
        ppl = perplexity(model, tokenizer, documents, batch_size=config.batch_size, progress=f"{label}: perplexity")
        quality[label]["perplexity"] = ppl.perplexity if ppl.tokens else None
    return quality, answers


def run(config: CompressConfig, ctx: StageContext) -> StageResult:
    model_dir = ctx.artifact("sft", "model")
    sft_test = ctx.artifact("data", "sft_test")
    instructions = spread_over_tasks(read_instructions(sft_test), config.max_samples)
    if not instructions:
        raise UserError(f"{sft_test}: no held-out instructions to measure the int8 model on")
    documents = read_documents(ctx.artifact("data", "corpus_test"), config.ppl_docs)

    tokenizer = load_tokenizer(model_dir)
    fp32 = load_causal_lm(model_dir, dtype=torch.float32)
    int8 = quantize_dynamic_int8(copy.deepcopy(fp32))
    int8_dir = save_quantized(int8, tokenizer, ctx.stage_dir / INT8_DIR, method=config.method)

    # The saved folder must reproduce the in-memory quantized model (same int8 kernels, same weights).
    probe = instructions[0].reference or instructions[0].question
    reload_diff = max_logit_difference(int8, load_causal_lm(int8_dir), tokenizer, probe)
    if reload_diff > RELOAD_TOLERANCE:
        raise RuntimeError(f"{int8_dir}: reloaded int8 model differs from the quantized one by {reload_diff}")

    sizes = {
        "fp32_bytes": serialized_weight_bytes(fp32),
        "int8_bytes": (int8_dir / QUANTIZED_STATE).stat().st_size,
    }
    sizes["ratio"] = sizes["fp32_bytes"] / sizes["int8_bytes"]

    bench_prompts = [row.prompt for row in instructions[: config.bench_prompts]]
    batched = len(bench_prompts)
    models = {"fp32": fp32, "int8": int8}
    speed = measure_speed(models, tokenizer, bench_prompts, config)
    quality, answers = measure_quality(models, tokenizer, instructions, documents, config)
    agreement = 100.0 * sum(a == b for a, b in zip(answers["fp32"], answers["int8"])) / len(instructions)

    table = build_table(sizes, speed, quality, agreement, batched)
    results = {
        "method": config.method,
        "source": "sft/model",
        "threads": torch.get_num_threads(),
        "bench": {"prompts": batched, "new_tokens": config.bench_new_tokens, "repeats": config.bench_repeats},
        "samples": len(instructions),
        "ppl_documents": len(documents),
        "sizes": sizes,
        "speed": speed,
        "quality": quality,
        "answer_agreement": agreement,
        "reload_max_abs_diff": reload_diff,
        "table": table.to_json(),
    }
    (ctx.stage_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    console.print(table.to_markdown(), markup=False)
    return StageResult(
        outputs={"model": INT8_DIR, "results": "results.json"},
        metrics=flat_metrics(sizes, speed, quality, agreement),
    )


def build_table(
    sizes: dict[str, float], speed: dict[str, float], quality: dict[str, dict[str, Any]], agreement: float,
    batched: int,
) -> Table:
    table = Table(["metric", "fp32", "int8", "change"])
    table.add(
        "weights (MB)",
        sizes["fp32_bytes"] / MB,
        sizes["int8_bytes"] / MB,
        f"{sizes['ratio']:.2f}× smaller",
    )
    for suffix, label in (("b1", "decode tok/s, batch 1"), ("bn", f"decode tok/s, batch {batched}")):
        old, new = speed[f"fp32_tok_s_{suffix}"], speed[f"int8_tok_s_{suffix}"]
        ratio = _ratio(new, old)
        table.add(label, old, new, "–" if ratio is None else f"{ratio:.2f}×")
    for key, label in (("rougeL", "ROUGE-L F (char)"), ("bleu4", "BLEU-4"), ("perplexity", "perplexity")):
        old, new = quality["fp32"][key], quality["int8"][key]
        table.add(label, old, new, format_number(_delta(new, old), signed=True))
    table.add("answers identical to fp32's (%)", "–", agreement, "")
    return table


def flat_metrics(
    sizes: dict[str, float], speed: dict[str, float], quality: dict[str, dict[str, Any]], agreement: float
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "fp32_mb": round(sizes["fp32_bytes"] / MB, 3),
        "int8_mb": round(sizes["int8_bytes"] / MB, 3),
        "size_ratio": round(sizes["ratio"], 3),
    }
    for name, value in speed.items():
        metrics[name] = round(value, 2)
    for suffix in ("b1", "bn"):
        ratio = _ratio(speed[f"int8_tok_s_{suffix}"], speed[f"fp32_tok_s_{suffix}"])
        metrics[f"speedup_{suffix}"] = None if ratio is None else round(ratio, 3)
    for key in ("rougeL", "bleu4", "perplexity"):
        old, new = quality["fp32"][key], quality["int8"][key]
        metrics[f"fp32_{key}"] = None if old is None else round(old, 4)
        metrics[f"int8_{key}"] = None if new is None else round(new, 4)
        delta = _delta(new, old)
        metrics[f"delta_{key}"] = None if delta is None else round(delta, 4)
    metrics["answer_agreement"] = round(agreement, 2)
    return metrics
