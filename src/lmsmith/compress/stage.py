"""The compress stage: every variant of the recipe, built, saved, scored, timed and gated.

Each variant (`compress.variants`, `lmsmith.compress.config`) is made from the tuned model or from an
earlier variant (`source`) by `lmsmith.compress.methods`, saved as `RUN/compress/<name>/` with its own
`manifest.json`, and read back to check the folder reproduces it. Then the `lmsmith eval` library scores
the tuned model and every variant on the same tasks and times them; this stage adds argmax agreement
with each variant's source, perplexity on the held-out conversations, and peak memory, applies the
quality gate (`max_drop`) and writes the comparison as results.json, table.md, report.html and a plot of
size against quality.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lmsmith.compress import measure, methods
from lmsmith.compress.config import CompressConfig
from lmsmith.compress.folder import save_variant
from lmsmith.compress.table import compress_document, drops, gate_keys
from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.generation import load_causal_lm, load_tokenizer
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.tokenizer.records import read_conversations

SOURCE = "source"
TRAINING_DIR = "training"
RELOAD_TOLERANCE = 1e-4
# Which kernels run each method on CPU (docs/compression.md has the CUDA side).
KERNELS = {
    "dynamic_int8": "fbgemm int8 GEMM, activations quantized per call (torch.ops.quantized.linear_dynamic)",
    "static_int8": "fbgemm int8 GEMM, activations quantized with calibrated ranges (torch.ops.quantized.linear)",
    "weight_only": "ATen _weight_int8pack_mm / _weight_int4pack_mm_for_cpu, bf16 activations",
    "mixed": "per module: fbgemm int8, ATen int8/int4 weight-packed, or bf16/fp16 matmuls",
    "prune": "dense fp32 matmuls on CPU (zeros are stored sparse on disk, not skipped in compute)",
    "distill": "dense fp32 matmuls (a smaller model)",
}


def variant_output(name: str) -> str:
    return f"variant.{name}"


def run(config: CompressConfig, ctx: StageContext) -> StageResult:
    from lmsmith.eval.compare import ModelEntry
    from lmsmith.eval.stage import task_files
    from lmsmith.eval.suite import evaluate_models
    from lmsmith.eval.compare import SpeedConfig
    from lmsmith.eval.tasks import load_task

    out = ctx.stage_dir
    tuned_dir = ctx.artifact("sft", "model")
    tokenizer = load_tokenizer(tuned_dir)
    tasks = task_files(config.tasks, ctx, out / "tasks", config.max_items, config.max_new_tokens)
    known = gate_keys([load_task(path) for path in tasks])
    for where, max_drop in [("compress.gate.max_drop", config.gate.max_drop)] + [
            (f"compress.variants.{v.name}.max_drop", v.max_drop) for v in config.variants if v.max_drop is not None]:
        unknown = sorted(set(max_drop) - set(known))
        if unknown:
            raise UserError(f"{where}: {', '.join(unknown)} is not measured; the keys are {', '.join(known)}")

    materials = methods.Materials(
        tokenizer=tokenizer, train=read_conversations(ctx.artifact("data", "sft_train")),
        val=read_conversations(ctx.artifact("data", "sft_val")), seed=ctx.seed, work_dir=out)
    test = read_conversations(ctx.artifact("data", "sft_test"))[: config.agreement_texts]
    if not test:
        raise UserError(f"{ctx.artifact('data', 'sft_test')}: no held-out conversations to compare variants on")
    texts = [tokenizer.apply_chat_template(list(messages), tokenize=False) for messages in test]
    probe = measure.encode_texts(tokenizer, texts)

    # Each model's next-token argmaxes and perplexity on the probe, measured while it is in memory anyway.
    argmax: dict[str, torch.Tensor] = {}
    perplexities: dict[str, float | None] = {}

    def probe_model(label: str, model) -> None:
        argmax[label] = measure.next_token_argmax(model, probe, config.batch_size)
        perplexities[label] = _perplexity(model, tokenizer, texts, config.batch_size, label)

    source_model = load_causal_lm(tuned_dir)
    probe_model(SOURCE, source_model)
    del source_model
    folders: dict[str, Path] = {SOURCE: tuned_dir}
    facts: dict[str, dict[str, Any]] = {}
    for variant in config.variants:
        source_dir = folders[variant.source or SOURCE]
        console.rule(f"compress: {variant.name} ({variant.method} of {variant.source or 'the tuned model'})")
        materials.work_dir = out / TRAINING_DIR / variant.name
        built = methods.build(load_causal_lm(source_dir), variant, materials)
        folder = out / variant.name
        if folder.exists():
            shutil.rmtree(folder)
        save_variant(built.model, tokenizer, folder, built.sparse)
        reloaded = load_causal_lm(folder)
        diff = max_logit_difference(built.model, reloaded, probe)
        if diff > RELOAD_TOLERANCE:
            raise RuntimeError(f"{folder}: the saved variant differs from the built one by {diff} in logits")
        facts[variant.name] = {**built.facts, "reload_max_abs_diff": diff}
        folders[variant.name] = folder
        probe_model(variant.name, reloaded)  # the saved folder is what is measured
        del built, reloaded
        gc.collect()

    entries = [ModelEntry(SOURCE, f"the tuned model ({tuned_dir.relative_to(ctx.run_dir)})", tuned_dir)]
    entries += [ModelEntry(v.name, f"{v.method} of {v.source or SOURCE}", folders[v.name]) for v in config.variants]
    speed = SpeedConfig(requests=config.speed_requests, new_tokens=config.speed_new_tokens, batch=config.speed_batch)
    results = evaluate_models(entries, tasks, out, config.batch_size, speed, tokenizer_path=tuned_dir, write=False)

    peaks = (measure.peak_memory_each(list(folders.values()), tuned_dir, config.speed_batch, 8)
             if config.peak_memory else [None] * len(folders))
    for label, peak in zip(folders, peaks):
        entry = results["models"][label]
        entry["perplexity"] = perplexities[label]
        entry["peak_memory_mb"] = peak
    results["models"][SOURCE]["agreement"] = 100.0
    failed = []
    for variant in config.variants:
        source = variant.source or SOURCE
        entry = results["models"][variant.name]
        entry["agreement"] = measure.agreement(argmax[source], argmax[variant.name], probe["attention_mask"])
        entry |= {"method": variant.method, "source": source, "kernels": KERNELS[variant.method],
                  "facts": facts[variant.name]}
        max_drop = variant.max_drop if variant.max_drop is not None else config.gate.max_drop
        entry["drops"] = drops(results, variant.name, source)
        over = {key: round(entry["drops"][key], 4) for key, limit in max_drop.items()
                if entry["drops"].get(key) is not None and entry["drops"][key] > limit}
        entry["gate"] = {"max_drop": max_drop, "over": over, "passed": not over}
        if over:
            failed.append(variant.name)
        write_variant_manifest(folders[variant.name], variant, entry)
    results["agreement_texts"] = len(texts)
    results["gate"] = {"failed": failed, "strict": config.gate.strict}
    results["threads"] = torch.get_num_threads()
    table = compress_document(results, out, f"{ctx.recipe.name}: compression")
    console.print(table.to_markdown(), markup=False)
    if failed:
        message = "; ".join(f"{name} over max_drop on {results['models'][name]['gate']['over']}" for name in failed)
        if config.gate.strict:
            raise UserError(f"compress.gate (strict): {message}")
        console.print(f"[red]compress gate failed[/]: {message}")
    outputs = {"results": "results.json", "table": "table.md", "html": "report.html", "plots": "plots",
               "tasks": "tasks", **{variant_output(v.name): v.name for v in config.variants}}
    if (out / TRAINING_DIR).exists():
        outputs["training"] = TRAINING_DIR
    return StageResult(outputs=outputs, metrics=flat_metrics(results, config))


def max_logit_difference(a, b, batch: dict[str, torch.Tensor]) -> float:
    part = {key: value[:2] for key, value in batch.items()}
    with torch.inference_mode():
        return float((a(**part, use_cache=False).logits - b(**part, use_cache=False).logits).abs().max())


def _perplexity(model, tokenizer, texts: list[str], batch_size: int, label: str) -> float | None:
    from lmsmith.eval.metrics import perplexity

    result = perplexity(model, tokenizer, texts, batch_size=batch_size, progress=f"{label}: perplexity")
    return result.perplexity if result.tokens else None


def write_variant_manifest(folder: Path, variant, entry: dict[str, Any]) -> None:
    manifest = {
        "name": variant.name,
        "method": variant.method,
        "config": variant.model_dump(mode="json"),
        "source": entry["source"],
        "kernels": entry["kernels"],
        "facts": entry["facts"],
        "size_bytes": entry.get("size_bytes"),
        "params": entry.get("params"),
        "peak_memory_mb": entry.get("peak_memory_mb"),
        "speed": entry.get("speed"),
        "agreement": entry["agreement"],
        "perplexity": entry["perplexity"],
        "drops": entry["drops"],
        "gate": entry["gate"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")


def flat_metrics(results: dict[str, Any], config: CompressConfig) -> dict[str, Any]:
    metrics: dict[str, Any] = {"gate_failed": len(results["gate"]["failed"]), "variants": len(config.variants)}
    source = results["models"][SOURCE]
    for label, entry in results["models"].items():
        if entry.get("size_bytes") and source.get("size_bytes"):
            metrics[f"{label}.size_ratio"] = round(source["size_bytes"] / entry["size_bytes"], 3)
        for key in ("tok_s_b1", "tok_s_b8"):
            value = (entry.get("speed") or {}).get(key)
            if value:
                metrics[f"{label}.{key}"] = round(value, 2)
        if label != SOURCE:
            metrics[f"{label}.agreement"] = round(entry["agreement"], 2)
            metrics[f"{label}.passed"] = entry["gate"]["passed"]
    return metrics
