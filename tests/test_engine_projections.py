"""The engine's fused and prepacked projections, and decode attention read in place from the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmsmith.serve.engine import Engine, EngineConfig, SamplingParams
from lmsmith.serve.engine.config import EngineConfig as Config
from lmsmith.serve.engine.projections import (
    DenseProjection,
    ModuleProjection,
    OneDnnKernel,
    build_layer_projections,
    choose_row_kernel,
    packing_supported,
)
from lmsmith.serve.engine.skinny import SkinnyKernel, load_skinny_kernel
from lmsmith.serve.engine.runner import ModelRunner, PromptPiece, StepBatch, _contiguous_start
from tests.conftest import build_tiny_model
from tests.test_engine import generate_ids, hf_greedy_ids

GREEDY = SamplingParams(max_tokens=16, temperature=0)
needs_packing = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32),
                                   reason="this torch build has no oneDNN linear kernels")


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, hidden_size=128, layers=2, seed=3).eval()


KERNELS = {
    "none": lambda: None,
    "onednn": lambda: OneDnnKernel(8),
    "skinny": load_skinny_kernel,
}


@pytest.mark.parametrize("kernel_name", [
    "none",
    pytest.param("onednn", marks=needs_packing),
    pytest.param("skinny", marks=pytest.mark.skipif(load_skinny_kernel() is None, reason="no AVX-512 or C compiler")),
])
def test_fused_projections_equal_the_models_own_linears(model, kernel_name):
    kernel = KERNELS[kernel_name]()
    reference = copy.deepcopy(model)
    fused_model = copy.deepcopy(model)
    built = build_layer_projections(list(fused_model.model.layers), kernel)
    for layer, ref, projections in zip(fused_model.model.layers, reference.model.layers, built):
        assert isinstance(projections.qkv, DenseProjection)
        assert (projections.qkv.packed is not None) == (kernel is not None)
        # The model's modules now point into the fused matrices: same values, no second copy.
        assert layer.self_attn.q_proj.weight.data_ptr() == projections.qkv.weight.data_ptr()
        assert torch.equal(layer.self_attn.k_proj.weight, ref.self_attn.k_proj.weight)
        for rows in (1, 2, 3, 5, 8, 13, 40):
            x = torch.randn(rows, model.config.hidden_size)
            attn, mlp = ref.self_attn, ref.mlp
            with torch.no_grad():
                expected_qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
                expected_gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
                wide = torch.randn(rows, mlp.down_proj.in_features)
                torch.testing.assert_close(projections.qkv(x), expected_qkv, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(projections.gate_up(x), expected_gate_up, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(projections.o(x), attn.o_proj(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(projections.down(wide), mlp.down_proj(wide), rtol=1e-5, atol=1e-5)


@needs_packing
def test_packed_and_plain_engines_give_the_same_greedy_tokens(tiny_model_dir):
    prompts = [[5, 6, 7], list(range(10, 60)), [9] * 20, list(range(100, 130)), [42]]
    answers = {}
    for packed in (True, False):
        engine = Engine.load(tiny_model_dir, device="cpu", config=EngineConfig(max_slots=8, packed_weights=packed))
        try:
            assert engine._runner.packed_weights is packed
            assert (engine.stats()["packed_weight_bytes"] > 0) is packed
            answers[packed] = generate_ids(engine, prompts, GREEDY)
        finally:
            engine.close()
    assert answers[True] == answers[False]
    assert all(len(ids) > 0 for ids in answers[True])


def test_a_dynamically_quantized_model_is_served_through_its_own_modules(tiny_tokenizer):
    from lmsmith.compress.config import DynamicInt8
    from lmsmith.compress.methods import dynamic_int8

    model = build_tiny_model(tiny_tokenizer, hidden_size=128, layers=2, seed=4).eval()
    model = dynamic_int8(model, DynamicInt8(name="int8"), None).model
    engine = Engine(model, tiny_tokenizer, EngineConfig(max_slots=4))
    try:
        assert isinstance(engine._runner.projections[0].qkv, ModuleProjection)
        prompts = [list(range(10, 40)), [7, 8, 9]]
        # One request at a time: dynamic int8 scales activations per call, so rows batched together
        # round differently than HF's one-sequence passes.
        got = [generate_ids(engine, [prompt], GREEDY)[0] for prompt in prompts]
    finally:
        engine.close()
    assert got == [hf_greedy_ids(model, prompt, GREEDY.max_tokens) for prompt in prompts]


def test_contiguous_start():
    assert _contiguous_start([3, 4, 5]) == 3
    assert _contiguous_start([0]) == 0
    assert _contiguous_start([0, 2, 3]) is None
    assert _contiguous_start([1, 1]) is None
    assert _contiguous_start([]) is None


def test_decode_rows_read_in_place_match_gathered_keys(model):
    runner = ModelRunner(copy.deepcopy(model), Config(max_slots=4).resolve("cpu", 512))
    lengths = [9, 17, 5, 12]
    with torch.inference_mode():
        # Fill four slots with prompts of different lengths.
        offset, pieces, ids, positions, slots = 0, [], [], [], []
        for slot, length in enumerate(lengths):
            pieces.append(PromptPiece(offset, length, slot, 0, None))
            ids += torch.randint(0, model.config.vocab_size, (length,)).tolist()
            positions += list(range(length))
            slots += [slot] * length
            offset += length
        runner.forward(StepBatch(torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), 0, 0, pieces=pieces))
        snapshot = (runner.kv.keys.clone(), runner.kv.values.clone())

        def decode(in_place: bool) -> torch.Tensor:
            runner.kv.keys.copy_(snapshot[0])
            runner.kv.values.copy_(snapshot[1])
            return runner.forward(StepBatch(
                input_ids=torch.tensor([11, 12, 13, 14]), positions=torch.tensor(lengths), slots=torch.arange(4),
                num_decode=4, decode_key_len=max(lengths) + 1, decode_slot_start=0 if in_place else None,
            ))

        torch.testing.assert_close(decode(True), decode(False), rtol=0, atol=0)


@pytest.mark.skipif(load_skinny_kernel() is None, reason="no AVX-512 or C compiler")
@pytest.mark.parametrize("out_features, in_features", [(64, 64), (100, 333), (6, 17), (96, 1024)])
def test_skinny_kernel_equals_f_linear_for_every_row_count_and_ragged_shapes(out_features, in_features):
    kernel = load_skinny_kernel()
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    panels = SkinnyKernel.pack(weight)
    assert panels.shape == (-(-out_features // 32), in_features, 32)
    for rows in range(1, 20):
        x = torch.randn(rows, in_features)
        torch.testing.assert_close(kernel.linear(x, panels, out_features, bias), F.linear(x, weight, bias),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kernel.linear(x, panels, out_features, None), F.linear(x, weight),
                                   rtol=1e-4, atol=1e-4)


def test_skinny_kernel_is_off_when_asked(monkeypatch):
    from lmsmith.serve.engine import skinny

    monkeypatch.setenv("LMSMITH_SKINNY_GEMM", "0")
    skinny.load_skinny_kernel.cache_clear()
    try:
        assert skinny.load_skinny_kernel() is None
        fallback = OneDnnKernel if packing_supported(torch.device("cpu"), torch.float32) else type(None)
        assert isinstance(choose_row_kernel(torch.device("cpu"), torch.float32, 8), fallback)
    finally:
        skinny.load_skinny_kernel.cache_clear()


def test_packed_weights_flows_from_cli_and_config_to_the_engine():
    from lmsmith.cli import build_parser
    from lmsmith.serve.config import ServeConfig

    parser = build_parser()
    assert parser.parse_args(["serve", "model"]).packed_weights is None
    assert parser.parse_args(["serve", "model", "--no-packed-weights"]).packed_weights is False
    assert parser.parse_args(["serve", "model", "--packed-weights"]).packed_weights is True
    assert ServeConfig(packed_weights=False).engine_config().packed_weights is False
    assert ServeConfig().engine_config().packed_weights is None
