"""``zfalkon bench``: tasks per second through the public API, as a user would get them.

Workloads (``--kind``):

- ``noop``: ``list(ex.map(abs, range(tasks)))``: the fabric's own cost per task;
- ``sleep``: ``ex.map(time.sleep, [task_seconds] * tasks)``: efficiency against the ideal
  ``tasks * task_seconds / slots``;
- ``shell``: ``ex.shell("true")`` (or ``sleep S``) futures, at most 10,000 in flight.

With no ``--broker`` it starts a :class:`~zfalkon.cluster.LocalCluster` on 127.0.0.1.
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import sys
import time
from typing import Iterator

from tqdm import tqdm

from zfalkon.client import Executor
from zfalkon.cluster import LocalCluster
from zfalkon.errors import BrokerUnavailable, ConfigError
from zfalkon.watch import NO_WORKER_WARNING_SECONDS, no_worker_message

KINDS = ("noop", "sleep", "shell")
_SHELL_WINDOW = 10_000
_PROGRESS_STEP = 1024


def _progress(it: Iterator, total: int, show: bool) -> Iterator:
    """Yield from ``it``, updating a progress bar every few thousand items."""
    if not show:
        yield from it
        return
    with tqdm(total=total, unit="task", file=sys.stderr, leave=False) as bar:
        n = 0
        for item in it:
            yield item
            n += 1
            if n == _PROGRESS_STEP:
                bar.update(n)
                n = 0
        bar.update(n)


def run_workload(ex: Executor, kind: str, tasks: int, task_seconds: float,
                 progress: bool = False) -> tuple[float, int]:
    """Run one workload; return (wall seconds, tasks that failed)."""
    start = time.perf_counter()
    errors = 0
    if kind == "noop":
        results = list(_progress(ex.map(abs, range(tasks)), tasks, progress))
        errors = tasks - len(results)
    elif kind == "sleep":
        for _ in _progress(ex.map(time.sleep, [task_seconds] * tasks), tasks, progress):
            pass
    elif kind == "shell":
        command = f"sleep {task_seconds:g}" if task_seconds > 0 else "true"

        def shell_results() -> Iterator:
            window: collections.deque = collections.deque()
            for _ in range(tasks):
                window.append(ex.shell(command))
                if len(window) >= _SHELL_WINDOW:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

        for result in _progress(shell_results(), tasks, progress):
            errors += result.returncode != 0
    else:
        raise ConfigError(f"unknown bench kind {kind!r}; choose from {', '.join(KINDS)}")
    return time.perf_counter() - start, errors


def wait_for_workers(ex: Executor, warn_after: float, fail_after: float | None) -> int:
    """Wait until ``ex``'s broker has a slot; warn on stderr after ``warn_after`` seconds,
    raise BrokerUnavailable after ``fail_after``. Returns its slot count."""
    start = time.monotonic()
    warned = False
    interval = max(0.05, min(1.0, warn_after / 5))
    while True:
        info = ex.status()
        if info["slots"] > 0:
            return info["slots"]
        waited = time.monotonic() - start
        if fail_after is not None and waited >= fail_after:
            raise BrokerUnavailable(f"no worker registered with the broker at {ex.address} "
                                    f"within {fail_after:g} s (--wait-workers); it has "
                                    f"{info['workers']} workers")
        if not warned and waited >= warn_after:
            warned = True
            print(f"zfalkon bench: warning: {no_worker_message(ex.address, info, waited)}",
                  file=sys.stderr, flush=True)
        time.sleep(interval)


@contextlib.contextmanager
def _cluster(address: str | None, workers: int, slots: int, rtt_ms: float,
             swarm: int, secure: bool) -> Iterator[tuple[str, str | None]]:
    """The broker to measure and the client keys to use: ``address`` (keys from
    ``$ZFALKON_KEYS``), or a LocalCluster (real or simulated workers, optionally behind an
    emulated link of ``rtt_ms``, optionally with CurveZMQ keys)."""
    if address:
        if rtt_ms or swarm or secure:
            raise ConfigError("--rtt-ms, --swarm and --secure need the local cluster "
                              "(no --broker; for a broker with keys set $ZFALKON_KEYS)")
        yield address, None
        return
    if swarm and secure:
        raise ConfigError("--swarm workers do not use keys; drop --secure")
    with LocalCluster(workers=0 if swarm else workers, slots_per_worker=slots,
                      rtt_ms=rtt_ms, secure=secure) as cluster:
        if swarm:
            from zfalkon.swarm import Swarm

            with Swarm(cluster.worker_address, workers=swarm, slots_per_worker=slots, window=0):
                yield cluster.address, None
        else:
            yield cluster.address, cluster.client_keys


def run_bench(address: str | None = None, *, workers: int = 2, slots: int = 1,
              tasks: int = 200_000, kind: str = "noop", task_seconds: float = 0.0,
              repeat: int = 1, rtt_ms: float = 0.0, swarm: int = 0, secure: bool = False,
              progress: bool = False, keys: str | None = None,
              worker_warning: float = NO_WORKER_WARNING_SECONDS,
              wait_workers: float | None = None) -> dict:
    """Run the benchmark; return the figures (the ``--json`` object).

    On a broker (``address``), the clock starts once it has a worker: with none, a
    warning after ``worker_warning`` seconds, an error after ``wait_workers``."""
    if kind not in KINDS:
        raise ConfigError(f"unknown bench kind {kind!r}; choose from {', '.join(KINDS)}")
    if tasks < 1 or repeat < 1:
        raise ConfigError("--tasks and --repeat must be at least 1")
    if kind == "sleep" and task_seconds <= 0:
        raise ConfigError("--kind sleep needs --task-seconds > 0")
    if address is None and not swarm and workers < 1:
        raise ConfigError("--workers must be at least 1: a local cluster without workers "
                          "runs nothing (--swarm N simulates N workers)")
    with _cluster(address, workers, slots, rtt_ms, swarm, secure) as (addr, local_keys), \
            Executor(addr, keys=local_keys if address is None else keys) as ex:
        total_slots = wait_for_workers(ex, worker_warning, wait_workers)
        runs = []
        errors = 0
        for _ in range(repeat):
            seconds, failed = run_workload(ex, kind, tasks, task_seconds, progress)
            runs.append(seconds)
            errors += failed
    wall = statistics.median(runs)
    figures = {
        "kind": kind,
        "tasks": tasks,
        "workers": (swarm or workers) if address is None else None,
        "simulated_workers": bool(swarm),
        "rtt_ms": rtt_ms,
        "secure": secure,
        "slots": total_slots,
        "task_seconds": task_seconds,
        "repeat": repeat,
        "wall_seconds": round(wall, 6),
        "tasks_per_second": round(tasks / wall, 1),
        "runs_tasks_per_second": [round(tasks / s, 1) for s in runs],
        "errors": errors,
        "broker": address or "local",
    }
    if task_seconds > 0 and total_slots:
        ideal = tasks * task_seconds / total_slots
        figures["ideal_seconds"] = round(ideal, 4)
        figures["efficiency"] = round(ideal / wall, 4)
    return figures


def format_table(figures: dict) -> str:
    """The figures as a small readable table."""
    rows = [
        ("workload", figures["kind"] + (f" ({figures['task_seconds']:g} s)"
                                        if figures["task_seconds"] else "")),
        ("broker", figures["broker"]),
        ("workers / slots", f"{figures['workers'] or '?'} / {figures['slots']}"
                            + (" (simulated)" if figures["simulated_workers"] else "")),
        ("link round trip", f"{figures['rtt_ms']:g} ms added" if figures["rtt_ms"] else "loopback"),
        ("security", "CurveZMQ keys" if figures.get("secure") else "none (loopback)"),
        ("tasks", f"{figures['tasks']:,}"),
        ("wall seconds (median)", f"{figures['wall_seconds']:.3f}"),
        ("tasks per second", f"{figures['tasks_per_second']:,.0f}"),
    ]
    if figures["repeat"] > 1:
        rows.append(("runs (tasks/s)", ", ".join(f"{r:,.0f}" for r in figures["runs_tasks_per_second"])))
    if "efficiency" in figures:
        rows.append(("efficiency", f"{figures['efficiency'] * 100:.1f} %"))
    rows.append(("errors", str(figures["errors"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
