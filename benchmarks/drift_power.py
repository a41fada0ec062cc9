"""Drift power beside Evidently (issue 28): how often each side reports drift, on windows of 50, 200
and 1,000 rows, with no drift (the false-alarm rate) and with drifts of growing size, on the same
windows for both sides.

    benchmarks/drift_evidently.sh                     # Evidently's side venv, once (~2 min)
    .venv/bin/python -m benchmarks.drift_images       # the image pools through the server, once (~6 min)
    .venv/bin/python -m benchmarks.drift_power        # 150 / 100 null trials, 20 per drift: ~35 min at load 10
    .venv/bin/python -m benchmarks.drift_power --minimum   # ours at 5 to 50 rows (the calibration of MIN_ROWS)

Data. *Planted* (benchmarks/drift_data.py): anisotropic, clustered 512-d unit vectors. Every trial
draws a fresh 2,000-row reference and a fresh current window from the space (trials are
independent; trial t's reference is the same in every drift of a window size, so the drifts are
compared on paired data): no drift, a mean shift (every row moved by 0.01 / 0.02 / 0.04 along one
direction, row norms ≈ 1), or a new cluster making up 5 / 10 / 25% of the window. *Images*
(benchmarks/drift_images.py): CLIP embeddings from the real server of 3,000 plain synthetic scenes
and 1,500 each darker (× 0.7) and recoloured (R, G, B → G, B, R). Every trial splits the plain
scenes at random: 1,500 are the reference, the window's plain rows come from the other 1,500, and
25% or 100% of the window is darker or recoloured. Under no drift the reference and the window are
then a random split of one set, so a permutation test is exactly valid given the set, and trials
are independent given it; at 1,000 rows the windows of different trials overlap (1,000 of 1,500).

Sides. Ours: `monitor_drift`'s default (``domain_classifier`` and ``mean_cosine``, drift when
either's permutation p-value is ≤ α / 2 = 0.025, 199 permutations, seed = trial). Evidently
0.7.23's embedding drift in its side venv (benchmarks/drift_evidently.py): its default ``model()``
(ROC AUC of an `SGDClassifier` on a 50/50 split, drift above 0.55: its choice with a reference of
≥ 1,000 rows, as here), its ``model(bootstrap=True)`` (drift above the 95th percentile of 100
random classifiers' AUC) and, fairest, the same AUC above a threshold calibrated to a 5% false-alarm
rate on this run's own no-drift trials of that data and window size (the 95th percentile of
Evidently's null AUCs: its false-alarm rate is then ≤ 5% on those trials by construction).

Each cell is the share of trials reporting drift; the no-drift rows are each side's false-alarm
rate with a Wilson 95% interval. Every trial's p-values and AUC go to a JSON file too
(``--out``), so a table can be redrawn without rerunning.
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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.drift_data import Space, make_space, sample
from benchmarks.drift_images import CACHE, load_pools
from prefect_roboflow.flows._drift.methods import ALPHA, DEFAULT_METHODS, drift_test

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
PLANTED_REFERENCE_ROWS = 2000
IMAGE_REFERENCE_ROWS = 1500
#: Trials sent to Evidently at once (a chunk's references: 25 × 2,000 × 512 float32 = 100 MB).
CHUNK = 25
CALIBRATED_FAR = 0.05
HERE = Path(__file__).resolve().parent
SPACE_SEED = 28

Pair = tuple[np.ndarray, np.ndarray]


def wilson(hits: int, trials: int) -> tuple[float, float]:
    """The Wilson 95% interval of a binomial share."""
    if trials == 0:
        return 0.0, 1.0
    z, p = 1.96, hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def planted_trial(space: Space, name: str, size: int, trial: int) -> Pair:
    """Trial ``trial``'s fresh reference (the same for every drift at this size) and current window."""
    scenario = list(PLANTED).index(name)
    with threadpool_limits(limits=1, user_api="blas"):
        reference = sample(space, np.random.default_rng([SPACE_SEED, size, trial]), PLANTED_REFERENCE_ROWS)
        current = sample(space, np.random.default_rng([SPACE_SEED, size, trial, 1 + scenario]), size, **PLANTED[name])
    return reference, current


