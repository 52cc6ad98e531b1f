"""Adversarial tests of the per-peer limits (issue 12): hostile peers on raw DEALER
sockets against a real broker process on 127.0.0.1.

Each test states what a correct broker must do (honest clients complete with correct
results; the broker's RSS grows by less than RSS_BOUND per attacking peer; it stays up).
Tests that show a limit being broken are kept, marked ``xfail(strict=True)`` with the
reason, so that the suite stays green until the broker is fixed (then they XPASS and
fail: remove the mark).
"""

from __future__ import annotations

import statistics
import threading
import time

import msgpack
import psutil
import pytest
import zmq

import tasks
from conftest import (
    RSS_BOUND,
    Raw,
    assert_serving,
    broker_process,
    cpu_seconds,
    rss,
    served_broker,
    steady_rss,
    wait_until,
    worker_hello,
)
from zfalkon import Executor, core, payload, query_status
from zfalkon import protocol as P
from zfalkon.constants import PROTOCOL_VERSION
from zfalkon.journal import Journal

#: What the broker may keep for a client that does not read its results (see
#: tests/test_limits.py::test_client_that_never_reads_its_results).
NOT_READING_BOUND = 2 * core.MAX_WAITING_BYTES + core.SEND_WINDOW_BYTES + 24 * 2**20


class PeakRss:
    """Samples a process's RSS every few ms while the block runs; ``peak`` is the most."""

    def __init__(self, proc) -> None:
        self.process = psutil.Process(proc.pid)
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # (bounded: no block here lasts that long)
        while time.monotonic() < deadline:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            if self._stop.wait(0.005):  # the sampling interval; set when the block ends
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def report(what: str, value: float, unit: str = "MiB") -> None:
    print(f"\nADVERSARY {what}: {value:.2f} {unit}")




@pytest.fixture(scope="module")
def served():
    """One broker with one 1-slot worker, for the attacks that do not bloat it."""
    with served_broker(name="adv-worker") as (proc, address, _):
        yield proc, address


# -- batch frames are unpacked in full, before the peer is even known ---------------------


def zeros_cancel(n: int) -> bytes:
    """A CANCEL whose ``ids`` are ``n`` zeros: one byte each on the wire, a list of
    ``n`` pointers (8 bytes each) once unpacked."""
    return msgpack.packb([P.TAGS[P.Cancel], 1, 0, [0] * n])


def test_unregistered_peer_cannot_make_the_broker_unpack_a_huge_batch(ctx):
    with broker_process() as (proc, address):
        raw = Raw(ctx, address)
        try:
            frame = zeros_cancel(16 * 2**20)
            with PeakRss(proc) as peak:
                started = time.monotonic()
                for _ in range(2):
                    raw.send(frame)
                    raw.expect_error("hello-required", timeout=60)
                spent = time.monotonic() - started
            report("unregistered 16 MiB CANCEL x2: broker RSS peak growth",
                   peak.growth / 2**20)
            report("unregistered 16 MiB CANCEL x2: broker time to answer", spent, "s")
            assert query_status(address)["clients"] >= 0  # (still up: it answers)
            assert peak.growth < RSS_BOUND
        finally:
            raw.close()


def test_unknown_tag_frame_is_refused_without_unpacking_it(ctx):
    with broker_process() as (proc, address):
        raw = Raw(ctx, address)
        try:
            frame = msgpack.packb([99, [0] * (16 * 2**20)])
            with PeakRss(proc) as peak:
                raw.send(frame)
                # (refused unread: hello-required from a stranger, too-large otherwise)
                assert raw.recv(timeout=60).code in ("hello-required", "too-large")
            report("unknown tag 99, 16 MiB: broker RSS peak growth", peak.growth / 2**20)
            assert peak.growth < RSS_BOUND
        finally:
            raw.close()


def test_non_fixint_tag_and_array16_header_fall_under_the_control_cap(served, ctx):
    """A HELLO whose header is an array16, or whose tag is a uint8, must not escape the
    size caps (decode falls back to MAX_CONTROL_BYTES for any frame of another shape)."""
    proc, address = served
    raw = Raw(ctx, address)
    try:
        raw.hello()  # (registered: an unregistered peer's large frame is refused unread)
        body = msgpack.packb(["x" * (200 * 1024)])
        info = {"worker_id": "w", "slots": 1, "pad": "y" * (200 * 1024)}
        # array16 header (0xdc) around a valid HELLO
        fields = msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("0") + msgpack.packb(
            "worker") + msgpack.packb(info)
        raw.send(b"\xdc\x00\x05" + b"\x01" + fields)
        raw.expect_error("too-large")
        # tag as uint8 (0xcc 0x01) in a fixarray
        raw.send(b"\x95\xcc\x01" + fields)
        raw.expect_error("too-large")
        # a PING whose tag is uint8 and whose body is large
        raw.send(b"\x93\xcc\x0f" + msgpack.packb(1.0) + body)
        raw.expect_error("too-large")
        assert len(body) > P.MAX_CONTROL_BYTES
    finally:
        raw.close()
    assert_serving(address, 5)


