"""The continuous-batching engine on CPU, against transformers' own `generate` on the tiny model.

Token ids are compared, not only text: each request's ids are read from its sequence once it finishes.
"""

from __future__ import annotations

import asyncio
import queue
import time

import pytest
import torch

from lmsmith.errors import UserError
from lmsmith.serve.engine import Engine, EngineConfig, EngineError, SamplingParams, UnknownAdapterError
from lmsmith.serve.engine.cuda_graphs import batch_buckets, bucket_for, key_len_bucket
from lmsmith.serve.engine.request import Sequence
from lmsmith.serve.engine.scheduler import Scheduler

GREEDY = SamplingParams(max_tokens=24, temperature=0)
TEXTS = [
    "星辰科技2023年营业收入为12.5亿元,同比增长15.2%。",
    "毛利率",
    "The company reported revenue of 1.2 billion yuan in 2023, up 8.5% year over year. " * 3,
    "华信银行2022年总资产为520亿元,资产负债率为61.2%。请计算2023年营业收入的同比增长率。" * 2,
    "归母净利润3.1亿元",
]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(hf) -> list[list[int]]:
    """Mixed lengths, from a single token to a few hundred."""
    _, tokenizer = hf
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    return [encoded[1][:1]] + encoded


def open_engine(model_dir, **config) -> Engine:
    return Engine.load(model_dir, device="cpu", config=EngineConfig(**config))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = open_engine(tiny_model_dir, max_slots=8, max_step_tokens=64, prefill_chunk=32)
    yield engine
    engine.close()


def hf_greedy_ids(model, prompt: list[int], max_new_tokens: int = GREEDY.max_tokens, **options) -> list[int]:
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **options)
    return output[0, len(prompt):].tolist()


