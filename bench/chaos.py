"""Chaos: random worker kills during a long run; count tasks lost and duplicates delivered.

Runs ``--tasks`` no-op tasks (``abs``) through ``Executor.map`` on a LocalCluster of
``--workers`` single-slot workers, and every
``--kill-every`` seconds makes a random worker vanish (its agent and slots frozen with
SIGSTOP, then SIGKILLed by PID: no BYE, no SLOT_LOST) and starts a replacement. The broker
finds the dead ones by missed heartbeats and requeues what they held.

Reports: tasks lost (results missing or wrong: must be 0), duplicates delivered (the
broker's delivered count beyond the task count: must be 0), kills, tasks/s, and the same
run's rate without kills. The whole run is made twice, without and with a journal
(``--fsync`` policy), to give the journal's cost; a third run with the journal also
``kill -9``s the broker halfway and restarts it on the same journal (its ``done``
counters start again, so that run reports tasks lost, not broker duplicates). Finally the
calm rate under each fsync policy.

    python bench/chaos.py [--tasks 1000000] [--workers 4] [--kill-every 1.0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
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


def calm_rate(ex: Executor, n: int = 200_000) -> float:
    start = time.perf_counter()
    assert list(ex.map(abs, range(n))) == list(range(n))
    return n / (time.perf_counter() - start)


def run(tasks: int, workers: int, kill_every: float, seed: int, journal: str | None = None,
        fsync: str = "interval", kill_broker: bool = False) -> dict:
    rng = random.Random(seed)
    broker_args = ["--journal", journal, "--fsync", fsync] if journal else []
    with LocalCluster(workers=workers, slots_per_worker=1, broker_args=broker_args) as cluster, \
            Executor(cluster.address) as ex:
        calm = calm_rate(ex, min(tasks, 200_000))
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
            for i, got in enumerate(results):
                if got != abs(next(expected)):
                    wrong += 1
                if kill_broker and i == tasks // 2:
                    cluster.restart_broker(kill=True)
            missing = sum(1 for _ in expected)
        finally:
            stop.set()
            killer.join(30)
        wall = time.perf_counter() - start
        # Let the broker's counters settle, then compare what it delivered with what we asked.
        time.sleep(1.0)
        delivered = cluster.status()["done"] - done_before
    return {"tasks": tasks, "workers": workers, "kill_every_seconds": kill_every,
            "journal": bool(journal), "fsync": fsync if journal else None,
            "broker_killed": kill_broker, "kills": kills, "tasks_lost": missing + wrong,
            "duplicates_delivered": None if kill_broker else max(0, delivered - tasks),
            "wall_seconds": wall, "tasks_per_second": tasks / wall,
            "tasks_per_second_without_kills": calm}


def fsync_rates(repeat: int = 3) -> dict:
    """Median no-op tasks/s (200k, 2 workers, no kills) without a journal and under each
    fsync policy, in one run."""
    rates = {}
    for policy in ("none", "never", "interval", "always"):
        samples = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as tmp:
                args = [] if policy == "none" else ["--journal", tmp, "--fsync", policy]
                with LocalCluster(workers=2, broker_args=args) as cluster, \
                        Executor(cluster.address) as ex:
                    samples.append(calm_rate(ex))
        rates[policy] = sorted(samples)[len(samples) // 2]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fsync", default="interval", choices=["always", "interval", "never"])
    args = parser.parse_args()
    plain = run(args.tasks, args.workers, args.kill_every, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        journaled = run(args.tasks, args.workers, args.kill_every, args.seed, tmp, args.fsync)
    with tempfile.TemporaryDirectory() as tmp:
        broker_kill = run(args.tasks, args.workers, args.kill_every, args.seed, tmp,
                          args.fsync, kill_broker=True)
    figures = {**plain, "journal_run": journaled, "broker_kill_run": broker_kill,
               "fsync_tasks_per_second": fsync_rates()}
    out = pathlib.Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    runs = (plain, journaled, broker_kill)
    sys.exit(0 if all(r["tasks_lost"] == 0 and not r["duplicates_delivered"] for r in runs)
             else 1)


if __name__ == "__main__":
    main()