def image_trial(pools: dict[str, np.ndarray], name: str, size: int, trial: int) -> Pair:
    """A random split of the plain scenes into reference and window; then the drift's share of the window."""
    plain = np.vstack([pools["reference"], pools["plain"]])
    rng = np.random.default_rng([SPACE_SEED, size, trial])
    order = rng.permutation(len(plain))
    reference, others = plain[order[:IMAGE_REFERENCE_ROWS]], plain[order[IMAGE_REFERENCE_ROWS:]]
    variant, share = IMAGES[name] or ("plain", 0.0)
    moved = round(share * size)
    rng = np.random.default_rng([SPACE_SEED, size, trial, 1 + list(IMAGES).index(name)])
    kept = others[rng.choice(len(others), size - moved, replace=False)]
    shifted = pools[variant][rng.choice(len(pools[variant]), moved, replace=False)] if moved else kept[:0]
    return reference, np.vstack([kept, shifted])[rng.permutation(size)]


class Evidently:
    """The worker in Evidently's venv, fed one chunk of trials at a time."""

    def __init__(self) -> None:
        python = subprocess.run([str(HERE / "drift_evidently.sh")], capture_output=True, text=True, check=True)
        self.process = subprocess.Popen([python.stdout.strip().splitlines()[-1], str(HERE / "drift_evidently.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.folder = tempfile.TemporaryDirectory(prefix="drift-power-")

    def submit(self, pairs: list[Pair]) -> None:
        """Send a chunk; Evidently works on it while ours does (`collect` reads its answer)."""
        path = Path(self.folder.name) / "chunk.npz"
        np.savez(path, reference=np.stack([r for r, _ in pairs]), current=np.stack([c for _, c in pairs]))
        assert self.process.stdin
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()

    def collect(self) -> list[dict[str, float | bool]]:
        assert self.process.stdout
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.folder.cleanup()


def ours(reference: np.ndarray, current: np.ndarray, trial: int) -> dict[str, float]:
    """Each default method's permutation p-value (`monitor_drift` alarms when any is ≤ α / k)."""
    return {m: drift_test(m, reference, current, seed=trial).p_value for m in DEFAULT_METHODS}


def our_verdict(p_values: dict[str, float], alpha: float = ALPHA) -> bool:
    return any(p <= alpha / len(DEFAULT_METHODS) for p in p_values.values())


def chunks(trials: int) -> Iterator[range]:
    for start in range(0, trials, CHUNK):
        yield range(start, min(trials, start + CHUNK))


def shown(hits: int, trials: int, interval: bool) -> str:
    if not interval:
        return f"{hits / trials:.0%}"
    low, high = wilson(hits, trials)
    return f"{hits / trials:.1%} ({low:.1%}–{high:.1%})"


def calibrated(null_aucs: list[float], far: float = CALIBRATED_FAR) -> float:
    """The smallest threshold with at most ``far`` of the null AUCs above it."""
    ordered = sorted(null_aucs)
    return ordered[math.ceil((1 - far) * len(ordered)) - 1]


def power(args: argparse.Namespace) -> None:
    evidently = Evidently()
    pools = load_pools(args.server)
    space = make_space(SPACE_SEED)
    records: list[dict[str, object]] = []
    out = Path(args.out or CACHE / f"power-{time.strftime('%Y%m%dT%H%M%S')}.json")
    try:
        for data, scenarios in (("planted", PLANTED), ("images", IMAGES)):
            scenarios = {k: v for k, v in scenarios.items() if k == "none" or not args.drifts or k in args.drifts}
            if len(scenarios) == 1 and args.drifts:
                continue
            print(f"\n### {data}\n\n| drift | rows | ours (default pair) | Evidently `model()` | "
                  "Evidently `model(bootstrap=True)` | Evidently AUC at its calibrated 5% threshold |")  # fmt: skip
            print("|---|---|---|---|---|---|")
            thresholds: dict[int, float] = {}
            for name in scenarios:
                for size in args.sizes:
                    trials = (args.null_trials if data == "planted" else args.image_null_trials) if name == "none" \
                        else args.trials  # fmt: skip
                    started, cpu = time.perf_counter(), time.process_time()
                    cell: list[dict[str, object]] = []
                    for block in chunks(trials):
                        pairs = [planted_trial(space, name, size, t) if data == "planted"
                                 else image_trial(pools, name, size, t) for t in block]  # fmt: skip
                        evidently.submit(pairs)
                        mine = [ours(r, c, t) for t, (r, c) in zip(block, pairs, strict=True)]
                        theirs = evidently.collect()
                        cell += [{"data": data, "drift": name, "rows": size, "trial": t, "ours": p, **e}
                                 for t, p, e in zip(block, mine, theirs, strict=True)]  # fmt: skip
                    records += cell
                    aucs = [float(r["auc"]) for r in cell]  # type: ignore[arg-type]
                    if name == "none":
                        thresholds[size] = calibrated(aucs)
                    threshold = thresholds[size]
                    hits = [
                        sum(our_verdict(r["ours"]) for r in cell),  # type: ignore[arg-type]
                        sum(bool(r["default"]) for r in cell),
                        sum(bool(r["bootstrap"]) for r in cell),
                        sum(a > threshold for a in aucs),
                    ]
                    row = " | ".join(shown(h, trials, name == "none") for h in hits)
                    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
                    note = f"{trials} trials, {seconds:.0f} s, {cpu_seconds:.0f} CPU-s"
                    if name == "none":
                        note += f"; Evidently's calibrated threshold {threshold:.3f}"
                    print(f"| {name} | {size} | {row} |  <!-- {note} -->", flush=True)
                    out.write_text(json.dumps(records))
    finally:
        evidently.close()
    print(f"\nper-trial records: {out}")


def minimum(args: argparse.Namespace) -> None:
    """Ours at small windows against a 2,000-row reference: the false-alarm rate and the power on
    the benchmark's planted drifts and on darker images (100% of the window)."""
    space = make_space(SPACE_SEED)
    pools = load_pools(args.server)
    cells = ("none", "mean shift 0.02", "mean shift 0.04", "new cluster 25%", "darker 100%")
    print("| rows | " + " | ".join(cells) + " |\n|---|" + "---|" * len(cells))
    for size in (5, 10, 15, 20, 30, 50):
        rates = []
        for name in cells:
            trials = args.null_trials if name == "none" else args.trials
            hits = 0
            for t in range(trials):
                reference, current = (image_trial(pools, name, size, t) if name in IMAGES
                                      else planted_trial(space, name, size, t))  # fmt: skip
                hits += our_verdict(ours(reference, current, t))
            rates.append(shown(hits, trials, name == "none"))
        print(f"| {size} | {' | '.join(rates)} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("INFERENCE_SERVER_URL", "http://127.0.0.1:9001"))
    parser.add_argument("--trials", type=int, default=20, help="trials per drifted cell")
    parser.add_argument("--null-trials", type=int, default=150, help="trials per planted no-drift cell")
    parser.add_argument("--image-null-trials", type=int, default=100, help="trials per image no-drift cell")
    parser.add_argument("--out", help="where the per-trial records go (JSON)")
    parser.add_argument("--drifts", nargs="*", help="only these drifts (and no drift, for the calibration)")
    parser.add_argument("--sizes", nargs="*", type=int, default=list(SIZES), help="window sizes")
    parser.add_argument("--minimum", action="store_true", help="measure the small windows instead")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    started = time.perf_counter()
    (minimum if args.minimum else power)(args)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; {(time.perf_counter() - started) / 60:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
