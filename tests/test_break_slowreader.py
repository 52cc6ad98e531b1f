"""Break attempt: a client that reads slowly (each done-callback sleeps 50 ms) receiving 200
results of 1 MiB each. Every result must arrive intact, none replaced by ResultDropped, and
the broker's ``dropped_results`` must stay 0. Figures printed (run with -s)."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import worker_env
from zfalkon import Executor, LocalCluster, query_status

N = 200
SIZE = 1 << 20


@pytest.mark.timeout(180)
def test_slow_reader_gets_every_mib_result():
    with LocalCluster(workers=2, env=worker_env()) as cluster:
        with Executor(cluster.address, connect_timeout=30) as ex:
            seen: list = []
            lock = threading.Lock()
            most_parked = 0

            def slow(f):
                time.sleep(0.05)  # the slow reader
                with lock:
                    seen.append(f)

            start = time.monotonic()
            futs = [ex.submit("builtins:bytes", SIZE) for _ in range(N)]
            for f in futs:
                f.add_done_callback(slow)
            deadline = time.monotonic() + 120
            while len(seen) < N and time.monotonic() < deadline:
                s = query_status(cluster.address, timeout=10)
                most_parked = max(most_parked, s["parked"])
                time.sleep(0.2)  # status sampling interval; the condition is len(seen)
            took = time.monotonic() - start
            s = query_status(cluster.address, timeout=10)
            errors = [type(f.exception()).__name__ for f in futs if f.done() and f.exception()]
            bad = sum(1 for f in futs if f.done() and not f.exception()
                      and f.result() != bytes(SIZE))
            if True:  # (figures: run with -s)
                print(f"callbacks={len(seen)}/{N} took={took:.1f}s errors={errors[:3]}"
                          f"({len(errors)}) wrong={bad} dropped_results={s['dropped_results']}"
                          f" parked_max={most_parked} parked_end={s['parked']}"
                          f" done={s['done']}\n")
            assert len(seen) == N
            assert not errors, errors[:3]
            assert bad == 0
            assert s["dropped_results"] == 0
