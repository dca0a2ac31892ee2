"""Knowledge bases: ingest of every format, sentence-aware chunks, Chinese-aware hybrid retrieval, and
incremental updates that match a rebuild."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmsmith.errors import UserError
from lmsmith.rag.chunking import Chunker, sections
from lmsmith.rag.config import KBConfig, SearchConfig
from lmsmith.rag.ingest import KBDocument, read_documents
from lmsmith.rag.kb import KnowledgeBase
from lmsmith.rag.retrieval import reciprocal_rank_fusion, words

REPORTS = {
    "xingchen.md": "# 星辰科技2023年年报\n\n## 经营情况\n\n报告期内，星辰科技实现营业收入12.5亿元，同比增长15.2%。"
                   "归母净利润为1.8亿元。\n\n## 风险提示\n\n公司面临原材料价格波动的风险。",
    "huaxin.txt": "华信银行2022年总资产为520亿元，资产负债率为61.2%。华信银行的不良贷款率为1.3%。",
    "tianyu.txt": "天宇储能宣布在江苏新建储能电池工厂，预计投资30亿元，达产后年产能为10吉瓦时。",
}


def write_docs(folder: Path, names=tuple(REPORTS)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(REPORTS[name], encoding="utf-8")
    return folder


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose page shows `text` (ASCII), with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    docs = write_docs(tmp_path_factory.mktemp("docs"))
    built, _ = KnowledgeBase.build([docs], tmp_path_factory.mktemp("kb") / "kb")
    return built


def test_a_chinese_query_finds_its_chunk_with_no_shared_whitespace_token(kb):
    query = "哪家银行的不良贷款率是多少"  # no spaces: a whitespace tokenizer sees one token that no chunk holds
    assert not set(query.split()) & {token for chunk in kb.chunks for token in chunk["text"].split()}
    for mode in ("sparse", "hybrid"):
        hits = kb.search(query, SearchConfig(k=1, mode=mode))
        assert hits[0].chunk["doc_id"] == "huaxin.txt", (mode, hits)
    assert kb.search("储能电池工厂的投资", SearchConfig(k=1))[0].chunk["doc_id"] == "tianyu.txt"
    assert "不良贷款" in words(query)


def test_markdown_sections_give_heading_paths_and_offsets(kb):
    [hit] = kb.search("营业收入同比增长", SearchConfig(k=1))
    chunk = hit.chunk
    assert chunk["title_path"] == ["星辰科技2023年年报", "经营情况"]
    assert REPORTS["xingchen.md"][chunk["start"]:chunk["end"]] == chunk["text"]
    assert "风险" not in chunk["text"]  # sections are never mixed in one chunk


def test_incremental_add_and_remove_match_a_rebuild(tmp_path):
    docs = write_docs(tmp_path / "all")
    kb, _ = KnowledgeBase.build([docs / "xingchen.md", docs / "huaxin.txt"], tmp_path / "kb")
    change = kb.add([docs / "tianyu.txt"])
    assert (change.documents_added, change.chunks_added) == (1, 1)
    kb.remove(["huaxin.txt"])
    rebuilt, _ = KnowledgeBase.build([docs / "xingchen.md", docs / "tianyu.txt"], tmp_path / "rebuilt")
    reopened = KnowledgeBase.open(tmp_path / "kb")
    for query in ("储能工厂", "营业收入", "银行资产", "原材料风险"):
        ours = [(h.chunk["doc_id"], h.chunk["start"], round(h.score, 6)) for h in reopened.search(query)]
        theirs = [(h.chunk["doc_id"], h.chunk["start"], round(h.score, 6)) for h in rebuilt.search(query)]
        assert ours == theirs, query
    assert np.allclose(reopened.vectors, rebuilt.vectors, atol=1e-5)  # batch composition moves the last bits
    assert sorted(reopened.documents) == ["tianyu.txt", "xingchen.md"]


def test_unchanged_documents_are_not_embedded_again_and_changed_ones_replace(tmp_path):
    docs = write_docs(tmp_path / "docs")
    kb, _ = KnowledgeBase.build([docs], tmp_path / "kb")
    again = kb.add([docs])
    assert (again.documents_unchanged, again.chunks_added) == (3, 0)
    (docs / "huaxin.txt").write_text("华信银行2023年总资产为560亿元。", encoding="utf-8")
    changed = KnowledgeBase.open(tmp_path / "kb").add([docs / "huaxin.txt"])
    assert (changed.documents_replaced, changed.chunks_added) == (1, 1)
    reopened = KnowledgeBase.open(tmp_path / "kb")
    assert [c["text"] for c in reopened.chunks if c["doc_id"] == "huaxin.txt"] == ["华信银行2023年总资产为560亿元。"]


def test_every_format_is_read_and_a_bad_file_is_skipped_with_its_reason(tmp_path):
    import docx

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notice.html").write_text(
        "<html><head><title>公告</title><script>track()</script></head><body><h1>董事会公告</h1>"
        "<p>公司拟每10股派发现金红利3元。</p></body></html>", encoding="utf-8")
    (folder / "news.jsonl").write_text(json.dumps(
        {"id": "n1", "text": "天宇储能新建工厂。", "metadata": {"industry": "energy"}}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    (folder / "rates.csv").write_text("id,text,region\nr1,人民币兑美元汇率为7.1。,cn\n", encoding="utf-8")
    word = docx.Document()
    word.add_heading("年度报告", level=1)
    word.add_paragraph("研发投入占营业收入的8%。")
    word.save(folder / "annual.docx")
    (folder / "filing.pdf").write_bytes(minimal_pdf("Revenue grew 15 percent in 2023."))
    (folder / "broken.pdf").write_bytes(b"\x00\x01 not a pdf")
    (folder / "empty.txt").write_text("   \n", encoding="utf-8")
    documents, skipped, files = read_documents([folder])
    by_id = {doc.id: doc for doc in documents}
    assert files == 7 and len(skipped) == 2 and files == len({doc.source for doc in documents}) + len(skipped)
    assert {Path(s.path).name for s in skipped} == {"broken.pdf", "empty.txt"}
    assert all(s.reason for s in skipped)
    assert by_id["notice.html"].text.startswith("# 董事会公告") and "track" not in by_id["notice.html"].text
    assert by_id["notice.html"].title == "公告"
    assert by_id["n1"].metadata == {"industry": "energy"} and by_id["r1"].metadata == {"region": "cn"}
    assert by_id["annual.docx"].text == "# 年度报告\n\n研发投入占营业收入的8%。"
    assert "Revenue grew 15 percent" in by_id["filing.pdf"].text
    kb, change = KnowledgeBase.build([folder], tmp_path / "kb")
    assert change.files_read == 7 and len(change.skipped) == 2
    assert kb.manifest["last_change"]["files_indexed"] == 5
    assert [h.chunk["doc_id"] for h in kb.search("工厂", SearchConfig(k=5, filter=["industry=energy"]))] == ["n1"]
    assert kb.search("工厂", SearchConfig(filter=["industry=finance"])) == []


def test_chunks_fit_the_token_budget_end_at_sentences_and_overlap(tiny_tokenizer):
    sentence = "公司营业收入同比增长15.2%。"
    text = sentence * 40
    chunker = Chunker(tiny_tokenizer, chunk_tokens=48, overlap=16, by_headings=False)
    chunks = chunker.chunk(KBDocument("d", text, "d"))
    sentence_tokens = len(tiny_tokenizer(sentence, add_special_tokens=False)["input_ids"])
    assert len(chunks) > 3
    for chunk in chunks:
        assert len(tiny_tokenizer(chunk.text, add_special_tokens=False)["input_ids"]) <= 48 + 2
        assert chunk.text.endswith("。") and text[chunk.start:chunk.end] == chunk.text
    # each chunk after the first starts inside the previous one: whole sentences of overlap
    assert all(later.start < earlier.end for earlier, later in zip(chunks, chunks[1:]))
    assert all(earlier.end - later.start <= len(sentence) * (16 // sentence_tokens)
               for earlier, later in zip(chunks, chunks[1:]))
    long_one = Chunker(tiny_tokenizer, 16, 4, False).chunk(KBDocument("l", "营业收入" * 60, "l"))
    assert len(long_one) > 1 and all(len(tiny_tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 17
                                     for c in long_one)


def test_sections_follow_the_heading_levels():
    text = "intro\n# A\nx\n## B\ny\n# C\nz"
    assert [titles for titles, _, _ in sections(text)] == [[], ["A"], ["A", "B"], ["C"]]


def test_reciprocal_rank_fusion_weights_and_ties():
    fused = reciprocal_rank_fusion([([(1, 0.9), (2, 0.5)], 1.0), ([(2, 3.0), (3, 1.0)], 2.0)], k=60)
    assert [row for row, _ in fused] == [2, 3, 1]
    assert fused[0][1] == pytest.approx(1 / 62 + 2 / 61)


def test_hnsw_agrees_with_flat_on_a_small_kb(tmp_path, kb):
    docs = write_docs(tmp_path / "docs")
    hnsw, _ = KnowledgeBase.build([docs], tmp_path / "hnsw", KBConfig(index="hnsw"))
    assert KnowledgeBase.open(tmp_path / "hnsw").manifest["index"] == "hnsw"
    for query in ("储能工厂", "营业收入", "不良贷款率"):
        assert [h.chunk["doc_id"] for h in hnsw.search(query, SearchConfig(mode="dense"))] == \
               [h.chunk["doc_id"] for h in kb.search(query, SearchConfig(mode="dense"))]


def test_a_different_embedding_model_forces_a_rebuild(tmp_path):
    docs = write_docs(tmp_path / "docs")
    KnowledgeBase.build([docs], tmp_path / "kb")
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    manifest["embedding"]["fingerprint"] = "0" * 16  # as if built with other weights
    (tmp_path / "kb" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="rebuild"):
        KnowledgeBase.open(tmp_path / "kb").add([docs])


def test_removing_an_unknown_document_names_it(kb):
    with pytest.raises(UserError, match="nope"):
        kb.remove(["nope"])


@pytest.mark.slow  # a whole `lmsmith` process
def test_the_cli_builds_and_searches(tmp_path):
    docs = write_docs(tmp_path / "docs")
    run = [sys.executable, "-m", "lmsmith.cli", "rag"]
    subprocess.run(run + ["build", str(docs), "--out", str(tmp_path / "kb"), "--overlap-tokens", "16"],
                   check=True, capture_output=True)
    found = subprocess.run(run + ["search", str(tmp_path / "kb"), "不良贷款率", "--json", "--k", "1"],
                           check=True, capture_output=True, text=True)
    hit = json.loads(found.stdout.strip().splitlines()[-1])
    assert hit["doc_id"] == "huaxin.txt" and hit["sparse_score"] > 0


def test_documents_can_be_cleaned_by_the_data_stage_operators(tmp_path):
    (tmp_path / "a.txt").write_text("客户的手机号是13812345678，营业收入１２．５亿元。", encoding="utf-8")
    kb, _ = KnowledgeBase.build([tmp_path / "a.txt"], tmp_path / "kb", KBConfig(clean=["unicode_normalize", "mask_pii"]))
    assert "13812345678" not in kb.chunks[0]["text"] and "12.5亿元" in kb.chunks[0]["text"]
    with pytest.raises(ValueError, match="unknown operator"):
        KBConfig(clean=["nope"])
