"""Data-engineering benchmark (issue 3): cleaning throughput, MinHash near-dup at scale, peak RSS.

    python bench/data_bench.py [--near-sizes 100000 1000000] [--rss-sizes 10000 30000 90000] [--workers 2]

- docs/s/core of the default cleaning chain (`lmsmith.data.ops.DEFAULT_OPS`) on ~1 KB documents, in
  one process (`clean_batch`, the function both executors run);
- near-dup (signatures on N workers + LSH banding + clustering) on 100k and 1M ~1 KB documents, and a
  naive single-process baseline (datasketch `MinHash.update` per shingle + `MinHashLSH` insert/query)
  on a sample, extrapolated, for the ratio;
- peak RSS of `lmsmith data clean` (a child process each) at three input sizes.

Documents are generated on the fly (never held all at once; 1M × 1 KB is 1 GB). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmsmith.data.config import PipelineConfig
from lmsmith.data.engine import Item, clean_batch
from lmsmith.data.minhash import MinHasher, NearDupIndex

PHRASES = ["营业收入", "同比增长", "归母净利润", "毛利率", "经营活动现金流量净额", "资产负债率", "研发投入",
           "基本每股收益", "公司", "报告期内", "主营业务", "市场份额", "新能源", "储能系统", "光伏组件", "客户需求"]
COMPANIES = ["星辰科技", "华信银行", "天宇储能", "盛世化工", "远航物流", "金石医药", "宏图电子", "蓝海食品"]


def document(index: int) -> str:
    """A ~1 KB (UTF-8) finance paragraph; every 30th is a near copy of an earlier one."""
    seed = index if index % 30 else max(0, index - 7)
    rng = random.Random(seed)
    parts = []
    while sum(len(p.encode()) for p in parts) < 950:
        parts.append(f"{rng.choice(COMPANIES)}{rng.randint(2015, 2024)}年{rng.choice(PHRASES)}为"
                     f"{rng.randint(1, 999)}.{rng.randint(10, 99)}亿元，{rng.choice(PHRASES)}{rng.randint(1, 40)}."
                     f"{rng.randint(0, 99)}%，{rng.choice(PHRASES)}{rng.choice(PHRASES)}。")
    text = "".join(parts)
    if index % 30 == 0 and index:
        text = text[:-6] + "（来源：证券时报）"
    if index % 17 == 0:
        text = f"<p>{text}</p><p>联系电话13812345678，邮箱ir@example.com。本文仅供参考。</p>"
    return text


def bench_cleaning(count: int) -> dict:
    plan = PipelineConfig(near_dedup={"enabled": False}).model_dump(mode="json")
    items = [Item(f"bench:{i}", "text", {"text": document(i)}) for i in range(count)]
    size = sum(len(item.row["text"].encode()) for item in items) / count
    clean_batch(plan, items[:50])  # build the operators outside the timing
    started = time.perf_counter()
    for start in range(0, count, 256):
        clean_batch(plan, items[start:start + 256])
    elapsed = time.perf_counter() - started
    return {"docs": count, "avg_bytes": round(size), "docs_per_s_per_core": round(count / elapsed)}


_HASHER = MinHasher()


def _signatures(bounds: tuple[int, int]) -> np.ndarray:
    return _HASHER.signatures([document(i) for i in range(*bounds)])


def bench_near_dup(count: int, workers: int) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work, NearDupIndex(0.8, 128, workdir=Path(work)) as index, \
            multiprocessing.get_context("fork").Pool(workers) as pool:
        chunks = [(start, min(count, start + 2000)) for start in range(0, count, 2000)]
        for signatures in pool.imap(_signatures, chunks):
            index.add(signatures)
        signed = time.perf_counter()
        clusters = index.clusters()
    elapsed = time.perf_counter() - started
    return {"docs": count, "workers": workers, "seconds": round(elapsed, 1),
            "signature_seconds": round(signed - started, 1), "cluster_seconds": round(elapsed - (signed - started), 1),
            "duplicates": int(len(clusters.duplicates)), "docs_per_s": round(count / elapsed)}


def bench_naive_near_dup(sample: int) -> dict:
    """datasketch the usual way: one Python `update` per shingle, then LSH query + insert per text."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    duplicates = 0
    started = time.perf_counter()
    for index in range(sample):
        text = document(index)
        signature = MinHash(num_perm=128)
        for start in range(max(1, len(text) - 4)):
            signature.update(text[start:start + 5].encode("utf-8"))
        if lsh.query(signature):
            duplicates += 1
        else:
            lsh.insert(str(index), signature)
    elapsed = time.perf_counter() - started
    return {"docs": sample, "seconds": round(elapsed, 1), "docs_per_s": round(sample / elapsed), "duplicates": duplicates}


def write_input(path: Path, count: int) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(json.dumps({"id": index, "text": document(index)}, ensure_ascii=False) + "\n")


def bench_rss(count: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "input.jsonl"
        write_input(path, count)
        code = ("import json,resource,sys; from lmsmith.data.engine import run_clean; "
                f"m = run_clean(sys.argv[1], sys.argv[2], workers={workers}); "
                "print(json.dumps({'wall': m['wall_time_s'], 'kept': m['counts']['kept'], "
                "'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
                "'children_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
        result = subprocess.run([sys.executable, "-c", code, str(path), str(Path(work) / "out")],
                                capture_output=True, text=True, check=True, env={**os.environ, "TERM": "dumb"})
        stats = json.loads(result.stdout.strip().splitlines()[-1])
        return {"docs": count, "input_mb": round(path.stat().st_size / 2**20, 1), "wall_s": stats["wall"],
                "docs_per_s": round(count / stats["wall"]), "driver_peak_rss_mb": round(stats["rss_mb"]),
                "worker_peak_rss_mb": round(stats["children_rss_mb"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clean-docs", type=int, default=20000)
    parser.add_argument("--near-sizes", type=int, nargs="*", default=[100000])
    parser.add_argument("--naive-sample", type=int, default=3000)
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[10000, 30000, 90000])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    results: dict = {"cores": os.cpu_count()}
    results["cleaning"] = bench_cleaning(args.clean_docs)
    print(json.dumps(results["cleaning"]), file=sys.stderr)
    results["near_dup"] = []
    for size in args.near_sizes:
        results["near_dup"].append(bench_near_dup(size, args.workers))
        print(json.dumps(results["near_dup"][-1]), file=sys.stderr)
    naive = bench_naive_near_dup(args.naive_sample)
    results["near_dup_naive"] = naive
    ours = results["near_dup"][0] if results["near_dup"] else None
    if ours:
        results["near_dup_speedup_vs_naive"] = round(ours["docs_per_s"] / naive["docs_per_s"], 1)
    results["rss"] = [bench_rss(size, args.workers) for size in args.rss_sizes]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
