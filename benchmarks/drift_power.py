"""Drift power beside Evidently (issue 28): how often each side reports drift, on windows of 50, 200
and 1,000 rows, with no drift (the false-alarm rate) and with drifts of growing size, on the same
windows for both sides.

    benchmarks/drift_evidently.sh                     # Evidently's side venv, once (~2 min)
    .venv/bin/python -m benchmarks.drift_images       # the image pools through the server, once (~6 min)
    .venv/bin/python -m benchmarks.drift_power --trials 10 --null-trials 40   # ~30 min at load 11

Data. *Planted* (benchmarks/drift_data.py): anisotropic, clustered 512-d unit vectors; each trial's
reference is 2,000 rows drawn from a pool of 20,000 of the space, its current window is fresh: no
drift, a mean shift (every row moved by 0.01 / 0.02 / 0.04 along one direction, row norms ≈ 1), or
a new cluster making up 5 / 10 / 25% of the window. *Images* (benchmarks/drift_images.py): CLIP
embeddings from the real server of synthetic scenes: a 1,500-image reference pool against windows
drawn from 1,500 other plain scenes (no drift), or with 25% / 100% of the window darker (× 0.7)
or recoloured (R, G, B → G, B, R). A window of 1,000 images draws from 1,500: its trials overlap.

Sides. Ours: `monitor_drift`'s default (``domain_classifier`` and ``mean_cosine``, drift when
either's permutation p-value is ≤ α / 2 = 0.025, 199 permutations, seed = trial). Evidently
0.7.23's embedding drift in its side venv (benchmarks/drift_evidently.py): its default ``model()``
(threshold 0.55 with a reference of ≥ 1,000 rows, as here) and ``model(bootstrap=True)``. Each
cell reports the share of trials reporting drift; the no-drift rows are each side's false-alarm
rate, with a Wilson 95% interval.
``--minimum`` measures instead ours at 5 to 50 rows (the calibration of `MIN_ROWS`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.drift_data import make_space, sample
from benchmarks.drift_images import load_pools
from prefect_roboflow.flows._drift.methods import DEFAULT_METHODS, drift_test

SIZES = (50, 200, 1000)
PLANTED = {
    "none": {},
    "mean shift 0.01": {"shift": 0.01},
    "mean shift 0.02": {"shift": 0.02},
    "mean shift 0.04": {"shift": 0.04},
    "new cluster 5%": {"new_cluster": 0.05},
    "new cluster 10%": {"new_cluster": 0.10},
    "new cluster 25%": {"new_cluster": 0.25},
}
IMAGES = {"none": None, "darker 25%": ("darker", 0.25), "darker 100%": ("darker", 1.0),
          "recoloured 25%": ("recoloured", 0.25), "recoloured 100%": ("recoloured", 1.0)}  # fmt: skip
REFERENCE_ROWS = 2000
HERE = Path(__file__).resolve().parent


def wilson(hits: int, trials: int) -> tuple[float, float]:
    """The Wilson 95% interval of a binomial share."""
    if trials == 0:
        return 0.0, 1.0
    z, p = 1.96, hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def planted_cell(name: str, size: int, trials: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A reference pool, each trial's reference rows in it, and each trial's current window."""
    space = make_space(28)
    pool = sample(space, np.random.default_rng(0), 20_000)
    index = np.stack([np.random.default_rng(1_000 + t).choice(len(pool), REFERENCE_ROWS, replace=False)
                      for t in range(trials)])  # fmt: skip
    current = np.stack([sample(space, np.random.default_rng([size, t, len(name)]), size, **PLANTED[name])
                        for t in range(trials)])  # fmt: skip
    return pool, index, current


def image_cell(pools: dict[str, np.ndarray], name: str, size: int, trials: int) -> tuple[np.ndarray, ...]:
    reference = pools["reference"]
    index = np.tile(np.arange(len(reference)), (trials, 1))
    windows = []
    for t in range(trials):
        rng = np.random.default_rng([size, t, len(name)])
        variant, share = IMAGES[name] or ("plain", 0.0)
        moved = round(share * size)
        plain = pools["plain"][rng.choice(len(pools["plain"]), size - moved, replace=False)]
        shifted = pools[variant][rng.choice(len(pools[variant]), moved, replace=False)] if moved else plain[:0]
        windows.append(np.vstack([plain, shifted])[rng.permutation(size)])
    return reference, index, np.stack(windows)


