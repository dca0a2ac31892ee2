"""Fitted operators (issue 7): fitted on the first records before the stream runs, their learnt fields
carried in the spec (numbers, or an .npz path) to every worker and recorded in stats.json / the manifest:
`perplexity` by quantile, the self-trained `quality_classifier`, and `coverage`'s rare clusters."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmsmith.data.clean import run_clean
from lmsmith.data.config import PipelineConfig
from lmsmith.data.quality import QualityConfig, cleaning_vs_labels, embedded_rows
from lmsmith.data.steps import DEFAULT_OPS, build_op, rewriter, validate_op_spec
from lmsmith.errors import UserError
from lmsmith.pipeline import run_pipeline
from lmsmith.recipe import validate_recipe

from conftest import build_tiny_tokenizer, train_tiny_model

GARBLED = "zq#x@!乂丶vkx9~¤乜乇 qwpz 7&%jj 丨丿乙 xvbq 斗冫 ###zz kpq"


def _finance_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["华宇科技", "东方能源", "长江制造", "海天食品", "中信证券"]
    return [f"{rng.choice(names)}{2019 + i % 5}年营业收入{rng.randint(10, 99)}亿元，同比增长{rng.randint(1, 30)}%。"
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def fitted_lm(tmp_path_factory) -> Path:
    """A tiny LM trained on the finance sentences, so garbled text is far more surprising to it."""
    tokenizer = build_tiny_tokenizer()
    model = train_tiny_model(tokenizer, _finance_sentences(40), seed=0, steps=60)
    path = tmp_path_factory.mktemp("finance_lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_perplexity_needs_exactly_one_limit(tiny_model_dir):
    for params in ({}, {"max_perplexity": 50.0, "quantile": 0.9}):
        with pytest.raises(ValueError, match="set exactly one of max_perplexity .* or quantile"):
            validate_op_spec({"op": "perplexity", "model": str(tiny_model_dir), **params})
    with pytest.raises(ValueError, match="quantile"):
        validate_op_spec({"op": "perplexity", "model": str(tiny_model_dir), "quantile": 1.0})
    unfitted = build_op(validate_op_spec({"op": "perplexity", "model": str(tiny_model_dir), "quantile": 0.5}))
    assert unfitted.needs_fit()
    with pytest.raises(UserError, match="not fitted"):
        unfitted.reject("营业收入")


def test_perplexity_quantile_is_fitted_and_drops_garbled_text(tmp_path, fitted_lm):
    sentences = _finance_sentences(40)
    # The garbled text comes after the fit sample: the fitted limit generalises to what it never saw.
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(sentences)]
                          + [{"id": "garbled", "text": GARBLED}])
    ops = [{"op": "unicode_normalize"},
           {"op": "perplexity", "model": str(fitted_lm), "quantile": 0.95, "apply_to": "corpus"}]
    recipe = validate_recipe({"data": {"quality": None, "corpus": str(corpus), "ops": ops, "fit_sample": 30,
                                       "embedded": {"companies": 1, "years": 2}}}, base_dir=tmp_path)
    run_pipeline(recipe, tmp_path / "run", only="data")
    stage = tmp_path / "run" / "data"
    stats = json.loads((stage / "stats.json").read_text(encoding="utf-8"))
    fitted = stats["fitted"]["perplexity"]
    assert fitted["sample"] == 30 and fitted["rule_noisy"] == 0
    # The limit is the 0.95 quantile of the first 30 texts' perplexities, as they reach the operator
    # (NFKC-folded by unicode_normalize first).
    scorer = build_op(validate_op_spec({"op": "perplexity", "model": str(fitted_lm), "max_perplexity": 1.0}))
    normalize = rewriter(ops[:1], "corpus")
    expected = float(np.quantile([scorer.perplexity(normalize(t)) for t in sentences[:30]], 0.95))
    assert fitted["max_perplexity"] == pytest.approx(expected, rel=1e-4)
    assert scorer.perplexity(GARBLED) > fitted["max_perplexity"]
    assert stats["ops"][1]["quantile"] == 0.95  # the recipe's spec, as written
    dropped = [json.loads(line) for line in (stage / "dropped.jsonl").read_text(encoding="utf-8").splitlines()]
    by_perplexity = {row["id"] for row in dropped if row["reason"] == "perplexity"}
    assert "garbled" in by_perplexity
    assert len(by_perplexity) <= 4  # a 0.95 quantile drops a few of the 40 clean sentences at most
    assert stats["corpus"]["dropped_by"]["perplexity"] == len(by_perplexity)


# -------------------------------------------------------------------------------- quality_classifier


def test_quality_classifier_needs_rule_labels_of_both_kinds(tmp_path):
    corpus = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _finance_sentences(20)])
    plan = PipelineConfig(ops=[{"op": "min_length", "chars": 5}, {"op": "quality_classifier"}])
    with pytest.raises(UserError, match="0 texts the rules flag and 20 they keep"):
        run_clean(corpus, tmp_path / "out", plan)


def test_quality_classifier_is_fitted_once_saved_without_pickle_and_same_on_every_executor(tmp_path):
    rng = random.Random(1)
    spam = ["点击领取红包", "加微信送好礼", "扫码免费领", "限时抢购优惠"]
    rows = []
    for i, text in enumerate(_finance_sentences(150, seed=3)):
        rows.append({"id": f"d{i}", "text": text})
        if i % 5 == 0:  # spam: short ones min_length drops, long ones (the last 30) it lets through
            words = rng.sample(spam, k=2 if i < 120 else 4)
            rows.append({"id": f"spam{i}", "text": "！".join(words) + "！"})
    corpus = _write_jsonl(tmp_path / "in.jsonl", rows)
    ops = [{"op": "min_length", "chars": 16}, {"op": "quality_classifier", "min_confidence": 0.6}]
    plan = PipelineConfig(ops=ops, near_dedup={"enabled": False}, exact_dedup=False, fit_sample=120, batch_size=16)
    one = run_clean(corpus, tmp_path / "one", plan)
    two = run_clean(corpus, tmp_path / "two", plan, workers=2)
    fitted = one["fitted"]["quality_classifier"]
    assert fitted["sample"] == 120 and fitted["rule_noisy"] == sum(r["id"].startswith("spam") for r in rows[:120])
    weights = Path(fitted["weights"])
    assert weights.parent == (tmp_path / "one" / "fitted").resolve() and weights.suffix == ".npz"
    with np.load(weights, allow_pickle=False) as arrays:
        assert set(arrays.files) == {"index", "value", "intercept", "shape"}
    assert Path(two["fitted"]["quality_classifier"]["weights"]).name == weights.name  # same model, same hash
    assert (tmp_path / "one" / "kept.jsonl").read_bytes() == (tmp_path / "two" / "kept.jsonl").read_bytes()
    dropped = [json.loads(line) for line in (tmp_path / "one" / "dropped.jsonl").read_text(encoding="utf-8").splitlines()]
    by_model = {row["id"] for row in dropped if row["reason"] == "quality_classifier"}
    long_spam = {row["id"] for row in rows if row["id"].startswith("spam") and len(row["text"]) >= 16}
    # What it adds over the rule: the long spam min_length lets through, and no finance sentence.
    assert long_spam and by_model == long_spam


def test_quality_classifier_on_the_embedded_corpus_adds_precise_drops():
    qc = {"op": "quality_classifier", "apply_to": "corpus", "min_confidence": 0.9}
    before, after, dropped = embedded_rows(ops=[qc, *DEFAULT_OPS])  # first: it sees the raw text
    labels = cleaning_vs_labels(before, after, dropped, [{}] * len(after), QualityConfig())
    scored = labels["by_op"]["drop:quality_classifier"]
    assert scored["flagged"] >= 10 and scored["precision"] >= 0.95
    assert 0.05 <= scored["recall"] <= 0.2  # it learnt the rules' fragments and boilerplate, not more


# ------------------------------------------------------------------------------------------ coverage


def test_coverage_tags_the_rare_cluster_and_drops_nothing(tmp_path):
    rows = [{"id": f"zh{i}", "text": t} for i, t in enumerate(_finance_sentences(95))]
    rows += [{"id": f"en{i}", "text": f"Bond coupon schedule number {i}: pay semiannual coupon on the notes."}
             for i in range(5)]
    rng = random.Random(0)
    rng.shuffle(rows)
    corpus = _write_jsonl(tmp_path / "in.jsonl", rows)
    plan = PipelineConfig(ops=[{"op": "coverage", "clusters": 2, "rare_share": 0.1}],
                          near_dedup={"enabled": False}, exact_dedup=False)
    manifest = run_clean(corpus, tmp_path / "out", plan)
    assert manifest["counts"] == {"read": 100, "kept": 100, "dropped": 0}
    assert manifest["tags"] == {"coverage:rare_cluster": 5}
    centroids = Path(manifest["fitted"]["coverage"]["centroids"])
    op = build_op(validate_op_spec({"op": "coverage", "centroids": str(centroids)}))
    assert not op.needs_fit()
    assert op.tags("Bond coupon schedule number 99: pay semiannual coupon on the notes.") == ["rare_cluster"]
    assert op.tags(_finance_sentences(1, seed=9)[0]) == []
    assert op.reject("anything") is None


def test_the_data_stage_marks_rare_rows_and_the_report_shows_them(tmp_path):
    from lmsmith.pipeline import run_pipeline
    from lmsmith.recipe import validate_recipe

    rows = [{"id": f"zh{i}", "text": t} for i, t in enumerate(_finance_sentences(95))]
    rows += [{"id": f"en{i}", "text": f"Bond coupon schedule number {i}: pay semiannual coupon on the notes."}
             for i in range(5)]
    random.Random(0).shuffle(rows)
    corpus = _write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = validate_recipe({"data": {
        "corpus": str(corpus), "embedded": {"companies": 2}, "split": {"ratios": [1, 0, 0]},
        "ops": [{"op": "coverage", "clusters": 2, "rare_share": 0.1, "apply_to": "corpus"}],
        "near_dedup": {"enabled": False}, "exact_dedup": False}}, base_dir=tmp_path)
    run_pipeline(recipe, tmp_path / "run", only="data")
    stage = tmp_path / "run" / "data"
    kept = [json.loads(line) for line in (stage / "corpus" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    tagged = {row["id"] for row in kept if row.get("tags") == ["rare_cluster"]}
    assert tagged == {f"en{i}" for i in range(5)}
    report = json.loads((stage / "quality" / "report.json").read_text(encoding="utf-8"))
    assert report["coverage"]["tags"]["rare_cluster"]["records"] == 5
    assert "rare_cluster" in (stage / "quality" / "report.md").read_text(encoding="utf-8")
