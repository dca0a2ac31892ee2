"""`lmsmith eval`: task files, the public layouts they read, multiple choice (log-likelihood, generation,
circular, few-shot), generation tasks, and the results table, on tiny local models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, train_tiny_model
from lmsmith.errors import UserError
from lmsmith.eval import suite
from lmsmith.eval.suite import LocalModel, rotations, score_multiple_choice
from lmsmith.eval.tasks import ChoiceQuestion, TaskConfig, load_task, read_items


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def ceval_csv(tmp_path) -> Path:
    # C-Eval's layout, lower-case answers and a BOM as Excel writes it.
    rows = ["id,Question,A,B,C,D,Answer,explanation"]
    for index in range(12):
        rows.append(f"{index},第{index}题：毛利率等于什么？,毛利/营收{index},净利/营收,营收/资产,负债/资产,{'abcd'[index % 4]},")
    return write(tmp_path / "ceval.csv", "\ufeff" + "\n".join(rows) + "\n")


def test_task_files_are_strict_and_name_the_file(tmp_path, ceval_csv):
    task = write(tmp_path / "t.yaml", f"name: ratios\ntype: multiple_choice\ndataset: {ceval_csv.name}\n")
    assert load_task(task).dataset == ceval_csv.resolve()
    write(task, f"name: r\ntype: multiple_choice\ndataset: {ceval_csv.name}\nshots: 2\n")
    with pytest.raises(UserError, match=r"t\.yaml: shots: unknown field"):
        load_task(task)
    write(task, f"name: r\ntype: generate\ndataset: {ceval_csv.name}\ncircular: true\n")
    with pytest.raises(UserError, match="circular, few_shot and target_delimiter apply to multiple_choice tasks only"):
        load_task(task)


def test_layouts_are_read_and_bad_rows_named(tmp_path, ceval_csv):
    items = read_items(TaskConfig(name="c", type="multiple_choice", dataset=ceval_csv))
    assert len(items) == 12 and items[1].gold == 1 and items[1].options[0] == "毛利/营收1"
    mc = write(tmp_path / "mc.jsonl", '{"question": "q", "choices": ["x", "y", "z"], "answer": 2}\n'
                                      '{"question": "q2", "A": "1", "B": "2", "answer": "b"}\n')
    parsed = read_items(TaskConfig(name="m", type="multiple_choice", dataset=mc))
    assert [(item.options, item.gold) for item in parsed] == [(("x", "y", "z"), 2), (("1", "2"), 1)]
    write(mc, '{"question": "q", "choices": ["x", "y"], "answer": "C"}\n')
    with pytest.raises(UserError, match=r"mc\.jsonl:1: answer 'C' is neither a letter nor an index"):
        read_items(TaskConfig(name="m", type="multiple_choice", dataset=mc))
    alpaca = write(tmp_path / "a.jsonl", '{"instruction": "算增长率", "input": "12→15", "output": "25%"}\n')
    sharegpt = write(tmp_path / "s.jsonl", '{"conversations": [{"from": "human", "value": "hi"}, '
                                           '{"from": "gpt", "value": "你好"}]}\n')
    assert read_items(TaskConfig(name="a", type="generate", dataset=alpaca))[0].messages[0]["content"] == "算增长率\n12→15"
    assert read_items(TaskConfig(name="s", type="generate", dataset=sharegpt))[0].reference == "你好"
    with pytest.raises(UserError, match="does not fit a generate task"):
        read_items(TaskConfig(name="x", type="generate", dataset=ceval_csv))


def test_rotations_move_the_gold_with_its_option():
    item = ChoiceQuestion("1", "q", ("w", "x", "y", "z"), gold=1)
    turns = rotations(item, circular=True)
    assert [options[gold] for options, gold in turns] == ["x"] * 4
    assert rotations(item, circular=False) == [(item.options, 1)]


def trained_on_letters(tokenizer, task: TaskConfig, items) -> torch.nn.Module:
    """A tiny model taught each question's gold letter in the order the options were given."""
    texts = [suite.format_question(task, item.question, item.options) + " " + "ABCD"[item.gold] for item in items]
    return train_tiny_model(tokenizer, texts, seed=5, steps=80)


