"""Training benchmark (issues 4 and 17): the same model, data and schedule trained by
`transformers.Trainer` at its defaults, by TRL's `SFTTrainer` at its fastest settings, and by lmsmith's
loop, alternating over several rounds in one run. Prints tokens/s, peak memory, held-out loss and the
median ratios.

    python bench/train_bench.py                          # CPU: both shapes of the demo, 3 rounds
    python bench/train_bench.py --shape sft --rounds 5   # one shape, more rounds
    python bench/train_bench.py --device cuda --size 0.5b        # GPU: random-init Qwen2-0.5B, seq 2048, bs 8
    python bench/train_bench.py --device cuda --size 7b          # 7B: bs 2, gradient checkpointing on both sides

CPU mode runs the two training shapes of `make demo` on its from-scratch tiny Qwen2 and a byte-level
BPE trained here over the embedded finance data:
- `sft`: LoRA r16 on every linear layer, ChatML conversations with answer-only labels, batch 16;
- `pretrain`: full training on 256-token blocks of the corpus, batch 16.
The sides:
- `trainer`: `transformers.Trainer` with its defaults (fp32, random batches padded to the longest, full
  logits), the reference of earlier figures;
- `trl`: `trl.SFTTrainer`. Before the rounds every combination of its speed options is tried once on a
  quarter of the rows (`--sweep-share`; `--trl` fixes the settings instead): the data layout
  (`group_by_length` sampling, `padding_free`, bfd `packing`), bf16 where the CPU has it, and sdpa or
  eager attention. Gradient checkpointing is off, and the loss is TRL's own chunked fused head
  (`chunked_nll` is an alias of it since TRL 1.x). The fastest goes into the rounds;
- `lmsmith`: `lmsmith.train.loop.train` as the demo's stages run it (`precision: auto`, length-grouped
  batches, target-only chunked linear + cross-entropy, a frozen base in bf16 when training in bf16).
All three use AdamW (betas 0.9/0.95, weight decay 0.01), 5% warmup, cosine decay and clipping at 1.0.
Packed layouts keep the tokens per step of the padded ones (fewer, longer rows).

Throughput counts real (non-padding) tokens over the wall time of the training call, set-up included.
Every run is its own subprocess, so peak RSS belongs to one side only. After training each side's model
is scored on the same held-out batches by one function in fp32 (`lmsmith.train.forward.evaluate`). The
sides run in a rotated order in each round; each ratio is the median over rounds. Each side's own batch
order and layout change what a short run learns, so the loss check is a last run of every side on the
very same batches (lmsmith's order, fed sequentially) with the same AdamW and schedule (lmsmith's, handed
to the HF trainers): there the held-out losses may differ only by precision and kernels. (The train-loss
curves are printed too; Trainer logs the mean of its step losses, lmsmith the token-weighted mean.)

GPU mode mirrors `shared/notes/gpu_baseline_hf_peft.py`: random-init Qwen2-architecture models in bf16,
random token sequences of `--seq` tokens, LoRA r16 on every linear layer; the baseline is the plain eager
PEFT loop of that script, against `lmsmith.train.loop.train` over the same batches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
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
CPU_SIDES = ("trainer", "trl", "lmsmith")
# The demo's schedules: sft and pretrain both train at lr 2e-3 (`lmsmith.train.config`).
LR, WARMUP, MIN_LR_RATIO, BETAS, WEIGHT_DECAY, CLIP = 2e-3, 0.05, 0.1, (0.9, 0.95), 0.01, 1.0
SEQ_LEN, HELD_OUT = 256, 64


# ---------------------------------------------------------------- shared set-up


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (lmsmith's `precision: auto` asks the same)."""
    from lmsmith.train.loop import resolve_precision

    return resolve_precision("auto") == "bf16"


