"""Knowledge-base benchmark (issue 15): build throughput, query latency at 10k and 100k chunks, and the
recall of the approximate index against exact search.

    python bench/rag_bench.py                 # 10k chunks built for real, 100k scaled from them
    python bench/rag_bench.py --sizes 10000   # only the first size

Documents are synthetic finance sentences in Chinese (companies, years, metrics, figures), one chunk
each. Build: `KnowledgeBase.build` over N documents (read, chunk, jieba, embed with the bundled MiniLM,
index), chunks per second. The larger sizes reuse those embeddings: each extra chunk is a built chunk's
vector plus small noise (renormalized) with a freshly generated text, so the index holds realistic
clusters without embedding 100k texts on 2 cores. Queries: 200 held-out questions, each timed end to end
through `KnowledgeBase.search` (query embedding, dense search, BM25, fusion; no reranker), p50 and p99.
Recall@10: HNSW's dense top 10 against exact inner-product search over the same vectors (flat), and the
latency ratio between them.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

COMPANIES = ["星辰科技", "华信银行", "天宇储能", "云图电器", "海川证券", "北辰医药", "东方航运", "金桥地产",
             "瑞丰农业", "中和保险", "远景汽车", "蓝海化工", "恒通物流", "长江电力", "新元半导体", "安泰食品"]
METRICS = ["营业收入", "归母净利润", "毛利率", "经营活动现金流量净额", "资产负债率", "研发投入", "总资产",
           "不良贷款率", "净息差", "每股收益", "存货周转天数", "销售费用"]
EVENTS = ["宣布在江苏新建工厂", "完成对海外子公司的收购", "发布新一代产品", "下调全年业绩指引", "获得监管批复",
          "启动股份回购计划", "与地方政府签署战略合作协议", "披露重大诉讼进展"]


def sentence(rng: random.Random) -> str:
    company, metric, year = rng.choice(COMPANIES), rng.choice(METRICS), rng.randint(2015, 2024)
    value = round(rng.uniform(0.5, 900), 2)
    change = round(rng.uniform(-30, 60), 1)
    tail = rng.choice([f"，同比{'增长' if change >= 0 else '下降'}{abs(change)}%。", "。",
                       f"，{rng.choice(EVENTS)}。"])
    return f"{company}{year}年{metric}为{value}亿元{tail}"


def question(rng: random.Random) -> str:
    return f"{rng.choice(COMPANIES)}{rng.randint(2015, 2024)}年的{rng.choice(METRICS)}是多少？"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q / 100 * len(ordered))) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    from lmsmith.rag.config import KBConfig, SearchConfig
    from lmsmith.rag.kb import KnowledgeBase
    from lmsmith.rag.retrieval import DenseIndex, words

    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="rag_bench_"))
    base = args.sizes[0]
    docs = work / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": sentence(rng)}, ensure_ascii=False) + "\n"
                            for i in range(base)), encoding="utf-8")
    started = time.perf_counter()
    kb, _ = KnowledgeBase.build([docs], work / "kb", KBConfig(index="flat"))
    build_s = time.perf_counter() - started
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                    "build": {"chunks": len(kb.chunks), "seconds": round(build_s, 1),
                              "chunks_per_s": round(len(kb.chunks) / build_s, 1)}}
    print(f"build: {len(kb.chunks)} chunks in {build_s:.1f} s ({len(kb.chunks) / build_s:.0f} chunks/s)")
    queries = [question(rng) for _ in range(args.queries)]
    base_vectors, base_chunks = kb.vectors.copy(), list(kb.chunks)
    noise = np.random.default_rng(0)
    for size in args.sizes:
        extra = size - len(base_chunks)
        if extra > 0:  # scale: a built chunk's vector plus noise, a fresh text
            picks = noise.integers(0, len(base_vectors), extra)
            vectors = base_vectors[picks] + noise.normal(0, 0.05, (extra, base_vectors.shape[1])).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            texts = [sentence(rng) for _ in range(extra)]
            chunks = [{"doc_id": f"s{i}", "source": "synthetic", "start": 0, "end": len(text), "title": "",
                       "title_path": [], "metadata": {}, "text": text, "words": words(text)}
                      for i, text in enumerate(texts)]
            kb.chunks, kb.vectors = base_chunks + chunks, np.concatenate([base_vectors, vectors])
        else:
            kb.chunks, kb.vectors = base_chunks[:size], base_vectors[:size]
        kb.config = KBConfig(index="auto")
        kb._dense = kb._sparse = None
        started = time.perf_counter()
        kind = kb.dense().kind
        kb.sparse()
        index_s = time.perf_counter() - started
        settings = SearchConfig(k=10)
        kb.search(queries[0], settings)  # warm
        latencies = []
        for query in queries:
            started = time.perf_counter()
            kb.search(query, settings)
            latencies.append((time.perf_counter() - started) * 1000)
        exact = DenseIndex.build(kb.vectors, "flat")
        query_vectors = kb.embedder().encode(queries)
        recall, approx_ms, exact_ms = [], [], []
        for vector in query_vectors:
            started = time.perf_counter()
            truth = {row for row, _ in exact.search(vector, 10)}
            exact_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            found = {row for row, _ in kb.dense().search(vector, 10, ef_search=settings.hnsw_ef_search)}
            approx_ms.append((time.perf_counter() - started) * 1000)
            recall.append(len(truth & found) / 10)
        row = {"chunks": size, "dense_index": kind, "index_build_s": round(index_s, 1),
               "hybrid_query_ms_p50": round(percentile(latencies, 50), 2),
               "hybrid_query_ms_p99": round(percentile(latencies, 99), 2),
               "dense_recall_at_10_vs_exact": round(statistics.mean(recall), 4),
               "dense_search_ms_p50": round(percentile(approx_ms, 50), 3),
               "exact_search_ms_p50": round(percentile(exact_ms, 50), 3)}
        row["exact_over_index_latency"] = round(row["exact_search_ms_p50"] / max(row["dense_search_ms_p50"], 1e-6), 2)
        report[str(size)] = row
        print(row)
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
