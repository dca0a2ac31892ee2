"""lmsmith's GGUF (written with the `gguf` package, no llama.cpp involved) loaded in real llama.cpp.

    python bench/gguf_llamacpp.py                                   # the demo's tuned model
    python bench/gguf_llamacpp.py --model path/to/hf-folder --quant f16 q8_0 q4_0 --tokens 48

llama.cpp comes from llama-cpp-python, built from its PyPI sdist with the system cmake (bench only, not a
dependency): `pip install llama-cpp-python==0.3.36` (about ten minutes on 2 cores; pip caches the wheel).

For each quantization the model folder is written as GGUF, then llama.cpp
- tokenizes the probe texts itself (from the GGUF's token list, merges and pre-tokenizer name), compared
  id for id with the HF tokenizer;
- computes the logits of each chat prompt, compared with transformers' (max |difference| over the
  largest logit, argmax agreement);
- continues each prompt greedily, compared token for token with transformers' greedy decode (to its end
  of sequence; tokens up to the first difference count as matching);
and the same prompts' greedy decode is timed in llama.cpp and in transformers (tok/s, batch 1).

With `--adapter` (default: the demo run's sft adapter) the adapter is also written as a base GGUF plus a
GGUF LoRA (`lmsmith export --to gguf-lora`'s code) and llama.cpp's logits with `lora_path` are compared
with peft's adapter model (and without it, to show the LoRA is what makes them equal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXTS = [
    "星辰科技2023年营业收入为12.5亿元，同比增长15.2%。",
    "The company reported revenue of 1.2 billion yuan in 2023, up 8.5% year over year.",
    "华信银行2022年总资产为520亿元，资产负债率为61.2%。\n请计算2023年营业收入的同比增长率。",
    "归母净利润：3.1亿元；毛利率42.3%  (2023)  EPS 0.95元",
]
QUESTIONS = [
    "请根据以下财务数据,撰写云图电器2019年的业绩摘要。\n营业收入:5495000000元\n归母净利润:577000000元",
    "云图电器2019年营业收入为5495000000元,2020年为5183000000元。请计算2020年营业收入的同比增长率。",
    "从下面这段文字中抽取公司、指标、金额和日期实体,以JSON格式输出。\n2020年4月19日,云图电器公告称,2019年公司研发投入为254000000元。",
    "What is the gross margin of a company with revenue of 100 and cost of sales of 60?",
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def demo_model() -> Path:
    from lmsmith.artifacts import Manifest

    stage = Path("runs/finance-demo/sft")
    manifest = Manifest.read(stage)
    if manifest is None:
        sys.exit("runs/finance-demo has no finished sft stage: run `make demo` first, or pass --model")
    return manifest.output_path(stage, "model")


def compare_logits(llama, model, prompts) -> tuple[float, float]:
    """(max |logit difference| over the largest logit, mean argmax agreement) of llama.cpp against `model`."""
    import numpy as np
    import torch

    worst, agreement = 0.0, []
    for prompt in prompts:
        llama.reset()
        llama.eval(list(prompt))
        got = np.asarray(llama.scores[: len(prompt)], dtype=np.float32)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([list(prompt)])).logits[0].numpy()
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        agreement.append(float((got.argmax(-1) == want.argmax(-1)).mean()))
    return worst, sum(agreement) / len(agreement)


def hf_greedy(model, prompt_ids: list[int], tokens: int) -> tuple[list[int], float]:
    import torch

    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=tokens, do_sample=False)
    return output[0, len(prompt_ids):].tolist(), time.perf_counter() - started


def llama_greedy(llama, prompt_ids: list[int], tokens: int) -> tuple[list[int], float]:
    llama.reset()
    produced: list[int] = []
    started = time.perf_counter()
    for token in llama.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        produced.append(int(token))
        if len(produced) == tokens:
            break
    return produced, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model folder (default: the demo run's tuned model)")
    parser.add_argument("--quant", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--adapter", type=Path, help="peft adapter folder for the GGUF LoRA check (default: the demo's)")
    args = parser.parse_args()

    import torch
    from llama_cpp import Llama

    from lmsmith.compress.gguf_file import write_gguf
    from lmsmith.train.model import load_causal_lm

    torch.set_num_threads(args.threads)
    folder = args.model or demo_model()
    model, tokenizer = load_causal_lm(folder, source=str(folder))
    model = model.float().eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True, return_dict=False,
                                             add_generation_prompt=True) for q in QUESTIONS]
    hf_runs = [hf_greedy(model, list(p), args.tokens) for p in prompts]
    hf_seconds = sum(seconds for _, seconds in hf_runs)
    print(f"model {folder}; CPU {cpu_model()}; {args.threads} threads")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for quant in args.quant:
            written = write_gguf(folder, Path(scratch) / f"model-{quant}.gguf", quant)
            llama = Llama(model_path=str(written.path), n_ctx=1024, n_threads=args.threads, logits_all=True,
                          verbose=False)
            same_ids = sum(llama.tokenize(text.encode(), add_bos=False, special=True)
                           == tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS)
            worst, mean_agreement = compare_logits(llama, model, prompts)
            # llama.cpp continues as long as asked; transformers stops at end of sequence (its last token).
            greedy = [llama_greedy(llama, list(p), len(hf_ids)) for p, (hf_ids, _) in zip(prompts, hf_runs)]
            matched = [next((i for i, (a, b) in enumerate(zip(ids, hf_ids)) if a != b), len(hf_ids))
                       for (ids, _), (hf_ids, _) in zip(greedy, hf_runs)]
            llama_seconds = sum(seconds for _, seconds in greedy)
            generated = sum(len(hf_ids) for hf_ids, _ in hf_runs)
            rows.append({
                "quant": quant, "bytes": written.bytes, "tokenizer_same_ids": f"{same_ids}/{len(TEXTS)}",
                "relative_logit_diff": round(worst, 5), "argmax_agreement": round(mean_agreement, 4),
                "greedy_tokens_matching_hf": f"{sum(matched)}/{generated}",
                "llama_cpp_tok_s": round(generated / llama_seconds, 1),
                "transformers_tok_s": round(generated / hf_seconds, 1),
            })
            del llama
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
        print(f"  llama.cpp / transformers tok/s at batch 1: {row['llama_cpp_tok_s'] / row['transformers_tok_s']:.2f}x")
    adapter = args.adapter or (Path("runs/finance-demo/sft/adapter") if args.model is None else None)
    if adapter is not None:
        print(json.dumps(lora_check(adapter, args.threads), ensure_ascii=False))


def lora_check(adapter: Path, threads: int) -> dict:
    """llama.cpp with lmsmith's GGUF LoRA on lmsmith's base GGUF against peft's adapter model."""
    from llama_cpp import Llama

    from lmsmith.compress.gguf_file import write_gguf, write_gguf_lora
    from lmsmith.train.export import load_adapted, split_token_rows, vllm_problems

    adapted, tokenizer = load_adapted(adapter, None)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True, return_dict=False,
                                             add_generation_prompt=True) for q in QUESTIONS]
    result: dict = {"adapter": str(adapter)}
    with tempfile.TemporaryDirectory() as scratch:
        base_source, lora_source = None, adapter
        if any(problem.startswith("trainable_token_indices") for problem in vllm_problems(adapter)):
            base_source, lora_source = split_token_rows(adapter, Path(scratch) / "split")
        if base_source is None:
            base_source = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
        base_file = write_gguf(base_source, Path(scratch) / "base-f16.gguf", "f16").path
        lora_file = write_gguf_lora(lora_source, Path(scratch) / "lora-f16.gguf", "f16", base_source).path
        for label, options in (("with_lora", {"lora_path": str(lora_file)}), ("base_only", {})):
            llama = Llama(model_path=str(base_file), n_ctx=1024, n_threads=threads, logits_all=True, verbose=False,
                          **options)
            worst, mean_agreement = compare_logits(llama, adapted.eval(), prompts)
            result[label] = {"relative_logit_diff": round(worst, 5), "argmax_agreement": round(mean_agreement, 4)}
            del llama
    return result


if __name__ == "__main__":
    main()