def test_loglikelihood_accuracy_and_circular_evaluation(tiny_tokenizer, ceval_csv):
    task = TaskConfig(name="c", type="multiple_choice", dataset=ceval_csv)
    items = read_items(task)
    model = trained_on_letters(tiny_tokenizer, task, items)
    plain = score_multiple_choice(task, LocalModel(model, tiny_tokenizer, 8), items, [])
    assert plain["acc"] >= 90.0 and plain["rotations"] == 1
    # The model learned letters, not answers: asked every rotation, it can no longer be right on all.
    circular = score_multiple_choice(task.model_copy(update={"circular": True}), LocalModel(model, tiny_tokenizer, 8),
                                     items, [])
    assert circular["rotations"] == 4 and circular["acc"] <= 25.0
    untrained = score_multiple_choice(task, LocalModel(build_tiny_model(tiny_tokenizer).eval(), tiny_tokenizer, 8),
                                      items, [])
    assert untrained["acc"] < plain["acc"]


def test_generation_scoring_reads_the_stated_letter(tiny_tokenizer, ceval_csv, monkeypatch):
    from lmsmith import generation

    task = TaskConfig(name="c", type="multiple_choice", dataset=ceval_csv, scoring=["generate"], limit=4)
    items = read_items(task)[:4]
    canned = ["答案是A", "CPA考试里…答案：B", "无法确定", "选C。"]  # golds A B C D: right, right, failure, wrong
    monkeypatch.setattr(generation, "generate_chat", lambda model, tok, prompts, **kw: generation.Generation(
        texts=canned[: len(prompts)], new_tokens=[1] * len(prompts), wall_s=0.1))
    scores = score_multiple_choice(task, LocalModel(None, tiny_tokenizer, 4), items, [])
    assert scores["gen_acc"] == pytest.approx(50.0) and scores["extraction_failure_rate"] == pytest.approx(25.0)
    assert scores["letter_distribution"] == {"A": 1, "B": 1, "C": 1}


def test_few_shot_examples_come_first_and_are_not_scored(tiny_tokenizer, ceval_csv):
    task = TaskConfig(name="c", type="multiple_choice", dataset=ceval_csv, few_shot=2)
    shots, scored = suite.split_shots(task, read_items(task))
    assert [s.id for s in shots] == ["0", "1"] and scored[0].id == "2"
    block = suite._shot_block(task, shots)
    assert block.count("答案：") == 2 and "答案：A\n\n" in block and "答案：B\n\n" in block
    with pytest.raises(UserError, match="few_shot 20, but only 12"):
        suite.split_shots(task.model_copy(update={"few_shot": 20}), read_items(task))