# -- results replayed into the socket without bound ------------------------------------


def test_hello_replay_of_unacknowledged_results_is_bounded(ctx):
    with served_broker() as (proc, address, _):
        raw = Raw(ctx, address)
        raw.stop_reading()
        try:
            key = raw.hello().key
            blob = payload.python_task("builtins:bytes", (4 << 20,), {})
            raw.send_msg(P.Submit(1, 0, [(key << P.ID_SHIFT) + 1], [blob]))
            wait_until(lambda: query_status(address)["done"] >= 1, 30, message="ran")
            wait_until(lambda: query_status(address)["unacknowledged_results"] == 1, 10,
                       message="held")
            hello = P.encode(P.hello(P.ROLE_CLIENT, {"name": "replayer", "key": key}))
            with PeakRss(proc) as peak:
                for _ in range(30):
                    raw.send(hello)
                # synchronise: the broker has taken every HELLO once a STATUS (asked on
                # another connection, after them) is answered; then the io thread copies
                # until the broker's RSS holds still
                wait_until(lambda: query_status(address)["clients"] >= 0, 10)
                steady_rss(proc)
            growth = max(peak.growth, 0)
            report("30 HELLOs replaying one unread 4 MiB result: broker RSS growth",
                   growth / 2**20)
            assert_serving(address, 5)
            assert growth < RSS_BOUND
        finally:
            raw.close()


def test_blind_acks_without_reading_keep_the_broker_bounded(ctx):
    """A client acknowledges DELIVERs it never read, hundreds of times (seq numbers are
    1, 2, 3..., so the numbers are guessable; the tokens are not): its ACKs count for
    nothing, so the broker hands its socket at most SEND_WINDOW_BYTES of results (before
    tokens: all 48 frames, whatever ZeroMQ's SNDHWM of 256 frames takes), and keeps no
    more of them than for a client that never reads (the bound of
    test_limits.py::test_client_that_never_reads_its_results: its results wait in the
    broker, 2 x MAX_WAITING_BYTES, then MAX_HELD_BYTES once it is quiet)."""
    with served_broker() as (proc, address, _):
        raw = Raw(ctx, address)
        raw.stop_reading()
        try:
            key = raw.hello().key
            base = key << P.ID_SHIFT
            n = 48  # 2 MiB each: 96 MiB of results, one DELIVER frame each at most
            blob = payload.python_task("builtins:bytes", (2 << 20,), {})
            before = rss(proc)
            growth = 0
            acks = 0
            with PeakRss(proc) as peak:
                raw.send_msg(P.Submit(1, 0, list(range(base + 1, base + n + 1)),
                                      [blob] * n))
                deadline = time.monotonic() + 90
                while query_status(address)["done"] < n and time.monotonic() < deadline:
                    for seq in (1, 2, 10_000):  # "I have everything you sent"
                        raw.send_msg(P.Ack(seq, bytes(8)))
                    raw.send_msg(P.Ack(10_000))
                    acks += 4
                    time.sleep(0.1)  # the attack's pace (and poll interval of the loop)
                for _ in range(10):  # the blind ACKs go on for 0.5 s after the last result
                    raw.send_msg(P.Ack(10_000))
                    acks += 1
                    time.sleep(0.05)  # the attack's pace
                growth = rss(proc) - before
            # what the broker handed the socket: read it now (acknowledging nothing)
            frames = []
            while raw.sock.poll(2000):
                msg = P.decode(raw.sock.recv())
                if type(msg) is P.Deliver:
                    frames.append(msg)
            sent = sum(len(b) for d in frames for b in d.blobs)
            report(f"blind ACKs ({acks}) over {n} x 2 MiB results never read: "
                   f"DELIVER frames sent ({len(frames)})", sent / 2**20)
            report(f"blind ACKs over {n} x 2 MiB results never read: broker RSS growth",
                   growth / 2**20)
            report("blind ACKs: broker RSS peak growth", peak.growth / 2**20)
            assert_serving(address, 5)
            assert sent <= core.SEND_WINDOW_BYTES or len(frames) == 1
            assert peak.growth < NOT_READING_BOUND
        finally:
            raw.close()