def cpu_data(args) -> Path:
    """Tokenize the embedded finance data once per run, outside every timing: the tokenizer, and for each
    shape its train rows and held-out rows as JSON in the work folder."""
    from lmsmith.datasets.finance import generate
    from lmsmith.tokenizer.bpe import train_byte_bpe
    from lmsmith.train.data import chat_example, pack_documents
    from lmsmith.train.pretrain import document_separator

    work = Path(args.work)
    if (work / "data.json").exists():
        return work
    dataset = generate(seed=0)
    tokenizer = train_byte_bpe([doc.text for doc in dataset.documents], vocab_size=4000)
    tokenizer.save_pretrained(work / "tokenizer")
    conversations = [item.messages for item in dataset.instructions]
    wanted = args.steps * args.batch_size
    if len(conversations) < wanted + HELD_OUT:
        raise SystemExit(f"--steps {args.steps} x --batch-size {args.batch_size} needs {wanted + HELD_OUT} "
                         f"conversations; the embedded data has {len(conversations)}")
    sft = [chat_example(tokenizer, messages) for messages in conversations[: wanted + HELD_OUT]]
    documents = tokenizer([doc.text for doc in dataset.documents], add_special_tokens=False)["input_ids"]
    blocks = pack_documents(documents, document_separator(tokenizer), SEQ_LEN, keep_remainder=False)
    held = max(1, len(blocks) // 10)
    rows = lambda examples: [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]  # noqa: E731
    data = {
        "sft": {"train": rows(sft[:wanted]), "eval": rows(sft[wanted:]), "epochs": 1.0},
        "pretrain": {"train": rows(blocks[:-held]), "eval": rows(blocks[-held:]), "epochs": args.pretrain_epochs},
    }
    (work / "data.json").write_text(json.dumps(data))
    return work


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


# ---------------------------------------------------------------- CPU: one side, one run


def run_cpu_side(args, side: str, variant: dict) -> dict:
    """Train one side on one shape; return its figures (timed part: the training call only)."""
    import torch
    from transformers import AutoTokenizer

    from lmsmith.train.data import Example, eval_batches
    from lmsmith.train.forward import evaluate

    work = Path(args.work)
    data = json.loads((work / "data.json").read_text())[args.shape]
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    train_rows, epochs = data["train"][: max(args.batch_size, round(len(data["train"]) * args.share))], data["epochs"]
    if args.same_order:
        train_rows, epochs = in_lmsmith_order(train_rows, epochs, args.batch_size), 1.0
        variant = {**variant, "layout": "sequential"}
    model = cpu_model(tokenizer)
    bf16 = variant.get("bf16", False)
    if args.shape == "sft":
        if bf16:
            model.to(torch.bfloat16)  # the frozen base, as lmsmith's sft loads it under bf16 (`load_dtype`)
        model = lora(model)
    model.set_attn_implementation(variant.get("attn", "eager"))
    tokens = round(sum(len(row["input_ids"]) for row in train_rows) * epochs)
    out = work / f"{side}-{os.getpid()}"

    if side == "lmsmith":
        from lmsmith.train.config import MonitorConfig, OptimConfig, TrainingSchedule
        from lmsmith.train.data import StepPlan, collate
        from lmsmith.train.loop import train

        examples = [Example(input_ids=row["input_ids"], labels=row["labels"]) for row in train_rows]
        config = TrainingSchedule(
            batch_size=args.batch_size, epochs=epochs, precision="auto", log_every=10, checkpoint_every=None,
            optim=OptimConfig(lr=LR, warmup_ratio=WARMUP, min_lr_ratio=MIN_LR_RATIO, betas=BETAS,
                              weight_decay=WEIGHT_DECAY, grad_clip=CLIP),
            monitor=MonitorConfig(tensorboard=False),
        )
        plan = StepPlan(examples, pad_id=tokenizer.pad_token_id, batch_size=args.batch_size, epochs=epochs, seed=0)
        if args.same_order:  # the rows are in StepPlan's order already: batch them as they come
            plan = [[collate(examples[i : i + args.batch_size], tokenizer.pad_token_id)]
                    for i in range(0, len(examples), args.batch_size)]
        started = time.perf_counter()
        summary = train(model, plan, len(plan), config, out, description="lmsmith")
        seconds = time.perf_counter() - started
        losses = [row["loss"] for row in summary.history]
        steps, settings = summary.steps, {"precision": summary.precision, "attention": config.attention}
    else:
        trainer = hf_trainer(args, side, variant, model, tokenizer, train_rows, epochs, out)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        steps, settings = trainer.state.global_step, variant
    peak = peak_memory_mb()
    held_out = [Example(input_ids=row["input_ids"], labels=row["labels"]) for row in data["eval"]]
    model.float()
    held_loss = evaluate(model, eval_batches(held_out, tokenizer.pad_token_id, 16))
    return {"side": side, "shape": args.shape, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "peak_mb": round(peak, 1), "steps": steps,
            "held_out_loss": round(held_loss, 4), "train_losses": losses, "settings": settings}


def hf_trainer(args, side: str, variant: dict, model, tokenizer, rows, epochs: float, out: Path):
    """`transformers.Trainer` at its defaults, or `trl.SFTTrainer` with `variant`'s speed options."""
    import torch
    from datasets import Dataset

    schedule = dict(
        output_dir=str(out), num_train_epochs=epochs, learning_rate=LR, warmup_steps=WARMUP,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO},
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=10, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    batch_size = args.batch_size
    if side == "trainer":
        from transformers import Trainer, TrainingArguments

        def pad(features):
            width = max(len(f["input_ids"]) for f in features)
            fill = lambda values, value: values + [value] * (width - len(values))  # noqa: E731
            return {
                "input_ids": torch.tensor([fill(f["input_ids"], tokenizer.pad_token_id) for f in features]),
                "labels": torch.tensor([fill(f["labels"], -100) for f in features]),
                "attention_mask": torch.tensor([fill([1] * len(f["input_ids"]), 0) for f in features]),
            }

        sampling = "sequential" if args.same_order else "random"
        arguments = TrainingArguments(per_device_train_batch_size=batch_size, train_sampling_strategy=sampling,
                                      **schedule)
        return Trainer(model=model, args=arguments, train_dataset=rows, data_collator=pad,
                       optimizers=same_optimizer(args, model, rows))

    from trl import SFTConfig, SFTTrainer

    layout = variant["layout"]
    longest = max(len(row["input_ids"]) for row in rows)
    if layout == "packing":
        # Keep the tokens per step of the padded layouts: rows of `longest` tokens, fewer of them.
        mean = sum(len(row["input_ids"]) for row in rows) / len(rows)
        batch_size = max(1, round(args.batch_size * mean / longest))
    arguments = SFTConfig(
        per_device_train_batch_size=batch_size, bf16=variant["bf16"], gradient_checkpointing=False,
        packing=layout == "packing", padding_free=layout == "padding_free",
        max_length=longest if layout == "packing" else None,
        train_sampling_strategy={"group_by_length": "group_by_length", "sequential": "sequential"}.get(layout, "random"),
        **schedule,
    )
    return SFTTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      optimizers=same_optimizer(args, model, rows))