class Evidently:
    """The worker in Evidently's venv, fed one cell at a time."""

    def __init__(self) -> None:
        python = subprocess.run([str(HERE / "drift_evidently.sh")], capture_output=True, text=True, check=True)
        self.process = subprocess.Popen([python.stdout.strip().splitlines()[-1], str(HERE / "drift_evidently.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.folder = tempfile.TemporaryDirectory(prefix="drift-power-")

    def submit(self, pool: np.ndarray, index: np.ndarray, current: np.ndarray) -> None:
        """Send a cell; Evidently works on it while ours does (`collect` reads its answer)."""
        path = Path(self.folder.name) / "cell.npz"
        np.savez(path, reference=pool, reference_index=index, current=current)
        assert self.process.stdin
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()

    def collect(self) -> list[dict[str, bool]]:
        assert self.process.stdout
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.folder.cleanup()


def ours(pool: np.ndarray, index: np.ndarray, current: np.ndarray, alpha: float = 0.05) -> list[bool]:
    """`monitor_drift`'s default verdict per trial: any default method with p ≤ alpha / k."""
    each = alpha / len(DEFAULT_METHODS)
    return [any(drift_test(m, pool[index[t]], current[t], seed=t).p_value <= each for m in DEFAULT_METHODS)
            for t in range(len(current))]  # fmt: skip


def shown(hits: int, trials: int, interval: bool) -> str:
    if not interval:
        return f"{hits / trials:.0%}"
    low, high = wilson(hits, trials)
    return f"{hits / trials:.1%} ({low:.1%}–{high:.1%})"


def power(args: argparse.Namespace) -> None:
    evidently = Evidently()
    pools = load_pools(args.server)
    sides = ("ours", "evidently_default", "evidently_bootstrap")
    try:
        for data, scenarios in (("planted", PLANTED), ("images", IMAGES)):
            print(f"\n### {data}\n\n| drift | rows | ours | Evidently model() | Evidently model(bootstrap=True) |")
            print("|---|---|---|---|---|")
            for name in scenarios:
                for size in SIZES:
                    trials = args.null_trials if name == "none" else args.trials
                    started = time.perf_counter()
                    cell = (
                        planted_cell(name, size, trials) if data == "planted" else image_cell(pools, name, size, trials)
                    )
                    evidently.submit(*cell)
                    mine = sum(ours(*cell))
                    theirs = evidently.collect()
                    hits = {"ours": mine, **{s: sum(r[s] for r in theirs) for s in sides[1:]}}
                    row = " | ".join(shown(hits[s], trials, name == "none") for s in sides)
                    seconds = time.perf_counter() - started
                    print(f"| {name} | {size} | {row} |  <!-- {trials} trials, {seconds:.0f} s -->", flush=True)
    finally:
        evidently.close()


def minimum(args: argparse.Namespace) -> None:
    """Ours at small windows: the false-alarm rate and the power on two planted drifts."""
    print("| rows | no drift | mean shift 0.04 | new cluster 25% |\n|---|---|---|---|")
    for size in (5, 10, 15, 20, 30, 50):
        cells = {name: planted_cell(name, size, args.null_trials if name == "none" else args.trials)
                 for name in ("none", "mean shift 0.04", "new cluster 25%")}  # fmt: skip
        rates = [shown(sum(ours(*cell)), len(cell[2]), name == "none") for name, cell in cells.items()]
        print(f"| {size} | {' | '.join(rates)} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("INFERENCE_SERVER_URL", "http://127.0.0.1:9001"))
    parser.add_argument("--trials", type=int, default=40, help="trials per drifted cell")
    parser.add_argument("--null-trials", type=int, default=200, help="trials per no-drift cell")
    parser.add_argument("--minimum", action="store_true", help="measure the small windows instead")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    (minimum if args.minimum else power)(args)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
