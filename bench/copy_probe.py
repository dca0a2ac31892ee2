"""Can a run's tuned model copy a figure out of its prompt? The finance suite's `finance-yoy` and
`finance-kbqa` need that before any arithmetic: the answer restates the prompt's (or the retrieved
source's) amounts. This probe scores the run's held-out yoy and kbqa conversations (data/sft/val and
test) two ways:

- teacher-forced: the share of each amount's two leading characters (the digits no template gives
  away, unlike the trailing zeros of `5495000000`; years, citations and computed percentages are not
  amounts) that are the model's argmax given the gold prefix: a model that copies gets nearly all of
  them, one that guesses about a tenth;
- generated: the share of greedy answers whose amounts (not percentages) equal the gold answer's.

    python bench/copy_probe.py runs/finance-demo [--model sft/merged]

It reads the model with transformers and scores numbers with `lmsmith.eval.metrics.numbers_in`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from lmsmith.eval.metrics import numbers_in
from lmsmith.generation import generate_chat, load_causal_lm, load_tokenizer


def held_out(run: Path, task: str) -> list[dict]:
    rows = []
    for split in ("val", "test"):
        with open(run / "data" / "sft" / f"{split}.jsonl", encoding="utf-8") as handle:
            rows += [row for row in map(json.loads, handle) if row.get("task") == task]
    return rows


# An amount in the answer: what the model must copy (years, citations and computed percentages are not).
_AMOUNT = re.compile(r"\d+(?:\.\d+)?(?=亿元|万元|元)")


def leading_digit_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Teacher-forced argmax accuracy over the first two characters of each amount in the answers."""
    right = total = 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        answer = row["messages"][-1]["content"]
        encoded = tokenizer(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        leading = {len(prompt) + match.start() + k for match in _AMOUNT.finditer(answer) for k in (0, 1)
                   if match.end() - match.start() > k}
        with torch.inference_mode():
            predicted = model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
        for at in range(1, len(ids)):
            if offsets[at][0] in leading:
                total += 1
                right += predicted[at - 1] == ids[at]
    return 100.0 * right / max(total, 1)


def amounts(text: str) -> list[float]:
    return [value for value, is_percent in numbers_in(text) if not is_percent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--model", default="sft/merged", help="model folder inside the run")
    args = parser.parse_args()
    model, tokenizer = load_causal_lm(args.run / args.model), load_tokenizer(args.run / args.model)
    for task, new_tokens in (("yoy", 96), ("kbqa", 48)):
        rows = held_out(args.run, task)
        if not rows:
            print(f"{task}: no held-out conversations")
            continue
        answers = generate_chat(model, tokenizer, [row["messages"][:-1] for row in rows], max_new_tokens=new_tokens,
                                batch_size=64).texts
        copied = sum(amounts(answer) == amounts(row["messages"][-1]["content"]) for row, answer in zip(rows, answers))
        print(f"{task}: {len(rows)} conversations; leading digits right when teacher-forced "
              f"{leading_digit_accuracy(model, tokenizer, rows):.1f}%; generated amounts all right {100.0 * copied / len(rows):.1f}%")


if __name__ == "__main__":
    main()
