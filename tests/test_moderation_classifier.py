"""The moderation classifier, trained by lmsmith's own sft stage on the embedded labelled set, classifies
texts it never saw (new fillings of its templates) and blocks them through the API where the term list
has no entry. (Whole templates held out need a pretrained base: a tiny random model memorises templates.)"""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from lmsmith.datasets.moderation import ALLOWED, VIOLATING, generate
from lmsmith.gateway.classifier import ModerationClassifier
from lmsmith.gateway.moderation import TermModerator
from lmsmith.serve.api import create_app
from lmsmith.serve.client import LocalClient
from lmsmith.serve.engine import Engine
from test_eval import write_manifest


def test_embedded_set_is_balanced_and_grouped_by_template():
    rows = generate()
    labels = [row["answer"]["label"] for row in rows]
    assert labels.count(VIOLATING) == labels.count(ALLOWED) and len(rows) >= 200
    assert all(row["messages"][-1]["content"] == row["answer"]["label"] for row in rows)
    assert len({row["group"] for row in rows}) == 20


def test_a_classifier_trained_by_the_sft_stage_blocks_unseen_texts(tmp_path, tiny_model_dir):
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe
    from lmsmith.train.config import SFTConfig
    from lmsmith.train.sft import run as run_sft

    train = generate(seed=0, per_template=8)
    seen = {row["messages"][1]["content"] for row in train}
    test = [row for row in generate(seed=1, per_template=4) if row["messages"][1]["content"] not in seen]
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    (run_dir / "data" / "val.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test[:8]))
    write_manifest(run_dir, "data", {"sft_train": "train.jsonl", "sft_val": "val.jsonl"})
    config = SFTConfig(method={"name": "full"}, epochs=15, batch_size=16, optim={"lr": 3e-3}, val_generations=0,
                       checkpoint_every=None, log_every=10)
    (run_dir / "sft").mkdir()
    result = run_sft(config, StageContext(run_dir=run_dir, stage_dir=run_dir / "sft",
                                          recipe=Recipe(model={"path": str(tiny_model_dir)}, sft=config)))
    write_manifest(run_dir, "sft", result.outputs)

    classifier = ModerationClassifier(run_dir)  # a run folder stands for its tuned model
    texts = [row["messages"][1]["content"] for row in test]
    predicted = [p >= 0.5 for p in classifier.probabilities(texts)]
    truth = [row["answer"]["label"] == VIOLATING for row in test]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy >= 0.9, accuracy

    violating = next(row["messages"][1]["content"] for row in test if row["answer"]["label"] == VIOLATING
                     and classifier.flags(row["messages"][1]["content"]))
    moderator = TermModerator([], input_action="block", output_action="off", classifier=classifier)
    engine = Engine.load(tiny_model_dir)
    try:
        with TestClient(create_app(LocalClient(tiny_model_dir.name, engine), moderator=moderator)) as http:
            blocked = http.post("/v1/chat/completions", json={"model": tiny_model_dir.name, "max_tokens": 2,
                                                              "messages": [{"role": "user", "content": violating}]})
            fine = http.post("/v1/chat/completions", json={"model": tiny_model_dir.name, "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "你好"}]})
    finally:
        engine.close()
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_filter"
    assert fine.status_code == 200 or classifier.flags("你好")
