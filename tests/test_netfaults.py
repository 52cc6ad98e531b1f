"""End-to-end network faults: stalled links, reset connections, a silent greedy slot and a
hung task, against real broker and worker processes on 127.0.0.1.

Faults come from an in-process :class:`zfalkon.linkproxy.LinkProxy` placed between one
party and the broker: ``freeze()`` stalls a link (no byte moves either way, keep-alives
included, like a dead network path), ``reset()`` kills its connections with RST. The tests
wait on what can be observed (the broker's status counters, the proxy's connections, the
futures), never on bare sleeps; the only sleeps are a fault's own duration.

Each scenario asserts that every future completes with the right value and that the
broker counts every task submitted once and done once (``submitted`` and ``done``).

Select with ``pytest -m netfaults``; they also run in the default ``pytest`` run.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import pytest
import zmq

import tasks
from conftest import (
    child_env,
    descendants,
    kill_tree,
    seconds,
    stop_process,
    wait_until,
    worker_env,
)
from zfalkon import Executor, LocalCluster
from zfalkon import protocol as P
from zfalkon.client import query_status
from zfalkon.linkproxy import LinkProxy

pytestmark = pytest.mark.netfaults

#: How long a stalled link stays stalled: 30 s (what the issue asks for) under tox -e long,
#: 12 s (twice the lease and the ZMTP heartbeat timeout) in the default run.
FREEZE_SECONDS = seconds(30.0, 12.0)
POLL = 0.1             # status polling interval (each poll is a short broker connection)


# -- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def worker(address: str, name: str, slots: int) -> Iterator[subprocess.Popen]:
    """A ``zfalkon worker`` named ``name`` connecting to ``address`` (e.g. a proxy); it
    and its slots are stopped by PID afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "zfalkon", "--log-level", "WARNING", "worker", "--broker",
         address, "--slots", str(slots), "--name", name], env=child_env())
    try:
        yield proc
    finally:
        kids = descendants(proc.pid)
        stop_process(proc)
        kill_tree(kids)


@contextlib.contextmanager
def executor(address: str) -> Iterator[Executor]:
    """An Executor that never blocks the test's teardown: pending futures are cancelled,
    and if the test failed the executor is not waited for."""
    ex = Executor(address, connect_timeout=30)
    ok = False
    try:
        yield ex
        ok = True
    finally:
        ex.shutdown(wait=ok, cancel_futures=True)


def worker_entry(status: dict, name: str) -> dict | None:
    """The ``worker_list`` entry of the worker called ``name``, or None."""
    for entry in status["worker_list"]:
        if entry["name"] == name:
            return entry
    return None


def worker_field(status: dict, name: str, field: str) -> int:
    """``field`` of the worker called ``name`` (-1 if the broker does not list it)."""
    entry = worker_entry(status, name)
    return -1 if entry is None else entry[field]


def wait_status(cluster: LocalCluster, predicate: Callable[[dict], object], timeout: float,
                message: str) -> dict:
    """Poll the broker's status until ``predicate(status)`` holds; return that status."""
    seen: list[dict] = []

    def check() -> object:
        status = cluster.status()
        seen[:] = [status]
        return predicate(status)

    try:
        wait_until(check, timeout, interval=POLL, message=message)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {brief(seen[0]) if seen else None}") from None
    return seen[0]


def brief(status: dict) -> dict:
    """The counters of a status (no worker list), plus each worker's running/done."""
    out = {k: status[k] for k in ("workers", "slots", "queued", "running", "submitted",
                                  "done", "failed")}
    out["per_worker"] = {w["name"]: (w["connected_slots"], w["running"], w["done"])
                         for w in status["worker_list"]}
    return out


def count_done(futures: list[cf.Future]) -> int:
    return sum(f.done() for f in futures)


def settle(futures: list[cf.Future], timeout: float, what: str,
           cluster: LocalCluster | None = None) -> None:
    """Wait for every future; fail naming how many are missing (and the broker's view)."""
    _, not_done = cf.wait(futures, timeout)
    if not_done:
        where = f"; broker: {brief(cluster.status())}" if cluster is not None else ""
        raise AssertionError(f"{len(not_done)} of {len(futures)} {what} not done within "
                             f"{timeout:.0f} s{where}")


def check_values(futures: list[cf.Future], expected: list) -> None:
    """Every future has its own right value (no exception, nothing swapped or repeated)."""
    got = [f.result(timeout=0) for f in futures]
    wrong = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not wrong, f"{len(wrong)} wrong results, first: {wrong[:5]}"


def check_counters(cluster: LocalCluster, n: int) -> dict:
    """The broker accepted each of the ``n`` tasks once and finished each once."""
    status = cluster.status()
    assert (status["submitted"], status["done"]) == (n, n), f"broker: {brief(status)}"
    assert status["failed"] == 0, f"broker: {brief(status)}"
    return status


# -- a: the client's link stalls for 30 s mid-run -------------------------------------------


