"""Break attempts on issue 12 ("hostile peers and hostile disks"), round 2.

Attacks the existing adversary tests do not cover: answers the broker re-sends or
re-computes on request, to a peer that never reads them. Each attack is bounded in time
and size; every process is stopped by PID. Growth is measured as the broker's peak RSS
(sampled every 5 ms) over the attack, after the attacker's legitimate state is in place.

A correct broker keeps what one hostile peer can make it hold under 50 MiB
(docs/protocol.md section 2, "Limits per peer") and goes on serving honest clients.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import tasks
import zmq
from conftest import (
    RSS_BOUND,
    Raw,
    seconds,
    assert_serving,
    broker_process,
    served_broker,
    start_broker,
    steady_rss,
    stop_process,
    wait_until,
    worker_env,
    worker_hello,
    worker_process,
)
from test_adversary_wire import PeakRss, report

from zfalkon import Executor, LocalCluster, core, payload, query_status
from zfalkon import protocol as P

MIB = 2**20
PER_PEER = RSS_BOUND  # 50 MiB


def fat_workers(ctx: zmq.Context, address: str, n: int) -> list[Raw]:
    """``n`` raw workers, each with the largest worker info the broker keeps (~4.6 KB in
    STATUS): 64 tags of 64 chars, a 128-char name and hostname."""
    workers = [Raw(ctx, address) for _ in range(n)]
    for i, w in enumerate(workers):
        w.send(worker_hello({
            "worker_id": f"fat-{i}", "slots": 1, "name": f"{i:04d}" + "n" * 124,
            "hostname": "h" * 128, "tags": [f"{j:02d}" + "t" * 62 for j in range(64)]}))
    for w in workers:
        assert isinstance(w.recv(), P.Welcome)
    return workers


# -- 1. STATUS answers accumulate for a peer that asks and never reads -----------------------


@pytest.mark.long
@pytest.mark.timeout(200)
def test_status_answers_unread_by_one_peer_stay_bounded_over_a_minute(ctx):
    with broker_process() as (proc, address):
        workers = fat_workers(ctx, address, 300)
        reader = Raw(ctx, address)
        try:
            reader.hello()
            reader.stop_reading()
            size = len(P.encode(P.Status(query_status(address))))
            request = P.encode(P.StatusRequest())
            steady_rss(proc)  # (the baseline: once the io thread's copies are done)
            attack = seconds(80, 20)  # (unbounded, 20 s of answers would be ~4x the bound)
            with PeakRss(proc) as peak:
                end = time.monotonic() + attack
                while time.monotonic() < end:
                    for _ in range(8):
                        reader.send(request)
                    for w in workers:  # (each stays registered: STATUS stays large)
                        w.send_msg(P.Heartbeat([]))
                    time.sleep(1.0)  # the attack's pace: 8 requests a second
            report(f"STATUS of {size / 1e6:.2f} MB asked 8/s for {attack} s by one peer that never "
                   "reads: broker RSS peak growth", peak.growth / MIB)
            assert proc.poll() is None
            assert peak.growth < PER_PEER
        finally:
            for w in workers:
                w.close()
            reader.close()


# -- 2. RESEND from a client that never reads -------------------------------------------------


@pytest.mark.long
@pytest.mark.timeout(200)
def test_resend_spam_from_a_client_that_never_reads_is_bounded(ctx):
    with served_broker() as (proc, address, _):
        raw = Raw(ctx, address)
        try:
            base = raw.hello().key << P.ID_SHIFT
            raw.stop_reading()
            blob = payload.python_task("builtins:bytes", (3_900_000,), {})
            raw.send_msg(P.Submit(1, 0, [base + 1], [blob]))
            wait_until(lambda: query_status(address)["done"] >= 1, 30, message="ran")
            steady_rss(proc)  # (the baseline: once the io thread's copies are done)
            attack = seconds(45, 30)  # (unbounded, 30 s of copies would pass the bound)
            with PeakRss(proc) as peak:
                end = time.monotonic() + attack
                while time.monotonic() < end:
                    raw.send_msg(P.Resend(0))
                    time.sleep(RESEND_PERIOD)  # the attack's pace
            report(f"one 3.9 MiB result, RESEND every 2.05 s for {attack} s, never read: broker "
                   "RSS peak growth", peak.growth / MIB)
            assert proc.poll() is None
            assert peak.growth < PER_PEER
            assert_serving(address, 5)
        finally:
            raw.close()


RESEND_PERIOD = core.RESEND_SECONDS + 0.05


# -- 3. RESEND from a slot that never reads: every task it holds, again ----------------------


@pytest.mark.long
@pytest.mark.timeout(200)
def test_resend_spam_from_a_slot_that_never_reads_is_bounded(ctx):
    with broker_process() as (proc, address):
        client, worker, slot = Raw(ctx, address), Raw(ctx, address), Raw(ctx, address)
        try:
            worker.send(worker_hello({"worker_id": "amp", "slots": 1, "name": "amp"}))
            assert isinstance(worker.recv(), P.Welcome)
            slot.hello(P.ROLE_SLOT, {"worker_id": "amp", "slot": 0})
            slot.stop_reading()
            slot.send_msg(P.Results(1, 0, 1000, 0, [], []))  # a window of 1,000 tasks
            base = client.hello().key << P.ID_SHIFT
            n = 16
            client.send_msg(P.Submit(1, 0, [base + i for i in range(1, n + 1)],
                                     [b"x" * MIB] * n))
            wait_until(lambda: (lambda s: s["running"] + s["prefetched"])(
                query_status(address)) >= n, 30,
                       message="the raw slot holds every task")
            slot.send_msg(P.Results(2, 0, 0, 0, [], []))  # (honest tasks go elsewhere)
            steady_rss(proc)  # (the baseline: once the io thread's copies are done)
            attack = seconds(40, 24)  # (unbounded, 24 s of copies would pass the bound)
            with PeakRss(proc) as peak:
                end = time.monotonic() + attack
                while time.monotonic() < end:
                    slot.send_msg(P.Resend(0))
                    worker.send_msg(P.Heartbeat([]))
                    time.sleep(RESEND_PERIOD)  # the attack's pace
            report(f"raw slot holding {n} x 1 MiB tasks, RESEND every 2.05 s for {attack} s, never "
                   "read: broker RSS peak growth", peak.growth / MIB)
            assert proc.poll() is None
            with worker_process(address, "--slots", "1"):
                assert_serving(address, 5)
            assert peak.growth < 3 * PER_PEER
        finally:
            for raw in (slot, worker, client):
                raw.close()


# -- 4. SUBMITs refused with ``limit`` in a loop, never read ---------------------------------


@pytest.mark.timeout(200)
def test_submits_refused_with_limit_in_a_loop_are_answered_at_most_every_2s(ctx):
    """A client fills MAX_CLIENT_HINTED (nothing runs: no worker) and then sends 1,500 more
    frames of 1,024 hinted tasks, each one refused, reading nothing: it is told ``limit`` at
    most once per RESEND_SECONDS, nothing more is queued, the broker's memory stays bounded
    and an honest client is served."""
    with broker_process() as (proc, address):
        raw = Raw(ctx, address)
        try:
            base = raw.hello().key << P.ID_SHIFT  # (it reads nothing until the end)
            seq, next_id = 0, base + 1

            def frame() -> bytes:
                nonlocal seq, next_id
                seq += 1
                ids = list(range(next_id, next_id + 1024))
                next_id += 1024
                return P.encode(P.Submit(seq, 0, ids, [b""] * 1024,
                                         [f"{t:x}" for t in ids]))

            for _ in range(core.MAX_CLIENT_HINTED // 1024):
                raw.send(frame())
            wait_until(lambda: query_status(address)["queued"] >= core.MAX_CLIENT_HINTED,
                       60, message="queued up to the hinted limit")
            refused = frame()  # (the same frame again and again: it is never acknowledged)
            steady_rss(proc)  # (the baseline: once the io thread's copies are done)
            with PeakRss(proc) as peak:
                started = time.monotonic()
                for i in range(1500):
                    raw.send(refused)
                    if i % 100 == 99:
                        time.sleep(0.3)  # the attack's pace: ~8 s of refused frames
                wait_until(lambda: query_status(address) is not None, 30)
                spent = time.monotonic() - started
            status = query_status(address)
            assert status["queued"] == core.MAX_CLIENT_HINTED
            # what was sent to it: read it all now
            errors = 0
            while raw.sock.poll(1000):
                msg = P.decode(raw.sock.recv())
                if isinstance(msg, P.Error):
                    assert msg.code == "limit", msg
                    errors += 1
            report(f"1,500 refused SUBMITs in {spent:.1f} s: 'limit' answers", errors, "")
            report("  broker RSS peak growth", peak.growth / MIB)
            assert errors <= spent / core.RESEND_SECONDS + 2
            assert peak.growth < PER_PEER
            assert proc.poll() is None
        finally:
            raw.close()
        with worker_process(address, "--slots", "1"):
            assert_serving(address, 5)


# -- 5-7. a task of client A against the processes that serve client B -------------------------


#: A's task: SIGSTOP every other child of its zygote (the spare host the zygote forked
#: ahead of time: the next client's host on this slot).
STOP_SPARE = """
import os, signal, time
zygote, me, hit = os.getppid(), os.getpid(), []
deadline = time.monotonic() + 10
while not hit and time.monotonic() < deadline:  # (the zygote forks the next spare once
    time.sleep(0.01)                              # the slot is quiet for 5 ms)
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                state, ppid = f.read().rsplit(')', 1)[1].split()[:2]
        except OSError:
            continue
        if int(ppid) == zygote and int(pid) != me and state not in 'ZX':
            os.kill(int(pid), signal.SIGSTOP)
            hit.append(int(pid))
