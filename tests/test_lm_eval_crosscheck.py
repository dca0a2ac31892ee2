"""The real client: lm-evaluation-harness (`local-completions`, tokenized requests) runs a local-JSONL
multiple-choice task against `lmsmith serve`, and gets the same accuracy, and the same per-option
log-likelihoods, as `lmsmith eval` computes on the local model and through the same server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import train_tiny_model
from lmsmith.eval.endpoint import EndpointModel
from lmsmith.eval.suite import LocalModel, RemoteModel, format_question, score_multiple_choice
from lmsmith.eval.tasks import TaskConfig, read_items
from lmsmith.serve.api import create_app, running_server
from lmsmith.serve.client import LocalClient

pytestmark = pytest.mark.slow  # lm-eval (a dev extra) imports datasets, evaluate and friends: ~10 s

LM_EVAL_TASK = """\
task: lmsmith_crosscheck
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
metric_list:
  - metric: acc
"""
LM_EVAL_GENERATION = """\
task: lmsmith_crosscheck_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["。"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def half_trained_model(tokenizer, task: TaskConfig, items, folder: Path) -> Path:
    """A tiny model taught the gold letter of half the questions: right on those, a guess on the rest."""
    texts = [format_question(task, item.question, item.options) + " " + "ABCD"[item.gold] for item in items[::2]]
    model = train_tiny_model(tokenizer, texts, seed=11, steps=60)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lm_eval_harness_against_lmsmith_serve_matches_lmsmith_eval(tmp_path, tiny_tokenizer, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmsmith.serve.engine import Engine

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    rows = [{"question": f"第{i}题：{subject}的计算公式是什么？", "A": f"毛利/营收{i}", "B": "净利/营收",
             "C": "营收/资产", "D": "负债/资产", "answer": "ABCD"[(i * 7) % 4]}
            for i, subject in enumerate(["毛利率", "净利率", "资产周转率", "资产负债率"] * 5)]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    task = TaskConfig(name="crosscheck", type="multiple_choice", dataset=data)
    items = read_items(task)
    folder = half_trained_model(tiny_tokenizer, task, items, tmp_path / "model")
    (tmp_path / "lm_eval_tasks").mkdir()
    (tmp_path / "lm_eval_tasks" / "crosscheck.yaml").write_text(LM_EVAL_TASK.format(data=data), encoding="utf-8")
    (tmp_path / "lm_eval_tasks" / "crosscheck_gen.yaml").write_text(LM_EVAL_GENERATION.format(data=data),
                                                                   encoding="utf-8")

    from transformers import AutoModelForCausalLM

    local = score_multiple_choice(task, LocalModel(AutoModelForCausalLM.from_pretrained(folder).eval(),
                                                   tiny_tokenizer, 8), items, [])
    assert 40.0 <= local["acc"] < 100.0  # neither chance-proof nor perfect: a comparison that can fail

    engine = Engine.load(folder, device="cpu")
    app = create_app(LocalClient("tiny", engine))
    try:
        with running_server(app) as url:
            through_server = score_multiple_choice(task, RemoteModel(EndpointModel.from_spec(f"{url}/v1#tiny")),
                                                   items, [])
            harness = simple_evaluate(
                model="local-completions",
                model_args=f"model=tiny,base_url={url}/v1/completions,tokenizer={folder},"
                           "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1,batch_size=4",
                tasks=["lmsmith_crosscheck", "lmsmith_crosscheck_gen"],
                task_manager=TaskManager(include_path=str(tmp_path / "lm_eval_tasks")),
                log_samples=True,
            )
            # Generation in lm-eval's default tokenized mode (token-id prompts in batches, stop strings)
            # gives what a plain text request gives.
            import httpx

            for sample in harness["samples"]["lmsmith_crosscheck_gen"][:6]:
                question = rows[sample["doc_id"]]["question"]
                direct = httpx.post(f"{url}/v1/completions", json={
                    "model": "tiny", "prompt": question, "max_tokens": 8, "temperature": 0, "stop": ["。"]},
                    timeout=60).json()["choices"][0]["text"]
                assert sample["resps"][0][0] == direct
    finally:
        engine.close()

    harness_acc = 100.0 * harness["results"]["lmsmith_crosscheck"]["acc,none"]
    assert harness_acc == pytest.approx(local["acc"]) == pytest.approx(through_server["acc"])
    # Option by option, the harness's log-likelihoods are the local model's.
    from lmsmith.eval.likelihood import continuation_logprobs

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    samples = sorted(harness["samples"]["lmsmith_crosscheck"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(items)
    for sample, item in zip(samples, items):
        prompt = format_question(task, item.question, item.options)
        want = continuation_logprobs(model, tiny_tokenizer, [(prompt, f" {letter}") for letter in "ABCD"])
        got = [float(response[0]) for response in sample["filtered_resps"]]
        assert all(math.isfinite(value) for value in got)
        assert got == pytest.approx(want, abs=1e-3)