@pytest.mark.long
@pytest.mark.timeout(180)
def test_client_link_frozen_30s_mid_run_all_futures_complete():
    n = 3000
    with LocalCluster(workers=2, env=worker_env()) as cluster, \
            LinkProxy(cluster.address) as proxy, executor(proxy.address) as ex:
        futures = [ex.submit(tasks.sleep_then, i, 0.01) for i in range(n)]  # ~15 s of work
        wait_until(lambda: count_done(futures) >= 200, 60, interval=0.05,
                   message="results flowing to the client")
        assert proxy.freeze(), "no client connection to freeze"  # new ones stall too
        try:
            assert count_done(futures) < n, "the run finished before the freeze"
            time.sleep(1.0)  # the fault itself (meanwhile the client reads what had arrived)
            frozen_at = count_done(futures)
            assert frozen_at < n, "the run finished before the freeze"
            time.sleep(FREEZE_SECONDS - 1.0)  # ... and the rest of it
            assert count_done(futures) == frozen_at  # nothing crossed the stalled link
        finally:
            proxy.thaw()
        settle(futures, 90, "futures", cluster)
        check_values(futures, list(range(n)))
        check_counters(cluster, n)


# -- b: only a slot's link stalls; the agent keeps heartbeating -----------------------------


@pytest.mark.long
@pytest.mark.timeout(200)
def test_slot_link_frozen_30s_its_tasks_run_elsewhere_and_it_comes_back():
    n1 = 3000
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            LinkProxy(cluster.address) as proxy, worker(proxy.address, "behind", 2):
        cluster.wait_for_slots(2)
        # the agent connects first (index 0) and starts its slots once registered (1, 2)
        wait_until(lambda: proxy.connections() == [0, 1, 2], 10, message="3 proxied links")
        cluster.add_worker(2, "--name", "direct")
        cluster.wait_for_slots(4)
        with executor(cluster.address) as ex:
            futures = [ex.submit(tasks.sleep_then, i, 0.003) for i in range(n1)]
            wait_status(cluster, lambda s: s["done"] >= 300
                        and worker_field(s, "behind", "running") > 0, 60,
                        "results flowing, the proxied slots holding tasks")
            # Freeze the slots' links, and any link they open again (index > 0); the
            # agent's link (index 0) stays up, so the worker itself is not lost.
            assert proxy.freeze(lambda i: i != 0) == [1, 2]
            start = time.monotonic()
            try:
                # the broker takes the silent slots' tasks back: they all run elsewhere
                # while the slots are still cut off
                settle(futures, FREEZE_SECONDS - 2, "futures (during the freeze)", cluster)
                status = cluster.status()
                assert worker_entry(status, "behind") is not None, \
                    f"the worker was lost, its agent's link was up: {brief(status)}"
                assert time.monotonic() - start < FREEZE_SECONDS
                time.sleep(max(0.0, FREEZE_SECONDS - (time.monotonic() - start)))  # the fault
            finally:
                proxy.thaw()
            check_values(futures, list(range(n1)))
            done_at_thaw = worker_field(cluster.status(), "behind", "done")

            # After the thaw the slots must ask for work again (not sit on stale tasks):
            # keep the queue fed until the proxied worker holds new tasks (every earlier
            # one is done, so whatever it holds now is new) or has finished some.
            more: list[cf.Future] = []
            deadline = time.monotonic() + 30
            while True:
                status = cluster.status()
                if (worker_field(status, "behind", "running") > 0
                        or worker_field(status, "behind", "done") > done_at_thaw):
                    break
                assert time.monotonic() < deadline, \
                    f"the thawed slots took no new work within 30 s: {brief(status)}"
                if status["queued"] < 400:
                    base = n1 + len(more)
                    more += [ex.submit(tasks.sleep_then, base + i, 0.005) for i in range(400)]
                time.sleep(POLL)  # poll interval (the condition is the status above)
            settle(more, 60, "futures (after the thaw)", cluster)
            check_values(more, list(range(n1, n1 + len(more))))
        check_counters(cluster, n1 + len(more))


# -- c: a worker's connections reset 3 times during a run -----------------------------------


@pytest.mark.timeout(150)
def test_worker_connections_reset_3_times_lose_and_duplicate_nothing():
    n = 3000
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            LinkProxy(cluster.address) as proxy, worker(proxy.address, "behind", 2):
        cluster.wait_for_slots(2)
        with executor(cluster.address) as ex:
            futures = [ex.submit(tasks.sleep_then, i, 0.003) for i in range(n)]  # ~4.5 s
            mark = 300
            for k in range(3):
                wait_status(cluster, lambda s: s["done"] >= mark, 30,
                            f"{mark} tasks done (before reset {k + 1})")
                wait_until(lambda: len(proxy.connections()) >= 3, 30,
                           message=f"the agent's and both slots' links up (reset {k + 1})")
                assert count_done(futures) < n, "the run finished before the resets"
                proxy.reset()  # every link of the worker: the agent's and both slots'
                mark += 500  # the next reset only after progress over the new connections
            settle(futures, 60, "futures", cluster)
            check_values(futures, list(range(n)))
        status = check_counters(cluster, n)
        assert worker_field(status, "behind", "connected_slots") == 2, \
            f"broker: {brief(status)}"


