"""Peak host memory of loading a checkpoint for training, by method (issue 10).

    python bench/load_memory.py                     # a ~0.5B-parameter Qwen2 saved in fp32, 2 steps of 1 × 128
    python bench/load_memory.py --hidden 768 --layers 12 --steps 8 --batch 4 --seq 256

One checkpoint is written to a temporary folder (bf16, as published checkpoints mostly are); each side then runs in a fresh subprocess (so its peak
RSS is its own) and does what the sft stage does: load through `lmsmith.train.model.load_causal_lm`,
apply the method, and train `--steps` steps of `--batch` × `--seq` tokens through lmsmith's loop.

- fp32 load: the checkpoint as stored, no method (the reference every load used to pay);
- lora-fp32: LoRA r16 on every linear layer over an fp32 base (CPUs without native bf16);
- lora: the same, the base in the run's precision (`precision: auto`: bf16 where the CPU has it);
- qlora, old path: fp32 load, then every linear layer quantized to nf4 in place (what lmsmith did
  before loading in 4 bits);
- qlora: the base quantized to nf4 while loading (`from_pretrained(quantization_config=...)`).

Peaks are sampled every 2 ms during the load and during training, from /proc/self/status: the resident
set, and its anonymous part. The difference is file-backed: pages of the memory-mapped checkpoint, which
the kernel may drop under pressure but which count in the RSS. Libraries are imported before the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDES = ("fp32-load", "lora-fp32", "lora", "qlora-old-path", "qlora")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident() -> tuple[int, int]:
    """(resident set, its anonymous part) in bytes, from /proc/self/status. The rest is file-backed:
    pages of the memory-mapped checkpoint, which the kernel can drop, but which count in the RSS."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


class RssPeak:
    """Highest resident set (and anonymous part) seen by a 2 ms sampler while the block runs: unlike
    ru_maxrss, it belongs to the block alone (importing torch peaks higher than loading a small model)."""

    def __enter__(self):
        import threading

        self.peak = self.peak_anon = 0
        self.running = True
        self.start = resident()[0]
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        import time

        while self.running:
            self._take()
            time.sleep(0.002)

    def _take(self):
        rss, anon = resident()
        self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self._take()
        self.end, self.end_anon = resident()

    @staticmethod
    def mb(value: int) -> int:
        return round(value / 2**20)


def build_checkpoint(folder: Path, hidden: int, layers: int, vocab: int, dtype: str) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=600)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_side(side: str, folder: Path, steps: int, batch: int, seq: int) -> dict:
    import bitsandbytes  # noqa: F401  (every side pays for the libraries before its load is measured)
    import peft  # noqa: F401
    import torch

    from lmsmith.train.config import MonitorConfig, SFTConfig
    from lmsmith.train.data import Example, StepPlan
    from lmsmith.train.loop import train
    from lmsmith.train.method_config import LoraMethod, QLoraMethod
    from lmsmith.train.methods import apply_method, build_optimizer, quantize_linear_layers
    from lmsmith.train.model import load_causal_lm

    method = {"fp32-load": None, "lora": LoraMethod(train_tokens="none"), "lora-fp32": LoraMethod(train_tokens="none"),
              "qlora-old-path": QLoraMethod(train_tokens="none"), "qlora": QLoraMethod(train_tokens="none")}[side]
    precision = "bf16" if side == "lora" and _native_bf16() else "fp32"
    with RssPeak() as load:
        if side == "qlora-old-path":
            model, tokenizer = load_causal_lm(folder)
            quantize_linear_layers(model, method)
        else:
            model, tokenizer = load_causal_lm(folder, method=method, precision=precision)
        if method is None:
            # Training reads every weight: touch them all, or an mmap-backed fp32 load looks nearly free.
            with torch.no_grad():
                sum(float(param.sum()) for param in model.parameters())
    result = {"side": side, "precision": precision, "before_mb": load.mb(load.start),
              "load_peak_mb": load.mb(load.peak), "load_peak_anon_mb": load.mb(load.peak_anon),
              "resident_mb": load.mb(load.end), "resident_anon_mb": load.mb(load.end_anon)}
    if method is not None and steps:
        schedule = SFTConfig(batch_size=batch, max_steps=steps, log_every=steps, checkpoint_every=None,
                             val_generations=0, monitor=MonitorConfig(tensorboard=False))
        torch.manual_seed(0)
        vocab = model.get_input_embeddings().num_embeddings
        examples = [Example(input_ids=ids, labels=ids) for ids in torch.randint(0, vocab, (steps * batch, seq)).tolist()]
        with RssPeak() as training, tempfile.TemporaryDirectory() as stage_dir:
            model, _ = apply_method(model, method)
            plan = StepPlan.for_schedule(examples, tokenizer.pad_token_id, schedule, 1, 0)
            summary = train(model, plan, plan.total_steps, schedule, Path(stage_dir),
                            optimizer=build_optimizer(model, method, schedule.optim), description=side)
        result["train_peak_mb"] = training.mb(training.peak)
        result["train_peak_anon_mb"] = training.mb(training.peak_anon)
        result["tokens_per_s"] = round(summary.tokens_per_s, 1)
    return result


def _native_bf16() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="How the checkpoint is stored (published checkpoints are mostly bf16).")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.folder), args.steps, args.batch, args.seq)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        params = build_checkpoint(folder, args.hidden, args.layers, args.vocab, args.dtype)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"checkpoint: {params / 1e6:.1f}M parameters, {size:.0f} MB on disk ({args.dtype}); CPU: {cpu_model()}, "
              f"native bf16: {_native_bf16()}")
        rows = []
        for side in SIDES:
            out = subprocess.run([sys.executable, __file__, "--side", side, "--folder", str(folder),
                                  "--steps", str(0 if side == "fp32-load" else args.steps),
                                  "--batch", str(args.batch), "--seq", str(args.seq)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        columns = ("load_peak_mb", "load_peak_anon_mb", "resident_mb", "resident_anon_mb", "train_peak_mb",
                   "train_peak_anon_mb", "tokens_per_s")
        print("side            precision  " + "  ".join(f"{c.removesuffix('_mb'):>15}" for c in columns))
        for row in rows:
            print(f"{row['side']:15} {row['precision']:>9}  " + "  ".join(f"{row.get(c, '–'):>15}" for c in columns))
        by_side = {row["side"]: row for row in rows}
        for key in ("load_peak_mb", "load_peak_anon_mb", "train_peak_mb", "train_peak_anon_mb"):
            for other in ("fp32-load", "lora-fp32", "lora", "qlora-old-path"):
                if key in by_side[other]:
                    print(f"{key}: qlora / {other} = {by_side['qlora'][key] / by_side[other][key]:.2f}")


if __name__ == "__main__":
    main()