def generate_ids(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 loras: list[str | None] | None = None, timeout: float = 60) -> list[list[int]]:
    """Submit all requests at once; each one's answer ids, once every request has finished."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    loras = loras or [None] * len(prompts)
    done: queue.Queue = queue.Queue()
    sequences = []
    for prompt, request_params, lora in zip(prompts, params_list, loras):
        holder: list[Sequence] = []

        def sink(event, holder=holder):
            if isinstance(event, EngineError) or event.finish_reason is not None:
                done.put((holder[0], event))

        holder.append(engine.submit(prompt, request_params, sink, lora))
        sequences.append(holder[0])
    for _ in sequences:
        seq, event = done.get(timeout=timeout)
        assert not isinstance(event, EngineError), event
    return [seq.token_ids[seq.num_prompt:] for seq in sequences]


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ----- scheduling -----

def test_scheduler_fills_the_token_budget_decodes_first_and_chunks_prompts():
    scheduler = Scheduler(max_slots=2, max_step_tokens=8, prefill_chunk=5)
    params = SamplingParams()
    long, short, late = (Sequence(i, list(range(n)), params, lambda e: None, None, torch.device("cpu"))
                         for i, n in ((1, 12), (2, 3), (3, 4)))
    for seq in (long, short, late):
        scheduler.add(seq)

    first = scheduler.next_step().chunks
    assert [(c.seq.request_id, c.start, c.count) for c in first] == [(1, 0, 5), (2, 0, 3)]
    counts = scheduler.counts()
    assert {key: counts[key] for key in ("running", "waiting", "kv_slots_used", "kv_slots_free")} == {
        "running": 2, "waiting": 1, "kv_slots_used": 2, "kv_slots_free": 0}
    assert counts["admitted_total"] == 2 and counts["queue_wait_seconds_total"] >= 0
    for chunk in first:
        chunk.seq.num_computed = chunk.start + chunk.count
    short.token_ids.append(7)  # short's prompt is all in: it sampled a token and now decodes

    second = scheduler.next_step().chunks
    assert [(c.seq.request_id, c.start, c.count, c.samples) for c in second] == [(2, 3, 1, True), (1, 5, 5, False)]
    short.finish_reason = "stop"
    for chunk in second:
        chunk.seq.num_computed = chunk.start + chunk.count

    third = scheduler.next_step().chunks  # short left: its slot goes to the waiting request
    assert [(c.seq.request_id, c.start, c.count, c.samples) for c in third] == [(1, 10, 2, True), (3, 0, 4, True)]
    assert late.slot == 1 and scheduler.counts()["waiting"] == 0


def test_decode_buckets():
    assert batch_buckets(16) == (1, 2, 3, 4, 6, 8, 12, 16)
    assert batch_buckets(5) == (1, 2, 3, 4, 5)
    assert bucket_for(7, batch_buckets(16)) == 8
    assert bucket_for(17, batch_buckets(16)) is None
    assert key_len_bucket(1, 256, 2048) == 256
    assert key_len_bucket(257, 256, 2048) == 512
    assert key_len_bucket(2000, 256, 1500) == 1500


# ----- greedy equals transformers -----

def test_mixed_length_batch_matches_hf_generate(engine, hf, prompts):
    model, _ = hf
    expected = [hf_greedy_ids(model, prompt) for prompt in prompts]
    assert generate_ids(engine, prompts, GREEDY) == expected
    assert len({tuple(ids) for ids in expected}) == len(expected)  # the prompts really lead apart


def test_chunked_prefill_gives_the_same_tokens(tiny_model_dir, engine, prompts):
    whole = generate_ids(engine, prompts, GREEDY)
    chunked = open_engine(tiny_model_dir, max_slots=4, max_step_tokens=9, prefill_chunk=5)
    try:
        assert generate_ids(chunked, prompts, GREEDY) == whole
        assert chunked.stats()["steps"] > sum(len(p) for p in prompts) // 9  # the prompts really went in pieces
    finally:
        chunked.close()


def test_64_concurrent_requests_equal_sequential_greedy(engine, hf):
    _, tokenizer = hf
    questions = [[{"role": "user", "content": f"{TEXTS[i % len(TEXTS)][: 4 + i % 17]} {i}"}] for i in range(64)]
    prompts = [engine.encode_chat(question) for question in questions]
    params = SamplingParams(max_tokens=10, temperature=0)
    sequential = [generate_ids(engine, [prompt], params)[0] for prompt in prompts]
    before = engine.stats()

    async def all_at_once():
        return await asyncio.gather(*(engine.complete(p, params) for p in prompts), return_exceptions=True)

    results = asyncio.run(all_at_once())
    after = engine.stats()
    assert [r for r in results if isinstance(r, BaseException)] == []
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in sequential]
    assert [r.text for r in results] == texts
    assert [r.completion_tokens for r in results] == [len(ids) for ids in sequential]
    tokens = after["completion_tokens"] - before["completion_tokens"]
    assert after["failed"] == before["failed"]
    assert after["steps"] - before["steps"] < tokens / 4  # requests shared steps
    assert after["running"] == 0 and after["waiting"] == 0 and after["kv_slots_used"] == 0


# ----- cancellation -----

def test_cancelling_frees_the_kv_slot_at_once(engine, prompts):
    total = engine.stats()["kv_slots_total"]

    async def start_then_leave() -> tuple[dict, dict]:
        stream = engine.stream(prompts[3], SamplingParams(max_tokens=400, temperature=0))
        await stream.__anext__()
        during = engine.stats()
        await stream.aclose()
        await asyncio.to_thread(wait_for, lambda: engine.stats()["kv_slots_used"] == 0)
        return during, engine.stats()

    during, after = asyncio.run(start_then_leave())
    assert during["kv_slots_used"] == 1 and during["running"] == 1
    assert after["kv_slots_used"] == 0 and after["kv_slots_free"] == total
    assert after["cancelled"] == during["cancelled"] + 1


# ----- sampling -----

def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine, prompts):
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    alone = generate_ids(engine, [prompts[1]], seeded)[0]
    assert generate_ids(engine, [prompts[1]], seeded)[0] == alone
    companions = [SamplingParams(max_tokens=30, temperature=1.0, seed=s) for s in (1, 2)] + [
        SamplingParams(max_tokens=30, temperature=0.7), GREEDY]
    crowd = generate_ids(engine, [prompts[2], prompts[1], prompts[4], prompts[0], prompts[3]],
                         [companions[0], seeded, *companions[1:]])
    assert crowd[1] == alone
    other_seed = generate_ids(engine, [prompts[1]], SamplingParams(max_tokens=20, temperature=1.0, seed=99))[0]
    assert other_seed != alone


def test_top_k_one_is_greedy(engine, prompts):
    greedy = generate_ids(engine, prompts, GREEDY)
    assert generate_ids(engine, prompts, SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3)) == greedy


def test_repetition_penalty_matches_transformers(engine, hf, prompts):
    model, _ = hf
    penalised = SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.8)
    expected = [hf_greedy_ids(model, prompt, repetition_penalty=1.8) for prompt in prompts[:4]]
    got = generate_ids(engine, prompts[:4], penalised)
    assert got == expected
    assert got != generate_ids(engine, prompts[:4], GREEDY)
    # Penalised answers repeat their tokens less.
    repeats = lambda answers: sum(len(ids) - len(set(ids)) for ids in answers)
    assert repeats(got) < repeats(generate_ids(engine, prompts[:4], GREEDY))


def test_sampling_params_are_validated():
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)


# ----- multi-LoRA -----

@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory, prompts):
    """Two peft LoRA adapters with random (non-zero) B, and each merged model's greedy answers."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    folders, expected = {}, {}
    for name, seed, targets in (("alpha", 1, "all-linear"), ("beta", 2, ["q_proj", "v_proj", "down_proj"])):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(r=4 * seed, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        folder = tmp_path_factory.mktemp(f"lora_{name}")
        get_peft_model(base, config).save_pretrained(folder)
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
        merged = merged.merge_and_unload().eval()
        folders[name] = folder
        expected[name] = [hf_greedy_ids(merged, prompt) for prompt in prompts]
    return folders, expected


@pytest.mark.parametrize("bucketed", [False, True], ids=["eager", "graph-shaped"])
def test_adapters_share_a_batch_and_match_their_merged_models(tiny_model_dir, adapters, hf, prompts, bucketed):
    folders, expected = adapters
    model, _ = hf
    base_expected = [hf_greedy_ids(model, prompt) for prompt in prompts]
    engine = open_engine(tiny_model_dir, max_slots=12, bucketed_decode=bucketed, graph_key_len_step=32)
    try:
        info = engine.add_lora("alpha", folders["alpha"])
        assert info.rank == 4 and "gate_proj" in info.target_modules
        engine.add_lora("beta", folders["beta"])
        assert [lora.name for lora in engine.loras()] == ["alpha", "beta"]
        requests = [(prompt, name) for prompt in prompts for name in ("alpha", "beta", None)]
        got = generate_ids(engine, [p for p, _ in requests], GREEDY, [n for _, n in requests])
        want = [expected[name][prompts.index(p)] if name else base_expected[prompts.index(p)] for p, name in requests]
        assert got == want
        assert (engine.stats()["bucketed_decode_steps"] > 0) == bucketed
        assert expected["alpha"] != base_expected and expected["beta"] != base_expected
    finally:
        engine.close()


def test_removing_an_adapter_fails_its_requests_cleanly(tiny_model_dir, adapters, prompts):
    folders, _ = adapters
    engine = open_engine(tiny_model_dir, max_slots=4)
    try:
        engine.add_lora("alpha", folders["alpha"])
        with pytest.raises(ValueError, match="already loaded"):
            engine.add_lora("alpha", folders["beta"])
        running = engine.stream_sync(prompts[2], SamplingParams(max_tokens=400, temperature=0), lora="alpha")
        next(running)
        engine.remove_lora("alpha")
        with pytest.raises(EngineError, match="was removed"):
            list(running)
        with pytest.raises(UnknownAdapterError, match="no LoRA adapter named 'alpha'"):
            engine.submit(prompts[0], GREEDY, lambda event: None, lora="alpha")
        assert engine.loras() == [] and engine.stats()["kv_slots_used"] == 0
        # The base model still answers, and the freed bank row takes a new adapter.
        assert generate_ids(engine, [prompts[0]], GREEDY)[0]
        engine.add_lora("beta", folders["beta"])
        assert generate_ids(engine, [prompts[0]], GREEDY, ["beta"])[0]
    finally:
        engine.close()


def test_a_broken_adapter_folder_is_a_user_error(engine, tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json"):
        engine.add_lora("broken", tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    with pytest.raises(UserError, match="use_dora"):
        engine.add_lora("broken", tmp_path)
    assert engine.loras() == []


def test_engine_config_defaults_depend_on_the_device():
    cpu = EngineConfig().resolve("cpu", 32768)
    cuda = EngineConfig().resolve("cuda", 32768)
    assert (cpu.max_slots, cpu.max_model_len, cpu.cuda_graphs, cpu.bucketed_decode) == (16, 2048, False, False)
    assert (cuda.max_slots, cuda.cuda_graphs, cuda.bucketed_decode) == (256, True, True)
    assert cuda.max_step_tokens > cpu.max_step_tokens
    assert EngineConfig(max_model_len=4096).resolve("cpu", 512).max_model_len == 512  # never past the model
    with pytest.raises(ValueError, match="max_step_tokens must be at least max_slots"):
        EngineConfig(max_slots=8, max_step_tokens=4)


# ----- logprobs -----

def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits over `ids` [len, vocab]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def collect(engine: Engine, prompt: list[int], params: SamplingParams, lora: str | None = None):
    return list(engine.stream_sync(prompt, params, lora))


def test_prompt_logprobs_match_transformers_across_prefill_chunks(tiny_model_dir, hf, prompts):
    model, _ = hf
    # A prefill chunk of 16 splits the long prompts; a budget of 17 leaves single-token mid-prompt pieces.
    engine = open_engine(tiny_model_dir, max_slots=4, max_step_tokens=17, prefill_chunk=16)
    try:
        for prompt in prompts[1:]:
            chunks = collect(engine, prompt, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=2))
            assert [chunk.finish_reason for chunk in chunks] == ["length"] and chunks[0].completion_tokens == 0
            got = chunks[0].prompt_logprobs
            assert got is not None and len(got) == len(prompt) and got[0] is None
            want = hf_logprobs(model, prompt)
            for position, entry in enumerate(got[1:], start=1):
                assert entry.token_id == prompt[position]
                assert entry.logprob == pytest.approx(float(want[position - 1, prompt[position]]), abs=2e-4)
                top_ids = [token for token, _ in entry.top]
                assert len(top_ids) == 2 and top_ids[0] == int(want[position - 1].argmax())
    finally:
        engine.close()


def test_sampled_token_logprobs_match_transformers(engine, hf, prompts):
    model, _ = hf
    prompt = prompts[2]
    chunks = collect(engine, prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=3, prompt_logprobs=0))
    entries = [entry for chunk in chunks for entry in chunk.logprobs]
    answer = [entry.token_id for entry in entries]
    assert answer == hf_greedy_ids(model, prompt, max_new_tokens=len(answer))
    want = hf_logprobs(model, prompt + answer)
    for index, entry in enumerate(entries):
        row = want[len(prompt) - 1 + index]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=2e-4)
        assert entry.top[0][0] == entry.token_id  # greedy: the chosen token is the most likely
        assert len(entry.top) == 3
    assert chunks[0].prompt_logprobs is not None and all(not e.top for e in chunks[0].prompt_logprobs[1:])


