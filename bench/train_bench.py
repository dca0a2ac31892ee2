"""Training benchmark (issue 4): the same model, data and LoRA, trained by a plain HF + PEFT baseline and
by lmsmith's loop, side by side in one run. Prints tokens/s, peak memory and both ratios.

    python bench/train_bench.py                                  # CPU: the demo's tiny Qwen2, finance SFT data
    python bench/train_bench.py --steps 40 --batch-size 8        # shorter or longer
    python bench/train_bench.py --device cuda --size 0.5b        # GPU: random-init Qwen2-0.5B, seq 2048, bs 8
    python bench/train_bench.py --device cuda --size 7b          # 7B: bs 2, gradient checkpointing on both sides

CPU mode. The data are the embedded finance chat instructions, rendered with the ChatML template and
a byte-level BPE trained here (answer-only labels); the model is the demo's from-scratch tiny Qwen2.
- baseline: `transformers.Trainer` with its defaults (fp32, random batches padded to the longest,
  full logits) over a peft LoRA model;
- lmsmith: `lmsmith.train.loop.train` over the same peft LoRA model (length-grouped batches or
  packing, bf16 autocast where the CPU supports it, target-only chunked linear + cross-entropy).

GPU mode mirrors `shared/notes/gpu_baseline_hf_peft.py`: random-init Qwen2-architecture models in bf16,
random token sequences of `--seq` tokens, LoRA r16 on every linear layer.
- baseline: the plain eager PEFT loop of that script (bf16 weights, `labels=input_ids`, AdamW);
- lmsmith: the same model and batches through `lmsmith.train.loop.train` (chunked linear + CE with no
  full logits tensor, Liger kernels when installed, gradient checkpointing when `--checkpointing`).

Throughput counts real (non-padding) tokens over the wall time of the training call, set-up included
on both sides. Each side runs in its own subprocess so that peak memory (CUDA max allocated, or the
CPU process's peak RSS) belongs to one side only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GPU_SIZES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- shared set-up


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def cpu_examples(args):
    """(tokenizer, examples) from the embedded finance instructions; cached in the work folder."""
    from lmsmith.datasets.finance import generate
    from lmsmith.tokenizer.bpe import train_byte_bpe
    from lmsmith.train.data import chat_example

    dataset = generate(seed=0)
    folder = Path(args.work) / "tokenizer"
    if (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = train_byte_bpe([doc.text for doc in dataset.documents], vocab_size=4000)
        tokenizer.save_pretrained(folder)
    conversations = [item.messages for item in dataset.instructions][: args.steps * args.batch_size]
    return tokenizer, [chat_example(tokenizer, messages) for messages in conversations]


def cpu_model(tokenizer):
    import torch

    from lmsmith.train.config import TinyModelConfig
    from lmsmith.train.model import build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model(TinyModelConfig(), tokenizer)


def gpu_model(size: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, **GPU_SIZES[size])
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return Qwen2ForCausalLM(config).to(torch.bfloat16)


def gpu_batches(args):
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 151936, (args.batch_size, args.seq), generator=generator) for _ in range(args.steps)]


def peak_memory_mb() -> float:
    import torch

    from lmsmith.train.monitor import peak_memory_mb as peak

    return peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------- the two sides


def run_baseline(args) -> dict:
    import torch

    if args.device == "cuda":
        model = gpu_model(args.size)
        if args.checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model = lora(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batches = gpu_batches(args)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for ids in batches:
            ids = ids.cuda()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = args.steps * args.batch_size * args.seq
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mb": peak_memory_mb()}

    from transformers import Trainer, TrainingArguments

    tokenizer, examples = cpu_examples(args)
    model = lora(cpu_model(tokenizer))
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def pad(features):
        width = max(len(f["input_ids"]) for f in features)
        fill = lambda values, value: values + [value] * (width - len(values))  # noqa: E731
        return {
            "input_ids": torch.tensor([fill(f["input_ids"], tokenizer.pad_token_id) for f in features]),
            "labels": torch.tensor([fill(f["labels"], -100) for f in features]),
            "attention_mask": torch.tensor([fill([1] * len(f["input_ids"]), 0) for f in features]),
        }

    training_args = TrainingArguments(
        output_dir=str(Path(args.work) / "hf"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=2e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=pad)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in examples)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mb": peak_memory_mb()}


def run_lmsmith(args) -> dict:
    import torch

    from lmsmith.train.config import EfficiencyConfig, MonitorConfig, OptimConfig, TrainingSchedule
    from lmsmith.train.data import Example, StepPlan, pack_examples
    from lmsmith.train.loop import train

    if args.device == "cuda":
        model = lora(gpu_model(args.size))
        examples = [Example(input_ids=row.tolist(), labels=row.tolist()) for ids in gpu_batches(args) for row in ids]
        attention = "sdpa"
    else:
        tokenizer, examples = cpu_examples(args)
        model = lora(cpu_model(tokenizer))
        attention = "eager"
        if args.packing:
            examples = pack_examples(examples, capacity=max(len(e) for e in examples))
    config = TrainingSchedule(
        batch_size=args.batch_size, epochs=1, precision="auto", attention=attention, log_every=10,
        optim=OptimConfig(lr=2e-3 if args.device == "cpu" else 1e-4), checkpoint_every=None,
        monitor=MonitorConfig(tensorboard=False),
        efficiency=EfficiencyConfig(gradient_checkpointing=args.checkpointing, compile=args.compile),
    )
    pad_id = 0 if args.device == "cuda" else tokenizer.pad_token_id
    plan = StepPlan(examples, pad_id=pad_id, batch_size=args.batch_size, seed=0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train(model, plan, plan.total_steps, config, Path(args.work) / "lmsmith", description="lmsmith")
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in examples)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mb": peak_memory_mb(),
            "precision": summary.precision, "steps": summary.steps, "packing": args.packing}


# ---------------------------------------------------------------- driver


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(GPU_SIZES), default="0.5b", help="GPU model size")
    parser.add_argument("--seq", type=int, default=2048, help="GPU sequence length")
    parser.add_argument("--batch-size", type=int, default=None, help="CPU 8; GPU 8 (7b: 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per side (CPU 60, GPU 12)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (on by default for 7b)")
    parser.add_argument("--packing", action="store_true", help="lmsmith side: pack conversations into rows")
    parser.add_argument("--compile", action="store_true", help="lmsmith side: torch.compile the decoder layers")
    parser.add_argument("--only", choices=["baseline", "lmsmith"], help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default=None, help="also write the result object here")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 2 if (args.device == "cuda" and args.size == "7b") else 8
    if args.steps is None:
        args.steps = 12 if args.device == "cuda" else 60
    if args.device == "cuda" and args.size == "7b":
        args.checkpointing = True
    return args


def side(args, name: str, work: str) -> dict:
    command = [sys.executable, __file__, "--only", name, "--work", work, "--device", args.device, "--size", args.size,
               "--seq", str(args.seq), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    command += [flag for flag, on in (("--checkpointing", args.checkpointing), ("--packing", args.packing),
                                      ("--compile", args.compile)) if on]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.only:
        result = (run_baseline if args.only == "baseline" else run_lmsmith)(args)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        if args.device == "cpu":
            cpu_examples(args)  # build the tokenizer once, outside both timings
        baseline = side(args, "baseline", work)
        ours = side(args, "lmsmith", work)
    result = {
        "device": args.device, "size": args.size if args.device == "cuda" else "tiny (demo TinyModelConfig)",
        "batch_size": args.batch_size, "steps": args.steps, "seq": args.seq if args.device == "cuda" else None,
        "checkpointing": args.checkpointing, "baseline": baseline, "lmsmith": ours,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
    }
    if "error" not in baseline and "error" not in ours:
        result["speedup"] = round(ours["tokens_per_s"] / baseline["tokens_per_s"], 2)
        result["memory_ratio"] = round(ours["peak_mb"] / baseline["peak_mb"], 2)
    print(f"{'side':<10} {'tok/s':>10} {'peak MB':>10}")
    for name, figures in (("baseline", baseline), ("lmsmith", ours)):
        if "error" in figures:
            print(f"{name:<10} failed: {figures['error'][-400:]}")
        else:
            print(f"{name:<10} {figures['tokens_per_s']:>10,.0f} {figures['peak_mb']:>10,.0f}")
    if "speedup" in result:
        print(f"speedup (lmsmith / baseline tok/s): {result['speedup']:.2f}x   "
              f"memory (lmsmith / baseline peak): {result['memory_ratio']:.2f}x")
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
