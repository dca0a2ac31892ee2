"""What a variant costs and keeps, beyond the eval tasks: argmax agreement with its source model,
perplexity on held-out conversations, and peak memory (measured in a fresh process, so one variant's
allocations cannot hide another's).

`python -m lmsmith.compress.measure FOLDER` is that fresh process: it loads the folder, decodes a batch,
and prints its peak resident memory above what the imports alone took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from lmsmith.errors import UserError


def encode_texts(tokenizer, texts: Sequence[str], max_len: int = 256) -> dict[str, torch.Tensor]:
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                        add_special_tokens=False)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def next_token_argmax(model, batch: dict[str, torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """The model's argmax next token at every position of `batch` (padding included; mask it after)."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, batch["input_ids"].shape[0], batch_size):
            part = {key: value[start: start + batch_size] for key, value in batch.items()}
            outputs.append(model(**part, use_cache=False).logits.argmax(-1))
    return torch.cat(outputs)


def agreement(reference: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor) -> float:
    """Share (0–100) of real-token positions where both models pick the same next token."""
    keep = mask.bool()
    return 100.0 * float((reference == predicted)[keep].float().mean())


def peak_memory_mb(folder: Path, tokenizer_folder: Path, batch: int, new_tokens: int, timeout_s: float = 600) -> float:
    """MB of peak resident memory a fresh process needs to load `folder` and decode `batch` prompts."""
    command = [sys.executable, "-m", "lmsmith.compress.measure", str(folder), str(tokenizer_folder), str(batch),
               str(new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise UserError(f"{folder}: measuring peak memory failed:\n{done.stderr.strip()[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def peak_memory_each(folders: Sequence[Path], tokenizer_folder: Path, batch: int, new_tokens: int) -> list[float]:
    """`peak_memory_mb` of each folder, a fresh process each, as many at once as there are cores: a
    process's own high-water mark does not depend on what runs beside it, and most of each process's
    time is its imports."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(len(folders), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda folder: peak_memory_mb(folder, tokenizer_folder, batch, new_tokens), folders))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _probe(folder: str, tokenizer_folder: str, batch: int, new_tokens: int) -> None:
    from lmsmith.generation import generate_chat, load_causal_lm, load_tokenizer

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(tokenizer_folder)
    with torch.device("meta"):  # import the architecture's code first: its memory is not the model's
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    # Reset the high-water mark, so the imports' own transient peak is not counted (Linux clear_refs).
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    model = load_causal_lm(folder)
    prompts = [[{"role": "user", "content": "请简要分析一家上市公司的年度财务表现。"}]] * batch
    generate_chat(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=batch, stop_at_eos=False)
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - before) / 1024}))


if __name__ == "__main__":
    _probe(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
