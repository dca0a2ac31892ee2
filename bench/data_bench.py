"""Data-engineering benchmark (issues 3, 16): cleaning throughput, MinHash near-dup at scale, peak RSS,
and the recipe's data stage end to end.

    python bench/data_bench.py [--near-sizes 100000 1000000] [--rss-sizes 10000 30000 90000] [--workers 2]
        [--stage-sizes 10000 100000 1000000] [--stage-executors local ray]

- docs/s/core of the default cleaning chain (`lmsmith.data.steps.DEFAULT_OPS`) on ~1 KB documents, in
  one process (`clean_batch`, the function both executors run);
- near-dup (signatures on N workers + LSH banding + clustering) on 100k and 1M ~1 KB documents, and a
  naive single-process baseline (datasketch `MinHash.update` per shingle + `MinHashLSH` insert/query)
  on a sample, extrapolated, for the ratio;
- peak RSS of `lmsmith data clean` (a child process each) at three input sizes;
- the recipe's `data` stage (`run_pipeline(..., only="data")`: jsonl corpus + 1,000 alpaca instructions,
  operators, exact + near dedup, split, writers) at 10k / 100k / 1M documents on local processes and
  on Ray, each (size, executor) in a fresh child process: wall time, docs/s, docs/s/core, and peak
  memory (the stage process's own peak RSS, the largest worker's, and the sampled peak of the whole
  process tree's PSS: driver + workers, Ray's raylet/GCS/workers included); then the trend
  largest size / smallest size of each peak (≈ 1: flat).

`--clean-docs 0`, `--naive-sample 0` and empty `--near-sizes` / `--rss-sizes` / `--stage-sizes` skip
those parts.

Documents are generated on the fly (never held all at once; 1M × 1 KB is 1 GB). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmsmith.data.config import PipelineConfig
from lmsmith.data.engine import clean_batch
from lmsmith.data.record import Record
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
    plan["drop_empty"] = True  # clean_batch's payload also says this (StreamOptions' default)
    items = [Record(f"bench:{i}", {"text": document(i)}, fmt="text") for i in range(count)]
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
        code = ("import json,resource,sys; from lmsmith.data.clean import run_clean; "
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


STAGE_INSTRUCTIONS = 1000

# Runs in the child: one data stage, then its own measures as the last stdout line (JSON). A thread
# samples the PSS of the whole process tree (the stage process and every descendant: local workers, or
# Ray's GCS, raylet and workers) every 0.25 s; PSS splits shared pages (Ray's object store, forked
# copy-on-write pages) between the processes mapping them, so the sum does not count them twice.
STAGE_CHILD = r"""
import json, os, resource, sys, threading, time
from pathlib import Path

