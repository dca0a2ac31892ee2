"""The feedback loop, closed: a served answer, a user's correction through POST /v1/feedback (stored
encrypted), the analysis, the export as SFT data, the sft stage on it, and the corrected answer."""

from __future__ import annotations

import base64
import json
import os

from starlette.testclient import TestClient

from lmsmith.gateway.config import GatewayConfig
from lmsmith.gateway.feedback import FeedbackStore
from lmsmith.gateway.keys import KeyStore
from lmsmith.gateway.middleware import Gateway
from lmsmith.serve.api import create_app
from lmsmith.serve.client import LocalClient
from lmsmith.serve.engine import Engine
from test_eval import write_manifest

QUESTION = [{"role": "user", "content": "星辰科技2023年的毛利率是多少?"}]
CORRECTION = "星辰科技2023年毛利率为42.3%。"


def test_feedback_to_export_to_sft_gives_the_corrected_answer(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    from lmsmith.cli import main
    from lmsmith.generation import generate_chat, load_causal_lm, load_tokenizer
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe
    from lmsmith.train.config import SFTConfig
    from lmsmith.train.sft import run as run_sft

    data_key = os.urandom(32)
    monkeypatch.setenv("LMSMITH_AUDIT_KEY", base64.b64encode(data_key).decode())
    state = tmp_path / "state"
    store = KeyStore(state)
    user, _ = store.create("analyst", "user")
    other, _ = store.create("someone-else", "user")
    gateway = Gateway(store, GatewayConfig(state_dir=str(state)), feedback=FeedbackStore(state, None, data_key))
    engine = Engine.load(tiny_model_dir)
    app = create_app(LocalClient(tiny_model_dir.name, engine), default_max_tokens=12, gateway=gateway)
    try:
        with TestClient(app) as http:
            asked = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {user}"},
                              json={"model": tiny_model_dir.name, "messages": QUESTION, "temperature": 0})
            request_id = asked.headers["X-Request-Id"]
            wrong = asked.json()["choices"][0]["message"]["content"]
            assert wrong != CORRECTION
            rated = {"request_id": request_id, "rating": 1, "correction": CORRECTION}
            assert http.post("/v1/feedback", json=rated, headers={"Authorization": f"Bearer {other}"}).status_code == 404
            accepted = http.post("/v1/feedback", json=rated, headers={"Authorization": f"Bearer {user}"})
            assert accepted.status_code == 200 and accepted.json()["request_id"] == request_id
    finally:
        engine.close()
    database = (state / "lmsmith.db").read_bytes()
    assert CORRECTION.encode() not in database and QUESTION[0]["content"].encode() not in database  # encrypted

    assert main(["feedback", "analyze", "--state-dir", str(state), "--out", str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "feedback.json").read_text())
    assert summary["rated"] == 1 and summary["failed"] == 1 and summary["by_model"] == {tiny_model_dir.name: {"numeric": 1}}
    exported = tmp_path / "feedback.jsonl"
    assert main(["feedback", "export", "--state-dir", str(state), "--out", str(exported)]) == 0
    (row,) = [json.loads(line) for line in exported.read_text().splitlines()]
    assert row["messages"] == [*QUESTION, {"role": "assistant", "content": CORRECTION}]

    # The sft stage on the exported data (as a recipe's data.instructions would give it).
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    exported.replace(run_dir / "data" / "train.jsonl")
    (run_dir / "data" / "val.jsonl").write_text((run_dir / "data" / "train.jsonl").read_text())
    write_manifest(run_dir, "data", {"sft_train": "train.jsonl", "sft_val": "val.jsonl"})
    config = SFTConfig(method={"name": "full"}, max_steps=40, batch_size=1, optim={"lr": 3e-3}, val_generations=0,
                       checkpoint_every=None, log_every=10)
    recipe = Recipe(model={"path": str(tiny_model_dir)}, sft=config)
    (run_dir / "sft").mkdir()
    result = run_sft(config, StageContext(run_dir=run_dir, stage_dir=run_dir / "sft", recipe=recipe))
    write_manifest(run_dir, "sft", result.outputs)
    tuned = run_dir / "sft" / result.outputs["model"]
    answer = generate_chat(load_causal_lm(tuned), load_tokenizer(tuned), [QUESTION], max_new_tokens=24).texts[0]
    assert answer == CORRECTION