def same_optimizer(args, model, rows: list[dict]) -> tuple:
    """In the loss check, lmsmith's own AdamW and schedule for the HF sides too (Trainer's warmup starts
    at lr 0, lmsmith's one step later), so the held-out losses differ only by precision and kernels;
    otherwise (None, None): each trainer builds its own."""
    if not args.same_order:
        return None, None
    import math

    import torch

    from lmsmith.train.config import OptimConfig
    from lmsmith.train.loop import build_optimizer, lr_factor

    optimizer = build_optimizer(model, OptimConfig(lr=LR, warmup_ratio=WARMUP, min_lr_ratio=MIN_LR_RATIO, betas=BETAS,
                                                   weight_decay=WEIGHT_DECAY, grad_clip=CLIP))
    total = math.ceil(len(rows) / args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, WARMUP, MIN_LR_RATIO))
    return optimizer, schedule


def in_lmsmith_order(rows: list[dict], epochs: float, batch_size: int) -> list[dict]:
    """The rows in the order lmsmith's StepPlan feeds them, every epoch spelled out: fed sequentially in
    batches of `batch_size`, every side then sees the same batches (`--same-order`)."""
    import math
    import random

    from lmsmith.train.data import length_grouped_order

    lengths = [len(row["input_ids"]) for row in rows]
    steps = math.ceil(math.ceil(len(rows) / batch_size) * epochs)
    ordered: list[dict] = []
    for epoch in range(math.ceil(epochs)):
        for batch in length_grouped_order(lengths, batch_size, random.Random(f"0:{epoch}")):
            ordered.extend(rows[i] for i in batch)
    return ordered[: steps * batch_size]


