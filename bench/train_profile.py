"""Where the training time goes on each CPU kind (issue 17): the demo's pretraining shape under
lmsmith's loop, alone or beside a second training process, on this CPU's full instruction set or limited
to AVX2 (the AMD EPYC machines without AVX-512 or native bf16), with OpenMP's default spin-waiting or
passive waiting.

    python bench/train_profile.py                # every scenario, one subprocess each
    python bench/train_profile.py --profile      # also the torch profiler's top operators per ISA
    python bench/train_profile.py --isas avx2 --waits default spin10k   # some scenarios only

Limiting the instruction set uses torch's own switches, `ATEN_CPU_CAPABILITY=avx2` and
`ONEDNN_MAX_CPU_ISA=AVX2`: the kernels an AVX2-only CPU gets, and `precision: auto` then falls back to
fp32 as it does there. It is not that chip (clock, caches and memory differ), so its figures say which
kernels and settings matter, not what the other machine measures.

"Contended" starts two identical training processes at once, each with the loop's default of one
thread per core: the situation of a demo run beside a test run on a 2-core machine. Each figure is
tokens/s over the training call (one process's, when two run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SEQ_LEN, BATCH = 256, 16
WAITS = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"},
         "spin100k": {"GOMP_SPINCOUNT": "100000"}}


def blocks(work: Path):
    """The demo's pretraining blocks of the embedded corpus, tokenized once per run into the work folder."""
    from lmsmith.train.data import Example

    cached = work / "blocks.json"
    if not cached.exists():
        from lmsmith.datasets.finance import generate
        from lmsmith.tokenizer.bpe import train_byte_bpe
        from lmsmith.train.data import pack_documents
        from lmsmith.train.pretrain import document_separator

        texts = [doc.text for doc in generate(seed=0).documents]
        tokenizer = train_byte_bpe(texts, vocab_size=4000)
        tokenizer.save_pretrained(work / "tokenizer")
        documents = tokenizer(texts, add_special_tokens=False)["input_ids"]
        packed = pack_documents(documents, document_separator(tokenizer), SEQ_LEN, keep_remainder=False)
        cached.write_text(json.dumps([example.input_ids for example in packed]))
    return [Example(input_ids=ids, labels=list(ids)) for ids in json.loads(cached.read_text())]


def train_once(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from lmsmith.train.config import MonitorConfig, TinyModelConfig, TrainingSchedule
    from lmsmith.train.data import StepPlan
    from lmsmith.train.loop import train
    from lmsmith.train.model import build_tiny_model

    work = Path(args.work)
    examples = blocks(work)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(), tokenizer)
    config = TrainingSchedule(batch_size=BATCH, max_steps=args.steps, epochs=100, log_every=10 ** 6,
                              checkpoint_every=None, monitor=MonitorConfig(tensorboard=False))
    plan = StepPlan(examples, pad_id=tokenizer.pad_token_id, batch_size=BATCH, epochs=100, max_steps=args.steps)
    started = time.perf_counter()
    summary = train(model, plan, plan.total_steps, config, work / f"run-{os.getpid()}", description="profile")
    seconds = time.perf_counter() - started
    result = {"tokens_per_s": round(args.steps * BATCH * SEQ_LEN / seconds, 1), "precision": summary.precision,
              "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}
    if args.profile:
        result["top_ops"] = profile_steps(model, plan, config)
    return result


def profile_steps(model, plan, config, steps: int = 4) -> list[dict]:
    """The torch profiler over a few training steps of the same loop: operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from lmsmith.train.loop import TrainRecipe

    recipe = TrainRecipe(model, config.model_copy(update={"max_steps": steps}), Path(tempfile.mkdtemp()))
    recipe.setup(steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        try:
            recipe.train(plan)
        finally:
            recipe.cleanup(failed=False)
    total = sum(event.self_cpu_time_total for event in prof.key_averages()) or 1
    ranked = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)[:12]
    return [{"op": event.key, "share": round(event.self_cpu_time_total / total, 3),
             "ms_per_step": round(event.self_cpu_time_total / 1000 / steps, 1)} for event in ranked]


def scenario(args, work: str, env: dict, copies: int) -> list[dict]:
    command = [sys.executable, __file__, "--only", "--work", work, "--steps", str(args.steps)]
    if args.profile and copies == 1:
        command.append("--profile")
    processes = [subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(copies)]
    results = []
    for process in processes:
        out, err = process.communicate()
        results.append(json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else {"error": err[-800:]})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per run (batch 16 x 256 tokens)")
    parser.add_argument("--profile", action="store_true", help="torch profiler's top operators (alone, per ISA)")
    parser.add_argument("--isas", nargs="+", choices=["native", "avx2"], default=["native", "avx2"])
    parser.add_argument("--waits", nargs="+", choices=sorted(WAITS), default=["default", "PASSIVE"],
                        help="OpenMP waiting: libgomp's default spin, passive, or a shorter spin count")
    parser.add_argument("--only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(train_once(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        blocks(Path(work))
        for isa, isa_env in (("native", {}), ("avx2", AVX2_ONLY)):
            if isa not in args.isas:
                continue
            for wait in args.waits:
                wait_env = WAITS[wait]
                for copies in (1, 2):
                    results = scenario(args, work, {**isa_env, **wait_env}, copies)
                    row = {"isa": isa, "omp_wait": wait, "processes": copies, "results": results}
                    rows.append(row)
                    speeds = [r.get("tokens_per_s") for r in results]
                    first = results[0]
                    print(f"{isa:<7} wait={wait:<8} processes={copies}  tok/s per process {speeds}  "
                          f"({first.get('precision')}, {first.get('capability')}, {first.get('threads')} threads)"
                          f"{'  ' + first['error'][-300:] if 'error' in first else ''}", flush=True)
                    for op in first.get("top_ops", []):
                        print(f"    {op['share']:>6.1%}  {op['ms_per_step']:>8.1f} ms/step  {op['op']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
