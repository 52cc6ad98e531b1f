"""zfalkon.broker: workers that vanish (no BYE, no SLOT_LOST) are found by missed heartbeats.

A "vanished machine" is simulated for real: the worker's agent and slots are frozen with
SIGSTOP (so none can say a word), then each is SIGKILLed by PID.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import tasks
from conftest import descendants, start_worker, stop_process, wait_until, worker_env
from zfalkon import Executor, LocalCluster, WorkerLost
from zfalkon.constants import HEARTBEAT_MISSES, HEARTBEAT_SECONDS, MAX_ATTEMPTS

LOST_AFTER = HEARTBEAT_SECONDS * HEARTBEAT_MISSES


def vanish(agent_pid: int) -> None:
    """Freeze a worker's agent and slots, then kill them all: nobody reports anything."""
    pids = [agent_pid, *descendants(agent_pid)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def running_on(cluster: LocalCluster, name_pid: int) -> int:
    for worker in cluster.status()["worker_list"]:
        if worker["name"].endswith(f"-{name_pid}"):
            return worker["running"] + worker["prefetched"]  # (held by its slots)
    return -1


def test_vanished_workers_lose_no_task_and_duplicate_none():
    n = 3000
    with LocalCluster(workers=0, env=worker_env()) as cluster:
        workers = [cluster.add_worker(slots=2) for _ in range(3)]
        cluster.wait_for_slots(6)
        with Executor(cluster.address) as ex:
            results = ex.map(tasks.sleep_then, range(n), [0.003] * n)
            first = [next(results) for _ in range(200)]  # the run is under way
            vanish(workers[0].pid)
            vanish(workers[1].pid)
            cluster.add_worker(slots=2)  # capacity comes back; the lost tasks go there
            rest = list(results)
        status = cluster.status()
    assert first + rest == list(range(n))  # every task, in order, none lost
    assert status["done"] == n  # the broker delivered each result exactly once
    assert status["workers"] == 2  # the two vanished workers were declared lost


def test_a_task_whose_workers_keep_vanishing_fails_with_worker_lost():
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            Executor(cluster.address) as ex:
        future = ex.submit(tasks.sleep_then, "never", 60)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            worker = cluster.add_worker(slots=1)
            wait_until(lambda: running_on(cluster, worker.pid) == 1, 30,
                       message=f"attempt {attempt} running")
            start = time.monotonic()
            vanish(worker.pid)
            if attempt < MAX_ATTEMPTS:
                # requeued: back in the queue once the broker notices the silence
                wait_until(lambda: cluster.status()["queued"] == 1, LOST_AFTER + 10,
                           message=f"requeue after loss {attempt}")
                assert time.monotonic() - start >= LOST_AFTER - 1.5
        with pytest.raises(WorkerLost) as info:
            future.result(timeout=LOST_AFTER + 10)
        assert info.value.attempts == MAX_ATTEMPTS
        assert info.value.worker and "lost 3 times" in str(info.value)
        assert cluster.status()["queued"] == 0


def test_workers_register_again_by_themselves_after_the_broker_is_killed():
    with LocalCluster(workers=2, slots_per_worker=2, env=worker_env()) as cluster:
        agents = [p.pid for p in cluster.worker_procs]
        with Executor(cluster.address) as ex:
            assert list(ex.map(abs, range(-50, 50))) == [abs(i) for i in range(-50, 50)]
        cluster.restart_broker(kill=True)  # kill -9, then a new broker on the same port
        status = cluster.wait_for_slots(4, timeout=30)  # nobody restarted the workers
        assert status["workers"] == 2 and status["slots"] == 4
        assert [p.pid for p in cluster.worker_procs] == agents
        with Executor(cluster.address) as ex:
            assert list(ex.map(abs, range(-500, 500))) == [abs(i) for i in range(-500, 500)]
            assert ex.shell("echo back").result(timeout=30).stdout == "back\n"


def test_clients_resubmit_and_complete_after_the_broker_is_killed():
    n = 2000
    with LocalCluster(workers=2, env=worker_env()) as cluster, \
            Executor(cluster.address) as ex:
        results = ex.map(tasks.sleep_then, range(n), [0.002] * n)
        first = [next(results) for _ in range(100)]
        futures = [ex.submit(tasks.sleep_then, i, 0.05) for i in range(40)]
        cluster.restart_broker(kill=True)  # every queued task is gone with the old broker
        rest = list(results)  # ... and comes back: the client submits its pending ones again
        assert first + rest == list(range(n))
        assert [f.result(timeout=60) for f in futures] == list(range(40))


def test_a_partition_longer_than_the_heartbeat_timeout_then_healed_loses_nothing():
    """Workers behind a link that goes dark (the link proxy frozen) for longer than the
    heartbeat timeout: declared lost, their tasks run elsewhere; after the link heals
    they register again by themselves."""
    with LocalCluster(workers=1, rtt_ms=2, env=worker_env()) as cluster:
        direct = start_worker(cluster.address, "--slots", "1")  # not behind the link
        try:
            cluster.wait_for_slots(2)
            with Executor(cluster.address) as ex:  # the client talks to the broker directly
                n = 600
                results = ex.map(tasks.sleep_then, range(n), [0.01] * n)
                first = [next(results) for _ in range(50)]
                os.kill(cluster.proxy.pid, signal.SIGSTOP)  # the link goes dark
                try:
                    wait_until(lambda: cluster.status()["workers"] == 1, LOST_AFTER + 10,
                               message="the partitioned worker declared lost")
                finally:
                    os.kill(cluster.proxy.pid, signal.SIGCONT)  # ... and heals
                rest = list(results)
                assert first + rest == list(range(n))
                wait_until(lambda: cluster.status()["slots"] == 2, 30,
                           message="the partitioned worker registered again")
                assert list(ex.map(abs, range(-300, 300))) == [abs(i) for i in range(-300, 300)]
            assert cluster.status()["done"] == n + 600  # each result delivered exactly once
        finally:
            stop_process(direct)
