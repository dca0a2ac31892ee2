"""One engine decode step on CPU, by projection kernel: F.linear (MKL), oneDNN prepacked, the skinny C kernel.

    python bench/engine_step_bench.py                     # the serve benchmark's 108M model, fp32, 1/4/8/16 rows
    python bench/engine_step_bench.py --dtype bfloat16 --rows 8

All runners hold the same random model (the CPU preset of `serve_bench.py`) and run in this process, taking
turns trial by trial, so drift in the machine's speed hits each the same. A step is one `ModelRunner.forward`
over `rows` decode rows at position `--position` (keys read in place from the KV cache). Prints the median
and best milliseconds per step and each kernel's median against F.linear.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_models  # noqa: E402  (the random models the serving benchmark uses)


def build_runners(model, max_slots: int) -> dict[str, object]:
    from lmsmith.serve.engine import projections
    from lmsmith.serve.engine.config import EngineConfig
    from lmsmith.serve.engine.runner import ModelRunner

    config = EngineConfig(max_slots=max_slots).resolve("cpu", model.config.max_position_embeddings)
    plain = EngineConfig(max_slots=max_slots, packed_weights=False).resolve("cpu", model.config.max_position_embeddings)
    runners = {"F.linear": ModelRunner(copy.deepcopy(model), plain)}
    with mock.patch.object(projections, "load_skinny_kernel", lambda: None):
        runners["oneDNN"] = ModelRunner(copy.deepcopy(model), config)
    skinny = ModelRunner(copy.deepcopy(model), config)
    if type(skinny.row_kernel).__name__ == "SkinnyKernel":
        runners["skinny"] = skinny
    return {name: runner for name, runner in runners.items() if name == "F.linear" or runner.row_kernel is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--position", type=int, default=256, help="Tokens already in each sequence's cache.")
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args()

    from lmsmith.serve.engine.runner import StepBatch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="engine_step_bench_") as work:
        folder = Path(work) / "model"
        parameters = bench_models.build_model(folder, bench_models.PRESETS["cpu"])
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    runners = build_runners(model, max(args.rows))
    print(f"{parameters / 1e6:.0f}M parameters, {args.dtype}, {torch.get_num_threads()} threads, "
          f"position {args.position}; kernels: {', '.join(runners)}")
    vocab = model.config.vocab_size
    for rows in args.rows:
        batch = StepBatch(
            input_ids=torch.randint(0, vocab, (rows,)), positions=torch.full((rows,), args.position),
            slots=torch.arange(rows), num_decode=rows, decode_key_len=args.position + 1, decode_slot_start=0,
        )
        times: dict[str, list[float]] = {name: [] for name in runners}
        with torch.inference_mode():
            for runner in runners.values():
                runner.forward(batch)
            for _ in range(args.trials):
                for name, runner in runners.items():
                    started = time.perf_counter()
                    runner.forward(batch)
                    times[name].append((time.perf_counter() - started) * 1000)
        base = statistics.median(times["F.linear"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"rows {rows:3d}  {name:9s} median {median:6.1f} ms  best {min(values):6.1f} ms  "
                  f"{median / base:5.2f}x F.linear's time")


if __name__ == "__main__":
    main()
