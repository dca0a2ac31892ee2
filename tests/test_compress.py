"""Every compression method on a trained tiny model: size reduction, agreement with the source model
within a bound stated per method, and a save/load round trip through the variant folder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import train_tiny_model
from lmsmith.compress import config as cc
from lmsmith.compress import methods, prune, quant
from lmsmith.compress.folder import is_compressed_folder, save_variant
from lmsmith.compress.measure import agreement, encode_texts, next_token_argmax
from lmsmith.errors import UserError
from lmsmith.generation import generate_chat, load_causal_lm

COMPANIES = ["星辰科技", "华信银行", "东方制造", "海川能源", "金桥地产", "远航物流"]
METRICS = [("营业收入", "亿元"), ("归母净利润", "亿元"), ("毛利率", "%"), ("资产负债率", "%")]


def conversations(count: int, offset: int = 0) -> list[list[dict]]:
    rows = []
    for index in range(offset, offset + count):
        company = COMPANIES[index % len(COMPANIES)]
        metric, unit = METRICS[(index // len(COMPANIES)) % len(METRICS)]
        value = f"{(index * 7.3) % 90 + 1:.1f}"
        rows.append([{"role": "user", "content": f"{company}{2020 + index % 4}年的{metric}是多少?"},
                     {"role": "assistant", "content": f"{company}{2020 + index % 4}年{metric}为{value}{unit}。"}])
    return rows


TRAIN = conversations(24)
HELD_OUT = conversations(8, offset=24)


@pytest.fixture(scope="module")
def trained(tiny_tokenizer):
    texts = [tiny_tokenizer.apply_chat_template(c, tokenize=False) for c in TRAIN]
    return train_tiny_model(tiny_tokenizer, texts, seed=0, steps=120, lr=1e-2)


@pytest.fixture(scope="module")
def probe(tiny_tokenizer):
    return encode_texts(tiny_tokenizer, [tiny_tokenizer.apply_chat_template(c, tokenize=False) for c in HELD_OUT])


@pytest.fixture(scope="module")
def source_argmax(trained, probe):
    return next_token_argmax(trained, probe)


def materials(tokenizer, tmp_path: Path) -> methods.Materials:
    return methods.Materials(tokenizer=tokenizer, train=TRAIN, val=HELD_OUT[:2], seed=0, work_dir=tmp_path)


def weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch, use_cache=False).logits


# One row per method: the variant, the smallest size reduction against fp32 safetensors, and the
# lowest argmax agreement (%) with the source allowed. The tiny model's fp32 embedding (not a Linear,
# never quantized) caps the quantized methods' reduction.
METHOD_BOUNDS = [
    (cc.DynamicInt8(name="int8"), 1.5, 95.0),
    (cc.DynamicInt8(name="int8-tensor", weights="per_tensor"), 1.5, 90.0),
    (cc.StaticInt8(name="static", calibration_samples=16), 1.5, 85.0),
    (cc.StaticInt8(name="static-sym-sq", calibration_samples=16, scheme="symmetric", observer="percentile",
                   percentile=99.9, smoothquant=0.5, weights="per_tensor"), 1.5, 80.0),
    (cc.WeightOnly(name="w8"), 1.5, 95.0),
    (cc.WeightOnly(name="w4", bits=4, group_size=32), 1.7, 85.0),
    (cc.Mixed(name="mixed", precision={"*.self_attn.*": "bf16", "*.mlp.*": "int8"}), 1.3, 95.0),
    (cc.Prune(name="sparse30", sparsity=0.3), 1.05, 80.0),
    (cc.Prune(name="two-four", kind="2:4"), 1.2, 50.0),
    (cc.Prune(name="structured", kind="structured", mlp=0.5, heads=0.5), 1.2, 40.0),
]


@pytest.mark.parametrize("variant,min_reduction,min_agreement", METHOD_BOUNDS, ids=lambda v: getattr(v, "name", ""))
def test_method_shrinks_agrees_and_round_trips(variant, min_reduction, min_agreement, trained, tiny_tokenizer,
                                              probe, source_argmax, tmp_path):
    built = methods.build(trained, variant, materials(tiny_tokenizer, tmp_path))
    assert built.model is not trained and all(type(m) is not quant.QuantizedLinear for m in trained.modules())
    source_dir = save_variant(trained, tiny_tokenizer, tmp_path / "source")
    folder = save_variant(built.model, tiny_tokenizer, tmp_path / variant.name, built.sparse)

    assert weight_bytes(source_dir) / weight_bytes(folder) >= min_reduction
    reached = agreement(source_argmax, next_token_argmax(built.model, probe), probe["attention_mask"])
    assert reached >= min_agreement, f"{variant.name}: agreement {reached:.1f}%"

    reloaded = load_causal_lm(folder)
    assert torch.allclose(logits(built.model, probe), logits(reloaded, probe), atol=1e-5)
    prompts = [c[:1] for c in HELD_OUT[:2]]
    assert (generate_chat(built.model, tiny_tokenizer, prompts, max_new_tokens=6).texts
            == generate_chat(reloaded, tiny_tokenizer, prompts, max_new_tokens=6).texts)


def test_quantized_methods_really_quantize_and_keep_what_they_skip(trained, tiny_tokenizer, tmp_path):
    variant = cc.DynamicInt8(name="int8", skip=["lm_head"])
    model = methods.build(trained, variant, materials(tiny_tokenizer, tmp_path)).model
    assert isinstance(model.model.layers[0].mlp.up_proj, quant.DynamicInt8Linear)
    assert type(model.lm_head) is torch.nn.Linear
    folder = save_variant(model, tiny_tokenizer, tmp_path / "int8")
    assert is_compressed_folder(folder)
    assert isinstance(load_causal_lm(folder).model.layers[1].self_attn.q_proj, quant.DynamicInt8Linear)


def test_weight_quantization_error_is_within_half_a_step():
    weight = torch.randn(16, 64)
    for per_channel in (True, False):
        for symmetric in (True, False):
            values, scale, zero = quant.quantize_weight(weight, per_channel, symmetric)
            step = scale[:, None] if per_channel else scale
            error = (quant.dequantize_weight(values, scale, zero) - weight).abs()
            assert bool((error <= step / 2 + 1e-6).all())


def test_int4_module_matches_its_dequantized_weights():
    linear = torch.nn.Linear(64, 32)
    module = quant.WeightInt4Linear.from_linear(linear, group_size=32)
    x = torch.randn(3, 64)
    reference = torch.nn.functional.linear(x.bfloat16().float(), module.dequantized(), linear.bias)
    assert torch.allclose(module(x), reference, atol=0.05, rtol=0.02)
    steps = module.group_scale.repeat_interleave(32, dim=1)
    assert bool(((module.dequantized() - linear.weight.detach()).abs() <= steps / 2 + 1e-5).all())


def test_smoothquant_moves_scale_without_changing_the_float_product():
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8) * torch.tensor([1, 1, 50, 1, 1, 1, 1, 1.0])
    divisor = torch.ones(8).index_fill_(0, torch.tensor([2]), 7.0)
    smoothed = torch.nn.functional.linear(x / divisor, linear.weight * divisor, linear.bias)
    assert torch.allclose(smoothed, linear(x), atol=1e-4)
    from lmsmith.compress.calibrate import smoothing_divisor

    s = smoothing_divisor(x.abs().amax(0), linear.weight, alpha=0.5)
    assert s[2] == s.max()  # the outlier channel is divided most


def test_static_int8_records_calibration_and_ranges(trained, tiny_tokenizer, tmp_path):
    variant = cc.StaticInt8(name="static", calibration_samples=8)
    built = methods.build(trained, variant, materials(tiny_tokenizer, tmp_path))
    assert built.facts["calibration_samples"] == 8 and built.facts["calibration_tokens"] > 8
    module = built.model.model.layers[0].mlp.down_proj
    assert isinstance(module, quant.StaticInt8Linear)
    assert float(module.input_scale) > 0 and 0 <= int(module.input_zero) <= quant.ACT_QMAX


def test_mixed_refuses_a_pattern_that_matches_nothing(trained, tiny_tokenizer, tmp_path):
    variant = cc.Mixed(name="mixed", precision={"*.attention.*": "bf16"})
    with pytest.raises(UserError, match=r"\*\.attention\.\* matches no Linear module"):
        methods.build(trained, variant, materials(tiny_tokenizer, tmp_path))
    built = methods.build(trained, cc.Mixed(name="m", precision={"*.mlp.*": "int4_weight"}, default="bf16",
                                             group_size=32), materials(tiny_tokenizer, tmp_path))
    assert built.facts["modules_by_precision"] == {"int4_weight": 6, "bf16": 9}


def test_magnitude_and_two_four_pruning_patterns(trained, tiny_tokenizer, tmp_path):
    magnitude = methods.build(trained, cc.Prune(name="p", sparsity=0.6), materials(tiny_tokenizer, tmp_path))
    assert magnitude.facts["sparsity"] == pytest.approx(0.6, abs=0.01)
    two_four = methods.build(trained, cc.Prune(name="q", kind="2:4"), materials(tiny_tokenizer, tmp_path))
    assert two_four.facts["two_four_pattern_holds"]
    assert all(prune.is_two_four(two_four.model.get_parameter(name)) for name in two_four.sparse)
    with pytest.raises(UserError, match="CUDA fp16/bf16"):
        prune.to_semi_structured(two_four.model, two_four.sparse[:1])


def test_pruning_recovery_keeps_the_zeros_and_lowers_the_loss(trained, tiny_tokenizer, tmp_path):
    variant = cc.Prune(name="p", sparsity=0.7, recovery=cc.Recovery(max_steps=15, batch_size=8, log_every=1))
    built = methods.build(trained, variant, materials(tiny_tokenizer, tmp_path))
    assert built.facts["sparsity_after_recovery"] >= built.facts["sparsity"] - 1e-6
    assert (tmp_path / "recovery" / "metrics.jsonl").is_file()
    assert not any(parametrize_name in name for name, _ in built.model.named_parameters()
                   for parametrize_name in ("parametrizations", "original"))


def test_structured_pruning_shrinks_the_config(trained, tiny_tokenizer, tmp_path):
    built = methods.build(trained, cc.Prune(name="s", kind="structured", mlp=0.25, heads=0.5),
                          materials(tiny_tokenizer, tmp_path))
    config = built.model.config
    assert (config.intermediate_size, config.num_key_value_heads, config.num_attention_heads) == (96, 1, 2)
    assert config.head_dim == trained.config.hidden_size // trained.config.num_attention_heads
    assert built.facts["params_after"] < built.facts["params_before"]


def test_distilled_student_beats_its_untrained_initialisation(trained, tiny_tokenizer, probe, source_argmax, tmp_path):
    # The last layer alone, without the first, starts far from the teacher: training must close the gap.
    start = prune.shrink(trained, [1], 0.0, 0.0)
    before = agreement(source_argmax, next_token_argmax(start, probe), probe["attention_mask"])
    variant = cc.Distill(name="student", keep_layers=[1],
                         training=cc.DistillTraining(epochs=8, batch_size=8, optim={"lr": 5e-3}, log_every=1))
    built = methods.build(copy.deepcopy(trained), variant, materials(tiny_tokenizer, tmp_path))
    assert built.model.config.num_hidden_layers == 1 and built.facts["student_layers"] == [1]
    assert built.facts["student_params"] < built.facts["teacher_params"]
    after = agreement(source_argmax, next_token_argmax(built.model, probe), probe["attention_mask"])
    assert after > before + 10
    folder = save_variant(built.model, tiny_tokenizer, tmp_path / "student")
    assert not is_compressed_folder(folder) and (folder / "config.json").is_file()  # a plain HF folder
    source = save_variant(trained, tiny_tokenizer, tmp_path / "source")
    assert weight_bytes(source) / weight_bytes(folder) >= 1.3
    assert torch.allclose(logits(built.model, probe), logits(load_causal_lm(folder), probe), atol=1e-5)


def test_prune_and_distill_refuse_a_quantized_source(trained, tiny_tokenizer, tmp_path):
    quantized = methods.build(trained, cc.DynamicInt8(name="int8"), materials(tiny_tokenizer, tmp_path)).model
    with pytest.raises(UserError, match="needs float weights"):
        methods.build(quantized, cc.Prune(name="p", source="int8"), materials(tiny_tokenizer, tmp_path))


def test_variant_config_errors_name_the_field():
    with pytest.raises(ValueError, match="not a variant listed before it"):
        cc.CompressConfig(variants=[{"name": "a", "method": "dynamic_int8", "source": "b"}])
    with pytest.raises(ValueError, match="two variants are named"):
        cc.CompressConfig(variants=[{"name": "a", "method": "dynamic_int8"}, {"name": "a", "method": "mixed",
                                                                                "precision": {}}])
    with pytest.raises(ValueError, match="INT4 groups"):
        cc.WeightOnly(name="w", bits=4, group_size=48)
    with pytest.raises(ValueError, match="student must be smaller"):
        cc.Distill(name="d")


# ---------------------------------------------------------------- the stage


def fabricated_run(run_dir: Path, model, tokenizer) -> None:
    from test_eval import CORPUS_ROWS, write_jsonl, write_manifest

    def rows(convs):
        return [{"id": f"r{i}", "task": "qa", "messages": c} for i, c in enumerate(convs)]

    write_jsonl(run_dir / "data" / "sft" / "train.jsonl", rows(TRAIN))
    write_jsonl(run_dir / "data" / "sft" / "val.jsonl", rows(HELD_OUT[:2]))
    write_jsonl(run_dir / "data" / "sft" / "test.jsonl", rows(HELD_OUT))
    write_jsonl(run_dir / "data" / "corpus" / "test.jsonl", CORPUS_ROWS)
    write_manifest(run_dir, "data", {"sft_train": "sft/train.jsonl", "sft_val": "sft/val.jsonl",
                                     "sft_test": "sft/test.jsonl", "corpus_test": "corpus/test.jsonl"})
    model.save_pretrained(run_dir / "sft" / "merged")
    tokenizer.save_pretrained(run_dir / "sft" / "merged")
    write_manifest(run_dir, "sft", {"model": "merged"})


def run_stage(run_dir: Path, **settings):
    from lmsmith.compress.stage import run
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe

    stage_dir = run_dir / "compress"
    stage_dir.mkdir(exist_ok=True)
    config = cc.CompressConfig(max_items=3, max_new_tokens=6, speed_requests=1, speed_batch=2, speed_new_tokens=3,
                               agreement_texts=4, **settings)
    return run(config, StageContext(run_dir=run_dir, stage_dir=stage_dir, recipe=Recipe(pretrain={}, sft={}, compress={}))), stage_dir


@pytest.mark.slow
def test_compress_stage_builds_scores_and_gates_every_variant(tmp_path, trained, tiny_tokenizer):
    import json

    fabricated_run(tmp_path, trained, tiny_tokenizer)
    variants = [
        {"name": "int8", "method": "dynamic_int8"},
        {"name": "static", "method": "static_int8", "calibration_samples": 8},
        {"name": "student", "method": "distill", "layers": 1, "training": {"max_steps": 3, "batch_size": 8},
         "max_drop": {"agreement": 0.0}},  # no student agrees everywhere: this one must fail its gate
        {"name": "student-int8", "method": "dynamic_int8", "source": "student"},
    ]
    result, stage_dir = run_stage(tmp_path, variants=variants)
    results = json.loads((stage_dir / "results.json").read_text())
    assert list(results["models"]) == ["source", "int8", "static", "student", "student-int8"]
    assert results["gate"]["failed"] == ["student"] and result.metrics["gate_failed"] == 1
    for name in ("int8", "static", "student", "student-int8"):
        assert result.outputs[f"variant.{name}"] == name
        manifest = json.loads((stage_dir / name / "manifest.json").read_text())
        assert manifest["name"] == name and manifest["size_bytes"] > 0 and manifest["peak_memory_mb"] > 0
        assert load_causal_lm(stage_dir / name) is not None
    int8 = results["models"]["int8"]
    assert int8["size_bytes"] < results["models"]["source"]["size_bytes"] and int8["gate"]["passed"]
    assert int8["agreement"] > 90 and set(int8["drops"]) >= {"agreement", "perplexity", "held-out-answers.rougeL"}
    assert results["models"]["student-int8"]["source"] == "student"
    assert results["models"]["student"]["gate"]["over"]["agreement"] > 0
    table = (stage_dir / "table.md").read_text()
    assert "| student | distill |" in table and "FAILED: agreement" in table and "× smaller" in table
    assert (stage_dir / "plots" / "size_quality.png").read_bytes()[:4] == b"\x89PNG"


def test_compress_gate_strict_fails_the_stage_and_unknown_keys_are_refused(tmp_path, trained, tiny_tokenizer):
    fabricated_run(tmp_path, trained, tiny_tokenizer)
    with pytest.raises(UserError, match=r"held-out-answers\.bleu is not measured; the keys are agreement, perplexity"):
        run_stage(tmp_path, gate={"max_drop": {"held-out-answers.bleu": 1.0}})
    with pytest.raises(UserError, match=r"compress.gate \(strict\): int8 over max_drop"):
        run_stage(tmp_path, variants=[{"name": "int8", "method": "dynamic_int8", "max_drop": {"agreement": 0.0}}],
                  gate={"strict": True}, peak_memory=False)


def test_a_run_serves_its_variant_by_name(tmp_path, trained, tiny_tokenizer):
    from test_eval import write_manifest

    from lmsmith.compress.stage import write_variant_manifest
    from lmsmith.models import resolve_model
    from lmsmith.serve.engine import Engine
    from lmsmith.serve.sampling import SamplingParams

    built = methods.build(trained, cc.WeightOnly(name="w8"), materials(tiny_tokenizer, tmp_path))
    folder = save_variant(built.model, tiny_tokenizer, tmp_path / "compress" / "w8")
    write_variant_manifest(folder, cc.WeightOnly(name="w8"), {
        "source": "source", "kernels": "", "facts": {}, "agreement": 99.0, "perplexity": 1.0, "drops": {},
        "gate": {"passed": True, "over": {}}})
    write_manifest(tmp_path, "sft", {"model": "merged"})
    write_manifest(tmp_path, "compress", {"variant.w8": "w8", "results": "results.json"})
    resolved = resolve_model(tmp_path, "w8")
    assert resolved.path == folder.resolve() and resolved.name == f"{tmp_path.name}-w8"
    with pytest.raises(UserError, match="made w8"):
        resolve_model(tmp_path, "int4")

    from test_engine import generate_ids, hf_greedy_ids

    engine = Engine.load(resolved.path, device="auto")
    prompt = tiny_tokenizer(tiny_tokenizer.apply_chat_template(HELD_OUT[0][:1], tokenize=False,
                                                               add_generation_prompt=True))["input_ids"]
    try:
        assert isinstance(engine.model.model.layers[0].mlp.up_proj, quant.WeightInt8Linear)
        served = generate_ids(engine, [prompt], SamplingParams(max_tokens=6, temperature=0))[0]
    finally:
        engine.close()
    assert served == hf_greedy_ids(built.model, prompt, 6)[: len(served)] and served


@pytest.mark.parametrize("kind", ["int8", "int8_weight"])
def test_joined_int8_projections_equal_the_separate_ones(kind):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, size, bias=index == 0) for index, size in enumerate((64, 32, 32))]
    modules = [quant.convert(linear, kind) for linear in linears]
    x = torch.randn(5, 64)
    separate = torch.cat([module(x) for module in modules], dim=-1)
    joined = quant.concatenate(modules)
    assert joined is not None and joined.out_features == 128
    assert torch.equal(joined(x), separate)
    assert torch.equal(torch.cat([module(x) for module in modules], dim=-1), separate)  # originals still work
    assert modules[1].weight_int8.data_ptr() == joined.weight_int8[64:].data_ptr()  # views, not copies
    assert quant.concatenate([modules[0], quant.convert(linears[1], "bf16")]) is None


def test_a_quantized_variant_refuses_a_gpu_and_a_pruned_one_takes_any_dtype(trained, tiny_tokenizer, tmp_path):
    from lmsmith.serve.engine import Engine

    quantized = methods.build(trained, cc.DynamicInt8(name="int8"), materials(tiny_tokenizer, tmp_path))
    folder = save_variant(quantized.model, tiny_tokenizer, tmp_path / "int8")
    with pytest.raises(UserError, match="runs on CPU with its saved dtypes"):
        Engine.load(folder, device="cpu", dtype="bfloat16")
    pruned = methods.build(trained, cc.Prune(name="p", kind="2:4"), materials(tiny_tokenizer, tmp_path))
    engine = Engine.load(save_variant(pruned.model, tiny_tokenizer, tmp_path / "p", pruned.sparse), device="cpu",
                         dtype="bfloat16")
    try:
        assert engine.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    finally:
        engine.close()


def test_a_recipe_names_only_variants_it_makes():
    from lmsmith.recipe import Recipe
    from lmsmith.stages import STAGES

    with pytest.raises(ValueError, match="eval.variants: 'w4' is not a compress variant of this recipe \\(int8\\)"):
        Recipe(pretrain={}, sft={}, compress={}, eval={"variants": ["w4"]})
    with pytest.raises(ValueError, match="serve.variant: 'int8' is not a compress variant"):
        Recipe(pretrain={}, sft={}, serve={"variant": "int8"})
    recipe = Recipe(pretrain={}, sft={}, compress={}, eval={"variants": ["int8"]}, serve={"variant": "int8"})
    requires = {spec.name: spec.requires(recipe) if callable(spec.requires) else spec.requires for spec in STAGES}
    assert "compress" in requires["eval"] and "compress" in requires["serve"]


def test_a_setting_the_variant_does_not_use_is_refused_not_ignored():
    for make, message in ((lambda: cc.StaticInt8(name="s", percentile=99.0), "percentile: not used by the minmax"),
                          (lambda: cc.WeightOnly(name="w", group_size=32), "group_size: not used by INT8"),
                          (lambda: cc.Prune(name="p", mlp=0.5), "mlp: not used by magnitude pruning"),
                          (lambda: cc.Prune(name="p", kind="structured", mlp=0.5, sparsity=0.3), "sparsity: not used"),
                          (lambda: cc.Distill(name="d", layers=1, skip=["lm_head"]), "skip: not used by distill"),
                          (lambda: cc.Distill(name="d", layers=1, calibration_samples=8), "calibration_samples")):
        with pytest.raises(ValueError, match=message):
            make()
    # A saved recipe repeats every default; validating it again must still pass.
    demo = cc.CompressConfig(variants=[{"name": "student", "method": "distill", "layers": 2},
                                       {"name": "w8", "method": "weight_only"}])
    assert cc.CompressConfig.model_validate(demo.model_dump(mode="json")) == demo
