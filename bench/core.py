"""Core-fabric figures, each beside its baseline in the same run (issue: core fabric).

Measures, on LocalCluster(workers=2, slots_per_worker=1) on 127.0.0.1:

1. no-op tasks through the public API, ``list(ex.map(abs, range(N)))``, against
   ``ProcessPoolExecutor(2).map`` with chunksize 1 (one task per element, as here) and
   with chunksize 1000 (bundled: not one task per element);
2. the futures path, ``[ex.submit(abs, i) ...]`` then every ``.result()``;
3. shell tasks, ``ex.shell("true")``, against ``xargs -P 2 sh -c true``;
4. serial round trip: submit one no-op, wait, repeat;
5. broker RSS with 1,000,000 queued no-op tasks and no workers.

Each figure is the median of ``--repeat`` runs. Prints a Markdown table (for
bench/RESULTS.md) and writes the raw numbers to ``bench/out/core.json``.

    python bench/core.py [--repeat 5] [--tasks 200000] [--queued 1000000]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time

import psutil

from zfalkon import Executor, LocalCluster, __version__


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_rate(n: int, fn, repeat: int) -> tuple[float, list[float]]:
    rates = [n / timed(fn) for _ in range(repeat)]
    return statistics.median(rates), rates


def bench_map(ex: Executor, n: int, repeat: int) -> dict:
    expected = list(range(n))

    def run() -> None:
        assert list(ex.map(abs, range(n))) == expected

    zf, zf_runs = median_rate(n, run, repeat)
    with cf.ProcessPoolExecutor(2) as pool:
        list(pool.map(abs, range(1000)))  # start the processes outside the timing
        ppe1, _ = median_rate(n, lambda: list(pool.map(abs, range(n))), repeat)
        ppe1000, _ = median_rate(n, lambda: list(pool.map(abs, range(n), chunksize=1000)), repeat)
    return {"zfalkon_map": zf, "zfalkon_map_runs": zf_runs,
            "ppe_chunksize_1": ppe1, "ppe_chunksize_1000": ppe1000}


def bench_submit(ex: Executor, n: int, repeat: int) -> dict:
    def run() -> None:
        futures = [ex.submit(abs, i) for i in range(n)]
        assert [f.result() for f in futures] == list(range(n))

    rate, runs = median_rate(n, run, repeat)
    return {"zfalkon_submit": rate, "zfalkon_submit_runs": runs}


def bench_shell(ex: Executor, n: int, repeat: int) -> dict:
    def run() -> None:
        futures = [ex.shell("true") for _ in range(n)]
        assert all(f.result().returncode == 0 for f in futures)

    def xargs() -> None:
        subprocess.run(f"seq {n} | xargs -P 2 -I{{}} sh -c true", shell=True, check=True)

    zf, zf_runs = median_rate(n, run, repeat)
    xa, xa_runs = median_rate(n, xargs, repeat)
    return {"zfalkon_shell": zf, "zfalkon_shell_runs": zf_runs,
            "xargs_P2": xa, "xargs_P2_runs": xa_runs}


def bench_serial(ex: Executor, n: int) -> dict:
    for i in range(200):  # warm up
        ex.submit(abs, i).result()
    samples = []
    for i in range(n):
        start = time.perf_counter()
        ex.submit(abs, i).result()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {"serial_rtt_ms_median": statistics.median(samples) * 1000,
            "serial_rtt_ms_p90": samples[int(len(samples) * 0.9)] * 1000}


def bench_queued_memory(queued: int) -> dict:
    with LocalCluster(workers=0) as cluster, Executor(cluster.address) as ex:
        broker = psutil.Process(cluster.broker.pid)
        idle_rss = broker.memory_info().rss
        stream = ex.map(abs, range(queued), buffersize=queued)  # submits all of them now
        deadline = time.monotonic() + 300
        while cluster.status()["queued"] < queued and time.monotonic() < deadline:
            time.sleep(0.2)
        status = cluster.status()
        rss = broker.memory_info().rss
        stream.close()  # cancels them
    return {"queued": status["queued"], "broker_rss_mib_idle": idle_rss / 2**20,
            "broker_rss_mib_queued": rss / 2**20,
            "broker_bytes_per_queued_task": (rss - idle_rss) / max(1, status["queued"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--submit-tasks", type=int, default=50_000)
    parser.add_argument("--shell-tasks", type=int, default=5_000)
    parser.add_argument("--serial", type=int, default=5_000)
    parser.add_argument("--queued", type=int, default=1_000_000)
    args = parser.parse_args()

    figures: dict = {"zfalkon": __version__, "python": platform.python_version(),
                     "cpus": os.cpu_count(), "repeat": args.repeat}
    with LocalCluster(workers=2, slots_per_worker=1) as cluster, Executor(cluster.address) as ex:
        figures.update(bench_map(ex, args.tasks, args.repeat))
        figures.update(bench_submit(ex, args.submit_tasks, args.repeat))
        figures.update(bench_shell(ex, args.shell_tasks, args.repeat))
        figures.update(bench_serial(ex, args.serial))
    figures.update(bench_queued_memory(args.queued))

    out = pathlib.Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    figures["sizes"] = {"tasks": args.tasks, "submit_tasks": args.submit_tasks,
                        "shell_tasks": args.shell_tasks, "serial": args.serial}
    (out / "core.json").write_text(json.dumps(figures, indent=2))
    print(markdown_table(figures))


def markdown_table(f: dict) -> str:
    """The core figures as a Markdown table (used by bench/report too)."""
    n = f["sizes"]
    rows = [
        (f"no-op `list(ex.map(abs, range({n['tasks']})))`", f"**{f['zfalkon_map']:,.0f} tasks/s**",
         f"ProcessPoolExecutor(2).map: {f['ppe_chunksize_1']:,.0f}/s (chunksize 1: one task per "
         f"element, as here); {f['ppe_chunksize_1000']:,.0f}/s (chunksize 1000: bundled)",
         f"{f['zfalkon_map'] / f['ppe_chunksize_1']:.1f}x", ">= 100,000 tasks/s"),
        (f"no-op `ex.submit` futures ({n['submit_tasks']:,}), then every `.result()`",
         f"{f['zfalkon_submit']:,.0f} tasks/s",
         f"ProcessPoolExecutor(2), chunksize 1: {f['ppe_chunksize_1']:,.0f}/s",
         f"{f['zfalkon_submit'] / f['ppe_chunksize_1']:.1f}x", ""),
        (f"`ex.shell(\"true\")` ({n['shell_tasks']:,})", f"**{f['zfalkon_shell']:,.0f} tasks/s**",
         f"`xargs -P 2 -I{{}} sh -c true`: {f['xargs_P2']:,.0f}/s",
         f"{f['zfalkon_shell'] / f['xargs_P2']:.2f}x", ">= xargs -P 2"),
        (f"serial round trip, submit one no-op and wait ({n['serial']:,})",
         f"**median {f['serial_rtt_ms_median']:.3f} ms**, p90 {f['serial_rtt_ms_p90']:.3f} ms",
         "raw pyzmq, same 4 hops, no zfalkon code: 0.23-0.27 ms (by hand)", "", "<= 0.35 ms"),
        (f"broker RSS, {f['queued']:,} queued no-op tasks, no workers",
         f"**{f['broker_rss_mib_queued']:.0f} MiB**",
         f"idle broker {f['broker_rss_mib_idle']:.0f} MiB; "
         f"{f['broker_bytes_per_queued_task']:.0f} B per queued task", "", "<= 200 MiB"),
    ]
    head = (f"zfalkon {f['zfalkon']}, Python {f['python']}, {f['cpus']} CPUs, "
            f"medians of {f['repeat']} runs\n\n"
            "| measure | zfalkon | baseline (same run) | ratio | target |\n|---|---|---|---|---|\n")
    return head + "\n".join("| " + " | ".join(row) + " |" for row in rows)


if __name__ == "__main__":
    main()