def test_prompt_logprobs_under_an_adapter_match_the_merged_model(tiny_model_dir, adapters, prompts):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders, _ = adapters
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folders["alpha"])
    merged = merged.merge_and_unload().eval()
    engine = open_engine(tiny_model_dir, max_slots=4)
    try:
        engine.add_lora("alpha", folders["alpha"])
        prompt = prompts[4]
        [chunk] = collect(engine, prompt, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0), "alpha")
        want = hf_logprobs(merged, prompt)
        got = [entry.logprob for entry in chunk.prompt_logprobs[1:]]
        assert got == pytest.approx([float(want[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=2e-4)
    finally:
        engine.close()


def test_logprob_counts_are_validated():
    with pytest.raises(ValueError, match="logprobs must be between 0 and 20"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_a_failing_worker_loop_fails_held_requests_instead_of_hanging(tiny_model_dir, monkeypatch):
    engine = Engine.load(tiny_model_dir, config=EngineConfig(max_slots=1, max_queue_wait_s=60))

    def broken(max_wait_s):
        raise RuntimeError("a bug outside any step")

    monkeypatch.setattr(engine._scheduler, "expired", broken)
    try:
        async def run():
            async for _ in engine.stream([5, 6, 7], SamplingParams(max_tokens=50, temperature=0)):
                pass

        started = time.monotonic()
        with pytest.raises(EngineError, match="stopped unexpectedly"):
            asyncio.run(asyncio.wait_for(run(), 30))
        assert time.monotonic() - started < 10
        engine._worker.join(timeout=5)
        assert not engine.healthy
    finally:
        engine.close()
