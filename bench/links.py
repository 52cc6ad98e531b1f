"""Throughput across links, at scale, and against peers (issue: throughput across links).

Every point starts its own LocalCluster on 127.0.0.1 (workers behind a
``zfalkon.linkproxy`` process for ``rtt_ms`` > 0) and measures through the public API
with ``zfalkon.bench.run_bench``, except the swarm sweep, which also samples the broker's
CPU time and RSS with psutil. Results go to ``bench/out/links.json``; ``bench/report``
turns them into tables and plots.

    python bench/links.py [--quick] [--only rtt,length,grid,wan,swarm,peers,proxy]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

import psutil

from zfalkon import Executor, LocalCluster
from zfalkon.bench import run_bench

OUT = pathlib.Path(__file__).parent / "out"


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def rtt_sweep(tasks: int, repeat: int) -> list[dict]:
    """No-op tasks/s against the added round trip, 2 workers x 1 slot."""
    rows = []
    for rtt in (0, 10, 50, 100, 200):
        fig = run_bench(workers=2, tasks=tasks, kind="noop", repeat=repeat, rtt_ms=rtt)
        # What a window of one task per slot would allow (Little's law), for comparison.
        one_per_slot = fig["slots"] / (rtt / 1000) if rtt else None
        rows.append({**fig, "window_of_one_tasks_per_second": one_per_slot})
        say(f"rtt {rtt} ms: {fig['tasks_per_second']:,.0f} tasks/s")
    return rows


def length_sweep(rtts: tuple[float, ...], seconds_of_work: float) -> list[dict]:
    """Efficiency (ideal / measured time) against task length, 2 workers x 1 slot."""
    rows = []
    for rtt in rtts:
        for length in (0.001, 0.01, 0.1, 1.0):
            tasks = max(4, int(seconds_of_work * 2 / length))
            fig = run_bench(workers=2, tasks=tasks, kind="sleep", task_seconds=length,
                            rtt_ms=rtt)
            rows.append(fig)
            say(f"rtt {rtt} ms, {length} s tasks: efficiency {fig['efficiency']:.3f}")
    return rows


def grid_sweep(tasks: int, repeat: int) -> list[dict]:
    """No-op tasks/s against workers and slots per worker (2 cores: oversubscribed past 2)."""
    rows = []
    for workers, slots in ((1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (4, 2)):
        fig = run_bench(workers=workers, slots=slots, tasks=tasks, kind="noop", repeat=repeat)
        rows.append(fig)
        say(f"{workers} workers x {slots} slots: {fig['tasks_per_second']:,.0f} tasks/s")
    return rows


def wan_long_tasks(slots: int, per_slot: int, rtt: float) -> dict:
    """1 s sleep tasks on ``slots`` simulated slots behind ``rtt`` ms: efficiency."""
    fig = run_bench(swarm=slots, tasks=slots * per_slot, kind="sleep", task_seconds=1.0,
                    rtt_ms=rtt)
    say(f"{slots} simulated slots, 1 s tasks at {rtt} ms: efficiency {fig['efficiency']:.4f}")
    return fig


def swarm_sweep(sizes: tuple[tuple[int, int], ...], tasks: int) -> list[dict]:
    """Broker throughput, CPU per task and RSS against connected (simulated) executors.

    ``sizes``: (workers, slots per worker); slots size their windows as real ones do. Each worker holds 1 + slots connections, and
    this machine's hard open-file limit (20,000) caps the broker near 20,000 connections:
    10,000 executors are measured as 5,000 workers x 2 slots (15,000 connections).
    """
    from zfalkon.swarm import Swarm

    rows = []
    for size, slots in sizes:
        with LocalCluster(workers=0, startup_timeout=300) as cluster:
            broker = psutil.Process(cluster.broker.pid)
            with Swarm(cluster.address, workers=size, slots_per_worker=slots, window=0):
                rss_connected = broker.memory_info().rss
                with Executor(cluster.address) as ex:
                    list(ex.map(abs, range(min(tasks, 20_000))))  # warm up
                    cpu0 = sum(broker.cpu_times()[:2])
                    start = time.perf_counter()
                    assert list(ex.map(abs, range(tasks))) == list(range(tasks))
                    wall = time.perf_counter() - start
                    cpu = sum(broker.cpu_times()[:2]) - cpu0
                rss = broker.memory_info().rss
        row = {"workers": size, "slots_per_worker": slots, "executors": size * slots,
               "connections": size * (1 + slots), "tasks": tasks, "wall_seconds": wall,
               "tasks_per_second": tasks / wall, "broker_cpu_us_per_task": cpu / tasks * 1e6,
               "broker_rss_mib_connected": rss_connected / 2**20,
               "broker_rss_mib_after": rss / 2**20}
        rows.append(row)
        say(f"swarm {size}x{slots}: {row['tasks_per_second']:,.0f} tasks/s, "
            f"broker {row['broker_cpu_us_per_task']:.2f} us CPU/task, {rss / 2**20:.0f} MiB")
    return rows


def _peer_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def peers(tasks: int, shell_tasks: int, repeat: int) -> dict:
    """The same no-op and ``true`` workloads on zfalkon and whatever peers are installed."""
    out: dict = {"tasks": tasks, "shell_tasks": shell_tasks}
    out["zfalkon_noop"] = run_bench(workers=2, tasks=tasks, repeat=repeat)["tasks_per_second"]
    out["zfalkon_shell"] = run_bench(workers=2, tasks=shell_tasks, kind="shell",
                                     repeat=repeat)["tasks_per_second"]

    def rate(n: int, fn) -> float:
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            runs.append(n / (time.perf_counter() - start))
        return statistics.median(runs)

    with cf.ProcessPoolExecutor(2) as pool:
        list(pool.map(abs, range(100)))
        out["ProcessPoolExecutor_noop"] = rate(tasks, lambda: list(pool.map(abs, range(tasks))))
    out["xargs_P2_shell"] = rate(shell_tasks, lambda: subprocess.run(
        f"seq {shell_tasks} | xargs -P 2 -I{{}} sh -c true", shell=True, check=True))
    for name, module in (("parsl", "parsl"), ("dask", "distributed"), ("ray", "ray")):
        out[f"{name}_installed"] = _peer_available(module)
    if out["dask_installed"]:
        from distributed import Client, LocalCluster as DaskCluster

        with DaskCluster(n_workers=2, threads_per_worker=1, processes=True) as dc, \
                Client(dc) as client:
            n = min(tasks, 5_000)  # dask runs ~1k tasks/s here: keep the run short
            out["dask_noop"] = rate(n, lambda: client.gather(client.map(abs, range(n), pure=False)))
            out["dask_tasks"] = n
    say(f"peers: {out}")
    return out


def proxy(samples: int) -> dict:
    from zfalkon.linkproxy import proxy_overhead

    runs = [proxy_overhead(samples) for _ in range(3)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default="rtt,length,grid,wan,swarm,peers,proxy")
    args = parser.parse_args()
    quick = args.quick
    parts = set(args.only.split(","))
    OUT.mkdir(exist_ok=True)
    path = OUT / "links.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if "proxy" in parts:
        results["proxy"] = proxy(300 if quick else 2000)
    if "rtt" in parts:
        results["rtt"] = rtt_sweep(20_000 if quick else 200_000, 1 if quick else 3)
    if "length" in parts:
        results["length"] = length_sweep((0, 50), 0.5 if quick else 5.0)
    if "grid" in parts:
        results["grid"] = grid_sweep(20_000 if quick else 200_000, 1 if quick else 3)
    if "wan" in parts:
        results["wan"] = wan_long_tasks(256, 2 if quick else 50, 200)
    if "swarm" in parts:
        results["swarm"] = swarm_sweep(((10, 1), (100, 1)) if quick else
                                       ((10, 1), (100, 1), (1000, 1), (5000, 2)),
                                       20_000 if quick else 200_000)
    if "peers" in parts:
        results["peers"] = peers(20_000 if quick else 200_000, 500 if quick else 5000,
                                 1 if quick else 3)
    results["python"] = sys.version.split()[0]
    results["xargs"] = shutil.which("xargs") is not None
    path.write_text(json.dumps(results, indent=2))
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
