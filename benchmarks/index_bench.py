"""Vector index benchmark (issue 12): the index against today's brute-force `search_images`.

    python -m benchmarks.index_bench [--sizes 100000,1000000] [--queries 200] [--only index,duplicates]

Synthetic, clustered 512-d vectors (``clustered``: each cluster spans a random 32-d subspace around
its centre, so nearest neighbours are structured, as real embeddings are, and recall means
something) are written as an ``embed_images`` table. For each size, each step runs in a fresh
process so its peak RSS (``VmHWM``) is its own:

- build: `update_index_from_table` (table → segments → IVF-PQ);
- search: open the index, answer the queries by vector (no embedding); p50/p95, peak RSS,
  recall@10 against exact search (computed here in blocks);
- brute force: today's `search_images` way (the table read into pandas, stacked, normalised,
  scored) per query; and the best case of brute force, the matrix resident in numpy;
- add: a table of 10,000 new rows plus a rerun of the first table (a superset: all skipped).

``duplicates``: the `find_duplicates` flow over 100,000 rows with planted exact and near copies.

Results are printed as markdown and saved as JSON in ``out/benchmarks/index-<n>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "benchmarks"
DIM = 512
MODEL, VERSION = "clip", "ViT-B-16"


def clustered(n: int, dim: int = DIM, seed: int = 0, per_cluster: int = 1000) -> np.ndarray:
    """``n`` unit vectors in clusters of ~``per_cluster``, each spanning a random 32-d subspace."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // per_cluster)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, dim), np.float32)
    for c in range(clusters):
        idx = np.flatnonzero(labels == c)
        basis = rng.standard_normal((32, dim), dtype=np.float32) * 0.25
        z = rng.standard_normal((len(idx), 32), dtype=np.float32)
        noise = 0.05 * rng.standard_normal((len(idx), dim), dtype=np.float32)
        out[idx] = centres[c] + z @ basis + noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def write_table(path: Path, vectors: np.ndarray, first: int = 0) -> None:
    """An ``embed_images``-shaped table of these vectors (rows ``first``, ``first + 1``, ...)."""
    with pq.ParquetWriter(path, _schema(vectors.shape[1]), compression="zstd") as writer:
        for start in range(0, len(vectors), 50_000):
            block = vectors[start : start + 50_000]
            ids = range(first + start, first + start + len(block))
            writer.write_table(
                pa.table(
                    {
                        "image_ref": [f"img/{i:08d}.jpg" for i in ids],
                        "image_sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in ids],
                        "model": [MODEL] * len(block),
                        "version": [VERSION] * len(block),
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), vectors.shape[1]).cast(
                            pa.list_(pa.float32())
                        ),
                        "status": ["ok"] * len(block),
                        "error": pa.nulls(len(block), pa.string()),
                    },
                    schema=_schema(vectors.shape[1]),
                )
            )


def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_ref", pa.string()),
            ("image_sha256", pa.string()),
            ("model", pa.string()),
            ("version", pa.string()),
            ("embedding", pa.list_(pa.float32())),
            ("status", pa.string()),
            ("error", pa.string()),
        ]
    )


