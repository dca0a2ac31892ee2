"""The model registry: versions of a served name, promote and rollback with a change log (audited), and a
server that follows the registry, switching versions without a restart."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from conftest import build_tiny_model
from lmsmith.errors import UserError
from lmsmith.gateway.audit import AuditLog
from lmsmith.gateway.registry import Registry
from test_eval import write_manifest

QUESTION = [{"role": "user", "content": "毛利率为多少?"}]


def fabricated_run(folder: Path, tokenizer, seed: int, rouge: float) -> Path:
    model = build_tiny_model(tokenizer, seed=seed).eval()
    model.save_pretrained(folder / "sft" / "merged")
    tokenizer.save_pretrained(folder / "sft" / "merged")
    write_manifest(folder, "sft", {"model": "merged"})
    write_manifest(folder, "eval", {}, {"tuned.held-out-answers.rougeL": rouge, "base.held-out-answers.rougeL": 1.0})
    return folder


@pytest.fixture()
def runs(tmp_path, tiny_tokenizer):
    return [fabricated_run(tmp_path / f"run{i}", tiny_tokenizer, seed=i + 3, rouge=70.0 + i) for i in range(2)]


def test_versions_promote_rollback_and_an_audited_change_log(tmp_path, runs):
    audit = AuditLog(tmp_path / "state", os.urandom(32))
    registry = Registry(tmp_path / "state", audit=audit)
    first = registry.register("finance", runs[0], note="first")
    assert (first.version, registry.current("finance").version) == (1, 1)  # the first version goes live
    assert first.eval_scores == {"held-out-answers.rougeL": 70.0} and len(first.manifest_hash) == 64
    second = registry.register("finance", runs[1])
    assert registry.current("finance").version == 1  # registering is not promoting
    assert registry.promote("finance", 2, actor="ops").version == 2
    assert registry.rollback("finance", actor="ops").version == 1
    with pytest.raises(UserError, match="has no version 7"):
        registry.promote("finance", 7)
    with pytest.raises(UserError, match="no model named 'other'"):
        registry.current("other")
    actions = [(c["action"], c["version"], c["previous"]) for c in registry.changes("finance")]
    assert actions == [("register", 1, None), ("promote", 1, None), ("register", 2, None), ("promote", 2, 1),
                       ("rollback", 1, 2)]
    events = [record["event"] for record in audit.read()]
    assert events == ["registry.register", "registry.promote", "registry.register", "registry.promote",
                      "registry.rollback"] and audit.verify() == []
    assert second.model_path.endswith("merged")
    with pytest.raises(UserError, match="not a run folder"):
        registry.register("finance", tmp_path)


def test_a_server_follows_promote_and_rollback_without_a_restart(tmp_path, runs, tiny_tokenizer):
    import asyncio

    from lmsmith.serve.api import create_app, follow_registry
    from lmsmith.serve.config import ServeConfig
    from lmsmith.serve.engine import Engine
    from lmsmith.serve.sampling import SamplingParams

    registry = Registry(tmp_path / "state")
    registry.register("finance", runs[0])
    registry.register("finance", runs[1])
    stop = threading.Event()
    client, load = follow_registry(registry, ServeConfig(registry="finance", registry_poll_s=0.05), None, stop)
    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    # Each version's own answer, from an engine with the server's settings: the test is about which version
    # answers, and a second implementation (HF generate) may break a near-tie of a random model differently.
    expected = {}
    for version, run in ((1, runs[0]), (2, runs[1])):
        engine = Engine.load(run / "sft" / "merged", config=ServeConfig().engine_config())
        try:
            expected[version] = asyncio.run(engine.complete(
                engine.encode_chat(QUESTION), SamplingParams(max_tokens=6, temperature=0))).text
        finally:
            engine.close()
    assert expected[1] != expected[2]
    app = create_app(client, default_max_tokens=6)
    body = {"model": "finance", "messages": QUESTION, "temperature": 0, "max_tokens": 6}

    def wait_for(version: int) -> None:
        deadline = time.monotonic() + 60
        while not (client.ready and client.version["version"] == version):
            assert time.monotonic() < deadline, f"v{version} never went live"
            time.sleep(0.05)

    try:
        with TestClient(app) as http:
            wait_for(1)
            assert http.get("/v1/models").json()["data"][0]["version"]["version"] == 1
            assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == expected[1]
            registry.promote("finance", 2)
            wait_for(2)
            assert http.get("/v1/models").json()["data"][0]["version"]["version"] == 2
            assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == expected[2]
            registry.rollback("finance")
            wait_for(1)
            assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == expected[1]
    finally:
        stop.set()
        loader.join(timeout=30)
        client.engine.close()
    shutil.rmtree(tmp_path / "state")


def test_registry_cli_round_trip(tmp_path, runs, capsys):
    from lmsmith.cli import main

    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["registry", "add", "finance", str(runs[0]), "--note", "baseline", *state]) == 0
    assert main(["registry", "add", "finance", str(runs[1]), *state]) == 0
    assert main(["registry", "promote", "finance", "2", *state]) == 0
    capsys.readouterr()
    assert main(["registry", "list", "finance", *state]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("  finance v1") and listed[1].startswith("* finance v2")
    assert main(["registry", "rollback", "finance", *state]) == 0
    assert main(["registry", "log", *state]) == 0
    log = capsys.readouterr().out
    assert '"action": "rollback"' in log and '"actor": "cli:' in log
    assert main(["registry", "promote", "finance", "9", *state]) == 2
    assert main(["serve", str(runs[0]), "--registry", "finance", *state]) == 2
    assert "not both" in capsys.readouterr().err