result = hit
"""


def _exec_result(code: str):
    """A task (function reference, argument) that runs ``code`` and returns the value it
    leaves in ``result`` (builtins:exec itself returns None)."""
    return ("builtins:eval", f"(lambda ns: (exec({code!r}, ns), ns['result'])[1])({{}})")


@pytest.mark.timeout(120)
def test_a_task_that_stops_the_spare_host_does_not_hang_another_clients_task():
    with LocalCluster(workers=1, slots_per_worker=1, env=worker_env()) as cluster:
        with Executor(cluster.address) as a, Executor(cluster.address) as b:
            assert b.submit(tasks.add, 1, 1).result(timeout=30) == 2
            fn, arg = _exec_result(STOP_SPARE)
            hit = a.submit(fn, arg).result(timeout=30)
            # (0 in a sandbox: A's task sees only its own PID namespace; without one it
            # stops the spare, and B's next task below hangs)
            report("spare hosts SIGSTOPped by client A's task", len(hit), "")
            f = b.submit(tasks.identity, "b-after")
            assert f.result(timeout=30) == "b-after"


#: A's task: SIGSTOP its own slot (the zygote's parent), then return.
STOP_SLOT = """
import os, signal, psutil
slot = psutil.Process(os.getppid()).ppid()
os.kill(slot, signal.SIGSTOP)
result = slot
"""


@pytest.mark.timeout(150)
def test_a_task_that_stops_its_slot_does_not_strand_another_clients_tasks():
    """One worker, two slots. A's task SIGSTOPs the slot running it; B's 40 short tasks,
    submitted right after, some of them prefetched by the stopped slot: all complete within
    60 s (taken back by work stealing or lease expiry), each correct. (Unsandboxed: in a
    sandbox a task cannot see its slot: test_isolation.py, "the sandbox".)"""
    with LocalCluster(workers=1, slots_per_worker=2, env=worker_env(),
                      worker_args=["--sandbox", "none"]) as cluster:
        (worker,) = cluster.worker_procs
        slots = [c.pid for c in psutil.Process(worker.pid).children()]
        a = Executor(cluster.address)
        b = Executor(cluster.address)
        try:
            assert list(b.map(tasks.add, range(10), range(10))) == [2 * i for i in range(10)]
            fn, arg = _exec_result(STOP_SLOT)
            a.submit(fn, arg)
            wait_until(lambda: [p for p in slots
                                if psutil.Process(p).status() == psutil.STATUS_STOPPED], 30,
                       message="A's task stopped its slot")
            fb = [b.submit(tasks.sleep_then, i, 0.05) for i in range(40)]
            started = time.monotonic()
            assert [f.result(timeout=60) for f in fb] == list(range(40))
            assert [p for p in slots if psutil.Process(p).status() == psutil.STATUS_STOPPED]
            report("B's 40 tasks after A stopped its slot: seconds",
                   time.monotonic() - started, "s")
            assert b.submit(tasks.identity, "b-last").result(timeout=30) == "b-last"
        finally:
            for pid in slots:  # (let the stopped slot be stopped by its agent)
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
            a.shutdown(wait=False, cancel_futures=True)
            b.shutdown(wait=False, cancel_futures=True)



#: A's task: SIGKILL the parent of any process running ``sleep 7`` (another client's
#: shell task on another slot: its host).
KILL_OTHER_HOST = """
import os, signal
hit = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            cmd = f.read()
        with open(f'/proc/{pid}/stat') as f:
            ppid = int(f.read().rsplit(')', 1)[1].split()[1])
    except OSError:
        continue
    if b'sleep 7' in cmd.replace(b'\\0', b' ') and ppid != os.getpid():
        os.kill(ppid, signal.SIGKILL)
        hit.append(ppid)
