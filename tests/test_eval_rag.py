"""Evaluation with knowledge bases: retrieval metrics by hand, and numeric tasks answered with and
without the kb's chunks in the prompt."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from lmsmith.errors import UserError
from lmsmith.eval.suite import evaluate_task
from lmsmith.eval.tasks import TaskConfig
from lmsmith.rag.kb import KnowledgeBase

from test_rag import write_docs


def test_retrieval_metrics_match_hand_computed_values(tmp_path, monkeypatch):
    ranking = {"q1": ["a", "x", "b"], "q2": ["x", "y", "z"]}  # q1's relevant: a (rank 1), b (rank 3); q2's: c (absent)

    class FakeKB:
        def search_many(self, queries, settings):
            return [[SimpleNamespace(chunk={"doc_id": doc}) for doc in ranking[query]] for query in queries]

    monkeypatch.setattr(KnowledgeBase, "open", classmethod(lambda cls, folder: FakeKB()))
    qrels = tmp_path / "qrels.jsonl"
    qrels.write_text(json.dumps({"query": "q1", "relevant": ["a", "b"]}) + "\n"
                     + json.dumps({"query": "q2", "relevant": ["c"]}) + "\n")
    task = TaskConfig(name="r", type="retrieval", dataset=qrels, kb=tmp_path, retrieval_k=2)
    scores = evaluate_task(task, backend=None)
    assert scores["k"] == 2 and scores["recall_at_k"] == pytest.approx((50.0 + 0.0) / 2)  # q1: a in the top 2, b not
    assert scores["mrr"] == pytest.approx((100.0 + 0.0) / 2)
    ideal = 1 + 1 / 1.584962500721156  # two relevant documents: gains at ranks 1 and 2
    assert scores["ndcg_at_k"] == pytest.approx((100.0 * 1 / ideal + 0.0) / 2)


class CopyingModel:
    """Answers with the first figure of the first numbered source in its system message, citing it;
    without sources it does not know."""

    def answers(self, conversations, max_new_tokens, progress):
        out = []
        for messages in conversations:
            system = messages[0]["content"] if messages[0]["role"] == "system" else ""
            block = re.search(r"^\[1\] [^\n]*\n(.*?)(?:\n\n\[2\]|\Z)", system, re.S | re.M)
            figures = re.findall(r"\d+(?:\.\d+)?%", block.group(1)) if block else []
            out.append(f"不良贷款率为{figures[-1]}[1]。" if figures else "不知道。")
        return out


def test_a_numeric_task_with_a_kb_grounds_every_question(tmp_path):
    KnowledgeBase.build([write_docs(tmp_path / "docs")], tmp_path / "kb")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"messages": [{"role": "user", "content": "华信银行的不良贷款率是多少？"},
                                              {"role": "assistant", "content": "1.3%"}],
                                 "answer": {"value": 1.3}}, ensure_ascii=False) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "月球背面的温度"},
                                                {"role": "assistant", "content": "-170"}],
                                   "answer": {"value": -170}}, ensure_ascii=False) + "\n", encoding="utf-8")
    closed = evaluate_task(TaskConfig(name="closed", type="numeric", dataset=items), CopyingModel())
    grounded = evaluate_task(TaskConfig(name="rag", type="numeric", dataset=items, kb=tmp_path / "kb", kb_top_k=1),
                             CopyingModel())
    assert closed["numeric_acc"] == 0.0 and "context_recall" not in closed
    assert grounded["numeric_acc"] == 50.0  # the bank question right; the moon question refused
    assert grounded["refusal_rate"] == 50.0 and grounded["context_recall"] == 50.0
    assert grounded["citation_rate"] == 50.0 and grounded["citation_precision"] == 100.0


def test_kb_applies_to_answering_and_retrieval_tasks_only(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nx,y\n")
    (tmp_path / "q.jsonl").write_text('{"query": "q", "relevant": ["d"]}\n')
    with pytest.raises(ValueError, match="kb applies"):
        TaskConfig(name="x", type="classification", dataset=tmp_path / "a.csv", kb=tmp_path)
    with pytest.raises(ValueError, match="retrieval task ranks"):
        TaskConfig(name="x", type="retrieval", dataset=tmp_path / "q.jsonl")


def test_searching_a_batch_finds_what_each_search_finds(tmp_path):
    KnowledgeBase.build([write_docs(tmp_path / "docs")], tmp_path / "kb")
    kb = KnowledgeBase.open(tmp_path / "kb")
    queries = ["华信银行的不良贷款率是多少？", "资本充足率", "net interest margin"]
    for query, hits in zip(queries, kb.search_many(queries)):
        alone = kb.search(query)
        assert [hit.row for hit in hits] == [hit.row for hit in alone]
        assert [hit.score for hit in hits] == pytest.approx([hit.score for hit in alone], abs=1e-6)
    with pytest.raises(UserError, match="query is empty"):
        kb.search_many(["资本充足率", " "])


def test_one_comparison_grounds_each_question_once_for_every_model(tmp_path, monkeypatch):
    KnowledgeBase.build([write_docs(tmp_path / "docs")], tmp_path / "kb")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"messages": [{"role": "user", "content": "华信银行的不良贷款率是多少？"},
                                              {"role": "assistant", "content": "1.3%"}],
                                 "answer": {"value": 1.3}}, ensure_ascii=False) + "\n", encoding="utf-8")
    searched = []
    search_many = KnowledgeBase.search_many
    monkeypatch.setattr(KnowledgeBase, "search_many",
                        lambda self, queries, settings=None: searched.append(len(queries)) or search_many(self, queries,
                                                                                                         settings))
    task = TaskConfig(name="rag", type="numeric", dataset=items, kb=tmp_path / "kb", kb_top_k=1)
    shared: dict = {}
    first, second = (evaluate_task(task, CopyingModel(), shared) for _ in range(2))
    assert searched == [1] and first == second and first["numeric_acc"] == 100.0
    evaluate_task(task, CopyingModel())  # no shared work given: searches again
    assert searched == [1, 1]
