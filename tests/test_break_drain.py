"""Break attempt: the stop/drain path of a worker (SIGTERM), with real processes.

Commit 3bafc8a made a stopping slot wait (at most STOP_CONFIRM_SECONDS = 5 s) until the
broker has acknowledged its last RESULTS before it says BYE, so that its agent's BYE (on
another connection, once the slot has exited) cannot overtake them (docs/protocol.md R21
and section 7, "Shutdown / BYE"). These tests stop workers while their slots hold
prefetched and running tasks, behind delayed, frozen and reset links, with and without
another worker, with SIGTERM twice or SIGTERM then SIGKILL, with the broker killed -9 and
restarted from its journal, and time how long an idle worker takes to stop.

Each scenario checks: every future completes, with its own value (a task returns what
it was given, doubled); no result reaches the user twice (the broker counts each task
done once, and a future's callbacks run once); every process of the stopped worker is
gone. Every task appends "i" to a log file when it starts, so the test knows which tasks
ran, where, and how often (a task may run again: execution is at least once, R12).

Figures are printed (run with -s). Waits are on observable state (the broker's status,
the log files, process states); sleeps are a fault's duration or a poll interval only.
``DRAIN_LOG=INFO`` runs the agents and slots at that log level.

What broke, each fixed in 98402dd (docs/protocol.md R21) and now passing here:

* a running task that ended more than ~4-6 s after SIGTERM (within the agent's 10 s grace)
  was not delivered: the stopping agent sent no HEARTBEAT, the broker declared the worker
  lost and took the task back (with no other worker its future waited for one; three
  such drains failed it with WorkerLost);
* a confirmation whose PING died with a replaced connection was never retried: the task
  that ran was taken back;
* an idle worker whose broker is gone took ~8 s to stop (ZMQ_LINGER on the slots' and
  the agent's sockets, and the idle slot's 1 s poll), though nothing was unacknowledged;
* the shipped systemd unit (then KillMode=control-group) SIGTERMed the task hosts too:
  running tasks ended with WorkerCrashed instead of finishing.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator

import psutil
import pytest

from conftest import (alive, child_env, descendants, kill_tree, seconds,
                      stop_process, wait_until, worker_env)
from zfalkon import Executor, LocalCluster
from zfalkon.constants import STOP_CONFIRM_SECONDS, STOP_GRACE_SECONDS
from zfalkon.linkproxy import LinkProxy

POLL = 0.05  # status / file polling interval


# -- the task ------------------------------------------------------------------------------


def logged(log: str, i: int, seconds: float, ends: str = "") -> int:
    """Append ``i`` to ``log`` (this task ran) and to ``LOG-NAME`` (NAME: the worker's,
    from ``$DRAIN_WORKER``), sleep ``seconds`` (its body), append ``i`` to ``ends`` if
    given (it finished); return ``2 * i``. Goes by value (cloudpickle)."""
    import os as _os
    import time as _time

    with open(log, "a") as f:
        f.write(f"{i}\n")
    worker = _os.environ.get("DRAIN_WORKER")
    if worker:  # (which worker ran it: each agent is started with its name there)
        with open(f"{log}-{worker}", "a") as f:
            f.write(f"{i}\n")
    if seconds:
        _time.sleep(seconds)
    if ends:
        with open(ends, "a") as f:
            f.write(f"{i}\n")
    return 2 * i


def lines(path) -> list[int]:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


# -- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def agent(address: str, name: str, slots: int, *extra: str) -> Iterator[subprocess.Popen]:
    """A worker agent named ``name`` connecting to ``address`` (the broker or a proxy),
    with ``DRAIN_WORKER=name`` in its environment (so in every process under it);
    afterwards it, its slots and everything seen under them are ended by PID."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "zfalkon", "--log-level", os.environ.get("DRAIN_LOG", "WARNING"), "worker", "--broker",
         address, "--slots", str(slots), "--name", name, *extra],
        env={**child_env(), "DRAIN_WORKER": name}, start_new_session=True)
    seen: set[int] = set()
    proc.seen = seen  # type: ignore[attr-defined]  (every PID of its tree seen so far)
    try:
        yield proc
    finally:
        seen.update(descendants(proc.pid))
        stop_process(proc)
        kill_tree(sorted(seen))


def tree(proc: subprocess.Popen) -> list[int]:
    """The agent's PID and every descendant's now (remembered for the cleanup)."""
    kids = descendants(proc.pid)
    proc.seen.update(kids)  # type: ignore[attr-defined]
    return [proc.pid, *kids]