def trl_variants(shape: str, bf16: bool) -> list[dict]:
    """Every combination of TRL's speed options worth trying on this CPU and shape."""
    layouts = ["group_by_length", "padding_free", "packing"] if shape == "sft" else ["blocks"]
    precisions = [False, True] if bf16 else [False]
    return [{"layout": layout, "bf16": precision, "attn": attn}
            for layout, precision, attn in itertools.product(layouts, precisions, ["sdpa", "eager"])]


def side_variant(side: str, bf16: bool) -> dict:
    if side == "lmsmith":
        return {"bf16": bf16}  # what precision: auto picks; the loop sets its own attention
    return {"layout": "padded", "bf16": False, "attn": "sdpa"}  # Trainer's defaults


# ---------------------------------------------------------------- GPU: the eager PEFT loop against lmsmith


def run_gpu_side(args, side: str) -> dict:
    import torch

    batches = gpu_batches(args)
    torch.cuda.reset_peak_memory_stats()
    if side == "baseline":
        model = gpu_model(args.size)
        if args.checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model = lora(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for ids in batches:
            ids = ids.cuda()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from lmsmith.train.config import EfficiencyConfig, MonitorConfig, OptimConfig, TrainingSchedule
        from lmsmith.train.data import Example, StepPlan
        from lmsmith.train.loop import train

        model = lora(gpu_model(args.size))
        examples = [Example(input_ids=row.tolist(), labels=row.tolist()) for ids in batches for row in ids]
        config = TrainingSchedule(
            batch_size=args.batch_size, epochs=1, precision="auto", attention="sdpa", log_every=10,
            optim=OptimConfig(lr=1e-4), checkpoint_every=None, monitor=MonitorConfig(tensorboard=False),
            efficiency=EfficiencyConfig(gradient_checkpointing=args.checkpointing, compile=args.compile),
        )
        plan = StepPlan(examples, pad_id=0, batch_size=args.batch_size, seed=0)
        started = time.perf_counter()
        train(model, plan, plan.total_steps, config, Path(args.work) / "lmsmith", description="lmsmith")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = args.steps * args.batch_size * args.seq
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mb": peak_memory_mb()}


# ---------------------------------------------------------------- driver


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=["sft", "pretrain", "both"], default="both", help="CPU training shape")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: rounds of the three sides, alternating")
    parser.add_argument("--trl", default=None, help='CPU: fix TRL\'s settings as JSON, e.g. \'{"layout": '
                        '"padding_free", "bf16": true, "attn": "eager"}\', instead of trying every combination')
    parser.add_argument("--pretrain-epochs", type=float, default=2.0, help="CPU pretrain shape: passes over the corpus")
    parser.add_argument("--size", choices=sorted(GPU_SIZES), default="0.5b", help="GPU model size")
    parser.add_argument("--seq", type=int, default=2048, help="GPU sequence length")
    parser.add_argument("--batch-size", type=int, default=None, help="CPU 16 (the demo's); GPU 8 (7b: 2)")
    parser.add_argument("--steps", type=int, default=None, help="CPU sft: optimiser steps (40); GPU: steps (12)")
    parser.add_argument("--checkpointing", action="store_true", help="GPU: gradient checkpointing (on for 7b)")
    parser.add_argument("--compile", action="store_true", help="GPU lmsmith side: torch.compile the decoder layers")
    parser.add_argument("--sweep-share", type=float, default=0.25,
                        help="CPU: share of the training rows each TRL sweep run trains on (it ranks, not measures)")
    parser.add_argument("--share", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--same-order", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default=None, help="also write the result object here")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 16 if args.device == "cpu" else 2 if args.size == "7b" else 8
    if args.steps is None:
        args.steps = 40 if args.device == "cpu" else 12
    if args.device == "cuda" and args.size == "7b":
        args.checkpointing = True
    return args


def subprocess_run(args, side: str, variant: dict | None = None, shape: str | None = None,
                   share: float = 1.0, same_order: bool = False) -> dict:
    command = [sys.executable, __file__, "--only", side, "--work", args.work, "--device", args.device,
               "--size", args.size, "--seq", str(args.seq), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--pretrain-epochs", str(args.pretrain_epochs),
               "--shape", shape or "sft", "--variant", json.dumps(variant or {}), "--share", str(share)]
    command += [flag for flag, on in (("--checkpointing", args.checkpointing), ("--compile", args.compile),
                                      ("--same-order", same_order)) if on]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"side": side, "settings": variant, "error": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    model, flags = platform.processor() or platform.machine(), []
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = [f for f in line.split()[1:] if f.startswith(("avx", "amx", "fma"))]
    except FileNotFoundError:
        pass
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(Path(__file__).parent), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "flags": flags, "cores": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2),
            "commit": commit + ("+dirty" if dirty else "")}


