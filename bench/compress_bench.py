"""Compression methods against fp32 on one trained model, in one process: size, decode tok/s, agreement.

    python bench/compress_bench.py                       # needs `make demo` (its tokenizer and corpus)
    python bench/compress_bench.py --hidden 1024 --layers 8 --intermediate 2816 --train-steps 60
    PYTHONPATH=/tmp/aopkg python bench/compress_bench.py --torchao   # also torchao 0.18's int8 configs

The model is a Qwen2 of the given shape trained for `--train-steps` on the demo's finance corpus (cached
under runs/bench-compress/), so its next-token distribution is peaked the way a real model's is and
argmax agreement means something. Every variant is built from it by lmsmith's own compress methods,
next to torch.ao's `quantize_dynamic` (the deprecated API, same fbgemm kernel) and, with --torchao,
torchao's eager int8 configs (the peer library the issue asks us to measure).

For each: size of its saved weights, greedy decode tok/s at batch 1 and batch 8 through transformers
(`lmsmith.generation.generate_chat`, best of 3), and in lmsmith's serving engine for fp32 and INT8, and
teacher-forced next-token argmax agreement with fp32 on held-out corpus text. The target (issue 12):
INT8 decode >= 3x fp32 tok/s with agreement >= 0.95.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TARGET_SPEEDUP, TARGET_AGREEMENT = 3.0, 95.0


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown", []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    return f"{model} [{' '.join(flag for flag in wanted if flag in flags)}]"


def demo_paths() -> tuple[Path, Path, Path]:
    from lmsmith.artifacts import Manifest

    run = Path("runs/finance-demo")
    data = Manifest.read(run / "data")
    sft = Manifest.read(run / "sft")
    if data is None or sft is None:
        sys.exit("run `make demo` first: the bench uses the demo run's tokenizer and corpus")
    return (sft.output_path(run / "sft", "model"), data.output_path(run / "data", "corpus_train"),
            data.output_path(run / "data", "corpus_test"))


def trained_model(args, tokenizer, corpus: list[str], cache: Path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder = cache / f"qwen2-h{args.hidden}-l{args.layers}-i{args.intermediate}-s{args.train_steps}"
    if (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    ids = tokenizer("\n".join(corpus), add_special_tokens=False)["input_ids"]
    seq, batch = 128, 8
    windows = torch.tensor(ids[: len(ids) // seq * seq]).reshape(-1, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.train_steps):
        rows = windows[torch.randint(len(windows), (batch,), generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.train_steps - 1:
            print(f"  train step {step + 1}/{args.train_steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()
    model.save_pretrained(folder)
    return model


def variants(model, tokenizer, train_conversations, use_torchao: bool) -> dict:
    from lmsmith.compress import config as cc
    from lmsmith.compress import methods

    materials = methods.Materials(tokenizer, train_conversations, [], 0, Path(tempfile.mkdtemp()))
    built = {"fp32": (model, True)}  # name -> (model, whether lmsmith's variant folder can save it)
    for name, variant in [
        ("int8 dynamic (lmsmith)", cc.DynamicInt8(name="int8")),
        ("int8 static (lmsmith)", cc.StaticInt8(name="static", calibration_samples=64)),
        ("int8 static+SmoothQuant", cc.StaticInt8(name="sq", calibration_samples=64, smoothquant=0.5)),
        ("int8 weight-only", cc.WeightOnly(name="w8")),
        ("int4 weight-only g64", cc.WeightOnly(name="w4", bits=4, group_size=64)),
        ("mixed attn bf16 / mlp int8", cc.Mixed(name="mixed", precision={"*.self_attn.*": "bf16", "*.mlp.*": "int8"})),
        ("bf16 (all linears)", cc.Mixed(name="bf16", precision={"*": "bf16"})),
    ]:
        built[name] = (methods.build(model, variant, materials).model, True)
    ao = copy.deepcopy(model)
    built["int8 torch.ao quantize_dynamic"] = (
        torch.ao.quantization.quantize_dynamic(ao, {torch.nn.Linear}, dtype=torch.qint8), False)
    if use_torchao:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for name, make in (("int8 dynamic (torchao, eager)", Int8DynamicActivationInt8WeightConfig),
                           ("int8 weight-only (torchao, eager)", Int8WeightOnlyConfig)):
            copied = copy.deepcopy(model)
            quantize_(copied, make())
            built[name] = (copied, False)
    return built


def saved_mb(model, tokenizer) -> float:
    from lmsmith.compress.folder import save_variant

    with tempfile.TemporaryDirectory() as folder:
        save_variant(model, tokenizer, Path(folder))
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 1e6


def hf_tok_s(model, tokenizer, prompts, batch: int, tokens: int) -> float:
    from lmsmith.generation import generate_chat

    generate_chat(model, tokenizer, prompts[:batch], max_new_tokens=4, batch_size=batch, stop_at_eos=False)
    return max(generate_chat(model, tokenizer, prompts[:batch], max_new_tokens=tokens, batch_size=batch,
                             stop_at_eos=False).tokens_per_s for _ in range(3))


def engine_tok_s(model, tokenizer, prompts, batch: int, tokens: int) -> float:
    import queue

    from lmsmith.serve.engine import Engine, EngineConfig
    from lmsmith.serve.engine.request import EngineError
    from lmsmith.serve.sampling import SamplingParams

    engine = Engine(model, tokenizer, EngineConfig(max_slots=8))
    params = SamplingParams(max_tokens=tokens, temperature=0)
    ids = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for p in prompts[:batch]]
    best = 0.0
    try:
        for _ in range(4):  # the first run warms the engine up; the best of the rest is kept
            done: queue.Queue = queue.Queue()

            def sink(event):
                if isinstance(event, EngineError) or event.finish_reason is not None:
                    done.put(event)

            started = time.perf_counter()
            sequences = [engine.submit(prompt, params, sink) for prompt in ids]
            for _ in ids:
                event = done.get(timeout=600)
                if isinstance(event, EngineError):
                    raise event
            made = sum(len(seq.token_ids) - seq.num_prompt for seq in sequences)
            best = max(best, made / (time.perf_counter() - started))
    finally:
        engine.close()
    return best


def agreement(model, reference: torch.Tensor, batch: dict) -> float:
    from lmsmith.compress.measure import agreement as share, next_token_argmax

    return share(reference, next_token_argmax(model, batch), batch["attention_mask"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=32, help="New tokens per timed decode.")
    parser.add_argument("--torchao", action="store_true", help="Also torchao's eager int8 configs.")
    parser.add_argument("--json", type=Path, help="Write the results here too.")
    parser.add_argument("--only", help="Comma-separated name prefixes of the variants to run (fp32 always runs).")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))

    from lmsmith.compress.measure import encode_texts, next_token_argmax
    from lmsmith.eval.data import read_documents
    from lmsmith.generation import load_tokenizer
    from lmsmith.tokenizer.records import read_conversations

    tokenizer_dir, corpus_train, corpus_test = demo_paths()
    tokenizer = load_tokenizer(tokenizer_dir)
    print(f"CPU: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    model = trained_model(args, tokenizer, read_documents(corpus_train), Path("runs/bench-compress"))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    train_conversations = read_conversations(Path("runs/finance-demo/data/sft/train.jsonl"))
    probe = encode_texts(tokenizer, read_documents(corpus_test, 16), max_len=256)
    reference = next_token_argmax(model, probe)
    prompts = [conversation[:-1] for conversation in train_conversations[:8]]

    rows = []
    chosen = [prefix.strip() for prefix in args.only.split(",")] if args.only else None
    for name, (variant_model, savable) in variants(model, tokenizer, train_conversations, args.torchao).items():
        if chosen and name != "fp32" and not any(name.startswith(prefix) for prefix in chosen):
            continue
        row = {"variant": name, "size_mb": saved_mb(variant_model, tokenizer) if savable else None,
               "tok_s_b1": hf_tok_s(variant_model, tokenizer, prompts, 1, args.tokens),
               "tok_s_b8": hf_tok_s(variant_model, tokenizer, prompts, 8, args.tokens),
               "agreement": agreement(variant_model, reference, probe)}
        if name in ("fp32", "int8 dynamic (lmsmith)"):
            row["engine_tok_s_b1"] = engine_tok_s(variant_model, tokenizer, prompts, 1, args.tokens)
            row["engine_tok_s_b8"] = engine_tok_s(variant_model, tokenizer, prompts, 8, args.tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)

    fp32 = rows[0]
    print("\n| variant | size MB | tok/s b1 | × fp32 | tok/s b8 | × fp32 | agreement % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        size = "–" if row["size_mb"] is None else f"{row['size_mb']:.1f}"
        print(f"| {row['variant']} | {size} | {row['tok_s_b1']:.1f} | {row['tok_s_b1'] / fp32['tok_s_b1']:.2f}× | "
              f"{row['tok_s_b8']:.1f} | {row['tok_s_b8'] / fp32['tok_s_b8']:.2f}× | {row['agreement']:.2f} |")
    int8 = next(row for row in rows if row["variant"] == "int8 dynamic (lmsmith)")
    for key in ("engine_tok_s_b1", "engine_tok_s_b8"):
        print(f"engine {key[-2:]}: fp32 {fp32[key]:.1f} tok/s, int8 {int8[key]:.1f} tok/s "
              f"({int8[key] / fp32[key]:.2f}×)")
    speedup = int8["tok_s_b1"] / fp32["tok_s_b1"]
    verdict = speedup >= TARGET_SPEEDUP and int8["agreement"] >= TARGET_AGREEMENT
    print(f"target INT8 >= {TARGET_SPEEDUP}× fp32 at batch 1 with agreement >= {TARGET_AGREEMENT}%: "
          f"{speedup:.2f}×, {int8['agreement']:.2f}% -> {'MET' if verdict else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_description(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