def test_an_ack_past_the_last_frame_sent_does_not_kill_the_broker(ctx):
    """Two 3 MiB results in two DELIVER frames: the second is held back by the 4 MiB send
    window. A client that has read nothing sends ACK 2: the broker must stay up (and
    should ignore, or clamp, an ack past its last frame sent)."""
    with served_broker() as (proc, address, _):
        raw = Raw(ctx, address)
        raw.sock.setsockopt(zmq.RCVHWM, 1)
        try:
            base = raw.hello().key << P.ID_SHIFT
            blob = payload.python_task("builtins:bytes", (3 << 20,), {})
            for seq in (1, 2):  # one at a time: two RESULTS, two DELIVER frames
                raw.send_msg(P.Submit(seq, 0, [base + seq], [blob]))
                wait_until(lambda: query_status(address)["done"] >= seq, 30,
                           message=f"task {seq} ran")
            raw.send_msg(P.Ack(2))
            raw.sync()  # (its PONG: the broker has handled the ACK)
            assert proc.poll() is None, f"broker exited with status {proc.returncode}"
            assert_serving(address, 5)
        finally:
            raw.close()


# -- forged results --------------------------------------------------------------------


def test_a_slot_cannot_return_results_for_tasks_another_slot_holds(served, ctx):
    """A raw slot (of its own raw worker) sends RESULTS for an honest client's task ids,
    guessed from the id scheme (key << 40 | seq): they are dropped (R4), the client gets
    the real results."""
    proc, address = served
    worker, slot = Raw(ctx, address), Raw(ctx, address)
    try:
        worker.send(worker_hello({"worker_id": "forger", "slots": 1, "name": "forger"}))
        assert isinstance(worker.recv(), P.Welcome)
        slot.hello(P.ROLE_SLOT, {"worker_id": "forger", "slot": 0})
        # window 0: it gets no task of its own
        slot.send_msg(P.Results(1, 0, 0, 0, [], []))
        forged = msgpack.packb([0, -999])
        with Executor(address, connect_timeout=10) as ex:
            futures = [ex.submit(tasks.sleep_then, i, 0.2) for i in range(6)]
            ids = [f.task_id for f in futures]
            for seq in range(2, 12):
                slot.send_msg(P.Results(seq, 0, 0, 6, ids, [forged] * 6))
            assert [f.result(timeout=60) for f in futures] == list(range(6))
    finally:
        slot.send_msg(P.Bye("done"))
        worker.send_msg(P.Bye("done"))
        slot.close()
        worker.close()


# -- the loop kept busy: an honest client's latency --------------------------------------


def honest_latencies(ex: Executor, n: int) -> list[float]:
    """One-task round trips of an Executor connected before the attack started."""
    out = []
    for i in range(n):
        started = time.monotonic()
        assert ex.submit(tasks.add, i, 1).result(timeout=120) == i + 1
        out.append(time.monotonic() - started)
    return out


def test_honest_latency_while_unregistered_peers_send_huge_frames(ctx):
    with served_broker() as (proc, address, _):
        ex = Executor(address, connect_timeout=30)
        base = honest_latencies(ex, 10)
        frame = zeros_cancel(16 * 2**20)
        attackers = [Raw(ctx, address) for _ in range(2)]
        try:
            for raw in attackers:
                raw.sock.setsockopt(zmq.RCVHWM, 1)
            idle = cpu_seconds(proc)
            for _ in range(8):  # bounded: 16 frames (~0.2 s of broker CPU in all, measured)
                for raw in attackers:
                    raw.send(frame)
            # the honest round trips start once the broker is at work on the frames (it
            # answers nothing meanwhile: its CPU time shows it)
            wait_until(lambda: cpu_seconds(proc) > idle + 0.05, 30,
                       message="the broker at work on the frames")
            attacked = honest_latencies(ex, 3)
            report("honest round trip, median, no attack",
                   statistics.median(base) * 1000, "ms")
            report("honest round trip, worst of 3, under 2 x 8 16 MiB frames",
                   max(attacked) * 1000, "ms")
            assert max(attacked) < 1.0
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
            for raw in attackers:
                raw.close()


# -- amplification through what one peer may legitimately make the broker keep ------------