def test_lmsmith_eval_writes_results_and_table(tmp_path, tiny_model_dir, ceval_csv, capsys):
    from lmsmith.artifacts import Manifest, describe_outputs
    from lmsmith.cli import main

    mc = write(tmp_path / "mc.yaml", f"name: ratios\ntype: multiple_choice\ndataset: {ceval_csv}\nlimit: 4\n")
    gen = write(tmp_path / "gen.jsonl", '{"instruction": "营业收入是多少？", "output": "12.5亿元"}\n'
                                        '{"instruction": "同比增长？", "output": "增长15.2%"}\n')
    gen_task = write(tmp_path / "gen.yaml", f"name: answers\ntype: generate\ndataset: {gen}\nmax_new_tokens: 4\n")
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "merged").symlink_to(tiny_model_dir, target_is_directory=True)
    Manifest(stage="sft", config={}, config_hash="x", inputs={},
             outputs=describe_outputs(run / "sft", {"model": "merged"})).write(run / "sft")
    out = tmp_path / "out"
    assert main(["eval", "--task", str(mc), "--task", str(gen_task), "--model", str(tiny_model_dir),
                 "--model", f"run:{run}#sft", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"ratios", "answers"}
    assert results["tasks"]["ratios"]["items"] == 4
    assert results["tasks"]["ratios"]["scores"][str(tiny_model_dir)]["items"] == 4
    assert set(results["tasks"]["answers"]["scores"][f"run:{run}#sft"]) >= {
        "bleu4", "bleu4_stderr", "rougeL", "chrf", "exact_match", "edit_rate", "edit_rate_stderr"}
    facts = results["models"][str(tiny_model_dir)]
    from transformers import AutoModelForCausalLM

    assert facts["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert facts["size_bytes"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert facts["speed"]["tok_s_b1"] > 0 and facts["speed"]["latency_p99_ms"] >= facts["speed"]["latency_p50_ms"]
    table = (out / "table.md").read_text()
    assert "| model | ratios acc | answers rougeL | answers chrf | answers edit_rate | size MB | params |" in table
    assert " ± " in table and "![headline scores" in table
    assert (out / "plots" / "scores.png").stat().st_size > 1000
    assert "data:image/png;base64," in (out / "report.html").read_text()
    capsys.readouterr()
    assert main(["eval", "--task", str(mc), "--model", f"run:{run}#pretrain"]) == 2
    assert "holds no finished stage" in capsys.readouterr().err


def canned_answers(monkeypatch, texts):
    from lmsmith import generation

    monkeypatch.setattr(generation, "generate_chat", lambda model, tok, prompts, **kw: generation.Generation(
        texts=list(texts[: len(prompts)]), new_tokens=[1] * len(prompts), wall_s=0.1))


def test_numeric_tasks_take_the_truth_from_the_record_or_the_reference(tmp_path, tiny_tokenizer, monkeypatch):
    from lmsmith.eval.suite import LocalModel, evaluate_task

    data = write(tmp_path / "yoy.jsonl", "\n".join([
        '{"messages": [{"role": "user", "content": "同比增长？"}, {"role": "assistant", "content": "增长25.0%"}], '
        '"answer": {"value": 25.0}}',
        '{"instruction": "营收是多少？", "output": "12.5亿元"}',
    ]) + "\n")
    with pytest.raises(UserError, match=r"yoy\.jsonl:1: alpaca records need"):  # one layout per file
        evaluate_task(TaskConfig(name="n", type="numeric", dataset=data, format="alpaca"),
                      LocalModel(None, tiny_tokenizer))
    records = write(tmp_path / "sft.jsonl", '{"messages": [{"role": "user", "content": "同比？"}, {"role": '
                    '"assistant", "content": "增长约25%"}], "answer": {"value": 25.04}}\n')
    canned_answers(monkeypatch, ["增长25.04%"])  # the record's value is the truth, not the rounded text
    assert evaluate_task(TaskConfig(name="n", type="numeric", dataset=records, rel_tol=0.0),
                         LocalModel(None, tiny_tokenizer))["numeric_acc"] == 100.0
    write(data, '{"instruction": "同比增长？", "output": "增长25.0%"}\n{"instruction": "营收是多少？", "output": "12.5亿元"}\n'
                '{"instruction": "净利润？", "output": "3.1亿元"}\n')
    canned_answers(monkeypatch, ["同比增长了25.1%", "营业收入为1,250,000,000元", "不知道"])
    scores = evaluate_task(TaskConfig(name="n", type="numeric", dataset=data, rel_tol=0.01), LocalModel(None, tiny_tokenizer))
    assert scores["numeric_acc"] == pytest.approx(200 / 3) and scores["no_number_rate"] == pytest.approx(100 / 3)


def test_classification_by_generation_and_by_likelihood(tmp_path, tiny_tokenizer, monkeypatch):
    from lmsmith.eval.suite import LocalModel, evaluate_task

    data = write(tmp_path / "news.csv", "text,label\n业绩大增,利好\n遭遇处罚,利空\n召开年会,中性\n回购股份,利好\n")
    task = TaskConfig(name="news", type="classification", dataset=data, scoring=["loglikelihood", "generate"],
                      labels=["利好", "利空", "中性"])
    canned_answers(monkeypatch, ["这是利好消息", "利好？不，是利空", "无法判断", "利空"])
    scores = evaluate_task(task, LocalModel(build_tiny_model(tiny_tokenizer).eval(), tiny_tokenizer))
    assert scores["gen_acc"] == pytest.approx(50.0) and scores["extraction_failure_rate"] == pytest.approx(25.0)
    assert scores["gen_confusion"]["利好"] == {"利好": 1, "利空": 1, "中性": 0, "<other>": 0}
    assert sum(sum(row.values()) for row in scores["confusion"].values()) == 4  # by likelihood: every item placed
    with pytest.raises(UserError, match=r"labels \['中性'\] are not in the task's labels"):
        evaluate_task(task.model_copy(update={"labels": ["利好", "利空"]}), LocalModel(None, tiny_tokenizer))


def test_perplexity_task_on_text_documents(tmp_path, tiny_tokenizer):
    from lmsmith.eval.suite import LocalModel, evaluate_task

    data = write(tmp_path / "docs.txt", "星辰科技2023年营业收入为12.5亿元。\n\n华信银行2022年总资产为520亿元。\n")
    scores = evaluate_task(TaskConfig(name="ppl", type="perplexity", dataset=data),
                           LocalModel(build_tiny_model(tiny_tokenizer).eval(), tiny_tokenizer))
    assert scores["items"] == 2 and 1.0 < scores["perplexity"] < 1e6 and scores["tokens"] > 10


class StubServer:
    """An OpenAI-compatible stub in a thread: prompt logprobs from a real tiny model (or dropped, or
    constant, as some servers send them), and a canned chat answer."""

    def __init__(self, model, tokenizer, logprobs: str = "real", answer: str = "答案是A"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"data": [{"id": "stub-model"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(request)
                if self.path.endswith("/chat/completions"):
                    choice = {"message": {"role": "assistant", "content": answer}}
                    if request.get("logprobs") and stub.mode == "chat_only":
                        choice["logprobs"] = {"content": [{"token": " ", "logprob": -9.0,
                                                           "top_logprobs": stub.letter_tops(request)}]}
                    self._send({"choices": [choice]})
                else:
                    self._send({"choices": [{"text": request["prompt"], "logprobs": stub.logprobs(request["prompt"])}]})

        self.model, self.tokenizer, self.mode, self.requests = model, tokenizer, logprobs, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def letter_tops(self, request):
        """The chat fallback's top tokens: each letter scored as the local model scores " A" after the prompt."""
        from lmsmith.eval.likelihood import continuation_logprobs

        prompt = request["messages"][0]["content"]
        values = continuation_logprobs(self.model, self.tokenizer, [(prompt, f" {letter}") for letter in "ABCD"])
        return [{"token": f" {letter}", "logprob": value} for letter, value in zip("ABCD", values)] + [
            {"token": "答", "logprob": -0.01}]  # a likelier token that is no option

    def logprobs(self, text: str):
        if self.mode in ("dropped", "chat_only"):
            return None
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        offsets = [start for start, _ in encoded["offset_mapping"]]
        if self.mode == "constant":
            return {"tokens": [], "token_logprobs": [None] + [-1.0] * (len(ids) - 1), "text_offset": offsets}
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        values = [None] + [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]
        return {"tokens": [], "token_logprobs": values, "text_offset": offsets}

    def close(self):
        self.server.shutdown()


def test_an_endpoint_scores_like_the_local_model_and_refuses_missing_logprobs(tiny_tokenizer, ceval_csv, tmp_path,
                                                                             capsys):
    from lmsmith.cli import main
    from lmsmith.eval.endpoint import EndpointModel
    from lmsmith.eval.suite import RemoteModel

    task = TaskConfig(name="c", type="multiple_choice", dataset=ceval_csv, scoring=["loglikelihood", "generate"])
    items = read_items(task)
    model = trained_on_letters(tiny_tokenizer, task, items)
    local = score_multiple_choice(task.model_copy(update={"scoring": ["loglikelihood"]}),
                                  LocalModel(model, tiny_tokenizer, 8), items, [])
    stub = StubServer(model, tiny_tokenizer)
    try:
        remote = score_multiple_choice(task, RemoteModel(EndpointModel.from_spec(stub.url)), items, [])
        assert remote["acc"] == local["acc"] and remote["acc"] >= 90.0
        assert remote["gen_acc"] == pytest.approx(100.0 * sum(item.gold == 0 for item in items) / len(items))
        assert all(r.get("model") == "stub-model" for r in stub.requests)
    finally:
        stub.close()
    # Without prompt logprobs but with chat top_logprobs: multiple choice falls back to the first chat token.
    stub = StubServer(model, tiny_tokenizer, logprobs="chat_only")
    try:
        fallback = score_multiple_choice(task.model_copy(update={"scoring": ["loglikelihood"]}),
                                         RemoteModel(EndpointModel.from_spec(stub.url)), items, [])
        assert fallback["acc_route"] == "chat_top_logprobs" and fallback["acc"] == local["acc"]
        assert fallback["unscored_rate"] == 0.0
        assert all(r["max_tokens"] == 1 and r["top_logprobs"] == 20 for r in stub.requests if "messages" in r)
    finally:
        stub.close()
    for mode, message in (("dropped", "returns no prompt logprobs"), ("constant", "returns the same logprob")):
        stub = StubServer(model, tiny_tokenizer, logprobs=mode)
        try:
            with pytest.raises(UserError, match=message + ".*score by generation.*no top_logprobs either"):
                score_multiple_choice(task, RemoteModel(EndpointModel.from_spec(stub.url + "#named")), items, [])
            task_file = write(tmp_path / f"{mode}.yaml", f"name: c\ntype: multiple_choice\ndataset: {ceval_csv}\n")
            capsys.readouterr()
            assert main(["eval", "--task", str(task_file), "--model", stub.url, "--out", str(tmp_path / mode)]) == 2
            assert message in capsys.readouterr().err
        finally:
            stub.close()


def test_a_prompt_template_must_hold_exactly_its_fields(ceval_csv):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"takes \{options\} and \{question\}; it has \{question\}"):
        TaskConfig(name="c", type="multiple_choice", dataset=ceval_csv, prompt="{question} 答案：")
    with pytest.raises(ValidationError, match=r"takes \{text\}, and may hold \{types\}; it has \{text\}, \{type\}"):
        TaskConfig(name="e", type="extraction", dataset=ceval_csv, prompt="{text} {type}")
    # The types (or labels) may be named in the template's own words.
    TaskConfig(name="e", type="extraction", dataset=ceval_csv, prompt="抽取公司实体：{text}")
    with pytest.raises(ValidationError, match="literal braces"):
        TaskConfig(name="c", type="multiple_choice", dataset=ceval_csv, prompt="{question} {options} {")
    task = TaskConfig(name="c", type="multiple_choice", dataset=ceval_csv, prompt='{{"q": "{question}"}}\n{options}')
    assert suite.format_question(task, "毛利率？", ["a", "b"]) == '{"q": "毛利率？"}\nA. a\nB. b'


def test_extraction_maps_listed_entities_onto_the_gold_tokens(tmp_path, tiny_tokenizer, monkeypatch):
    from lmsmith.eval.suite import LocalModel, evaluate_task, tags_from_answer

    tokens = list("星辰科技营收12.5亿元")
    types = ["AMOUNT", "COMPANY"]
    answer = "COMPANY：星辰科技\nAMOUNT: 12.5亿元\nMETRIC：营收\nCOMPANY：不存在的公司"  # METRIC is no type here
    as_json = json.dumps({"entities": [{"type": "COMPANY", "text": "星辰科技"}, {"type": "AMOUNT", "text": "12.5亿元"},
                                       {"type": "METRIC", "text": "营收"}]}, ensure_ascii=False)
    assert tags_from_answer(as_json, tokens, types) == tags_from_answer(answer, tokens, types)
    assert tags_from_answer(answer, tokens, types) == (["B-COMPANY"] + ["I-COMPANY"] * 3 + ["O", "O"]
                                                       + ["B-AMOUNT"] + ["I-AMOUNT"] * 5)
    words = ["Revenue", "of", "Acme", "Corp", "rose"]
    assert tags_from_answer("COMPANY: Acme Corp\nCOMPANY: cme", words, types) == ["O", "O", "B-COMPANY",
                                                                                  "I-COMPANY", "O"]
    lines = ["星 B-COMPANY", "辰 I-COMPANY", "营 O", "收 O", "5 B-AMOUNT", "亿 I-AMOUNT", "",
             "华 B-COMPANY", "信 I-COMPANY", "亏 O", "损 O"]
    data = write(tmp_path / "ner.conll", "\n".join(lines) + "\n")
    canned_answers(monkeypatch, ["COMPANY：星辰\nAMOUNT：5亿", "COMPANY：华\n"])  # 2 of 2 right, then a short span
    scores = evaluate_task(TaskConfig(name="ner", type="extraction", dataset=data), LocalModel(None, tiny_tokenizer))
    assert (scores["entity_precision"], scores["entity_recall"]) == pytest.approx((200 / 3, 200 / 3), abs=0.01)
    assert scores["per_type"]["COMPANY"]["f1"] == pytest.approx(0.5)
    write(data, "星 B-COMPANY\n辰 X-COMPANY\n")
    with pytest.raises(UserError, match=r"ner\.conll:2: expected 'token tag' with a BIO tag"):
        evaluate_task(TaskConfig(name="ner", type="extraction", dataset=data), LocalModel(None, tiny_tokenizer))


def test_a_peft_adapter_is_scored_on_its_base(tmp_path, tiny_model_dir, tiny_tokenizer, ceval_csv):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmsmith.cli import main

    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    lora_params = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    task = write(tmp_path / "mc.yaml", f"name: mc\ntype: multiple_choice\ndataset: {ceval_csv}\n")
    out = tmp_path / "out"
    assert main(["eval", "--task", str(task), "--model", str(adapter), "--model", f"{tiny_model_dir}+{adapter}",
                 "--speed-requests", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = list(results["models"].values())
    assert [row["trainable_params"] for row in rows] == [lora_params, lora_params]
    scores = results["tasks"]["mc"]["scores"]
    assert scores[str(adapter)]["acc"] == scores[f"{tiny_model_dir}+{adapter}"]["acc"]
    with pytest.raises(UserError, match="not a peft adapter folder"):
        suite.adapter_spec(f"{tiny_model_dir}+{tiny_model_dir}")