def processes_of(name: str) -> list[int]:
    """Live processes started by the agent named ``name`` (every one inherits
    ``DRAIN_WORKER=name``: its slots, their zygotes, task hosts and tasks, including any
    started after a snapshot of its tree, or orphaned)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("DRAIN_WORKER") == name and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            pass
    return found


def assert_all_gone(pids: list[int], timeout: float, what: str) -> None:
    """Every process of the snapshot ``pids`` (the agent's tree before it was signalled)
    and every process of the worker called ``what`` has ended."""
    def left() -> list[int]:
        return sorted({p for p in pids if alive(p)} | set(processes_of(what)))

    wait_until(lambda: not left(), timeout, POLL,
               message=f"every process of worker {what} gone ({left()} still alive)")


def entry(status: dict, name: str) -> dict | None:
    return next((w for w in status["worker_list"] if w["name"] == name), None)


def field(status: dict, name: str, key: str, default=-1):
    w = entry(status, name)
    return default if w is None else w[key]


def wait_status(cluster: LocalCluster, predicate: Callable[[dict], object], timeout: float,
                message: str) -> dict:
    seen: list[dict] = []

    def check() -> object:
        seen[:] = [cluster.status()]
        return predicate(seen[0])

    try:
        wait_until(check, timeout, POLL, message=message)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {brief(seen[0]) if seen else None}") \
            from None
    return seen[0]


def brief(status: dict) -> dict:
    out = {k: status[k] for k in ("workers", "slots", "queued", "running", "prefetched",
                                  "submitted", "done", "failed", "expired_leases")}
    out["per_worker"] = {w["name"]: (w["connected_slots"], w["running"], w["prefetched"],
                                     w["done"], w["draining"]) for w in status["worker_list"]}
    return out


class Tracked:
    """Futures of ``logged`` tasks, each with a done-callback counter (a future whose
    callbacks ran twice would have reached its user twice)."""

    def __init__(self, ex: Executor, log: str, ends: str = "") -> None:
        self.ex, self.log, self.ends = ex, log, ends
        self.futures: dict[int, cf.Future] = {}
        self.calls: collections.Counter[int] = collections.Counter()

    def submit(self, i: int, seconds: float) -> cf.Future:
        f = self.ex.submit(logged, self.log, i, seconds, self.ends)
        self.futures[i] = f
        f.add_done_callback(lambda _, i=i: self.calls.update([i]))
        return f

    def done(self) -> set[int]:
        return {i for i, f in self.futures.items() if f.done()}

    def settle(self, timeout: float, cluster: LocalCluster | None = None) -> None:
        _, not_done = cf.wait(list(self.futures.values()), timeout)
        if not_done:
            where = f"; broker: {brief(cluster.status())}" if cluster else ""
            missing = sorted(i for i, f in self.futures.items() if not f.done())
            raise AssertionError(f"{len(not_done)} of {len(self.futures)} futures not done "
                                 f"within {timeout:.0f} s (first {missing[:5]}){where}")

    def check(self) -> dict:
        """Every future done with its own value, its callbacks run once; the figures."""
        wrong = {}
        for i, f in self.futures.items():
            exc = f.exception(timeout=0)
            if exc is not None:
                wrong[i] = repr(exc)
            elif f.result() != 2 * i:
                wrong[i] = f.result()
        assert not wrong, f"{len(wrong)} wrong results, e.g. {list(wrong.items())[:3]}"
        # (callbacks run in the I/O thread right after the future is set)
        wait_until(lambda: len(self.calls) == len(self.futures), 5, POLL,
                   message="every done-callback ran")
        twice = {i: n for i, n in self.calls.items() if n != 1}
        assert not twice, f"futures completed more than once: {twice}"
        runs = collections.Counter(lines(self.log))
        missing = set(self.futures) - set(runs)
        assert not missing, f"tasks that never ran yet have a result: {sorted(missing)[:5]}"
        return {"tasks": len(self.futures), "executions": sum(runs.values()),
                "ran_more_than_once": sum(1 for n in runs.values() if n > 1)}


def check_counters(cluster: LocalCluster, n: int) -> dict:
    """The broker counts each task submitted once and done once, and holds nothing."""
    status = wait_status(cluster, lambda s: s["done"] == n and s["queued"] == 0
                         and s["running"] + s["prefetched"] == 0, 10,
                         f"the broker counting {n} tasks done, none held")
    assert status["submitted"] == n and status["failed"] == 0, brief(status)
    return status


@contextlib.contextmanager
def executor(address: str) -> Iterator[Executor]:
    """An Executor that never blocks the teardown: a test may leave a task pending that
    no worker will run (what some of these tests show), and shutdown(wait=True) would
    wait for it."""
    ex = Executor(address, connect_timeout=30)
    try:
        yield ex
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def sigterm(proc: subprocess.Popen) -> float:
    os.kill(proc.pid, signal.SIGTERM)
    return time.monotonic()


def warm_up(t: Tracked, n: int, base: int) -> None:
    """``n`` instant tasks, so that every slot has timed tasks and asks for a deep window
    (prefetch), and every task host has the function."""
    fs = [t.submit(base + i, 0) for i in range(n)]
    _, not_done = cf.wait(fs, 60)
    assert not not_done, "warm-up tasks not done"


# -- 1: prefetched short tasks and running long ones -------------------------------------

N_SHORT = 400
LONG_TASK = 4.0


def start_mixed_load(t: Tracked, cluster: LocalCluster, name: str, slots: int,
                     total_slots: int) -> None:
    """Warm up, then one long task per slot (each alone in its SUBMIT, so that dispatch
    hands them round the slots, one each) and N_SHORT short ones; return once worker
    ``name`` runs a task in each of its slots with short ones prefetched (the long tasks
    still running: asserted)."""
    warm_up(t, 200, 100_000)
    held = lambda s: s["running"] + s["prefetched"]  # noqa: E731
    for i in range(total_slots):
        t.submit(i, LONG_TASK)
        wait_status(cluster, lambda s: held(s) == i + 1, 10, f"long task {i} dispatched")
    for i in range(total_slots, total_slots + N_SHORT):
        t.submit(i, 0.002)
    # (any prefetch: how deep depends on how the client batched its SUBMITs, since
    # dispatch gives each slot its share of the queue as it was, and a slot running a long
    # task asks for more only with its next RESULTS)
    wait_status(cluster, lambda s: field(s, name, "running", 0) == slots
                and field(s, name, "prefetched", 0) >= 1, 20,
                f"worker {name} running {slots} tasks with some prefetched")
    wait_until(lambda: set(range(total_slots)) <= set(lines(t.log)), 10, POLL,
               message="every long task started")
    assert not set(range(total_slots)) & set(lines(t.ends)), \
        "a long task ended already: the machine is too slow for this test's timing"


@contextlib.contextmanager
def worker_a_alone(tmp_path, slots: int) -> Iterator[tuple[LocalCluster, subprocess.Popen,
                                                           Tracked]]:
    """A cluster whose only worker is A (``slots`` slots), and an executor's Tracked
    tasks (logging to ``runs`` and ``ends`` in ``tmp_path``)."""
    log, ends = str(tmp_path / "runs"), str(tmp_path / "ends")
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            agent(cluster.address, "A", slots) as a:
        cluster.wait_for_slots(slots)
        with executor(cluster.address) as ex:
            yield cluster, a, Tracked(ex, log, ends)


@contextlib.contextmanager
def a_running_long_tasks_b_alive(tmp_path) -> Iterator[tuple[LocalCluster,
                                                             subprocess.Popen, Tracked]]:
    """A cluster with worker A (2 slots) running a long task in each slot with short ones
    prefetched behind them (:func:`start_mixed_load`) and worker B (1 slot) alive; yields
    the cluster, A's agent and the Tracked tasks."""
    log, ends = str(tmp_path / "runs"), str(tmp_path / "ends")
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            agent(cluster.address, "A", 2) as a, agent(cluster.address, "B", 1):
        cluster.wait_for_slots(3)
        with executor(cluster.address) as ex:
            t = Tracked(ex, log, ends)
            start_mixed_load(t, cluster, "A", 2, 3)
            yield cluster, a, t


@pytest.mark.timeout(120)
def test_sigterm_twice_hands_prefetched_tasks_to_the_other_worker(tmp_path):
    """Worker A (2 slots) runs long tasks with short ones prefetched behind them; worker B
    (1 slot) is alive. SIGTERM A, and again once it shows draining: one drain; its
    running tasks finish and are delivered, what it had prefetched runs on B; A and its
    processes exit 0 within the grace period."""
    with a_running_long_tasks_b_alive(tmp_path) as (cluster, a, t):
        held = brief(cluster.status())["per_worker"]["A"]
        pids = tree(a)
        start = sigterm(a)
        wait_status(cluster, lambda s: field(s, "A", "draining", False), 15,
                    "A draining")
        sigterm(a)  # again: still one drain
        code = a.wait(STOP_GRACE_SECONDS + 10)
        took = time.monotonic() - start
        t.settle(60, cluster)
        figures = t.check()
        status = check_counters(cluster, len(t.futures))
        print(f"\nA held {held} at SIGTERM; exited {code} after {took:.2f} s; {figures}; "
              f"stolen={status['stolen']} expired_leases={status['expired_leases']}")
        assert code == 0
        assert took < LONG_TASK + STOP_CONFIRM_SECONDS, "A waited for nothing"
        assert_all_gone(pids, 15, "A")
        assert status["expired_leases"] == 0


@pytest.mark.timeout(120)
def test_sigterm_with_no_other_worker_delivers_what_ran_and_a_new_worker_finishes(tmp_path):
    """Worker A alone. SIGTERM it while it runs long tasks with short ones prefetched:
    every task it ran is delivered before it has exited (R21), the rest stay queued, and
    a worker started later runs them; each task's result reaches its user once."""
    with worker_a_alone(tmp_path, 2) as (cluster, a, t):
        start_mixed_load(t, cluster, "A", 2, 2)
        pids = tree(a)
        start = sigterm(a)
        code = a.wait(STOP_GRACE_SECONDS + 10)
        took = time.monotonic() - start
        ran = set(lines(t.log))
        # what A ran is delivered (the client may take a moment to read it)
        wait_until(lambda: ran <= t.done(), 5, POLL,
                   message=f"the tasks A ran delivered "
                           f"({len(ran - t.done())} of {len(ran)} missing)")
        status = wait_status(cluster, lambda s: s["workers"] == 0, 15, "A deregistered")
        queued = status["queued"]
        assert queued == len(t.futures) - len(t.done()), brief(status)
        assert_all_gone(pids, 15, "A")
        with agent(cluster.address, "B", 1):
            t.settle(60, cluster)
            figures = t.check()
            check_counters(cluster, len(t.futures))
        print(f"\nA exited {code} after {took:.2f} s having run {len(ran)} tasks; "
              f"{queued} left queued for B; {figures}")
        assert code == 0


# -- 1c: a running task that ends after the lease, within the grace period ---------------

#: Under STOP_GRACE_SECONDS (10), over LEASE_SECONDS (6): the agent lets the slot finish it.
DRAIN_TASK = 8.0

@pytest.mark.timeout(120)
def test_a_task_ending_6_to_10_s_after_sigterm_is_delivered_with_no_other_worker(tmp_path):
    """One worker, one slot, a task of DRAIN_TASK s. SIGTERM when it starts: the agent
    grants its slots STOP_GRACE_SECONDS to finish, the task ends within them, so its result
    must reach the user (R21: "a task that finished while its worker was stopping is
    delivered, even when no other worker is left to run it again")."""
    with worker_a_alone(tmp_path, 1) as (cluster, a, t):
        f = t.submit(0, DRAIN_TASK)
        wait_until(lambda: lines(t.log) == [0], 20, POLL, message="the task started")
        pids = tree(a)
        start = sigterm(a)
        wait_until(lambda: lines(t.ends) == [0], DRAIN_TASK + 5, POLL,
                   message="the task finished in A's slot")
        finished = time.monotonic() - start
        delivered = cf.wait([f], 5).done == {f}  # (its result goes out at once)
        status = brief(cluster.status())
        code = a.wait(STOP_GRACE_SECONDS + 10)
        took = time.monotonic() - start
        assert_all_gone(pids, 15, "A")
        print(f"\ntask ended {finished:.1f} s after SIGTERM; A exited {code} after "
              f"{took:.1f} s; delivered: {delivered}; broker: {status}")
        assert code == 0
        assert delivered, (f"the task ended in A's slot {finished:.1f} s after SIGTERM (A "
                           f"exited after {took:.1f} s), and the future was not done 5 s "
                           f"later; broker then: {status}")


@pytest.mark.long
@pytest.mark.timeout(120)
def test_three_graceful_drains_during_a_long_task_do_not_fail_it(tmp_path):
    """Three workers of one slot. Whichever runs the DRAIN_TASK s task is SIGTERMed once
    it started, three times: each drain is graceful (no crash, no lost link), so the task
    should at worst run again, never fail."""
    log = str(tmp_path / "runs")
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            agent(cluster.address, "W0", 1) as w0, agent(cluster.address, "W1", 1) as w1, \
            agent(cluster.address, "W2", 1) as w2:
        cluster.wait_for_slots(3)
        agents = {"W0": w0, "W1": w1, "W2": w2}
        with executor(cluster.address) as ex:
            t = Tracked(ex, log)
            f = t.submit(0, DRAIN_TASK)
            stopped: list[str] = []
            for k in range(3):
                wait_until(lambda: len(lines(log)) == k + 1, 20, POLL,
                           message=f"the task started, time {k + 1}")
                s = wait_status(cluster, lambda s: s["running"] == 1, 15, "task held")
                name = next(w["name"] for w in s["worker_list"] if w["running"])
                stopped.append(name)
                sigterm(agents[name])
                # taken back (or done) before the next round
                wait_status(cluster, lambda s: field(s, name, "running", 0) == 0,
                            STOP_GRACE_SECONDS + 5, f"{name} no longer holding the task")
                if f.done():
                    break
            outcome = f.exception(timeout=30) or f.result()
            print(f"\nstopped {stopped}; executions {len(lines(log))}; outcome {outcome!r}")
            assert f.result() == 0  # (it ran, and was delivered, through the drains)


# -- 6: stop latency -------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_an_idle_worker_stops_at_once(tmp_path):
    """A worker of 2 slots that has run tasks and is idle (every result acknowledged: the
    broker counts them done) stops well within STOP_CONFIRM_SECONDS; so does one stopped
    the moment its last result reached the client (the slot may not have had the
    acknowledgement yet: it waits for its PONG)."""
    log = str(tmp_path / "runs")
    took = {}
    with LocalCluster(workers=0, env=worker_env()) as cluster, executor(cluster.address) as ex:
        t = Tracked(ex, log)
        for case in ("idle", "just finished"):
            with agent(cluster.address, case, 2) as a:
                cluster.wait_for_slots(2)
                base = len(t.futures)
                fs = [t.submit(base + i, 0.001) for i in range(300)]
                if case == "idle":
                    cf.wait(fs, 60)
                    wait_status(cluster, lambda s: s["done"] == len(t.futures), 10,
                                "every result in")
                else:  # SIGTERM as soon as the last result is in (its RESULTS frame
                    # may not be acknowledged to the slot yet: the confirmation's PONG)
                    wait_until(lambda: len(t.done()) == base + 300, 60, 0.005,
                               message="300 results in")
                pids = tree(a)
                start = sigterm(a)
                assert a.wait(STOP_GRACE_SECONDS + 10) == 0
                took[case] = time.monotonic() - start
                assert_all_gone(pids, 15, case)
            wait_status(cluster, lambda s: s["workers"] == 0, 10, "deregistered")
        t.settle(5, cluster)
        t.check()
        check_counters(cluster, len(t.futures))
    print(f"\nSIGTERM to exit: {took}")
    # (an idle slot notices its SIGTERM when its 1 s idle poll ends; pyzmq restarts an
    # interrupted poll with what it counts is left, in whole seconds: up to ~2 s)
    # (~1-2 s here; a margin for a loaded machine, well under the wait for unacknowledged
    # results, STOP_CONFIRM_SECONDS)
    assert took["idle"] < 4.0 and took["just finished"] < 4.0, took


@pytest.mark.timeout(90)
def test_an_idle_worker_whose_broker_is_gone_stops_at_once(tmp_path):
    """A worker registers (both slots announce their window: the broker shows it) and runs
    nothing; the broker is killed (-9); the worker is SIGTERMed. Its slots have sent no
    results and have nothing unacknowledged: nothing is worth waiting for."""
    with LocalCluster(workers=0, env=worker_env()) as cluster:
        with agent(cluster.address, "A", 2) as a:
            cluster.wait_for_slots(2)
            wait_status(cluster, lambda s: field(s, "A", "window", 0) >= 2, 10,
                        "both slots announced their window")
            cluster.broker.kill()
            cluster.broker.wait(10)
            pids = tree(a)
            start = sigterm(a)
            code = a.wait(STOP_GRACE_SECONDS + 10)
            took = time.monotonic() - start
            assert_all_gone(pids, 15, "A")
    print(f"\nbroker gone: SIGTERM to exit {took:.2f} s (code {code})")
    assert code == 0
    # (~1-2 s here, 8 s before 98402dd; a margin for a loaded machine)
    assert took < 4.0, f"an idle worker whose broker is gone took {took:.2f} s to stop"


# -- 2: results in flight on a slow link -------------------------------------------------


@pytest.mark.timeout(120)
def test_sigterm_behind_a_50_to_200_ms_link_delivers_what_ran(tmp_path):
    """Worker A (2 slots) alone, behind a link adding 50-200 ms each way; a stream of short
    tasks, so that results are always in flight. SIGTERM A: every task A ran is delivered
    by the time it has exited (R21), with no other worker to run it again; a worker
    started afterwards runs the rest; each result reaches its user once."""
    log = str(tmp_path / "runs")
    n = 1000
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            LinkProxy(cluster.address, delay_ms=50, jitter_ms=150, seed=7) as proxy, \
            agent(proxy.address, "A", 2) as a:
        cluster.wait_for_slots(2)
        with executor(cluster.address) as ex:
            t = Tracked(ex, log)
            for i in range(n):
                t.submit(i, 0.002)
            s0 = wait_status(cluster, lambda s: field(s, "A", "done", 0) >= 200
                             and field(s, "A", "running", 0) == 2, 60,
                             "A returning results and holding tasks in both slots")
            pids = tree(a)
            start = sigterm(a)
            code = a.wait(STOP_GRACE_SECONDS + 10)
            took = time.monotonic() - start
            ran = set(lines(f"{log}-A"))
            wait_until(lambda: ran <= t.done(), 5, POLL,
                       message=f"the tasks A ran delivered "
                               f"({len(ran - t.done())} of {len(ran)} missing)")
            status = wait_status(cluster, lambda s: s["workers"] == 0, 15, "A deregistered")
            left = status["queued"]
            assert_all_gone(pids, 15, "A")
            with agent(cluster.address, "B", 1):
                t.settle(60, cluster)
                figures = t.check()
                check_counters(cluster, n)
        print(f"\nA held {brief(s0)['per_worker']['A']} at SIGTERM (window "
              f"{field(s0, 'A', 'window')}); exited {code} after {took:.2f} s having run "
              f"{len(ran)}; {left} left queued for B; {figures}")
        assert code == 0 and took < STOP_CONFIRM_SECONDS
        assert figures["ran_more_than_once"] == 0


# -- 3: the link frozen through the confirmation wait ------------------------------------

FREEZE = seconds(15.0, STOP_CONFIRM_SECONDS + 2)


@pytest.mark.long
@pytest.mark.timeout(150)
def test_sigterm_while_the_link_is_frozen_past_stop_confirm_seconds(tmp_path):
    """Worker A (2 slots) behind a link that freezes (no byte passes, keep-alives
    included) just before SIGTERM, for longer than STOP_CONFIRM_SECONDS; worker B (1 slot,
    direct) is alive. A's results and BYEs wait in the link; its tasks may run again on B.
    After the thaw every future completes once with its value, the broker counts each
    task done once, and A's processes are all gone."""
    log = str(tmp_path / "runs")
    n = 600
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            LinkProxy(cluster.address) as proxy, agent(proxy.address, "A", 2) as a, \
            agent(cluster.address, "B", 1):
        cluster.wait_for_slots(3)
        with executor(cluster.address) as ex:
            t = Tracked(ex, log)
            for i in range(n):
                t.submit(i, 0.5 if i % 50 == 0 else 0.002)
            s0 = wait_status(cluster, lambda s: field(s, "A", "done", 0) >= 50
                             and field(s, "A", "running", 0) == 2, 60,
                             "A returning results and holding tasks in both slots")
            pids = tree(a)
            assert proxy.freeze() == [0, 1, 2]  # the agent's link and its slots'
            exited = None  # seconds from SIGTERM to A's exit, if it exits while frozen
            try:
                start = sigterm(a)
                deadline = start + FREEZE
                while (left := deadline - time.monotonic()) > 0:
                    if exited is None and a.poll() is not None:
                        exited = time.monotonic() - start
                    time.sleep(min(POLL, left))  # the fault's duration, polled
            finally:
                proxy.thaw()
            ran_before_thaw = len(lines(f"{log}-A"))
            code = a.wait(STOP_GRACE_SECONDS + 10)
            took = exited if exited is not None else time.monotonic() - start
            t.settle(60, cluster)
            figures = t.check()
            status = check_counters(cluster, n)
            assert_all_gone(pids, 15, "A")
        print(f"\nA held {brief(s0)['per_worker']['A']} at the freeze; frozen "
              f"{FREEZE:.0f} s; A exited {code} {took:.1f} s after SIGTERM "
              f"({'during' if exited is not None else 'after'} the freeze) having run "
              f"{ran_before_thaw}; {figures}; expired_leases={status['expired_leases']}")
        assert code == 0


@pytest.mark.timeout(120)
def test_results_lost_with_a_reset_connection_during_the_confirmation_are_resent(tmp_path):
    """Worker A (1 slot) alone, behind a proxy. SIGTERM while a task runs; freeze the
    slot's link (only: the agent's DRAIN has passed) before the task ends, so its RESULTS
    and the confirmation PING wait in the link; reset that connection (RST: they are
    lost). The slot reconnects at once, well within STOP_CONFIRM_SECONDS: the task that
    ran must still be delivered, with no other worker to run it again."""
    log, ends = str(tmp_path / "runs"), str(tmp_path / "ends")
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            LinkProxy(cluster.address) as proxy, agent(proxy.address, "A", 1) as a:
        cluster.wait_for_slots(1)
        wait_until(lambda: proxy.connections() == [0, 1], 10, POLL,
                   message="the agent's link (0) and its slot's (1)")
        with executor(cluster.address) as ex:
            t = Tracked(ex, log, ends)
            f = t.submit(0, 1.0)
            wait_until(lambda: lines(log) == [0], 20, POLL, message="the task started")
            pids = tree(a)
            start = sigterm(a)
            wait_status(cluster, lambda s: field(s, "A", "draining", False), 15,
                        "A draining")
            assert proxy.freeze([1]) == [1]
            assert not lines(ends), "the task ended before the freeze: too slow a machine"
            wait_until(lambda: lines(ends) == [0], 10, POLL, message="the task ended")
            time.sleep(0.3)  # the fault: the slot's frames sit in the frozen link
            assert proxy.reset([1]) == [1]
            reset_at = time.monotonic() - start
            wait_until(lambda: 1 not in proxy.connections() and len(proxy.connections()) == 2,
                       5, POLL, message="the slot reconnected")
            code = a.wait(STOP_GRACE_SECONDS + 10)
            took = time.monotonic() - start
            delivered = cf.wait([f], 2).done == {f}
            status = brief(cluster.status())
            assert_all_gone(pids, 15, "A")
            print(f"\nreset {reset_at:.1f} s after SIGTERM; A exited {code} after "
                  f"{took:.1f} s; delivered: {delivered}; broker {status}")
        assert code == 0
        assert delivered, (f"the task ran and ended in A's slot; A exited {took:.1f} s "
                           f"after SIGTERM; not delivered 2 s later: broker {status}")


# -- 4: SIGTERM twice; SIGTERM then SIGKILL --------------------------------------------


@pytest.mark.timeout(120)
def test_sigkill_of_the_agent_during_the_confirmation_wait(tmp_path):
    """Worker A (2 slots) alone behind a proxy, short tasks and two long ones running.
    SIGTERM; freeze the slots' links (the agent's DRAIN has passed) so that they wait for
    the acknowledgement of their last results; SIGKILL the agent during that wait; thaw.
    The slots, orphans now, still confirm and exit by themselves (no process left); every
    task they ran is delivered with no other worker; a worker started later runs the
    rest."""
    log, ends = str(tmp_path / "runs"), str(tmp_path / "ends")
    with LocalCluster(workers=0, env=worker_env()) as cluster, \
            LinkProxy(cluster.address) as proxy, agent(proxy.address, "A", 2) as a:
        cluster.wait_for_slots(2)
        wait_until(lambda: proxy.connections() == [0, 1, 2], 10, POLL,
                   message="the agent's link (0) and its slots' (1, 2)")
        with executor(cluster.address) as ex:
            t = Tracked(ex, log, ends)
            start_mixed_load(t, cluster, "A", 2, 2)
            pids = tree(a)
            sigterm(a)
            wait_status(cluster, lambda s: field(s, "A", "draining", False), 15,
                        "A draining")
            assert proxy.freeze([1, 2]) == [1, 2]
            try:
                # the long tasks end (the slots finish what their task hosts hold, then
                # wait for the acknowledgement that cannot come through the frozen link)
                wait_until(lambda: {0, 1} <= set(lines(ends)), LONG_TASK + 5, POLL,
                           message="the long tasks ended")
                wait_until(lambda: len(lines(ends)) == len(lines(log)), 5, POLL,
                           message="every task A started ended")
                killed_at = time.monotonic()
                a.kill()
                a.wait(5)
                time.sleep(1.0)  # the fault: the slots wait, orphaned, behind a frozen link
            finally:
                proxy.thaw()
            assert_all_gone(pids, STOP_CONFIRM_SECONDS + 5, "A")  # (slots orphaned)
            gone_after = time.monotonic() - killed_at
            ran = set(lines(f"{log}-A"))
            wait_until(lambda: ran <= t.done(), 5, POLL,
                       message=f"the tasks A ran delivered "
                               f"({len(ran - t.done())} of {len(ran)} missing)")
            with agent(cluster.address, "B", 1):
                t.settle(60, cluster)
                figures = t.check()
                check_counters(cluster, len(t.futures))
        print(f"\nslots gone {gone_after:.1f} s after the agent's SIGKILL; A ran "
              f"{len(ran)}; {figures}")
        assert figures["ran_more_than_once"] == 0


@pytest.mark.long
@pytest.mark.timeout(120)
def test_sigterm_then_sigkill_of_the_agent_while_tasks_run(tmp_path):
    """Worker A (2 slots) running long tasks with short ones prefetched, B (1 slot) alive.
    SIGTERM A, then SIGKILL it while the long tasks still run: the slots (their agent
    dead) kill their task hosts, report the tasks they ran (SLOT_LOST: a crash each, R18)
    and exit; every task runs on B; nothing of A is left."""
    with a_running_long_tasks_b_alive(tmp_path) as (cluster, a, t):
        pids = tree(a)
        sigterm(a)
        wait_status(cluster, lambda s: field(s, "A", "draining", False), 15,
                    "A draining")
        a.kill()
        a.wait(5)
        assert_all_gone(pids, 15, "A")
        t.settle(60, cluster)
        figures = t.check()
        check_counters(cluster, len(t.futures))
        print(f"\n{figures}")


@pytest.mark.timeout(120)
def test_systemctl_stop_with_the_shipped_unit_lets_running_tasks_finish(tmp_path):
    """Worker A (2 slots) running long tasks with short ones prefetched, B (1 slot)
    alive. Signal A's processes as `systemctl stop` does with the shipped unit
    (bootstrap/zfalkon-worker.service: KillSignal to the main process alone with
    KillMode=mixed, to every process of the unit with the default control-group, which
    killed the running tasks: WorkerCrashed): every task must still end with its own
    value."""
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    path = os.path.join(os.path.dirname(__file__), "..", "bootstrap",
                        "zfalkon-worker.service")
    assert unit.read(path)
    service = unit["Service"]
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    mode = service.get("KillMode", "control-group")
    with a_running_long_tasks_b_alive(tmp_path) as (cluster, a, t):
        pids = tree(a)
        for pid in pids if mode == "control-group" else [a.pid]:  # (as systemd)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        code = a.wait(STOP_GRACE_SECONDS + 10)
        assert_all_gone(pids, 15, "A")
        t.settle(60, cluster)
        failed = {i: repr(f.exception()) for i, f in t.futures.items()
                  if f.exception() is not None}
        print(f"\nKillMode={mode}: A exited {code}; {len(failed)} failed: "
              f"{list(failed.values())[:2]}")
        t.check()


# -- 5: the broker killed -9 while a worker stops, restarted from its journal ------------


@pytest.mark.timeout(150)
def test_broker_killed_while_a_worker_drains_and_restarted_from_its_journal(tmp_path):
    """Worker A (2 slots) alone; the broker keeps a journal. SIGTERM A while it runs long
    tasks with short ones prefetched; kill -9 the broker at once; the long tasks end
    (their results go nowhere, the slots wait for an acknowledgement); restart the broker
    on its journal while they wait. A exits; a new worker finishes the run: every future
    once, with its own value; nothing of A is left."""
    log, ends = str(tmp_path / "runs"), str(tmp_path / "ends")
    with LocalCluster(workers=0, env=worker_env(),
                      broker_args=["--journal", str(tmp_path / "journal")]) as cluster, \
            agent(cluster.address, "A", 2) as a:  # (B, later, has 2 slots: the long
        #                                             tasks run again there side by side)
        cluster.wait_for_slots(2)
        with executor(cluster.address) as ex:
            t = Tracked(ex, log, ends)
            start_mixed_load(t, cluster, "A", 2, 2)
            pids = tree(a)
            start = sigterm(a)
            wait_status(cluster, lambda s: field(s, "A", "draining", False), 15,
                        "A draining")
            cluster.broker.kill()
            cluster.broker.wait(10)
            done_at_kill = len(t.done())
            wait_until(lambda: {0, 1} <= set(lines(ends)), LONG_TASK + 5, POLL,
                       message="the long tasks ended")
            cluster.restart_broker(kill=True)
            restarted = time.monotonic() - start
            code = a.wait(STOP_GRACE_SECONDS + 10)
            took = time.monotonic() - start
            assert_all_gone(pids, 15, "A")
            status = cluster.status()
            with agent(cluster.address, "B", 2):
                t.settle(60, cluster)
                figures = t.check()
            final = wait_status(cluster, lambda s: s["queued"] == 0
                                and s["running"] + s["prefetched"] == 0, 10, "idle")
        print(f"\n{done_at_kill} done at the kill; broker back {restarted:.1f} s after "
              f"SIGTERM; A exited {code} after {took:.1f} s; restarted broker before B: "
              f"{brief(status)}; {figures}; duplicate_submits="
              f"{final['duplicate_submits']}")
        assert code == 0