def test_status_requests_unread_with_a_large_worker_list_are_bounded(ctx):
    with broker_process() as (proc, address):
        workers = [Raw(ctx, address) for _ in range(400)]
        reader = Raw(ctx, address)
        reader.stop_reading()
        try:
            for i, w in enumerate(workers):
                w.send(worker_hello({
                    "worker_id": f"fat-{i}", "slots": 1, "name": "n" * 128,
                    "hostname": "h" * 128, "tags": [f"{j:02d}" + "t" * 62 for j in range(64)]}))
            for w in workers:
                assert isinstance(w.recv(), P.Welcome)
            size = len(P.encode(P.Status(query_status(address))))
            reader.hello()
            with PeakRss(proc) as peak:
                request = P.encode(P.StatusRequest())
                for _ in range(10):  # 10 s at the 8-a-second allowance
                    for _ in range(8):
                        reader.send(request)
                    # each worker heartbeats (stays registered) and syncs on the broker
                    time.sleep(1.0)  # the attack's pace: 8 requests a second
                    for w in workers[:1]:
                        w.send_msg(P.Heartbeat([]))
            report(f"STATUS of {size / 1e6:.2f} MB asked 96 times, unread: broker RSS "
                   "peak growth", peak.growth / 2**20)
            assert peak.growth < RSS_BOUND
        finally:
            for w in workers:
                w.close()
            reader.close()


def test_submit_with_distinct_hints_is_not_a_memory_amplifier(ctx):
    """200,000 empty tasks with distinct data hints: as one frame (refused: past
    MAX_BATCH), then as 200 frames of 1,000 (taken up to MAX_CLIENT_HINTED, the rest
    refused with ``limit`` and not acknowledged)."""
    with broker_process() as (proc, address):
        raw = Raw(ctx, address)
        try:
            base = raw.hello().key << P.ID_SHIFT
            n = 200_000
            ids = list(range(base + 1, base + n + 1))
            hints = [f"{i:x}" for i in range(n)]
            frame = P.encode(P.Submit(1, 0, ids, [b""] * n, hints))
            before = rss(proc)
            raw.send(frame)
            raw.expect_error("limit", timeout=60)
            for seq, start in enumerate(range(0, n, 1000), 1):
                raw.send_msg(P.Submit(seq, 0, ids[start:start + 1000], [b""] * 1000,
                                      hints[start:start + 1000]))
            wait_until(lambda: query_status(address)["queued"] >= core.MAX_CLIENT_HINTED
                       - 1000, 60, message="queued up to the limit")
            raw.sync(60)  # (its PONG: the broker has handled every SUBMIT, taken or refused)
            status = query_status(address)
            growth = rss(proc) - before
            report(f"one {len(frame) / 1e6:.1f} MB SUBMIT, then 200 of 1,000, {n} distinct "
                   f"hints: queued {status['queued']}, broker RSS growth", growth / 2**20)
            report("  amplification", growth / len(frame), "x")
            assert status["queued"] <= core.MAX_CLIENT_HINTED + 1000
            assert growth < RSS_BOUND
        finally:
            raw.close()


def test_many_abandoned_sessions_from_one_process_are_bounded(ctx):
    with served_broker() as (proc, address, _):
        before = rss(proc)
        n = 6
        blob = payload.python_task("builtins:bytes", (15 << 20,), {})
        for i in range(n):
            raw = Raw(ctx, address)
            raw.stop_reading()
            base = raw.hello().key << P.ID_SHIFT
            raw.send_msg(P.Submit(1, 0, [base + 1], [blob]))
            wait_until(lambda: query_status(address)["done"] >= i + 1, 60,
                       message=f"session {i} ran")
            raw.close()
        wait_until(lambda: query_status(address)["away_clients"] >= n, 20,
                   message="sessions away")
        growth = rss(proc) - before
        status = query_status(address)
        report(f"{n} abandoned sessions x 15 MiB result: broker RSS growth",
               growth / 2**20)
        report("  results replaced by ResultDropped", status["dropped_results"], "")
        assert status["unacknowledged_results"] == n
        assert_serving(address, 5)
        assert growth < RSS_BOUND


