"""Curation at scale (issue 30): `curate_images` over a 1,000,000 or 10,000,000 × 512 vector index.

    bash benchmarks/run.sh --only curation [--rows 1000000]    # = python -m benchmarks.curation bench
    python -m benchmarks.curation build --rows 1000000 --index out/benchmarks/curation-1m
    python -m benchmarks.curation run --index out/benchmarks/curation-1m [--budget 1000] [--check 1000]

``bench`` builds ``out/benchmarks/curation-<rows>`` once (kept for later runs) and runs it in a fresh
process with ``--check 500 --rerun``.

``build`` writes a vector index of synthetic clustered 512-d unit vectors (as `benchmarks.index_bench`:
each cluster of ~1,000 rows, at most 4,096 clusters, spans a random 32-d subspace around its centre,
its spread drawn from 0.1–0.4 so that some clusters are tight and some broad, as real classes are)
with planted near copies (1% of rows: an earlier row plus noise, cosine ≈ 0.99) and exact copies
(0.5%: an earlier row's vector and sha256), generated and added block by block (never all in memory;
no IVF-PQ: curation reads rows, not the ANN file). ``run`` runs the flow on the Prefect test harness
in a fresh process and prints one JSON line: wall time, CPU time, peak RSS (``VmHWM``), the load
average, the result, and — with ``--check N`` — the quality against exact brute force on N random
rows (uniqueness's Spearman correlation, the share of those rows whose nearest neighbour distance is
exact) and the share of planted near/exact copies that share a duplicate group with their original.
A second run over the same index (``--rerun``) reads the scores from the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DIM = 512
BLOCK = 100_000
NEAR_SHARE, EXACT_SHARE = 0.01, 0.005


def _planted(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(kind, original)`` per row: 0 plain, 1 near copy, 2 exact copy of row ``original``."""
    rng = np.random.default_rng(seed + 7)
    kind = np.zeros(rows, dtype=np.int8)
    copies = rng.choice(np.arange(rows // 10, rows), int(rows * (NEAR_SHARE + EXACT_SHARE)), replace=False)
    kind[copies[: int(rows * NEAR_SHARE)]] = 1
    kind[copies[int(rows * NEAR_SHARE) :]] = 2
    original = np.full(rows, -1, dtype=np.int64)
    original[copies] = rng.integers(0, rows // 10, len(copies))
    return kind, original, copies


def build(rows: int, index_path: str, seed: int = 0) -> dict[str, Any]:
    """Write the benchmark index (see the module docs)."""
    from prefect_roboflow.flows.vector_index import RowBatch, VectorIndex

    rng = np.random.default_rng(seed)
    clusters = min(4096, max(1, rows // 1000))
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    spread = rng.uniform(0.1, 0.4, clusters).astype(np.float32)  # tight and broad clusters: uniqueness varies
    bases = rng.standard_normal((clusters, 32, DIM), dtype=np.float32) * spread[:, None, None]
    kind, original, _ = _planted(rows, seed)
    head = np.empty((rows // 10, DIM), dtype=np.float32)  # originals of the copies: the first tenth
    index = VectorIndex.open(index_path, create=True, exact_below=2**62)
    started = time.perf_counter()

    def batches() -> Any:
        for start in range(0, rows, BLOCK):
            n = min(BLOCK, rows - start)
            labels = rng.integers(0, clusters, n)
            z = rng.standard_normal((n, 32), dtype=np.float32)
            out = centres[labels] + 0.05 * rng.standard_normal((n, DIM), dtype=np.float32)
            order = np.argsort(labels, kind="stable")
            bounds = np.searchsorted(labels[order], np.arange(clusters + 1))
            for c in range(clusters):
                members = order[bounds[c] : bounds[c + 1]]
                if len(members):
                    out[members] += z[members] @ bases[c]
            out /= np.linalg.norm(out, axis=1, keepdims=True)
            ids = np.arange(start, start + n)
            shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in ids]
            near, exact = kind[ids] == 1, kind[ids] == 2
            if near.any():
                noisy = head[original[ids[near]]] + 0.004 * rng.standard_normal(
                    (int(near.sum()), DIM), dtype=np.float32
                )
                out[near] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
            for j in np.flatnonzero(exact):
                out[j] = head[original[ids[j]]]
                shas[j] = hashlib.sha256(str(original[ids[j]]).encode()).hexdigest()
            first = min(n, max(0, rows // 10 - start))
            head[start : start + first] = out[:first]
            yield RowBatch([f"img/{i:09d}.jpg" for i in ids], shas, out)

    added = index.add(batches(), family="clip", version="ViT-B-16")
    return {"rows": added.rows, "seconds": round(time.perf_counter() - started, 1), "index": index_path}


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _exact_uniqueness(index: Any, rows: np.ndarray) -> np.ndarray:
    """The weighted 3-NN cosine distance of ``rows`` by brute force over every row."""
    from prefect_roboflow.flows._curation.sketch import blocks

    queries = index.vectors(rows)
    best = np.full((len(rows), 4), -np.inf, dtype=np.float32)
    for _, vectors in blocks(index, 65_536):
        scores = queries @ vectors.T
        top = -np.partition(-scores, 3, axis=1)[:, :4]
        best = -np.partition(-np.concatenate([best, top], axis=1), 3, axis=1)[:, :4]
    best = -np.sort(-best, axis=1)[:, 1:4]  # the first is the row itself (or an exact copy: distance 0 either way)
    return ((1.0 - best) * np.array([0.6, 0.3, 0.1])).mean(axis=1)


def run(index_path: str, budget: int, check: int, rerun: bool, cache: str | None, out: str | None) -> dict[str, Any]:
    """Run the flow once (twice with ``rerun``) in this process; the figures."""
    import pyarrow.parquet as pq
    from prefect.testing.utilities import prefect_test_harness

    from prefect_roboflow.flows.curate_images import curate_images
    from prefect_roboflow.flows.vector_index import VectorIndex

    out = out or tempfile.mkdtemp(prefix="curation-bench-")
    cache = cache or tempfile.mkdtemp(prefix="curation-cache-")
    figures: dict[str, Any] = {"load_before": os.getloadavg()}
    with prefect_test_harness(server_startup_timeout=120):
        cpu, started = time.process_time(), time.perf_counter()
        result = curate_images(index_path, out, budget=budget, cache_storage=cache, gallery_rows=0)
        figures.update(
            seconds=round(time.perf_counter() - started, 1),
            cpu_seconds=round(time.process_time() - cpu, 1),
            peak_rss_gb=round(_vm_hwm() / 2**30, 2),
            load_after=os.getloadavg(),
            result=result.model_dump(),
        )
        if rerun:
            started = time.perf_counter()
            again = curate_images(index_path, out, budget=budget, cache_storage=cache, gallery_rows=0)
            figures["rerun"] = {"seconds": round(time.perf_counter() - started, 1), "from_cache": again.from_cache}
    if check:
        index = VectorIndex.open(index_path)
        table = pq.read_table(result.curation_path, columns=["uniqueness", "duplicate_group"])
        rng = np.random.default_rng(1)
        rows = np.sort(rng.choice(index.rows, check, replace=False))
        from scipy.stats import spearmanr

        exact = _exact_uniqueness(index, rows)
        ours = table.column("uniqueness").to_numpy()[rows]
        figures["uniqueness_spearman_on_sample"] = round(float(spearmanr(exact, ours).statistic), 4)
        group = table.column("duplicate_group").to_numpy(zero_copy_only=False)
        group = np.where(np.isnan(group.astype(float)), -1, group).astype(np.int64)
        kind, original, copies = _planted(index.rows, 0)
        for name, code in (("near", 1), ("exact", 2)):
            planted = copies[kind[copies] == code]
            together = (group[planted] >= 0) & (group[planted] == group[original[planted]])
            figures[f"planted_{name}_copies_grouped"] = round(float(together.mean()), 4)
    return figures


def oracle() -> dict[str, Any]:
    """The agreements the tests assert, as figures: 20,000 planted rows (tests/integration/test_curate_images.py)
    against FiftyOne Brain's code (its side venv), brute-force pairs and brute-force greedy k-centre."""
    import subprocess

    import pyarrow.parquet as pq
    from prefect.testing.utilities import prefect_test_harness
    from scipy.stats import spearmanr

    from prefect_roboflow.flows.curate_images import curate_images

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests" / "integration"))
    import test_curate_images as t  # the planted rows and brute-force helpers the tests use

    data = t.planted()
    root = Path(tempfile.mkdtemp(prefix="curation-oracle-"))
    table = t.write_table(root / "embeddings.parquet", data["vectors"], data["shas"], data["splits"])
    with prefect_test_harness(server_startup_timeout=120):
        result = curate_images(str(table), str(root / "out"), budget=100, cache_storage=str(root / "cache"))
    rows = pq.read_table(result.curation_path).to_pandas()
    python = subprocess.run([str(t.ORACLE / "up")], check=True, capture_output=True, text=True).stdout.split()[-1]
    np.save(root / "e.npy", data["vectors"])
    subprocess.run([python, str(t.ORACLE / "oracle.py"), str(root / "e.npy"), str(root / "fo.npz")], check=True)
    fo = np.load(root / "fo.npz")
    vectors = data["vectors"]
    greedy = [0]
    nearest = 1.0 - vectors @ vectors[0]
    while len(greedy) < 100:
        greedy.append(int(np.argmax(nearest)))
        np.minimum(nearest, 1.0 - vectors @ vectors[greedy[-1]], out=nearest)
    picks = rows.loc[rows["selected"], "selection_rank"].sort_values().index.to_numpy()
    return {
        "rows": len(rows),
        "uniqueness_spearman_vs_fiftyone": round(float(spearmanr(rows["uniqueness"], fo["uniqueness"]).statistic), 6),
        "uniqueness_max_abs_difference": float(np.abs(rows["uniqueness"].to_numpy() - fo["uniqueness"]).max()),
        "representativeness_spearman_vs_1_minus_fiftyone": round(
            float(spearmanr(rows["representativeness"], 1.0 - fo["representativeness"]).statistic), 6
        ),
        "representativeness_spearman_vs_fiftyone_as_returned": round(
            float(spearmanr(rows["representativeness"], fo["representativeness"]).statistic), 6
        ),
        "same_cluster_as_fiftyone": float((rows["cluster"].to_numpy() == fo["cluster"]).mean()),
        "coverage_radius": t._radius(vectors, picks),
        "brute_force_greedy_radius": t._radius(vectors, np.asarray(greedy)),
        "duplicate_groups": result.duplicate_groups,
        "leaks": result.leaks,
    }


def bench(rows: int) -> dict[str, Any]:
    """Build the index of ``rows`` once, then measure a run of it in a fresh process."""
    import subprocess

    index = Path(__file__).resolve().parents[1] / "out" / "benchmarks" / f"curation-{rows}"
    if not (index / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "benchmarks.curation", "build", "--rows", str(rows), "--index", str(index)],
            check=True,
        )
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.curation", "run", "--index", str(index), "--check", "500", "--rerun"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("oracle")
    whole = sub.add_parser("bench")
    whole.add_argument("--rows", type=int, default=1_000_000)
    b = sub.add_parser("build")
    b.add_argument("--rows", type=int, default=1_000_000)
    b.add_argument("--index", required=True)
    r = sub.add_parser("run")
    r.add_argument("--index", required=True)
    r.add_argument("--budget", type=int, default=1000)
    r.add_argument("--check", type=int, default=0, help="rows checked against brute force")
    r.add_argument("--rerun", action="store_true", help="run again over the same rows (the cache)")
    r.add_argument("--cache")
    r.add_argument("--out")
    args = parser.parse_args(argv)
    if args.command == "oracle":
        print(json.dumps(oracle(), default=str), flush=True)
    elif args.command == "bench":
        print(json.dumps(bench(args.rows), default=str), flush=True)
    elif args.command == "build":
        print(json.dumps(build(args.rows, args.index)), flush=True)
    else:
        figures = run(args.index, args.budget, args.check, args.rerun, args.cache, args.out)
        figures["max_rss_gb_getrusage"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print(json.dumps(figures, default=str), flush=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