result = hit
"""


@pytest.mark.timeout(120)
def test_a_task_cannot_kill_another_clients_host_on_another_slot():
    with LocalCluster(workers=1, slots_per_worker=2, env=worker_env()) as cluster:
        with Executor(cluster.address) as a, Executor(cluster.address) as b:
            fb = b.shell("sleep 7; echo b-done")
            wait_until(lambda: any("sleep 7" in " ".join(p.info["cmdline"] or ())
                                   for p in psutil.process_iter(["cmdline"])), 30,
                       message="B's shell task running")
            fn, arg = _exec_result(KILL_OTHER_HOST)
            hit = a.submit(fn, arg).result(timeout=30)
            report("hosts of B killed by A's task", len(hit), "")
            assert fb.result(timeout=30).stdout == "b-done\n"


# -- 8. a task fills the disk under the journal -------------------------------------------------



@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root; skipped otherwise), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                      capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a 4 MiB tmpfs (needs root, or CAP_SYS_ADMIN) to fill a disk")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.mark.timeout(240)
def test_a_task_that_fills_the_journals_disk_loses_nothing_and_the_journal_replays(
        small_disk, tmp_path):
    """Client A's shell task fills the (real, 4 MiB) filesystem the broker's journal is on,
    while honest client B's tasks flow: the broker stays up, refuses B's new frames while
    the disk is full; once A's file is removed every task of B runs exactly once; then the
    broker is SIGKILLed and a new one replays the journal (no damage, nothing live)."""
    journal, hog, marker = str(small_disk / "j"), small_disk / "hog", tmp_path / "ran"
    pad = "x" * 3000
    proc, address = start_broker("tcp://127.0.0.1:0", "--journal", journal)
    second = None
    try:
        with worker_process(address, "--slots", "2"):
            with Executor(address) as a, Executor(address) as b:
                first = [b.shell(f"echo {i} >> {marker} # {pad}") for i in range(20)]
                assert [f.result(timeout=60).returncode for f in first] == [0] * 20
                fill = a.shell(f"dd if=/dev/zero of={hog} bs=64k 2>&1; true")
                fill.result(timeout=60)
                wait_until(lambda: os.statvfs(small_disk).f_bavail == 0, 10,
                           message="the disk is full")
                later = [b.shell(f"echo {i} >> {marker} # {pad}") for i in range(20, 120)]
                wait_until(lambda: query_status(address)["journal"]["unavailable"], 30,
                           message="the journal cannot be written")
                wait_until(lambda: query_status(address)["journal"]["failures"] >= 1, 30,
                           message="a failed journal write")
                assert proc.poll() is None
                os.unlink(hog)
                got = [f.result(timeout=90).returncode for f in later]
                assert got == [0] * 100
            # (the journal is marked available again on its next successful write: a tick)
            wait_until(lambda: query_status(address)["journal"]["unavailable"] is None, 30,
                       message="the journal available again")
            status = query_status(address)
            report("journal failures while the disk was full", status["journal"]["failures"], "")
            report("duplicate submits", status["duplicate_submits"], "")
        lines = list(map(int, marker.read_text().split()))
        assert sorted(lines) == list(range(120)), "a task lost or run twice"
        proc.kill()
        proc.wait()
        second, address = start_broker("tcp://127.0.0.1:0", "--journal", journal)
        status = query_status(address)
        assert status["queued"] == 0 and status["unacknowledged_results"] == 0, status
    finally:
        stop_process(proc)
        if second is not None:
            stop_process(second)


# -- 9. submit, cancel (DROP), submit again: cancelled tasks stay queued -------------------


@pytest.mark.timeout(240)
def test_submit_cancel_loop_is_bounded_by_the_clients_limits(ctx):
    with served_broker() as (proc, address, _):
        honest = Executor(address)
        raw = Raw(ctx, address)
        try:
            busy = honest.submit(tasks.sleep_then, "honest", seconds(40, 20))
            wait_until(lambda: query_status(address)["running"] >= 1, 30,
                       message="the slot busy with an honest task")
            base = raw.hello().key << P.ID_SHIFT
            blob = b"x" * (15 * MIB)
            seq, tid, rounds = 0, base, 8
            with PeakRss(proc) as peak:
                for r in range(rounds):
                    ids = []
                    for _ in range(4):
                        seq += 1
                        tid += 1
                        ids.append(tid)
                        raw.send_msg(P.Submit(seq, 0, [tid], [blob]))
                    wait_until(lambda r=r: query_status(address)["submitted"] >= 4 * (r + 1),
                               60, message=f"round {r} taken")
                    seq += 1
                    raw.send_msg(P.Cancel(seq, 0, ids, b"", P.CANCEL_DROP))
                raw.sync()  # (its PONG: the broker has handled the last CANCEL)
                status = query_status(address)
            assert not busy.done(), "the slot was free during the rounds: run it longer"
            report(f"{rounds} rounds of 4 x 15 MiB submitted and cancelled (DROP), slot busy:"
                   " broker RSS peak growth", peak.growth / MIB)
            report("  queued", status["queued"], "")
            assert proc.poll() is None
            assert peak.growth < core.MAX_CLIENT_BYTES + PER_PEER
            assert busy.result(timeout=60) == "honest"
        finally:
            raw.close()
            honest.shutdown(wait=False, cancel_futures=True)


# -- 10. a task names another client's task in its slot's state file, then kills the slot ------

#: A's task: wait for TARGET (an id of B's), write it in every file the slot maps from the
#: agent's directory (its state file and the running cell), then SIGKILL the slot. Once.
FRAME_OTHER = """
import os, signal, struct, time, psutil
if os.path.exists(DONE):
    result = 'again'