def test_honest_latency_while_two_peers_flood_capped_hellos(ctx):
    hello = msgpack.packb([P.TAGS[P.Hello], PROTOCOL_VERSION, "0", P.ROLE_CLIENT,
                           {"name": "x", "pad": [[]] * 15_000}])
    assert len(hello) <= P.MAX_HELLO_BYTES
    with served_broker() as (proc, address, _):
        ex = Executor(address, connect_timeout=30)
        base = honest_latencies(ex, 10)
        attackers = [Raw(ctx, address) for _ in range(2)]
        try:
            for raw in attackers:
                raw.sock.setsockopt(zmq.RCVHWM, 1)
                raw.sock.setsockopt(zmq.SNDHWM, 100_000)

            def flood(raw: Raw) -> None:
                for _ in range(800):  # bounded: ~11 s of broker time per peer
                    raw.sock.send(hello)

            threads = [threading.Thread(target=flood, args=(r,), daemon=True)
                       for r in attackers]
            idle = cpu_seconds(proc)
            for t in threads:
                t.start()
            # the honest round trips start once the broker is at work on the flood (as
            # above: its CPU time shows it)
            wait_until(lambda: cpu_seconds(proc) > idle + 0.05, 30,
                       message="the broker at work on the flood")
            try:
                attacked = honest_latencies(ex, 3)
            finally:
                for t in threads:
                    t.join(60)
            report("honest round trip, median, no attack",
                   statistics.median(base) * 1000, "ms")
            report("honest round trip, worst of 3, under 2 x 800 15 KB HELLOs",
                   max(attacked) * 1000, "ms")
            assert max(attacked) < 1.0
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
            for raw in attackers:
                raw.close()


def test_a_client_cannot_cancel_or_submit_under_another_clients_key(served, ctx):
    """Task ids are guessable (key << 40 | seq): a raw client cancels an honest client's
    ids and submits tasks under its key; the honest client's results are untouched."""
    proc, address = served
    raw = Raw(ctx, address)
    try:
        mine = raw.hello().key
        with Executor(address, connect_timeout=10) as ex:
            futures = [ex.submit(tasks.sleep_then, i, 0.3) for i in range(4)]
            ids = [f.task_id for f in futures]
            victim = ids[0] >> P.ID_SHIFT
            assert victim != mine
            raw.send_msg(P.Cancel(1, 0, ids))
            raw.send_msg(P.Submit(2, 0, [ids[-1] + 1], [payload.python_task(
                "tasks:identity", ("forged",), {})]))
            raw.expect_error("malformed")
            assert [f.result(timeout=60) for f in futures] == list(range(4))
    finally:
        raw.close()


def test_a_client_flapping_quiet_does_not_rewrite_its_held_results_to_the_journal(ctx, tmp_path):
    with served_broker("--journal", str(tmp_path / "j")) as (proc, address, _):
        raw = Raw(ctx, address)
        raw.stop_reading()
        try:
            key = raw.hello().key
            base = key << P.ID_SHIFT
            blob = payload.python_task("builtins:bytes", (2 << 20,), {})
            for seq in range(1, 7):  # 6 results of 2 MiB, one DELIVER frame each
                raw.send_msg(P.Submit(seq, 0, [base + seq], [blob]))
                wait_until(lambda: query_status(address)["done"] >= seq, 30,
                           message=f"task {seq}")
            io = psutil.Process(proc.pid)
            written = io.io_counters().write_chars
            hello = P.encode(P.hello(P.ROLE_CLIENT, {"name": "flapper", "key": key}))
            for _ in range(200):  # bounded: 10 s
                raw.send(hello)
                time.sleep(0.05)  # the attack's pace: 20 HELLOs a second
            query_status(address)  # (the broker has taken them all)
            written = io.io_counters().write_chars - written
            status = query_status(address)
            report("10 s of HELLOs from a client with 12 MiB of unread results: "
                   "broker wrote", written / 2**20)
            report("  journal compactions meanwhile", status["journal"]["compactions"], "")
            assert written < 100 * 2**20
        finally:
            raw.close()


def drain(raw: Raw, timeout: float = 0.5) -> list:
    out = []
    while raw.sock.poll(timeout * 1000):
        out.append(P.decode(raw.sock.recv()))
    return out


