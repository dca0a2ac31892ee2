"""The pipeline's contract: manifests, skipping unchanged stages, forcing, and recipe errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import _fake_stages
from lmsmith import pipeline
from lmsmith.artifacts import Manifest
from lmsmith.errors import UserError
from lmsmith.recipe import load_recipe, validate_recipe
from lmsmith.stages import StageSpec

FAKE_STAGES = (
    StageSpec("data", "_fake_stages", ()),
    StageSpec("tokenizer", "_fake_stages", ("data",)),
)


@pytest.fixture
def fake_pipeline(monkeypatch):
    monkeypatch.setattr(pipeline, "STAGES", FAKE_STAGES)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", ("data", "tokenizer"))
    runs = {"data": _fake_stages.run_data, "tokenizer": _fake_stages.run_tokenizer}
    monkeypatch.setattr(StageSpec, "load_run", lambda self: runs[self.name])
    _fake_stages.CALLS.clear()
    return _fake_stages.CALLS


def _recipe(corpus: Path, companies: int = 5, vocab: int = 1000):
    return validate_recipe(
        {"data": {"corpus": str(corpus), "embedded": {"companies": companies}},
         "tokenizer": {"vocab_size": vocab}}
    )


def test_manifest_records_config_inputs_outputs_and_versions(tmp_path, fake_pipeline):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("营业收入", encoding="utf-8")
    manifests = pipeline.run_pipeline(_recipe(corpus), tmp_path / "run")
    data = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert data["stage"] == "data"
    assert data["config"]["embedded"]["companies"] == 5
    assert len(data["config_hash"]) == 64
    assert set(data["inputs"]) == {"file:corpus"}
    assert data["outputs"]["corpus"]["path"] == "corpus.txt"
    assert data["metrics"] == {"chars": 4}
    assert "torch" in data["versions"] and "python" in data["versions"]
    assert data["wall_time_s"] >= 0
    tokenizer = manifests["tokenizer"]
    assert tokenizer.inputs == {"stage:data": manifests["data"].fingerprint}


def test_rerun_skips_unchanged_stages_quickly(tmp_path, fake_pipeline, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc", encoding="utf-8")
    pipeline.run_pipeline(_recipe(corpus), tmp_path / "run")
    assert fake_pipeline == {"data": 1, "tokenizer": 1}
    started = time.perf_counter()
    pipeline.run_pipeline(_recipe(corpus), tmp_path / "run")
    assert time.perf_counter() - started < 5
    assert fake_pipeline == {"data": 1, "tokenizer": 1}
    assert capsys.readouterr().out.count("config and inputs unchanged") >= 2


def test_changed_config_reruns_that_stage_and_dependents_only_if_outputs_change(tmp_path, fake_pipeline):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc", encoding="utf-8")
    run_dir = tmp_path / "run"
    pipeline.run_pipeline(_recipe(corpus), run_dir)
    pipeline.run_pipeline(_recipe(corpus, vocab=400), run_dir)
    assert fake_pipeline == {"data": 1, "tokenizer": 2}
    pipeline.run_pipeline(_recipe(corpus, vocab=400, companies=7), run_dir)
    assert fake_pipeline == {"data": 2, "tokenizer": 3}


def test_changed_input_file_or_missing_output_forces_rerun(tmp_path, fake_pipeline):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc", encoding="utf-8")
    run_dir = tmp_path / "run"
    pipeline.run_pipeline(_recipe(corpus), run_dir)
    corpus.write_text("abcd", encoding="utf-8")
    pipeline.run_pipeline(_recipe(corpus), run_dir)
    assert fake_pipeline == {"data": 2, "tokenizer": 2}
    (run_dir / "tokenizer" / "tokenizer" / "vocab.json").unlink()
    pipeline.run_pipeline(_recipe(corpus), run_dir)
    assert fake_pipeline == {"data": 2, "tokenizer": 3}


def test_a_file_named_inside_a_list_or_an_operator_spec_reruns_its_stage_when_edited(tmp_path, fake_pipeline):
    corpus, table, words = tmp_path / "corpus.txt", tmp_path / "table.csv", tmp_path / "words.txt"
    corpus.write_text("abc", encoding="utf-8")
    table.write_text("company,year,revenue\nA,2023,1\n", encoding="utf-8")
    words.write_text("spam\n", encoding="utf-8")
    recipe = validate_recipe({"data": {"corpus": str(corpus), "synth_tables": [str(table)],
                                       "ops": [{"op": "strip_html"}, {"op": "blacklist", "file": str(words)}]},
                              "tokenizer": {}})
    run_dir = tmp_path / "run"
    manifests = pipeline.run_pipeline(recipe, run_dir)
    assert set(manifests["data"].inputs) == {"file:corpus", "file:synth_tables.0", "file:ops.1.file"}

    pipeline.run_pipeline(recipe, run_dir)
    assert fake_pipeline == {"data": 1, "tokenizer": 1}  # nothing edited: skipped

    table.write_text("company,year,revenue\nA,2023,2\n", encoding="utf-8")  # same size, new content
    pipeline.run_pipeline(recipe, run_dir)
    assert fake_pipeline == {"data": 2, "tokenizer": 1}  # the stand-in's output ignores the table

    words.write_text("spam\nscam\n", encoding="utf-8")
    pipeline.run_pipeline(recipe, run_dir)
    assert fake_pipeline == {"data": 3, "tokenizer": 1}
    pipeline.run_pipeline(recipe, run_dir)
    assert fake_pipeline == {"data": 3, "tokenizer": 1}


def test_files_are_found_at_any_depth_and_a_lone_slash_is_not_a_path(tmp_path):
    from pydantic import BaseModel

    class Inner(BaseModel):
        weights: Path
        options: dict

    class Outer(BaseModel):
        inner: Inner
        pairs: list[tuple[str, str]]
        missing: Path

    (tmp_path / "w").mkdir()
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    config = Outer(inner=Inner(weights=tmp_path / "w", options={"lists": [{"file": str(tmp_path / "a.txt")}],
                                                                 "pattern": "/", "note": "a/b"}),
                   pairs=[("x", str(tmp_path / "a.txt"))], missing=tmp_path / "gone")
    assert pipeline.external_inputs(config) == {
        "inner.weights": tmp_path / "w",
        "inner.options.lists.0.file": tmp_path / "a.txt",
        "pairs.0.1": tmp_path / "a.txt",
    }


def test_from_and_only_force_the_named_stages(tmp_path, fake_pipeline):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc", encoding="utf-8")
    run_dir = tmp_path / "run"
    pipeline.run_pipeline(_recipe(corpus), run_dir)
    pipeline.run_pipeline(_recipe(corpus), run_dir, only="tokenizer")
    assert fake_pipeline == {"data": 1, "tokenizer": 2}
    pipeline.run_pipeline(_recipe(corpus), run_dir, start="data")
    assert fake_pipeline == {"data": 2, "tokenizer": 3}
    with pytest.raises(UserError, match="unknown stage"):
        pipeline.run_pipeline(_recipe(corpus), run_dir, only="nope")


def test_only_a_stage_whose_upstream_never_ran_is_refused(tmp_path, fake_pipeline):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc", encoding="utf-8")
    with pytest.raises(UserError, match="needs data"):
        pipeline.run_pipeline(_recipe(corpus), tmp_path / "run", only="tokenizer")


def test_recipe_overrides_and_relative_paths(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: demo\ndata:\n  corpus: corpus.jsonl\ntokenizer:\n", encoding="utf-8")
    recipe = load_recipe(recipe_file, overrides=["tokenizer.vocab_size=500", "seed=7"])
    assert recipe.tokenizer.vocab_size == 500 and recipe.seed == 7
    assert recipe.stages() == ["data", "tokenizer"]  # `tokenizer:` alone lists the stage with defaults
    with pytest.raises(UserError, match="--set sft.method.r=4: the recipe has no sft block"):
        load_recipe(recipe_file, overrides=["sft.method.r=4"])
    assert Path(recipe.data.corpus) == (tmp_path / "corpus.jsonl").resolve()


def test_a_relative_path_in_set_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    recipe_file = tmp_path / "recipes" / "r.yaml"
    recipe_file.write_text("data:\n  corpus: corpus.jsonl\n", encoding="utf-8")
    (tmp_path / "recipes" / "corpus.jsonl").write_text('{"text": "in the recipe folder"}\n', encoding="utf-8")
    (tmp_path / "mine.jsonl").write_text('{"text": "typed on the command line"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert Path(load_recipe(recipe_file).data.corpus) == (tmp_path / "recipes" / "corpus.jsonl").resolve()
    assert Path(load_recipe(recipe_file, overrides=["data.corpus=mine.jsonl"]).data.corpus) == \
        (tmp_path / "mine.jsonl").resolve()
    # Only path fields: a name or a title that happens to match a file stays as typed.
    named = load_recipe(recipe_file, overrides=["name=recipes", "data.corpus=mine.jsonl"])
    assert named.name == "recipes"


@pytest.mark.parametrize(
    "body, expected",
    [
        ("sft:\n  bogus: 1\n", "sft.bogus: unknown field"),
        ("sft:\n  batch_size: many\n", "sft.batch_size"),
        ("data:\n  corpus: missing.jsonl\n", "missing.jsonl"),
        ("sft: [1, 2\n", "invalid YAML"),
    ],
)
def test_bad_recipe_exits_2_with_one_line_naming_the_field(tmp_path, body, expected):
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(body, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "lmsmith.cli", "run", str(recipe_file), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and str(recipe_file) in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lmsmith.cli", "run", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_manifest_read_tolerates_corrupt_file(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    assert Manifest.read(tmp_path) is None


def test_run_control_fields_do_not_force_a_rerun(tmp_path, fake_pipeline, monkeypatch):
    from lmsmith.tokenizer.config import TokenizerConfig

    monkeypatch.setattr(TokenizerConfig, "run_control_fields", frozenset({"min_frequency"}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc", encoding="utf-8")
    recipe = _recipe(corpus)
    pipeline.run_pipeline(recipe, tmp_path / "run")
    recipe.tokenizer.min_frequency = 5
    manifests = pipeline.run_pipeline(recipe, tmp_path / "run")
    assert fake_pipeline == {"data": 1, "tokenizer": 1}
    recipe.tokenizer.vocab_size = 500
    manifests = pipeline.run_pipeline(recipe, tmp_path / "run")
    assert fake_pipeline == {"data": 1, "tokenizer": 2}
    assert manifests["tokenizer"].config["min_frequency"] == 5  # still recorded


def test_a_manifest_output_outside_its_stage_folder_is_refused(tmp_path):
    from lmsmith.artifacts import Manifest
    from lmsmith.errors import UserError

    stage_dir = tmp_path / "sft"
    (stage_dir / "merged").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    outputs = {name: {"path": path, "hash": "h"} for name, path in
               (("model", "merged"), ("absolute", str(tmp_path / "elsewhere")), ("up", "../elsewhere"),
                ("sneaky", "merged/../../elsewhere"))}
    manifest = Manifest(stage="sft", config={}, config_hash="c", inputs={}, outputs=outputs, metrics={}, wall_time_s=0)
    assert manifest.output_path(stage_dir, "model") == stage_dir / "merged"
    for name in ("absolute", "up", "sneaky"):
        with pytest.raises(UserError, match=f"output '{name}' points outside the stage folder"):
            manifest.output_path(stage_dir, name)
