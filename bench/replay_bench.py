"""Forgetting and replay (issue 17): how much of the pretraining corpus to mix into SFT.

    python bench/replay_bench.py runs/finance-demo                  # shares 0, 0.1 and 0.25
    python bench/replay_bench.py runs/finance-demo --shares 0 0.2   # others
    python bench/replay_bench.py RUN --recipe my-recipe.yaml        # a run of another recipe

Takes a finished run of a recipe with a pretrain and an sft stage (for example `make demo`'s), copies its
data, tokenizer and pretrain stages, and for each `sft.replay.token_share` trains the sft stage again
with the recipe's own sft settings, then scores it with the eval stage on the run's held-out tasks. Prints,
per share: held-out perplexity of the test corpus (report text: what SFT makes the model forget),
held-out answers ROUGE-L (what SFT teaches), sft val loss and train time. Nothing else runs meanwhile, so
the times compare; the scores are deterministic for the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder (recipe.json, data/, tokenizer/, pretrain/)")
    parser.add_argument("--recipe", type=Path, default=Path(__file__).parents[1] / "recipes" / "finance-demo.yaml",
                        help="the recipe the run was made with (default: the demo's)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.1, 0.25])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    from lmsmith.artifacts import Manifest
    from lmsmith.pipeline import run_pipeline
    from lmsmith.recipe import load_recipe

    source = load_recipe(args.recipe)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for share in args.shares:
            folder = Path(work) / f"share-{share}"
            for stage in ("data", "tokenizer", "pretrain"):
                if (args.run / stage).exists():
                    shutil.copytree(args.run / stage, folder / stage)
            sft = source.sft.model_copy(update={"replay": {"token_share": share} if share else None})
            sft = type(source.sft).model_validate(sft.model_dump())
            evaluation = source.eval.model_copy(update={"tasks": ["held-out"], "variants": []})
            recipe = source.model_copy(update={"sft": sft, "eval": evaluation, "compress": None, "serve": None,
                                               "report": None})
            run_pipeline(recipe, folder, stages=["sft", "eval"])
            trained = Manifest.read(folder / "sft").metrics
            scores = Manifest.read(folder / "eval").metrics
            rows.append({
                "token_share": share,
                "replay_rows": trained.get("replay_rows", 0),
                "held_out_perplexity": round(scores["tuned.held-out-perplexity.perplexity"], 3),
                "base_held_out_perplexity": round(scores["base.held-out-perplexity.perplexity"], 3),
                "held_out_answers_rougeL": round(scores["tuned.held-out-answers.rougeL"], 2),
                "sft_val_loss": trained["val_loss"],
                "sft_train_time_s": trained["train_time_s"],
            })
            print(json.dumps(rows[-1]), flush=True)
    print("| replay token share | corpus blocks | held-out perplexity (base → tuned) | held-out answers ROUGE-L "
          "| sft val loss | sft train s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['token_share']} | {row['replay_rows']} | {row['base_held_out_perplexity']} → "
              f"{row['held_out_perplexity']} | {row['held_out_answers_rougeL']} | {row['sft_val_loss']} | "
              f"{row['sft_train_time_s']} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