def test_a_second_resend_within_two_seconds_keeps_the_books(ctx, tmp_path):
    directory = tmp_path / "j"
    with served_broker("--journal", str(directory)) as (proc, address, _):
        raw = Raw(ctx, address)
        try:
            key = raw.hello().key
            base = key << P.ID_SHIFT
            blob = payload.python_task("builtins:bytes", (1 << 20,), {})
            for seq in range(1, 7):  # 6 results of 1 MiB, one DELIVER frame each
                raw.send_msg(P.Submit(seq, 0, [base + seq], [blob]))
                wait_until(lambda: query_status(address)["done"] >= seq, 30,
                           message=f"task {seq}")
            got = [m for m in drain(raw) if isinstance(m, P.Deliver)]
            assert [m.seq for m in got] == [1, 2, 3]  # (the 4 MiB window holds back 4..6)
            token = got[-1].token  # (what acknowledges frame 3)
            raw.send_msg(P.Resend(0))  # a gap: everything again
            again = [m for m in drain(raw) if isinstance(m, P.Deliver)]
            assert [(m.seq, m.token) for m in again] == [(m.seq, m.token) for m in got]
            raw.send_msg(P.Resend(3, token))  # soon after: "I have 1..3, send the rest"
            raw.send_msg(P.Ack(3, token))
            raw.send_msg(P.Ping(1.0, 3, token))
            later = []
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and len(later) < 3:
                later += [m.seq for m in drain(raw, 1.0) if isinstance(m, P.Deliver)]
                raw.send_msg(P.Ping(2.0, 3, token))
            report("DELIVER frames after the client acknowledged 1..3 by RESEND",
                   len(later), "frames")
        finally:
            raw.close()
    # (served_broker stopped the broker by SIGTERM: a clean stop)
    journal = Journal(str(directory))
    try:
        left = journal.replay()
    finally:
        journal.close()
    acknowledged = [t for t in (base + 1, base + 2, base + 3) if t in left.tasks or t in left.held]
    report("acknowledged tasks a restart would run again", len(acknowledged), "tasks")
    assert sorted(set(later)) == [4, 5, 6], f"DELIVERs 4..6 never sent: got {later}"
    assert not acknowledged


# -- the limits against honest clients ----------------------------------------------------


def test_an_honest_executor_with_100_mib_of_results_gets_every_result():
    with served_broker(slots=2) as (proc, address, _):
        with Executor(address, connect_timeout=30) as ex:
            futures = [ex.submit(bytes, 256 * 1024) for _ in range(400)]
            failed = 0
            for f in futures:
                try:
                    assert f.result(timeout=120) == bytes(256 * 1024)
                except Exception:  # noqa: BLE001 (TaskError ResultDropped)
                    failed += 1
        dropped = query_status(address)["dropped_results"]
        report("honest Executor, 400 x 256 KiB results: results lost (ResultDropped)",
               failed, "results")
        assert failed == 0 and dropped == 0


def test_hello_churn_from_fresh_routing_ids_is_bounded(ctx):
    import uuid
    with broker_process() as (proc, address):
        before = rss(proc)
        hello = P.encode(P.hello(P.ROLE_CLIENT, {"name": "n" * 128}))
        started = time.monotonic()
        n = 40_000
        for _ in range(n // 200):
            batch = []
            for _ in range(200):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
                sock.connect(address)
                sock.send(hello)
                batch.append(sock)
            for sock in batch:
                assert sock.poll(10_000)
                assert isinstance(P.decode(sock.recv()), P.Welcome)
                sock.close(0)
        spent = time.monotonic() - started
        status = query_status(address)
        growth = rss(proc) - before
        report(f"{n} HELLOs from fresh routing ids in {spent:.1f} s: broker RSS growth",
               growth / 2**20)
        report("  client records kept", status["clients"] + status["away_clients"], "")
        assert status["clients"] + status["away_clients"] <= core.MAX_IDLE_CLIENTS + 1
        assert growth < RSS_BOUND


def test_pong_does_not_announce_frames_held_back_by_the_send_window(ctx):
    with served_broker() as (proc, address, _):
        raw = Raw(ctx, address)
        try:
            base = raw.hello().key << P.ID_SHIFT
            blob = payload.python_task("builtins:bytes", (3 << 20,), {})
            for seq in (1, 2):  # two DELIVER frames of 3 MiB: the second held back
                raw.send_msg(P.Submit(seq, 0, [base + seq], [blob]))
                wait_until(lambda: query_status(address)["done"] >= seq, 30,
                           message=f"task {seq}")
            got = [m for m in drain(raw)]
            delivered = [m.seq for m in got if isinstance(m, P.Deliver)]
            assert delivered == [1]
            raw.send_msg(P.Ping(7.0, 0))  # (ack 0: the window stays shut)
            pong = [m for m in drain(raw) if isinstance(m, P.Pong)]
            assert pong and pong[0].sent == 7.0
            report("PONG seq with 1 frame sent and 1 held back", pong[0].seq, "")
            assert pong[0].seq == max(delivered)
        finally:
            raw.close()