# -- d: a slot that asks for a billion tasks, then never reads or answers -------------------


class EvilWorker:
    """A hand-written worker (raw DEALERs, the wire protocol by hand): the agent keeps
    heartbeating; its one slot announces a window of 10**9 tasks, then never reads and
    never answers."""

    INFO = {"worker_id": "evil", "name": "evil", "hostname": "x", "slots": 1, "cpus": 1,
            "memory": 0, "tags": [], "pid": 1}

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.agent = self._socket(address)
        self.slot = self._socket(address)
        self.slot.setsockopt(zmq.RCVHWM, 1)  # it never reads: let TCP push back at once
        self.slot.setsockopt(zmq.RCVBUF, 4096)
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._heartbeat, daemon=True)
        self.heartbeat = 2.0

    def _socket(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    @staticmethod
    def _welcome(sock: zmq.Socket) -> P.Welcome:
        assert sock.poll(10_000), "no WELCOME from the broker"
        msg = P.decode(sock.recv())
        assert isinstance(msg, P.Welcome), msg
        return msg

    def start(self) -> "EvilWorker":
        self.agent.send(P.encode(P.hello(P.ROLE_WORKER, self.INFO)))
        self.heartbeat = self._welcome(self.agent).heartbeat
        self._beats.start()
        self.slot.send(P.encode(P.hello(P.ROLE_SLOT, {"worker_id": "evil", "slot": 0})))
        self._welcome(self.slot)
        self.slot.send(P.encode(P.Results(seq=1, ack=0, window=10**9, failed=0, ids=[],
                                          blobs=[])))
        return self  # from here on the slot socket is never read nor written

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.agent.send(P.encode(P.Heartbeat(busy=[])))
            while self.agent.poll(0):  # whatever the broker tells the agent: ignored
                self.agent.recv()

    def close(self) -> None:
        self._stop.set()
        if self._beats.is_alive():
            self._beats.join(10)
        self.agent.close(0)
        self.slot.close(0)
        self.ctx.term()


class Sampler:
    """Polls the broker's status in the background, keeping the largest ``running`` seen
    for one worker."""

    def __init__(self, address: str, name: str) -> None:
        self.address = address
        self.name = name
        self.most = 0
        self.samples = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                entry = worker_entry(query_status(self.address, timeout=5.0), self.name)
            except BaseException as exc:
                self.errors.append(exc)
                return
            if entry is not None:
                self.most = max(self.most, entry["running"] + entry["prefetched"])
            self.samples += 1
            self._stop.wait(0.05)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.timeout(120)
def test_a_silent_slot_with_huge_credit_holds_at_most_a_fair_share_then_loses_it():
    n = 3000
    fair = n // 2 + 64  # two slots (the evil one, one real): half the queue, and some slack
    with LocalCluster(workers=1, env=worker_env()) as cluster:
        evil = EvilWorker(cluster.address)
        try:
            evil.start()
            wait_status(cluster, lambda s: s["slots"] == 2
                        and worker_field(s, "evil", "connected_slots") == 1, 10,
                        "the evil worker and its slot registered")
            with Sampler(cluster.address, "evil") as sampler, executor(cluster.address) as ex:
                futures = [ex.submit(tasks.sleep_then, i, 0.001) for i in range(n)]
                settle(futures, 60, "futures", cluster)
            assert not sampler.errors, sampler.errors
            assert sampler.samples > 0
            assert sampler.most <= fair, \
                f"the silent slot held {sampler.most} tasks at once (fair share {fair})"
            check_values(futures, list(range(n)))
            status = check_counters(cluster, n)
            assert worker_field(status, "evil", "running") <= 0, f"broker: {brief(status)}"
        finally:
            evil.close()


# -- e: one hung task, with short tasks prefetched behind it --------------------------------


@pytest.mark.long
@pytest.mark.timeout(120)
def test_short_tasks_do_not_wait_behind_a_hung_task():
    long_seconds = seconds(30.0, 15.0)
    n = 500
    with LocalCluster(workers=2, env=worker_env()) as cluster, \
            executor(cluster.address) as ex:
        start = time.monotonic()
        long = ex.submit(tasks.sleep_then, "long", long_seconds)
        wait_status(cluster, lambda s: s["running"] >= 1, 10, "the long task dispatched")
        short = [ex.submit(tasks.identity, i) for i in range(n)]
        # every short task finishes while the long one still runs, including any that
        # were prefetched by the slot now stuck in the long task
        settle(short, long_seconds - 5 - (time.monotonic() - start), "short tasks", cluster)
        assert not long.done()
        assert time.monotonic() - start < long_seconds
        check_values(short, list(range(n)))
        assert long.result(timeout=long_seconds + 30) == "long"
        check_counters(cluster, n + 1)