def tree(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                pass
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found

def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

peak = {"pss_kb": 0, "processes": 0}
done = threading.Event()

def sample():
    while not done.is_set():
        pids = tree(os.getpid())
        peak["pss_kb"] = max(peak["pss_kb"], sum(pss_kb(pid) for pid in pids))
        peak["processes"] = max(peak["processes"], len(pids))
        done.wait(0.25)

args = json.loads(sys.argv[1])
from lmsmith.pipeline import run_pipeline
from lmsmith.recipe import validate_recipe

recipe = validate_recipe({"data": args["data"]}, base_dir=Path(args["work"]))
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
started = time.perf_counter()
manifest = run_pipeline(recipe, Path(args["run_dir"]), only="data")["data"]
wall = time.perf_counter() - started
done.set()
sampler.join()
print(json.dumps({"wall_s": wall, "metrics": manifest.metrics,
                  "driver_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "tree_pss_kb": peak["pss_kb"], "tree_processes": peak["processes"]}))
"""


def write_stage_inputs(work: Path, count: int) -> tuple[Path, Path]:
    """A jsonl corpus of `count` documents (written one line at a time; groups of 10 documents, like a
    company-year) and 1,000 alpaca instructions."""
    corpus, instructions = work / "corpus.jsonl", work / "instructions.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(json.dumps({"id": f"doc-{index}", "group": f"g{index // 10}", "text": document(index)},
                                    ensure_ascii=False) + "\n")
    with open(instructions, "w", encoding="utf-8") as handle:
        for index in range(STAGE_INSTRUCTIONS):
            rng = random.Random(10**9 + index)
            company, year, phrase = rng.choice(COMPANIES), rng.randint(2015, 2024), rng.choice(PHRASES)
            row = {"id": f"sft-{index}", "group": f"{company}-{year}",
                   "instruction": f"{company}{year}年的{phrase}是多少？",
                   "input": document(10**7 + index)[:300],
                   "output": f"{company}{year}年{phrase}为{rng.randint(1, 999)}.{rng.randint(10, 99)}亿元。"}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return corpus, instructions


def bench_stage(corpus: Path, instructions: Path, count: int, executor: str, workers: int, work: Path,
                timeout: float) -> dict:
    """The recipe's data stage in a child process (fresh interpreter, fresh Ray when executor is ray)."""
    run_dir = work / f"run-{executor}"
    data = {"corpus": str(corpus), "instructions": str(instructions), "executor": executor, "workers": workers,
            "quality": None}
    env = {**os.environ, "TERM": "dumb"}
    if executor == "ray":
        env["RAY_AUTH_MODE"] = "disabled"
    args = json.dumps({"data": data, "work": str(work), "run_dir": str(run_dir)})
    proc = subprocess.Popen([sys.executable, "-c", STAGE_CHILD, args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"docs": count, "executor": executor, "workers": workers, "error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if proc.returncode:
        return {"docs": count, "executor": executor, "workers": workers,
                "error": f"exit {proc.returncode}", "stderr_tail": stderr[-4000:]}
    stats = json.loads(stdout.strip().splitlines()[-1])
    wall, metrics = stats["wall_s"], stats["metrics"]
    return {"docs": count, "executor": executor, "workers": workers,
            "input_mb": round(corpus.stat().st_size / 2**20, 1),
            "records": count + STAGE_INSTRUCTIONS,  # docs/s below counts the corpus documents only
            "wall_s": round(wall, 1), "docs_per_s": round(count / wall),
            "docs_per_s_per_core": round(count / wall / workers),
            "driver_peak_rss_mb": round(stats["driver_rss_kb"] / 1024),
            "worker_peak_rss_mb": round(stats["children_rss_kb"] / 1024),
            "tree_peak_pss_mb": round(stats["tree_pss_kb"] / 1024), "tree_processes": stats["tree_processes"],
            "corpus_kept": metrics.get("corpus_kept"), "sft_kept": metrics.get("sft_kept"),
            "corpus_dropped_near_dedup": metrics.get("corpus_dropped_near_dedup", 0),
            "corpus_dropped_exact_dedup": metrics.get("corpus_dropped_exact_dedup", 0)}


def bench_stages(sizes: list[int], executors: list[str], workers: int, timeout: float) -> dict:
    runs = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            corpus, instructions = write_stage_inputs(work, size)
            for executor in executors:
                runs.append(bench_stage(corpus, instructions, size, executor, workers, work, timeout))
                print(json.dumps(runs[-1]), file=sys.stderr)
    trend = {}
    for executor in executors:
        done = [run for run in runs if run["executor"] == executor and "error" not in run]
        if len(done) >= 2:
            small, large = min(done, key=lambda r: r["docs"]), max(done, key=lambda r: r["docs"])
            trend[executor] = {
                "docs": [small["docs"], large["docs"]],
                **{f"{key}_ratio": round(large[key] / small[key], 2)
                   for key in ("driver_peak_rss_mb", "worker_peak_rss_mb", "tree_peak_pss_mb")},
            }
            print(f"stage {executor}: peak RSS {large['docs']:,} / {small['docs']:,} docs: driver "
                  f"{large['driver_peak_rss_mb']} / {small['driver_peak_rss_mb']} MB = "
                  f"{trend[executor]['driver_peak_rss_mb_ratio']}×, largest worker "
                  f"{trend[executor]['worker_peak_rss_mb_ratio']}×, process tree (PSS) "
                  f"{trend[executor]['tree_peak_pss_mb_ratio']}× (≈ 1: flat)", file=sys.stderr)
    return {"runs": runs, "rss_trend": trend}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clean-docs", type=int, default=20000)
    parser.add_argument("--near-sizes", type=int, nargs="*", default=[100000])
    parser.add_argument("--naive-sample", type=int, default=3000)
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[10000, 30000, 90000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stage-sizes", type=int, nargs="*", default=[10000, 100000, 1000000])
    parser.add_argument("--stage-executors", nargs="*", choices=["local", "ray"], default=["local", "ray"])
    parser.add_argument("--stage-timeout", type=float, default=3600, help="seconds per stage run")
    args = parser.parse_args()
    results: dict = {"cores": os.cpu_count()}
    if args.clean_docs:
        results["cleaning"] = bench_cleaning(args.clean_docs)
        print(json.dumps(results["cleaning"]), file=sys.stderr)
    results["near_dup"] = []
    for size in args.near_sizes:
        results["near_dup"].append(bench_near_dup(size, args.workers))
        print(json.dumps(results["near_dup"][-1]), file=sys.stderr)
    if args.naive_sample:
        naive = bench_naive_near_dup(args.naive_sample)
        results["near_dup_naive"] = naive
        ours = results["near_dup"][0] if results["near_dup"] else None
        if ours:
            results["near_dup_speedup_vs_naive"] = round(ours["docs_per_s"] / naive["docs_per_s"], 1)
    results["rss"] = [bench_rss(size, args.workers) for size in args.rss_sizes]
    if args.stage_sizes and args.stage_executors:
        results["stage"] = bench_stages(args.stage_sizes, args.stage_executors, args.workers, args.stage_timeout)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