def queries_for(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Queries near (not at) stored rows: a row plus noise, normalised."""
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), count, replace=False)]
    q = picked + 0.05 * rng.standard_normal(picked.shape, dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Ground truth: exact top-k row numbers, scored in blocks."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(vectors), 65_536):
        s = queries @ vectors[start : start + 65_536].T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        cs, ci = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1), np.concatenate([best_i, part + start], 1)
        order = np.argsort(-cs, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)
    return best_i


# --- workers: each runs in a fresh process and prints one JSON line ----------------------------


def _hwm_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_build(table: str, index: str) -> dict[str, Any]:
    from prefect_roboflow.flows.vector_index import update_index_from_table

    start = time.perf_counter()
    result = update_index_from_table(table, index)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _hwm_mb(), **result.model_dump()}


def worker_search(index: str, queries: str, k: str) -> dict[str, Any]:
    from prefect_roboflow.flows.vector_index import VectorIndex

    q = np.load(queries)
    start = time.perf_counter()
    opened = VectorIndex.open(index)
    open_seconds = time.perf_counter() - start
    opened.search(q[0], int(k))  # first query: lazily reads metadata; timed separately
    first = time.perf_counter() - start - open_seconds
    latencies, rows = [], []
    for vector in q:
        t = time.perf_counter()
        hits = opened.search(vector, int(k))
        latencies.append(time.perf_counter() - t)
        rows.append([h.row for h in hits])
    return {
        "open_seconds": open_seconds,
        "first_query_seconds": first,
        "latencies": latencies,
        "rows": rows,
        "peak_rss_mb": _hwm_mb(),
    }


def worker_brute(table: str, queries: str, k: str, resident: str) -> dict[str, Any]:
    """Today's `search_images` scoring (per query: table → pandas → stack → score), or resident numpy."""
    import pandas as pd  # noqa: F401  (today's path goes through pandas)

    q = np.load(queries)
    latencies, rows = [], []
    matrix = None
    if resident == "1":
        frame = pq.read_table(table, columns=["embedding"])
        matrix = np.asarray(frame.column("embedding").combine_chunks().flatten(), np.float32).reshape(len(frame), -1)
        matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    for vector in q:
        t = time.perf_counter()
        if matrix is None:
            df = pq.read_table(table).to_pandas()
            df = df[df["status"] == "ok"].reset_index(drop=True)
            m = np.vstack(df["embedding"].to_numpy()).astype(np.float32)
            scores = (m / np.linalg.norm(m, axis=1, keepdims=True)) @ (vector / np.linalg.norm(vector))
        else:
            scores = matrix @ vector
        rows.append(np.argsort(-scores, kind="stable")[: int(k)].tolist())
        latencies.append(time.perf_counter() - t)
    return {"latencies": latencies, "rows": rows, "peak_rss_mb": _hwm_mb()}


def worker_duplicates(table: str, out_dir: str) -> dict[str, Any]:
    from prefect.testing.utilities import prefect_test_harness

    from prefect_roboflow.flows.find_duplicates import find_duplicates

    with prefect_test_harness(server_startup_timeout=180):
        start, cpu = time.perf_counter(), time.process_time()
        result = find_duplicates(source=table, out_dir=out_dir)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    # CPU seconds of this process (all threads): less at the mercy of other work on shared cores.
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": _hwm_mb(), **result.model_dump()}


WORKERS = {
    "build": worker_build,
    "search": worker_search,
    "brute": worker_brute,
    "duplicates": worker_duplicates,
}


def run_worker(name: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.index_bench", "--worker", name, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- the sections -----------------------------------------------------------------------------------


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def _ms(latencies: list[float], pct: float) -> float:
    return round(float(np.percentile(latencies, pct)) * 1000, 2)


def bench_index(n: int, n_queries: int, work: Path, brute_queries: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    vectors = clustered(n + 10_000)
    base, extra = vectors[:n], vectors[n:]
    table, extra_table = work / f"table-{n}.parquet", work / f"extra-{n}.parquet"
    index = work / f"index-{n}"
    t = time.perf_counter()
    write_table(table, base)
    write_table(extra_table, extra, first=n)
    print(f"[{n}] tables written in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    queries = queries_for(base, n_queries)
    np.save(work / "queries.npy", queries)
    np.save(work / "brute-queries.npy", queries[:brute_queries])
    truth = exact_top(base, queries)
    del vectors, base
    subprocess.run(["rm", "-rf", str(index)], check=True)
    result: dict[str, Any] = {"rows": n, "queries": n_queries}
    result["build"] = run_worker("build", str(table), str(index))
    print(f"[{n}] build {result['build']}", file=sys.stderr, flush=True)
    search = run_worker("search", str(index), str(work / "queries.npy"), "10")
    result["search"] = _search_figures(search, truth)
    print(f"[{n}] search {result['search']}", file=sys.stderr, flush=True)
    result["resident"] = _search_figures(run_worker("brute", str(table), str(work / "queries.npy"), "10", "1"), truth)
    print(f"[{n}] resident {result['resident']}", file=sys.stderr, flush=True)
    if n <= 200_000:  # today's path holds ~13 KB a row (2.6 GB at 200k): not run at 1M on a shared machine
        brute = run_worker("brute", str(table), str(work / "brute-queries.npy"), "10", "0")
        result["today"] = _search_figures(brute, truth[:brute_queries])
        print(f"[{n}] today {result['today']}", file=sys.stderr, flush=True)
    result["add_10k"] = run_worker("build", str(extra_table), str(index))
    result["rerun_superset"] = run_worker("build", str(table), str(index))
    after = run_worker("search", str(index), str(work / "queries.npy"), "10")
    result["search_after_add"] = {"p50_ms": _ms(after["latencies"], 50), "peak_rss_mb": round(after["peak_rss_mb"])}
    result["index_bytes"] = sum(p.stat().st_size for p in index.iterdir())
    return result


def _search_figures(run: dict[str, Any], truth: np.ndarray) -> dict[str, Any]:
    return {
        "p50_ms": _ms(run["latencies"], 50),
        "p95_ms": _ms(run["latencies"], 95),
        "recall_at_10": round(_recall(run["rows"], truth), 4),
        "peak_rss_mb": round(run["peak_rss_mb"]),
        **{k: round(run[k], 3) for k in ("open_seconds", "first_query_seconds") if k in run},
    }


def bench_duplicates(n: int, work: Path) -> dict[str, Any]:
    """``n`` rows: 1% planted exact copies (same sha256), 1% planted near copies (cosine ≥ 0.97)."""
    work.mkdir(parents=True, exist_ok=True)
    vectors = clustered(n, seed=7)
    rng = np.random.default_rng(3)
    originals = rng.choice(n, n // 50, replace=False)
    exact, near = originals[: n // 100], originals[n // 100 :]
    table = work / f"dups-{n}.parquet"
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    copies = rng.choice(np.setdiff1d(np.arange(n), originals), len(originals), replace=False)
    for src, dst in zip(exact, copies[: len(exact)], strict=True):
        vectors[dst], shas[dst] = vectors[src], shas[src]
    for src, dst in zip(near, copies[len(exact) :], strict=True):
        v = vectors[src] + 0.01 * rng.standard_normal(DIM, dtype=np.float32)
        vectors[dst] = v / np.linalg.norm(v)
    write_table(table, vectors)
    t = pq.read_table(table)
    t = t.set_column(1, "image_sha256", pa.array(shas))
    pq.write_table(t, table)
    result = run_worker("duplicates", str(table), str(work / f"dups-out-{n}"))
    planted = {frozenset((int(a), int(b))) for a, b in zip(originals, copies, strict=True)}
    out = pq.read_table(work / f"dups-out-{n}" / "duplicates.parquet").to_pandas()
    row_of = {f"img/{i:08d}.jpg": i for i in range(n)}
    out["row"] = out["member"].map(row_of)
    found = {frozenset(g["row"].tolist()) for _, g in out.groupby("group") if len(g) == 2}
    result["planted_pairs"] = len(planted)
    result["planted_pairs_found"] = len(planted & found)
    result.pop("duplicates_path", None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--brute-queries", type=int, default=5)
    parser.add_argument("--duplicates-n", type=int, default=100_000)
    parser.add_argument("--only", default="index,duplicates")
    parser.add_argument("--work", default=str(OUT / "index-work"))
    args = parser.parse_args()
    if args.worker:
        name, *rest = args.worker
        print(json.dumps(WORKERS[name](*rest)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    sections = set(args.only.split(","))
    if "index" in sections:
        for n in (int(s) for s in args.sizes.split(",")):
            result = bench_index(n, args.queries, Path(args.work), args.brute_queries)
            (OUT / f"index-{n}.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result, indent=1))
    if "duplicates" in sections:
        result = bench_duplicates(args.duplicates_n, Path(args.work))
        (OUT / f"duplicates-{args.duplicates_n}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    main()
