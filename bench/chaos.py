"""Chaos: random worker kills during a long run; count tasks lost and duplicates delivered.

Runs ``--tasks`` no-op tasks (``abs``) through ``Executor.map`` on a LocalCluster of
``--workers`` single-slot workers, and every
``--kill-every`` seconds makes a random worker vanish (its agent and slots frozen with
SIGSTOP, then SIGKILLed by PID: no BYE, no SLOT_LOST) and starts a replacement. The broker
finds the dead ones by missed heartbeats and requeues what they held.

Reports: tasks lost (results missing or wrong: must be 0), duplicates delivered (the
broker's delivered count beyond the task count: must be 0), kills, tasks/s, and the same
run's rate without kills. There is no journal yet, so no journal cost is measured.

    python bench/chaos.py [--tasks 1000000] [--workers 4] [--kill-every 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import sys
import threading
import time

import psutil

from zfalkon import Executor, LocalCluster


def vanish(pid: int) -> None:
    """Freeze a worker agent and its slots, then SIGKILL each, by PID."""
    try:
        pids = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in pids:
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(tasks: int, workers: int, kill_every: float, seed: int) -> dict:
    rng = random.Random(seed)
    with LocalCluster(workers=workers, slots_per_worker=1) as cluster, \
            Executor(cluster.address) as ex:
        start = time.perf_counter()
        assert list(ex.map(abs, range(min(tasks, 200_000)))) == list(range(min(tasks, 200_000)))
        calm_rate = min(tasks, 200_000) / (time.perf_counter() - start)
        done_before = cluster.status()["done"]

        kills = 0
        stop = threading.Event()

        def chaos() -> None:
            nonlocal kills
            while not stop.wait(kill_every):
                live = [p for p in cluster.worker_procs if p.poll() is None]
                if len(live) > 1:
                    vanish(rng.choice(live).pid)
                    kills += 1
                cluster.add_worker()  # capacity comes back

        killer = threading.Thread(target=chaos, daemon=True)
        start = time.perf_counter()
        killer.start()
        try:
            results = ex.map(abs, range(-tasks // 2, tasks - tasks // 2))
            wrong = missing = 0
            expected = iter(range(-tasks // 2, tasks - tasks // 2))
            for got in results:
                if got != abs(next(expected)):
                    wrong += 1
            missing = sum(1 for _ in expected)
        finally:
            stop.set()
            killer.join(30)
        wall = time.perf_counter() - start
        # Let the broker's counters settle, then compare what it delivered with what we asked.
        time.sleep(1.0)
        delivered = cluster.status()["done"] - done_before
    return {"tasks": tasks, "workers": workers, "kill_every_seconds": kill_every,
            "kills": kills, "tasks_lost": missing + wrong,
            "duplicates_delivered": max(0, delivered - tasks), "wall_seconds": wall,
            "tasks_per_second": tasks / wall, "tasks_per_second_without_kills": calm_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    figures = run(args.tasks, args.workers, args.kill_every, args.seed)
    out = pathlib.Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    sys.exit(0 if figures["tasks_lost"] == 0 and figures["duplicates_delivered"] == 0 else 1)


if __name__ == "__main__":
    main()
