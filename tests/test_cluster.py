"""zfalkon.cluster: LocalCluster starts real processes and stops every one of them."""

from __future__ import annotations

import os
import time

import psutil
import pytest

import tasks
from conftest import alive, descendants, kill_tree, outer_pid, wait_until, worker_env
from zfalkon import BrokerUnavailable, ConfigError, Executor, LocalCluster


def cluster_pids(cluster: LocalCluster) -> list[int]:
    """The broker, the worker agents and their slot processes."""
    pids = [cluster.broker.pid] + [p.pid for p in cluster.worker_procs]
    for p in cluster.worker_procs:
        pids += descendants(p.pid)
    return pids


def my_children() -> set[int]:
    """Live descendants of the test process."""
    return {pid for pid in descendants(os.getpid()) if alive(pid)}


def test_start_and_stop_leaves_no_process():
    cluster = LocalCluster(workers=2, slots_per_worker=2, env=worker_env())
    pids: list[int] = []
    try:
        cluster.start()
        assert cluster.address.startswith("tcp://127.0.0.1:")
        status = cluster.status()
        assert status["workers"] == 2 and status["slots"] == 4
        assert sorted(w["connected_slots"] for w in status["worker_list"]) == [2, 2]
        pids = cluster_pids(cluster)
        slots = [c for w in cluster.worker_procs for c in psutil.Process(w.pid).children()]
        assert len(slots) == 4  # (each with its zygote and task hosts below it)
        assert len(pids) >= 1 + 2 + 4 + 4
        assert all(alive(pid) for pid in pids)
        with Executor(cluster.address) as ex:
            assert list(ex.map(tasks.square, range(50))) == [i * i for i in range(50)]
        start = time.monotonic()
        cluster.stop()
        assert time.monotonic() - start < 10
        wait_until(lambda: not any(alive(pid) for pid in pids), 5, message="all PIDs gone")
        assert cluster.broker is None and cluster.worker_procs == []
        cluster.stop()  # stopping again is harmless
    finally:
        cluster.stop()
        kill_tree(pids)


def test_workers_zero_is_a_broker_alone():
    with LocalCluster(workers=0, env=worker_env()) as cluster:
        status = cluster.status()
        assert status["workers"] == 0 and status["slots"] == 0
        assert cluster.worker_procs == []
        assert descendants(cluster.broker.pid) == []
        ex = Executor(cluster.address)
        try:
            f = ex.submit(tasks.add, 2, 3)
            wait_until(lambda: cluster.status()["queued"] == 1, 10,
                       message="the task queued at the broker")
            assert not f.done()  # nobody to run it
            proc = cluster.add_worker(slots=1)
            assert proc in cluster.worker_procs
            assert f.result(timeout=30) == 5
            assert cluster.wait_for_slots(1)["slots"] == 1
        finally:
            ex.shutdown(cancel_futures=True)
        broker_pid = cluster.broker.pid
    wait_until(lambda: not alive(broker_pid), 5)


def test_wait_for_slots_times_out():
    with LocalCluster(workers=0) as cluster:
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="0 of 3"):
            cluster.wait_for_slots(3, timeout=0.5)
        assert time.monotonic() - start < 5


def test_context_manager_stops_on_error():
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="inside"):
        with LocalCluster(workers=1, env=worker_env()) as cluster:
            pids = cluster_pids(cluster)
            assert len(pids) >= 1 + 1 + 1 + 1  # broker, agent, slot, its zygote
            raise RuntimeError("inside the block")
    try:
        wait_until(lambda: not any(alive(pid) for pid in pids), 5, message="all PIDs gone")
    finally:
        kill_tree(pids)


def test_start_failure_cleans_up():
    before = my_children()
    with LocalCluster(workers=0) as first:
        port = int(first.address.rsplit(":", 1)[1])
        second = LocalCluster(workers=1, port=port, startup_timeout=10)
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            second.start()
        assert time.monotonic() - start < 10
        assert second.broker is None and second.worker_procs == []
        assert my_children() - before == {first.broker.pid}


@pytest.mark.parametrize("kwargs", [{"workers": -1}, {"slots_per_worker": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        LocalCluster(**kwargs)


def test_env_reaches_workers():
    with LocalCluster(workers=1, env={**worker_env(), "ZF_CLUSTER_VAR": "yes"}) as cluster:
        with Executor(cluster.address) as ex:
            assert ex.submit(tasks.getenv, "ZF_CLUSTER_VAR").result(timeout=30) == "yes"
            pid = outer_pid(ex.submit(tasks.whoami).result(timeout=30))
            assert pid in descendants(cluster.worker_procs[0].pid)
    assert "ZF_CLUSTER_VAR" not in os.environ


def test_rtt_puts_the_workers_behind_an_emulated_link():
    with LocalCluster(workers=1, rtt_ms=60, env=worker_env()) as cluster:
        assert cluster.worker_address != cluster.address
        proxy_pid = cluster.proxy.pid
        with Executor(cluster.address) as ex:
            start = time.monotonic()
            assert ex.submit(abs, -4).result(timeout=30) == 4
            assert time.monotonic() - start >= 0.06  # one task crosses the link both ways
            assert list(ex.map(abs, range(-500, 500))) == [abs(i) for i in range(-500, 500)]
    assert not psutil.pid_exists(proxy_pid) or psutil.Process(proxy_pid).status() == "zombie"
