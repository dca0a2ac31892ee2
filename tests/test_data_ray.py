"""The Ray Data executor runs the same pipeline as the local one and writes the same files."""

from __future__ import annotations

import json
import os

import pytest

from lmsmith.data.config import PipelineConfig
from lmsmith.data.clean import run_clean
from lmsmith.datasets.finance import generate

ray = pytest.importorskip("ray")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ray_executor_matches_local(tmp_path):
    dataset = generate(companies=8)
    path = tmp_path / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for doc in dataset.documents:
            handle.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
        handle.write("{malformed\n")
        for item in dataset.instructions[:20]:
            handle.write(json.dumps({"messages": item.messages}, ensure_ascii=False) + "\n")
    plan = PipelineConfig(batch_size=16, shard_bytes=20_000, ops=[
        {"op": "strip_html"}, {"op": "unicode_normalize"}, {"op": "terminology"}, {"op": "mask_pii"},
        {"op": "normalize_numbers"}, {"op": "min_length", "apply_to": "corpus"}, {"op": "language"},
    ])
    local = run_clean(path, tmp_path / "local", plan, executor="local", workers=1, on_error="skip")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_clean(path, tmp_path / "ray", plan, executor="ray", workers=2, on_error="skip")
    finally:
        ray.shutdown()
    assert len(local["shards"]) > 1
    assert remote["counts"] == local["counts"] and remote["steps"] == local["steps"]
    assert local["counts"]["read"] == local["counts"]["kept"] + local["counts"]["dropped"]
    assert local["dropped_by"]["read"] == 1 and local["dropped_by"]["near_dedup"] > 0
    for name in ("kept.jsonl", "dropped.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
