"""The report: markdown plus a self-contained HTML built from a fabricated run folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmsmith.report.document import Document, Image, Paragraph
from lmsmith.report.stage import flatten
from lmsmith.report.tables import Table, format_number
from test_eval import write_jsonl, write_manifest

EVAL_TABLE = {
    "columns": ["model", "finance-yoy numeric_acc", "finance-report rougeL", "size MB"],
    "rows": [["base", "0.00 ± 0.00", "3.14 ± 0.52", "48.21"], ["tuned", "66.67 ± 2.10", "27.18 ± 1.20", "17.93"]],
}
COMPRESS_TABLE = {
    "columns": ["model", "method", "size MB", "tok/s b1", "held-out-answers rougeL", "gate"],
    "rows": [["source", "tuned", "23.41", "25.10", "79.33", "–"],
             ["int8", "dynamic_int8", "7.02 (3.33× smaller)", "61.77 (2.46×)", "79.26 (-0.07)", "passed"]],
}


def fabricate_finished_run(run_dir: Path, with_serve: bool) -> None:
    write_manifest(run_dir, "data", {}, {"corpus": {"read": 300, "kept": 271}, "sft_train": 480, "ops": ["dedup", "pii"]})
    write_manifest(run_dir, "tokenizer", {}, {"vocab_size": 4000, "chars_per_token": 1.87})
    for stage, steps in (("pretrain", 30), ("sft", 12)):
        rows = [{"step": s, "loss": 6.0 / (1 + s / 5), "lr": 1e-3, "tokens_per_s": 2500.0} for s in range(1, steps + 1)]
        rows[-1]["val_loss"] = 1.2345
        rows[steps // 2]["val_loss"] = 2.5
        write_jsonl(run_dir / stage / "metrics.jsonl", rows)
        write_manifest(run_dir, stage, {"metrics": "metrics.jsonl"}, {"final_loss": rows[-1]["loss"]}, wall_time_s=42.5)
    (run_dir / "eval" / "plots").mkdir(parents=True)
    (run_dir / "eval" / "results.json").write_text(json.dumps({
        "tasks": {"finance-yoy": {"type": "numeric", "items": 200}, "finance-report": {"type": "generate", "items": 60}},
        "table": EVAL_TABLE,
        "tuned_beats_base": {"finance-yoy numeric_acc": True, "finance-report <script>": False}}))
    (run_dir / "eval" / "plots" / "scores.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    write_manifest(run_dir, "eval", {"results": "results.json", "plots": "plots"},
                   {"tuned_beats_base": 1, "tuned_beats_base_of": 2})
    (run_dir / "compress").mkdir()
    (run_dir / "compress" / "results.json").write_text(json.dumps(
        {"tasks": {"held-out-answers": {}}, "threads": 2, "gate": {"failed": [], "strict": False},
         "table": COMPRESS_TABLE}))
    (run_dir / "compress" / "plots").mkdir()
    (run_dir / "compress" / "plots" / "size_quality.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    write_manifest(run_dir, "compress", {"results": "results.json", "plots": "plots"}, {"variants": 1, "gate_failed": 0})
    if with_serve:
        (run_dir / "serve").mkdir()
        (run_dir / "serve" / "transcript.json").write_text(json.dumps(
            {"model": "demo", "model_dir": "sft/merged", "entries": [
                {"question": "华信银行的资产负债率是多少?", "answer": "61.2%,详见 https://example.com", "latency_s": 0.42}
            ]},
            ensure_ascii=False))
        write_manifest(run_dir, "serve", {"transcript": "transcript.json"})


def every_stage():
    from lmsmith.recipe import Recipe

    return Recipe(**{name: {} for name in ("data", "tokenizer", "pretrain", "sft", "eval", "compress", "serve", "report")})


def run_report(run_dir: Path):
    from lmsmith.pipeline import StageContext
    from lmsmith.report.config import ReportConfig
    from lmsmith.report.stage import run

    stage_dir = run_dir / "report"
    stage_dir.mkdir()
    result = run(ReportConfig(title="Finance run"), StageContext(run_dir=run_dir, stage_dir=stage_dir, recipe=every_stage()))
    return result, stage_dir


def test_report_html_is_self_contained_and_shows_every_stage(tmp_path):
    run_dir = tmp_path / "run"
    fabricate_finished_run(run_dir, with_serve=True)
    result, stage_dir = run_report(run_dir)

    assert result.outputs == {"md": "report.md", "html": "report.html"}
    page = (stage_dir / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4  # pretrain and sft loss curves, eval scores, compress size/quality
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and "<script>" not in page  # inline CSS only; sample text is escaped
    assert "&lt;script&gt;" in page
    for number in ("48.21", "17.93", "66.67 ± 2.10", "3.33× smaller", "61.77 (2.46×)", "0.42", "finance-yoy (200 items)",
                   "Every variant passed its quality gate",
                   "ahead of base beyond both standard errors on 1 of 2: finance-yoy numeric_acc"):
        assert number in page
    for text in ("Finance run", "corpus.read", "271", "chars_per_token", "华信银行的资产负债率是多少?"):
        assert text in page
    assert result.metrics["missing"] == 0 and "Nothing is missing." in page

    markdown = (stage_dir / "report.md").read_text(encoding="utf-8")
    assert "![pretrain: train and validation loss by step](loss_pretrain.png)" in markdown
    assert (stage_dir / "loss_pretrain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (stage_dir / "loss_sft.png").is_file()
    assert "| tuned | 66.67 ± 2.10 | 27.18 ± 1.20 | 17.93 |" in markdown
    # The training table reads the curves: 30 logged steps, last val loss 1.2345, best of (2.5, 1.2345).
    assert "| pretrain | 30 |" in markdown and "1.23 | 1.23 | 2,500.0 |" in markdown


def test_report_lists_missing_pieces_instead_of_failing(tmp_path):
    run_dir = tmp_path / "run"
    fabricate_finished_run(run_dir, with_serve=False)
    (run_dir / "sft" / "metrics.jsonl").unlink()
    result, stage_dir = run_report(run_dir)

    markdown = (stage_dir / "report.md").read_text(encoding="utf-8")
    assert result.metrics["missing"] == 2
    assert "- stage serve has not run" in markdown
    assert "sft loss curve" in result.metrics["missing_pieces"]
    assert "| serve | missing |" in markdown
    assert (stage_dir / "report.html").read_text().count("data:image/png;base64,") == 3


def test_flatten_nested_metrics():
    flat = flatten({"a": {"b": 1, "c": {"d": 2.5}}, "ops": ["x", "y"], "rows": [{"k": 1}] * 3, "n": None})
    assert flat == {"a.b": 1, "a.c.d": 2.5, "ops": "x, y", "rows": "3 items", "n": None}


def test_tables_render_the_same_cells_in_markdown_and_html():
    table = Table(["metric", "value"])
    table.add("a|b", 1234.5678)
    table.add("tiny", 0.000123)
    assert table.to_markdown().splitlines()[2] == "| a\\|b | 1,234.6 |"
    assert "<td>0.000123</td>" in table.to_html()
    assert Table.from_json(json.loads(json.dumps(table.to_json()))).rows == table.rows
    with pytest.raises(ValueError):
        table.add("only one cell")


@pytest.mark.parametrize("value, signed, text", [(None, False, "–"), (3, True, "+3"), (-0.5, True, "-0.50"),
                                                 (17.934, False, "17.93"), (float("nan"), False, "–")])
def test_format_number(value, signed, text):
    assert format_number(value, signed=signed) == text


def test_document_escapes_text_and_embeds_images():
    doc = Document("T <1>")
    doc.section("S").blocks.extend([Paragraph("a & b"), Image("x.png", "cap", b"\x89PNG")])
    page = doc.to_html()
    assert "T &lt;1&gt;" in page and "a &amp; b" in page and "data:image/png;base64,iVBORw==" in page
    assert "![cap](x.png)" in doc.to_markdown()
