"""Embedding drift at scale (issues 19, 28): a 100,000 × 512 reference table against a 10,000-row
current one, read and tested by every `monitor_drift` method — statistic and permutation p-value
(199 permutations) — in a fresh process (peak RSS = its ``VmHWM``).

    .venv/bin/python -m benchmarks.drift            # ~1 min on 2 shared cores; a table on stdout

Targets: all four methods, tables read included, ≤ 30 s and ≤ 1.5 GB peak RSS (the process's CPU
seconds are printed too: on a shared machine they say more than the wall time). Side by side in the
same process: each step's share of the total, and MMD at its 1,000-row bound against 2,000 rows (the
kernel is quadratic: why it is subsampled). The tables are planted (unit vectors around a mean
direction; the current window's at 60° from the reference's), written before the timed process starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIM = 512


def _write_table(path: Path, rows: int, direction: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    writer = pq.ParquetWriter(path, pa.schema([("model", pa.string()), ("version", pa.string()),
                                               ("embedding", pa.list_(pa.float32()))]))  # fmt: skip
    for start in range(0, rows, 20_000):
        n = min(20_000, rows - start)
        vectors = direction[None, :] + rng.standard_normal((n, DIM)).astype(np.float32) / np.float32(np.sqrt(DIM))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM).cast(pa.list_(pa.float32()))
        writer.write_table(pa.table({"model": ["clip"] * n, "version": ["ViT-B-16"] * n, "embedding": embedding}))
    writer.close()


def _child(reference: str, current: str) -> None:
    """Read both windows and score them with every method; print timings and VmHWM as JSON."""
    import resource

    from prefect_roboflow.flows._drift import methods
    from prefect_roboflow.flows._drift.windows import read_window

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    times: dict[str, float] = {}
    cpus: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), cpu()
    ref = read_window(reference, "reference")
    cur = read_window(current, "current")
    assert ref is not None and cur is not None
    times["read tables"], cpus["read tables"] = time.perf_counter() - started, cpu() - cpu_started
    scores = {}
    for method in methods.METHODS:
        t, c = time.perf_counter(), cpu()
        test = methods.drift_test(method, ref.vectors, cur.vectors, seed=0)
        scores[method] = test.score
        scores[f"{method} p"] = test.p_value
        times[method], cpus[method] = time.perf_counter() - t, cpu() - c
    total, cpu_total = time.perf_counter() - started, cpu() - cpu_started
    t, c = time.perf_counter(), cpu()
    methods.MAX_ROWS["mmd"] = 2_000
    methods.drift_test("mmd", ref.vectors, cur.vectors, seed=0)
    times["mmd at 2,000 rows (not in total)"] = time.perf_counter() - t
    cpus["mmd at 2,000 rows (not in total)"] = cpu() - c
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"times": times, "cpus": cpus, "total": total, "cpu": cpu_total, "peak_mb": peak_kb / 1024,
                      "scores": scores, "n": [len(ref.vectors), len(cur.vectors)]}))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-rows", type=int, default=100_000)
    parser.add_argument("--current-rows", type=int, default=10_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    rng = np.random.default_rng(0)
    a = rng.standard_normal(DIM)
    a /= np.linalg.norm(a)
    r = rng.standard_normal(DIM)
    r -= (r @ a) * a
    r /= np.linalg.norm(r)
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as folder:
        reference, current = Path(folder) / "reference.parquet", Path(folder) / "current.parquet"
        _write_table(reference, args.reference_rows, a.astype(np.float32), 1)
        _write_table(current, args.current_rows, (0.5 * a + np.sqrt(0.75) * r).astype(np.float32), 2)
        load = os.getloadavg()
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.drift", "--child", str(reference), str(current)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        load_after = os.getloadavg()
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"reference {report['n'][0]} x {DIM}, current {report['n'][1]} x {DIM}; "
          f"load average {load[0]:.1f} before, {load_after[0]:.1f} after")  # fmt: skip
    print("| step | seconds | CPU seconds | share of total |\n|---|---|---|---|")
    for step, seconds in report["times"].items():
        share = f"{seconds / report['total']:.0%}" if "not in total" not in step else "—"
        print(f"| {step} | {seconds:.2f} | {report['cpus'][step]:.2f} | {share} |")
    print(f"| **total** | {report['total']:.2f} | {report['cpu']:.2f} | 100% |")
    pair = ("read tables", "domain_classifier", "mean_cosine")
    print(
        f"| default pair (read + domain_classifier + mean_cosine) | {sum(report['times'][s] for s in pair):.2f} "
        f"| {sum(report['cpus'][s] for s in pair):.2f} | |"
    )
    print(f"CPU seconds of the process over the total (all threads): {report['cpu']:.1f}")
    print(f"scores: {', '.join(f'{k} {v:.4f}' for k, v in report['scores'].items())}")
    ok = report["total"] <= 30 and report["peak_mb"] <= 1536
    print(f"peak RSS {report['peak_mb']:.0f} MB; target ≤ 30 s and ≤ 1.5 GB: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 3


if __name__ == "__main__":
    raise SystemExit(main())