else:
    open(DONE, 'w').close()
    deadline = time.time() + 20
    while not os.path.exists(TARGET) and time.time() < deadline:
        time.sleep(0.05)  # (poll interval: the condition is TARGET's file)
    target = int(open(TARGET).read())
    slot = psutil.Process(os.getppid()).ppid()
    paths = set()
    for line in open(f'/proc/{slot}/maps'):
        parts = line.split()
        if len(parts) >= 6 and 'zfalkon-worker-' in parts[5]:
            paths.add(parts[5])
    for p in paths:
        with open(p, 'r+b') as f:
            f.write(struct.pack('<q', target))
    os.kill(slot, signal.SIGKILL)
    time.sleep(5)  # (not reached: the slot's death takes the zygote and this host along)
    result = 'not reached'
"""


@pytest.mark.timeout(150)
def test_a_task_cannot_get_another_clients_task_blamed_for_its_slots_death(tmp_path):
    """One slot. B's short tasks are prefetched by the slot while A's task runs; A's task
    writes the id of one of them in the slot's state file and running cell (files of the
    worker's user) and SIGKILLs the slot: the agent must not report B's task as the one that
    killed it; B's tasks all complete with their values."""
    done, target = str(tmp_path / "done"), str(tmp_path / "target")
    code = FRAME_OTHER.replace("DONE", repr(done)).replace("TARGET", repr(target))
    with LocalCluster(workers=1, slots_per_worker=1, env=worker_env()) as cluster:
        a = Executor(cluster.address)
        b = Executor(cluster.address)
        try:
            # (many short tasks first: the slot measures them and prefetches deeply)
            assert list(b.map(tasks.add, range(500), range(500))) == [2 * i for i in range(500)]
            fn, arg = _exec_result(code)
            fa = a.submit(fn, arg)
            wait_until(lambda: os.path.exists(done), 30, message="A's task started")
            fb = [b.submit(tasks.sleep_then, i, 0.01) for i in range(50)]
            wait_until(lambda: (lambda s: s["running"] + s["prefetched"])(
                cluster.status()) >= 2, 30,
                       message="B's tasks prefetched by the slot running A's")
            with open(target + ".tmp", "w") as f:
                f.write(str(fb[0].task_id))
            os.rename(target + ".tmp", target)
            outcomes = []
            for f in fb:
                try:
                    outcomes.append(f.result(timeout=60))
                except Exception as exc:  # noqa: BLE001
                    outcomes.append(f"{type(exc).__name__}: {exc}")
            report("B's tasks failed after A framed one of them",
                   sum(1 for o in outcomes if isinstance(o, str)), "")
            try:
                report(f"A's task: {fa.result(timeout=30)!r}", 0, "")
            except Exception as exc:  # noqa: BLE001
                report(f"A's task: {type(exc).__name__}: {exc}", 0, "")
            assert outcomes == list(range(50)), [o for o in outcomes if isinstance(o, str)][:3]
        finally:
            a.shutdown(wait=False, cancel_futures=True)
            b.shutdown(wait=False, cancel_futures=True)
