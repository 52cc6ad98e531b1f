"""Break attempts on the latest round of fixes (issue 12 round 2 and issue 13): the STATUS
answer cap and rate, RESEND backoff, the purge of cancelled queued tasks, exact
cancellation, and per-client limits as backpressure.

Every attack runs against real broker/worker processes on 127.0.0.1, from raw ZeroMQ
peers speaking the protocol where an honest client would not do it; every process is
stopped by PID; loops are bounded by deadlines. An attack that breaks the system keeps
asserting the correct behaviour and is marked ``xfail(strict=True)`` with what broke and
the measured figures; an attack that holds is a plain test.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time

import psutil
import pytest
import tasks
import zmq
from conftest import (
    Raw,
    broker_process,
    seconds,
    steady_rss,
    wait_until,
    worker_env,
    worker_hello,
    worker_process,
)
from test_adversary_wire import PeakRss, report

from zfalkon import Executor, LocalCluster, core, payload, query_status
from zfalkon import protocol as P

MIB = 2**20
PER_PEER = 50 * MIB


def quiet_raw(ctx: zmq.Context, address: str) -> Raw:
    """A raw DEALER that reads nothing more than ZeroMQ and the kernel must, set up so
    *before* it connects (RCVBUF and RCVHWM apply to the connection from the start)."""
    raw = Raw.__new__(Raw)
    raw.sock = ctx.socket(zmq.DEALER)
    raw.sock.setsockopt(zmq.LINGER, 0)
    raw.sock.setsockopt(zmq.RCVHWM, 1)
    raw.sock.setsockopt(zmq.RCVBUF, 4096)
    raw.sock.connect(address)
    return raw


# -- 1. STATUS: one answer capped, 1 MiB/s per peer; but per *routing id* ------------------


def _fat_workers(ctx: zmq.Context, address: str, n: int) -> list[Raw]:
    """``n`` raw workers with the largest info the broker keeps (STATUS ~80 KB)."""
    workers = [Raw(ctx, address) for _ in range(n)]
    for i, w in enumerate(workers):
        w.send(worker_hello({
            "worker_id": f"fat-{i}", "slots": 1, "name": f"{i:04d}" + "n" * 124,
            "hostname": "h" * 128, "tags": [f"{j:02d}" + "t" * 62 for j in range(64)]}))
    for w in workers:
        assert isinstance(w.recv(), P.Welcome)
    return workers


@pytest.mark.long
@pytest.mark.timeout(150)
def test_status_flood_from_many_routing_ids_is_bounded_globally(ctx):
    with broker_process() as (proc, address):
        workers = _fat_workers(ctx, address, 300)
        size = len(P.encode(P.Status(query_status(address))))
        attackers = [quiet_raw(ctx, address) for _ in range(12)]
        try:
            for a in attackers:
                a.send_msg(P.hello(P.ROLE_CLIENT, {"name": "status-flood"}))
            # registered (the WELCOMEs sit unread: these peers never read), and the broker's
            # RSS steady before the baseline
            wait_until(lambda: (lambda s: s["clients"] + s["away_clients"])(
                query_status(address)) >= len(attackers), 30, message="attackers registered")
            steady_rss(proc)
            request = P.encode(P.StatusRequest())
            attack = seconds(40, 15)
            with PeakRss(proc) as peak:
                end = time.monotonic() + attack
                while time.monotonic() < end:
                    for a in attackers:
                        for _ in range(8):
                            a.send(request)
                    for w in workers:  # (they stay registered: STATUS stays large)
                        w.send_msg(P.Heartbeat([]))
                    time.sleep(1.0)  # the attack's pace: 8 requests a second per routing id
            report(f"12 routing ids x 8 STATUS/s of {size / 1e3:.0f} KB for {attack} s, never read: "
                   "broker RSS peak growth", peak.growth / MIB)
            assert proc.poll() is None
            started = time.monotonic()
            assert query_status(address)["workers"] == 300
            report("  an honest STATUS round trip after the flood",
                   time.monotonic() - started, "s")
            assert peak.growth < 100 * MIB
        finally:
            for r in attackers + workers:
                r.close()


# -- 2. RESEND backoff: hoarded tokens make the acknowledgement "move" every time -------------


#: A task that takes 20 ms (so that the slot returns each result in its own frame) and
#: returns 256 KiB: 16 DELIVER frames fill the client's 4 MiB send window.
_SLOW_256K = ("builtins:eval",
              "(__import__('time').sleep(0.02), b'r' * 262144)[1]")


@pytest.mark.long
@pytest.mark.timeout(200)
def test_resend_with_hoarded_tokens_stays_within_the_per_peer_bound(ctx):
    """A client reads its first window (15 DELIVER frames of 256 KiB: tokens 1..15), then
    every 2.05 s sends RESEND acknowledging ONE more frame with a token it already holds
    (reading more only when its hoard is spent). Its acknowledgement "moves" each time, so
    the backoff never starts and its window (~3.75 MiB) is queued again every 2 s: that
    is the documented rule (the backoff applies only while the acknowledgement stands
    still). What bounds the broker is ZeroMQ's SNDHWM: 256 frames of 256 KiB = 64 MiB
    (the optimum for this reader: a larger frame means fewer hoarded tokens, a smaller one
    a smaller cap). Measured: 54 MiB peak growth in 60 s (reading 56 MiB), i.e. above the
    50 MiB used as the per-peer figure elsewhere, below the 64 MiB cap asserted here. (60 s
    under tox -e long; 30 s in the default run, which only a broker that queued far faster
    than this rule allows could fail.)"""
    with broker_process() as (proc, address):
        with worker_process(address, "--slots", "1"):
            wait_until(lambda: query_status(address)["slots"] >= 1, 30, message="slot")
            raw = quiet_raw(ctx, address)
            try:
                raw.send_msg(P.hello(P.ROLE_CLIENT, {"name": "hoarder"}))
                welcome = raw.recv(10)
                assert isinstance(welcome, P.Welcome)
                base = welcome.key << P.ID_SHIFT
                n = 110  # (27.5 MiB of results: under MAX_WAITING_BYTES, nothing parked)
                blob = payload.python_task(_SLOW_256K[0], (_SLOW_256K[1],), {})
                raw.send_msg(P.Submit(1, 0, [base + i for i in range(1, n + 1)], [blob] * n))
                tokens: dict[int, bytes] = {}
                frames = 0

                def read_one(timeout: float) -> bool:
                    nonlocal frames
                    if not raw.sock.poll(timeout * 1000):
                        return False
                    msg = P.decode(raw.sock.recv())
                    if isinstance(msg, P.Deliver):
                        tokens.setdefault(msg.seq, msg.token)
                        frames += 1
                    return True

                # the first window (15 frames), then nothing more comes until it acknowledges
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and (len(tokens) < 8 or read_one(1.0)):
                    read_one(1.0)
                assert len(tokens) >= 8, len(tokens)
                ack, resends = 0, 0
                attack = seconds(60, 30)
                with PeakRss(proc) as peak:
                    end = time.monotonic() + attack
                    while time.monotonic() < end:
                        stop = time.monotonic() + 1.0
                        while ack + 1 not in tokens and time.monotonic() < stop:
                            read_one(0.05)  # (reads only until it has the next token)
                        if ack + 1 in tokens:
                            ack += 1
                        raw.send_msg(P.Resend(ack, tokens.get(ack, b"")))
                        resends += 1
                        time.sleep(core.RESEND_SECONDS + 0.05)  # the attack's pace
                read_mib = frames * 0.25
                report(f"RESEND with hoarded tokens for {attack} s ({resends} RESENDs, ack moved to "
                       f"{ack}, {read_mib:.0f} MiB read): broker RSS peak growth",
                       peak.growth / MIB)
                assert proc.poll() is None
                assert peak.growth < 256 * 256 * 1024 + 16 * MIB
            finally:
                raw.close()


# -- 3. the purge of cancelled queued tasks ------------------------------------------------


@pytest.mark.timeout(120)
def test_cancel_if_queued_loop_does_not_fill_the_queue():
    with broker_process() as (proc, address):  # (no worker: no slot is free)
        big = b"x" * (15 * MIB)
        ex = Executor(address)
        try:
            before = psutil.Process(proc.pid).memory_info().rss
            answers = []
            with PeakRss(proc) as peak:
                for _ in range(20):
                    fut = ex.submit(tasks.identity, big)
                    answers.append(fut.cancel())
                    assert fut.cancelled()
                # (the last CANCELLED result is acknowledged by the next message: a PING)
                probe = ex.submit(tasks.add, 1, 1)
                assert probe.cancel()
                # (cancel() returns with the broker's answer: the broker has handled every
                # frame before it; the RSS measured below once it holds still)
                steady_rss(proc)
                status = query_status(address)
            grown = psutil.Process(proc.pid).memory_info().rss - before
            report("20 x (submit 15 MiB, cancel() -> True), no free slot: STATUS queued",
                   status["queued"], "")
            report("  broker RSS growth", grown / MIB)
            report("  broker RSS peak growth", peak.growth / MIB)
            assert all(answers)
            assert proc.poll() is None
            assert grown < core.MAX_CANCELLED_QUEUED_BYTES + PER_PEER
        finally:
            ex.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(120)
def test_cancel_of_another_clients_ids_changes_nothing(ctx, tmp_path):
    """Client B sends CANCEL in all three modes (and a SUBMIT) naming client A's queued
    ids, and ids of no one: A's tasks all run, once each; B gets no CANCELLED result for
    them and the broker stays consistent (nothing queued or live afterwards)."""
    marker = tmp_path / "ran"
    with broker_process() as (proc, address):
        a, b = Raw(ctx, address), Raw(ctx, address)
        try:
            base_a = a.hello().key << P.ID_SHIFT
            ids = [base_a + i for i in range(1, 11)]
            a.send_msg(P.Submit(1, 0, ids, [payload.shell_task(f"echo {t} >> {marker}")
                                            for t in ids]))
            wait_until(lambda: query_status(address)["queued"] == 10, 10, message="queued")
            base_b = b.hello().key << P.ID_SHIFT
            b.send_msg(P.Cancel(1, 0, ids[:4], b"", P.CANCEL_DROP))
            b.send_msg(P.Cancel(2, 0, ids[4:7], b"", P.CANCEL_IF_QUEUED))
            b.send_msg(P.Cancel(3, 0, ids[7:], b"", P.CANCEL_KILL))
            b.send_msg(P.Cancel(4, 0, [base_b + 99, (12345 << P.ID_SHIFT) + 1, 0, 2**62],
                                b"", P.CANCEL_KILL))
            b.send_msg(P.Submit(5, 0, ids[:1], [payload.shell_task("echo hijack")]))
            err = b.expect_error("malformed")  # (ids outside its key)
            assert "outside" in err.message
            got = []
            while b.sock.poll(300):
                got.append(P.decode(b.sock.recv()))
            assert not [m for m in got if isinstance(m, (P.Deliver, P.Started))], got
            assert query_status(address)["queued"] == 10
            with worker_process(address, "--slots", "2"):
                wait_until(lambda: query_status(address)["done"] >= 10, 60, message="A ran")
            lines = marker.read_text().split()
            assert sorted(map(int, lines)) == ids
            delivered = []
            while a.sock.poll(500):
                msg = P.decode(a.sock.recv())
                if isinstance(msg, P.Deliver):
                    delivered += msg.ids
            assert sorted(delivered) == ids
        finally:
            a.close()
            b.close()


# -- 4. exact cancellation -------------------------------------------------------------------


def _append(path, text: str, then: str = "") -> tuple[str, str]:
    """A task (function reference, argument) that appends ``text`` and a newline to
    ``path``, then runs ``then`` (Python source)."""
    return ("builtins:exec",
            f"open({str(path)!r}, 'a').write({text + chr(10)!r})\n{then}")


@pytest.mark.timeout(150)
def test_force_cancel_does_not_run_finished_neighbours_twice(tmp_path):
    marker = tmp_path / "ran"
    with LocalCluster(workers=1, slots_per_worker=1, env=worker_env()) as cluster:
        address = cluster.address
        with Executor(address) as ex:
            # many short tasks: the slot measures them and pipelines several in its host
            assert list(ex.map(tasks.add, range(300), range(300))) == \
                [2 * i for i in range(300)]
            # (task bodies: F takes 0.5 s, K runs until it is force-cancelled)
            f = ex.submit(*_append(marker, "F", "import time; time.sleep(0.5)"))
            j = ex.submit(*_append(marker, "J"))
            k = ex.submit(*_append(marker, "K", "import time; time.sleep(60)"))
            wait_until(lambda: marker.exists() and "K" in marker.read_text(), 20,
                       message="K running")
            try:
                wait_until(lambda: f.done() and j.done(), 5, message="F, J results")
                results_while_k_runs = True
            except AssertionError:
                results_while_k_runs = False
            killed = k.cancel(force=True)
            with pytest.raises(cf.CancelledError):
                k.result(timeout=30)
            assert f.result(timeout=30) is None and j.result(timeout=30) is None
            wait_until(lambda: (lambda s: s["queued"] == 0 and s["running"] == 0)(
                query_status(address)), 30, message="idle")
        runs = marker.read_text().split()
        report(f"force-cancel of K (returned {killed}): F ran", runs.count("F"), "times")
        report("  J ran", runs.count("J"), "times")
        report("  F's and J's results came while K ran", results_while_k_runs, "")
        assert killed
        assert runs.count("F") == 1 and runs.count("J") == 1, runs
        assert results_while_k_runs


SPAWN_CHILD = """
import subprocess, time
p = subprocess.Popen(['sleep', '300'])
open(PIDFILE, 'w').write(str(p.pid))
time.sleep(300)  # (runs until cancel_all kills it)
"""


@pytest.mark.timeout(120)
def test_cancel_all_kills_python_and_shell_process_groups_and_exact_counts(tmp_path):
    """Two slots: a Python task that started a child process and a shell task with a
    background job both run; 10 marker tasks wait behind them. cancel_all() cancels
    everything: the running tasks' process groups die (the Python task's child and the
    shell's background ``sleep``), every future ends cancelled, and of the queued marker
    tasks exactly those whose cancel the broker confirmed never run (here: all)."""
    py_pid, sh_pid, marks = tmp_path / "py.pid", tmp_path / "sh.pid", tmp_path / "marks"
    # (no sandbox: the PIDs the tasks write are then this machine's; in a sandbox the
    # whole PID namespace dies with the host: tests/test_isolation.py)
    with LocalCluster(workers=1, slots_per_worker=2,
                      env=worker_env() | {"ZFALKON_SANDBOX": "none"}) as cluster:
        with Executor(cluster.address) as ex:
            fp = ex.submit("builtins:exec", SPAWN_CHILD.replace("PIDFILE", repr(str(py_pid))))
            fs = ex.shell(f"sleep 300 & echo $! > {sh_pid}; wait")
            wait_until(lambda: py_pid.exists() and sh_pid.exists()
                       and py_pid.read_text() and sh_pid.read_text(), 30,
                       message="both running")
            children = [int(py_pid.read_text()), int(sh_pid.read_text().strip())]
            queued = [ex.submit(*_append(marks, str(i))) for i in range(10)]
            assert ex.cancel_all() == 12
            done, not_done = cf.wait([fp, fs, *queued], 30)
            assert not not_done
            assert all(f.cancelled() for f in (fp, fs, *queued))
            wait_until(lambda: not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                for p in children), 15, message="the tasks' children killed")
            assert ex.submit(tasks.add, 2, 3).result(timeout=30) == 5
        assert not marks.exists() or not marks.read_text()


@pytest.mark.timeout(150)
def test_cancel_true_never_runs_under_two_racing_executors(tmp_path):
    """Two executors race on one 2-slot cluster: each submits 400 marker tasks and cancels
    every third from another thread while results arrive. Every cancel() that returned True is a task that never ran
    (count of markers per id), every other one ran exactly once."""
    import threading

    marks = {n: tmp_path / n for n in ("a", "b")}
    with LocalCluster(workers=1, slots_per_worker=2, env=worker_env()) as cluster:
        a, b = Executor(cluster.address), Executor(cluster.address)
        try:
            futs: dict[str, list] = {"a": [], "b": []}
            # (interleaved: both clients' tasks queue side by side; each takes 20 ms)
            for i in range(400):
                for n, ex in (("a", a), ("b", b)):
                    futs[n].append(ex.submit(*_append(marks[n], str(i),
                                                      "import time; time.sleep(0.02)")))
            answers: dict[str, dict[int, bool]] = {"a": {}, "b": {}}

            def ran(n: str) -> int:
                return len(marks[n].read_text().split()) if marks[n].exists() else 0

            wait_until(lambda: ran("a") >= 10 and ran("b") >= 10, 60, message="a start")

            def canceller(n: str) -> None:  # (the first ones are done, the rest race)
                for i in range(0, 400, 3):
                    answers[n][i] = futs[n][i].cancel()

            threads = [threading.Thread(target=canceller, args=(n,)) for n in "ab"]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            for n in "ab":
                cf.wait(futs[n], 60)
            wait_until(lambda: (lambda s: s["queued"] == 0 and s["running"] == 0)(
                query_status(cluster.address)), 60, message="idle")
            for n in "ab":
                runs = marks[n].read_text().split() if marks[n].exists() else []
                counts = {i: runs.count(str(i)) for i in range(400)}
                yes = {i for i, ok in answers[n].items() if ok}
                assert yes and len(yes) < len(answers[n]), "the race was not exercised"
                assert not [i for i in yes if counts[i]], "cancel() True but ran"
                assert all(futs[n][i].cancelled() for i in yes)
                for i in range(400):
                    if i not in yes:
                        assert counts[i] == 1, (n, i, counts[i])
        finally:
            a.shutdown(wait=False, cancel_futures=True)
            b.shutdown(wait=False, cancel_futures=True)


# -- 5. per-client limits as backpressure ---------------------------------------------------


@pytest.mark.timeout(180)
def test_byte_limit_backpressure_loses_nothing_and_does_not_deadlock(caplog, tmp_path):
    """An Executor submits 300 tasks of 1 MiB each (300 MiB > MAX_CLIENT_BYTES) to a
    broker with no worker: the broker takes up to the limit and answers ``limit``; the
    Executor keeps the rest. A worker then joins: every task runs exactly once, every
    future gets its own value, and the Executor shuts down cleanly."""
    marker = tmp_path / "ran"
    n = 300
    with broker_process() as (proc, address):
        with caplog.at_level(logging.WARNING, logger="zfalkon.client"):
            ex = Executor(address)
            try:
                pad = "#" + "x" * MIB  # (a 1 MiB comment: a 1 MiB task blob)
                futs = [ex.submit("builtins:exec", f"open({str(marker)!r}, 'a').write("
                                  f"'{i}' + chr(10))\n{pad}") for i in range(n)]
                seen: list[int] = []

                def settled() -> bool:  # (the same count twice, a second apart)
                    seen.append(query_status(address)["queued"])
                    time.sleep(1.0)
                    return len(seen) > 1 and seen[-1] == seen[-2] > 200
                wait_until(settled, 90, message="queued up to the byte limit")
                queued = seen[-1]
                assert queued < n, "the limit was not reached"
                assert any("refuses new tasks" in r.getMessage() for r in caplog.records)
                report(f"{n} x 1 MiB submitted, no worker: broker took", queued, "tasks")
                with worker_process(address, "--slots", "2"):
                    started = time.monotonic()
                    assert [f.result(timeout=120) for f in futs] == [None] * n
                    report("  all ran after a worker joined, seconds",
                           time.monotonic() - started, "s")
                    ex.shutdown(wait=True, timeout=30)
                    status = query_status(address)
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
        lines = marker.read_text().split()
        assert sorted(map(int, lines)) == list(range(n)), "a task lost or run twice"
        assert status["submitted"] == n and status["queued"] == 0
