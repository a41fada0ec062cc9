"""Two inference servers against one (issue 11): the same `embed_images` job, side by side.

    python -m benchmarks.two_servers [--upstream URL [URL]] [--images 300] [--capacity 4]
                                     [--service-time 0.4] [--rounds 2]

A SIMULATION OF SERVERS WITH KNOWN CAPACITY. The two CPU cores here are shared by the client, the
real servers and everything else, so two real servers cannot run twice as fast as one. Each "GPU
server" is instead a loopback proxy in its own process (`tests/support/fault_proxy.FaultProxy` in
limiting mode, through `benchmarks/proxy_process.py`) in front of a real server: it admits
``--capacity`` requests at a time, each keeping its place ``--service-time`` seconds (its forward to
the real server included), and answers 429 to any request beyond that — a server of
``capacity / service_time`` requests per second as long as the real server, which still computes
every embedding, answers within the service time.

Rounds alternate one server / two servers; every run is a fresh engine (its adaptive limits start at
4 and must find the proxies' capacity) and a fresh cache, so every image is sent. The figure is the
ratio of the best rounds (target ≥ 1.8×), with the requests each server answered (from the flow's
step table) and the 429s each proxy sent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect_roboflow.blocks import _http

from .clients import step_table
from .common import LatencyProxy, Table, generate_images, ratio, verdict

TARGET = 1.8


class CapacityProxy(LatencyProxy):
    """A simulated server of known capacity: ``capacity`` requests at a time, ``service_time`` each."""

    name = "capacity proxy"

    def __init__(self, upstream: str, capacity: int, service_time: float) -> None:
        super().__init__(upstream, 0.0)
        self.args += [str(capacity), str(service_time)]
        self.capacity, self.service_time = capacity, service_time

    def rejected(self) -> int:
        """429s sent since the last `clear` (requests beyond the capacity)."""
        return int(self._ask("rejected"))


def run_flow(urls: list[str], images: Sequence[Path], work: Path) -> dict[str, Any]:
    """One cold `embed_images` run over ``urls``: seconds, counts, and requests per server."""
    from prefect_roboflow.flows import embed_images

    _http.close_engines()  # a fresh engine: the limits start at 4 again
    with tempfile.TemporaryDirectory(dir=work) as run_dir:
        started = time.perf_counter()
        state = embed_images(
            [str(p) for p in images],
            str(Path(run_dir) / "out"),
            server=urls if len(urls) > 1 else urls[0],
            cache_storage=str(Path(run_dir) / "cache"),
            return_state=True,
        )
        seconds = time.perf_counter() - started
    result = state.result()
    if result.succeeded != result.images:
        raise RuntimeError(f"embed_images: {result.failed} of {result.images} images failed")
    (step,) = step_table(state.state_details.flow_run_id, "embed-images-steps")
    return {
        "seconds": seconds,
        "images": result.images,
        "requests": result.requests,
        "retries": result.retries,
        "per_server": step["requests_per_server"],
    }


def measure(args: argparse.Namespace, work: Path) -> tuple[Table, Table, bool]:
    """The interleaved rounds; the figures table and the verdict table."""
    images = generate_images(work / "images", args.images)
    upstreams = (args.upstream * 2)[:2]
    with (
        CapacityProxy(upstreams[0], args.capacity, args.service_time) as a,
        CapacityProxy(upstreams[1], args.capacity, args.service_time) as b,
    ):
        setups = {"one server": [a], "two servers": [a, b]}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in setups}
        for round_index in range(args.rounds):
            order = list(setups) if round_index % 2 == 0 else list(reversed(setups))
            for name in order:
                proxies = setups[name]
                for proxy in proxies:
                    proxy.clear()
                figures = run_flow([p.url for p in proxies], images, work)
                figures["rejected"] = sum(p.rejected() for p in proxies)
                runs[name].append(figures)
                rate = figures["images"] / figures["seconds"]
                print(f"round {round_index + 1}, {name}: {rate:.2f} images/s ({figures['per_server']})", flush=True)
    capacity = args.capacity / args.service_time
    figures_table = Table(
        f"Two servers vs one (SIMULATED servers of known capacity): embed_images over {args.images} images",
        ["setup", "best images/s", "all rounds", "capacity images/s", "% of capacity", "requests per server", "429s"],
        note=f"A simulation: each server is a loopback proxy (FaultProxy limiting mode, own process) admitting "
        f"{args.capacity} requests at a time, each holding its place {args.service_time:g} s (its forward to a real "
        f"inference-cpu server included: {', '.join(upstreams)}), i.e. {capacity:g} requests/s per server while the "
        "shared CPUs answer within that; requests beyond that get 429. Each run: a fresh engine (adaptive limits "
        f"start at 4) and a fresh cache, the flow's default batch_size (64); {args.rounds} rounds, order "
        "alternated. Servers named by proxy port.",
    )
    best: dict[str, float] = {}
    for name, setup_runs in runs.items():
        rates = [r["images"] / r["seconds"] for r in setup_runs]
        top = max(range(len(rates)), key=lambda i: rates[i])
        best[name] = rates[top]
        servers = len(setups[name])
        figures_table.add(
            name,
            rates[top],
            ", ".join(f"{r:.2f}" for r in rates),
            capacity * servers,
            100 * rates[top] / (capacity * servers),
            setup_runs[top]["per_server"],
            setup_runs[top]["rejected"],
        )
    gain = ratio(best["two servers"], best["one server"])
    ok = gain >= TARGET
    verdicts = Table("Two servers ÷ one (simulated capacity)", ["ratio", "value", "target", "result"])
    verdicts.add("two servers ÷ one, best rounds", gain, f"≥ {TARGET}", verdict(ok))
    return figures_table, verdicts, ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("INFERENCE_SERVER_URL", "http://127.0.0.1:9001")
    parser.add_argument("--upstream", nargs="+", default=[default], help="real server(s) behind the proxies")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--capacity", type=int, default=4, help="requests each simulated server admits at once")
    parser.add_argument("--service-time", type=float, default=0.4, help="seconds each simulated request takes")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    from .bench import prefect_api

    print("A SIMULATION of servers with known capacity (see the module doc).", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-two-servers-") as work, prefect_api():
        figures, verdicts, ok = measure(args, Path(work))
    print(figures.text())
    print(verdicts.text())
    print(f"[two servers: {time.monotonic() - started:.0f} s]")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
