"""Two CPU processes (gloo) under DDP and under FSDP2 follow the single-process loss curve at the same
global batch. Launched with torchrun; accelerate sets up gloo and wraps the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STEPS = 6

WORKER = textwrap.dedent('''
    """Train a tiny random Qwen2 on random sequences of mixed lengths; write metrics to OUT/<mode>/."""
    import random, sys
    from pathlib import Path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from lmsmith.train import dist
    from lmsmith.train.config import MonitorConfig, OptimConfig, TrainingSchedule
    from lmsmith.train.data import Example, StepPlan
    from lmsmith.train.loop import train

    out, modes, accum = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
    rng = random.Random(0)
    examples = []
    for _ in range(48):
        ids = [rng.randrange(1, 97) for _ in range(rng.randint(6, 30))]
        examples.append(Example(input_ids=ids, labels=ids))
    accelerator = dist.make_accelerator()
    for mode in modes:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=False, attn_implementation="eager"))
        config = TrainingSchedule(batch_size=4, grad_accum_steps=accum, max_steps=%(steps)d, log_every=1,
                                  precision="fp32", optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
                                  sharding="fsdp2" if mode == "fsdp2" else "none",
                                  monitor=MonitorConfig(tensorboard=False))
        plan = StepPlan(examples, pad_id=0, batch_size=4,
                        grad_accum_steps=accum * accelerator.num_processes, max_steps=%(steps)d, seed=0)
        train(model, plan, plan.total_steps, config, out / mode, accelerator=accelerator, description=mode)
        if mode == "fsdp2":  # really sharded: each process holds DTensor shards of the weights
            assert all(type(p).__name__ == "DTensor" for p in model.parameters())
''' % {"steps": STEPS})


def curve(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return [row["loss"] for row in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # One process, two micro-batches per step: the same global batch as two processes with one each.
    single = subprocess.run([sys.executable, str(script), str(out / "single"), "single", "2"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; accelerate then picks gloo on CPU (its own launcher
    # needs mpirun for CPU processes).
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(out / "multi"), "ddp,fsdp2", "1"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(runs):
    single, ddp = curve(runs / "single" / "single"), curve(runs / "multi" / "ddp")
    assert ddp == pytest.approx(single, rel=1e-4, abs=1e-4)
    assert single[-1] < single[0]  # it trained


@pytest.mark.slow
def test_two_process_fsdp2_matches_one_process(runs):
    single, fsdp = curve(runs / "single" / "single"), curve(runs / "multi" / "fsdp2")
    assert fsdp == pytest.approx(single, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_only_the_main_process_writes_logs(runs):
    for mode in ("ddp", "fsdp2"):
        lines = (runs / "multi" / mode / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == STEPS  # a second writer would have doubled the rows