def describe(figures: dict) -> str:
    if "error" in figures:
        return f"failed: {figures['error'].strip().splitlines()[-1][:200]}"
    return (f"{figures['tokens_per_s']:>8,.0f} tok/s  peak {figures['peak_mb']:>6,.0f} MB  "
            f"held-out loss {figures['held_out_loss']:.4f}  ({figures['seconds']:.1f} s, {figures['steps']} steps)")


def cpu_shape(args, shape: str, bf16: bool) -> dict:
    if args.trl:
        trl_settings, sweep = json.loads(args.trl), []
    else:
        print(f"[{shape}] TRL sweep: every combination of its speed options, once each")
        sweep = []
        for variant in trl_variants(shape, bf16):
            figures = subprocess_run(args, "trl", variant, shape, share=args.sweep_share)
            sweep.append(figures)
            print(f"  {json.dumps(variant):<62} {describe(figures)}", flush=True)
        done = [f for f in sweep if "error" not in f]
        if not done:
            raise SystemExit(f"[{shape}] every TRL configuration failed; the last: {sweep[-1]['error']}")
        trl_settings = max(done, key=lambda f: f["tokens_per_s"])["settings"]
        print(f"  fastest TRL: {json.dumps(trl_settings)}")
    settings = {"trainer": side_variant("trainer", bf16), "trl": trl_settings, "lmsmith": side_variant("lmsmith", bf16)}
    rounds = []
    for number in range(args.rounds):
        order = CPU_SIDES[number % 3 :] + CPU_SIDES[: number % 3]
        results = {}
        for side in order:
            results[side] = subprocess_run(args, side, settings[side], shape)
            print(f"[{shape}] round {number + 1} {side:<8} {describe(results[side])}", flush=True)
        rounds.append(results)
    # The loss check: every side on the very same batches (lmsmith's order, fed sequentially), each at its
    # own precision; held-out losses then differ by precision and kernels only.
    same_order = {}
    for side in CPU_SIDES:
        same_order[side] = subprocess_run(args, side, settings[side], shape, same_order=True)
        print(f"[{shape}] same batches  {side:<8} {describe(same_order[side])}  train loss every 10 steps "
              f"{[round(loss, 3) for loss in same_order[side].get('train_losses', [])]}", flush=True)
    ok = [r for r in rounds if all("error" not in r[side] for side in CPU_SIDES)]
    summary = {"shape": shape, "settings": settings, "sweep": sweep, "rounds": rounds, "same_order": same_order}
    if ok:
        median = lambda values: round(statistics.median(values), 3)  # noqa: E731
        for side in CPU_SIDES:
            summary[side] = {key: median([r[side][key] for r in ok]) for key in ("tokens_per_s", "peak_mb",
                                                                                   "held_out_loss")}
        for other in ("trl", "trainer"):
            summary[f"speed_vs_{other}"] = median([r["lmsmith"]["tokens_per_s"] / r[other]["tokens_per_s"] for r in ok])
            summary[f"memory_vs_{other}"] = median([r["lmsmith"]["peak_mb"] / r[other]["peak_mb"] for r in ok])
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.only:
        variant = json.loads(args.variant)
        if args.device == "cuda":
            result = run_gpu_side(args, args.only)
        else:
            result = run_cpu_side(args, args.only, variant)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        if args.device == "cuda":
            sides = {side: subprocess_run(args, side) for side in ("baseline", "lmsmith")}
            result = {"device": "cuda", "size": args.size, "batch_size": args.batch_size, "steps": args.steps,
                      "seq": args.seq, "checkpointing": args.checkpointing, **sides}
            if all("error" not in figures for figures in sides.values()):
                result["speedup"] = round(sides["lmsmith"]["tokens_per_s"] / sides["baseline"]["tokens_per_s"], 2)
                result["memory_ratio"] = round(sides["lmsmith"]["peak_mb"] / sides["baseline"]["peak_mb"], 2)
            for side, figures in sides.items():
                print(f"{side:<10} {figures.get('tokens_per_s', float('nan')):>10,.0f} tok/s "
                      f"{figures.get('peak_mb', float('nan')):>10,.0f} MB {figures.get('error', '')[-300:]}")
        else:
            cpu_data(args)
            bf16 = cpu_bf16()
            result = {"device": "cpu", "machine": machine(), "bf16": bf16, "batch_size": args.batch_size,
                      "sft_steps": args.steps, "pretrain_epochs": args.pretrain_epochs, "rounds": args.rounds,
                      "shapes": [cpu_shape(args, shape, bf16)
                                 for shape in (["sft", "pretrain"] if args.shape == "both" else [args.shape])]}
            print(f"\n{result['machine']}")
            print("| shape | side | settings | tok/s (median) | peak MB | held-out loss |")
            print("|---|---|---|---|---|---|")
            for shape in result["shapes"]:
                for side in CPU_SIDES:
                    if side in shape:
                        print(f"| {shape['shape']} | {side} | {json.dumps(shape['settings'][side])} | "
                              f"{shape[side]['tokens_per_s']:,.0f} | {shape[side]['peak_mb']:,.0f} | "
                              f"{shape[side]['held_out_loss']:.4f} |")
                losses = {side: shape["same_order"][side].get("held_out_loss") for side in CPU_SIDES}
                print(f"[{shape['shape']}] held-out loss after the same batches: "
                      + ", ".join(f"{side} {loss}" for side, loss in losses.items()))
                if "speed_vs_trl" in shape:
                    print(f"[{shape['shape']}] lmsmith / TRL: {shape['speed_vs_trl']:.2f}x tok/s, "
                          f"{shape['memory_vs_trl']:.2f}x peak RSS; lmsmith / Trainer: "
                          f"{shape['speed_vs_trainer']:.2f}x tok/s (medians over rounds)")
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
