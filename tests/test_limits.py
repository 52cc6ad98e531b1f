"""Per-peer limits (docs/protocol.md, "Limits"): what one hostile peer can make the broker
keep or compute. Each test attacks a real broker process from a raw DEALER (or a client
that does not read), then checks that the broker's memory grew by less than the stated
bound and that an honest client still gets correct results."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from conftest import (
    Raw,
    assert_serving,
    broker_process,
    rss,
    wait_until,
    worker_hello,
    worker_process,
)
from zfalkon import payload, query_status
from zfalkon import core
from zfalkon import protocol as P

#: Most the broker's resident memory may grow under one peer's attack.
RSS_BOUND = 50 * 2**20


@pytest.fixture(scope="module")
def served():
    with broker_process() as (proc, address):
        with worker_process(address, "--slots", "1", "--name", "limits-worker"):
            wait_until(lambda: query_status(address, timeout=5)["slots"] >= 1, 30,
                       message="worker slot registered")
            yield proc, address


def grew(proc, before: int, what: str) -> int:
    """The broker's RSS growth since ``before``, printed for bench/RESULTS.md."""
    growth = rss(proc) - before
    print(f"\nLIMITS {what}: broker RSS grew {growth / 2**20:.1f} MiB")
    return growth




def test_huge_hello_is_refused_before_it_is_unpacked(served, ctx):
    """8 MB of empty maps in a HELLO's info (70x amplification once unpacked) is refused
    by size, unread, and the broker's memory does not follow."""
    proc, address = served
    before = rss(proc)
    raw, stranger = Raw(ctx, address), Raw(ctx, address)
    try:
        huge = worker_hello({"worker_id": "w", "slots": 1, "x": [{}] * (8 << 20)})
        stranger.send(huge)  # (not registered: refused before decoding at all)
        stranger.expect_error("hello-required", timeout=10)
        raw.hello()  # (registered: decode refuses it by its size, before unpacking)
        started = time.monotonic()
        for _ in range(5):
            raw.send(huge)
            err = raw.expect_error("too-large", timeout=10)
            assert len(err.message) < 200
        assert time.monotonic() - started < 5  # (not seconds of validation each)
    finally:
        raw.close()
        stranger.close()
    assert grew(proc, before, "5 HELLOs of 8 MB") < RSS_BOUND
    assert_serving(address)


def test_hello_fields_are_cut_to_their_limits(served, ctx):
    """A worker HELLO within the size limit but with many long tags, a long name and
    unknown fields: the broker keeps the known fields, cut to their limits."""
    proc, address = served
    raw = Raw(ctx, address)
    try:
        info = {"worker_id": "cut-worker", "slots": 1, "name": "n" * 2000,
                "hostname": "h" * 3000, "tags": ["t" * 100] * 100,
                "junk": {"a": [1] * 500}}
        raw.send(worker_hello(info))
        assert isinstance(raw.recv(), P.Welcome)
        status = query_status(address)
        (worker,) = [w for w in status["worker_list"] if w["name"].startswith("nnn")]
        assert len(worker["name"]) == core.MAX_NAME_CHARS
        assert len(worker["hostname"]) == core.MAX_NAME_CHARS
        assert len(worker["tags"]) == core.MAX_TAGS
        assert all(len(t) == core.MAX_TAG_CHARS for t in worker["tags"])
        assert len(worker["version"]) <= core.MAX_NAME_CHARS
    finally:
        raw.send_msg(P.Bye("done"))
        raw.close()


def test_another_protocol_version_is_not_echoed_at_length(served, ctx):
    proc, address = served
    raw = Raw(ctx, address)
    try:
        raw.send(msgpack.packb([P.TAGS[P.Hello], "v" * 12000, "x" * 3000, "client", {}]))
        err = raw.expect_error("version")
        assert len(err.message) < 600 and "vvvv" in err.message
    finally:
        raw.close()


def test_holding_flood_is_bounded(served, ctx):
    """A slot announcing ever more data keys: the broker keeps MAX_DATA_KEYS of them,
    and none longer than MAX_DATA_KEY_CHARS."""
    proc, address = served
    before = rss(proc)
    worker, slot = Raw(ctx, address), Raw(ctx, address)
    try:
        worker.send(worker_hello({"worker_id": "holder", "slots": 1, "name": "holder"}))
        assert isinstance(worker.recv(), P.Welcome)
        slot.hello(P.ROLE_SLOT, {"worker_id": "holder", "slot": 0})
        long_keys = ["k" * 4000] * 70  # (over MAX_HOLDING_BYTES)
        slot.send_msg(P.Holding(long_keys))
        slot.expect_error("too-large")
        for batch in range(12):
            slot.send_msg(P.Holding([f"s3://b/{batch}/{i:06d}" + "x" * 400
                                     for i in range(500)]))
            slot.send_msg(P.Holding(["y" * (core.MAX_DATA_KEY_CHARS + 1)] * 100))
        wait_until(lambda: any(w["data_keys"] == 6000 for w in query_status(address)
                               ["worker_list"]), 10, message="HOLDINGs taken")
        for batch in range(12, 40):
            slot.send_msg(P.Holding([f"s3://b/{batch}/{i:06d}" for i in range(500)]))
        wait_until(lambda: any(w["data_keys"] == core.MAX_DATA_KEYS for w in query_status(
            address)["worker_list"]), 10, message="data keys capped")
    finally:
        slot.send_msg(P.Bye("done"))
        worker.send_msg(P.Bye("done"))
        slot.close()
        worker.close()
    assert grew(proc, before, "40 HOLDINGs") < RSS_BOUND
    assert_serving(address)


def test_ping_flood_without_reading_is_bounded(served, ctx):
    """A client that pings as fast as it can and never reads the PONGs."""
    proc, address = served
    before = rss(proc)
    raw = Raw(ctx, address)
    raw.sock.setsockopt(zmq.RCVHWM, 1)
    try:
        raw.hello()
        frame = P.encode(P.Ping(1.0, 0))
        for _ in range(200_000):
            raw.sock.send(frame)
        wait_until(lambda: query_status(address)["clients"] >= 1, 5, message="broker up")
        assert_serving(address)
        assert grew(proc, before, "200,000 PINGs unread") < RSS_BOUND
    finally:
        raw.close()


def test_cancelled_tasks_of_a_departed_client_leave_memory(ctx):
    """A client queues 300,000 tasks, cancels them all, and leaves: on an idle broker
    nothing of them stays (tombstones and queued tasks both go)."""
    with broker_process() as (proc, address):
        raw = Raw(ctx, address)
        try:
            base = raw.hello().key << P.ID_SHIFT
            blob = payload.python_task("builtins:abs", (1,), {})
            before = rss(proc)
            seq, n = 0, 300_000
            for start in range(1, n + 1, 1000):
                seq += 1
                ids = list(range(base + start, base + start + 1000))
                raw.send_msg(P.Submit(seq, 0, ids, [blob] * 1000))
            wait_until(lambda: query_status(address)["queued"] == n, 60, message="queued")
            grown = rss(proc) - before
            for start in range(1, n + 1, 1000):
                seq += 1
                raw.send_msg(P.Cancel(seq, 0, list(range(base + start, base + start + 1000))))
            raw.send_msg(P.Bye("gone"))
            wait_until(lambda: query_status(address)["queued"] == 0, 10, message="purged")
            assert grown > 10 * 2**20  # (the queue did cost memory while it was there)
            # Python keeps freed memory in its pools; what matters is that it is reused:
            # the same again must not grow the broker by as much again.
            raw2 = Raw(ctx, address)
            base = raw2.hello().key << P.ID_SHIFT
            mid = rss(proc)
            for i, start in enumerate(range(1, n + 1, 1000), 1):
                ids = list(range(base + start, base + start + 1000))
                raw2.send_msg(P.Submit(i, 0, ids, [blob] * 1000))
            wait_until(lambda: query_status(address)["queued"] == n, 60, message="queued")
            assert grew(proc, mid, "300,000 tasks queued again after cancel+BYE") \
                < grown / 2 + RSS_BOUND / 5
            raw2.close()
        finally:
            raw.close()


def test_client_that_never_reads_its_results(ctx):
    """A client submits tasks with 64 KiB results and never reads: the broker sends it at
    most SEND_WINDOW_BYTES ahead of its acknowledgements, keeps MAX_HELD_BYTES of its
    results in full and replaces older ones by ResultDropped; an honest client is served
    meanwhile and the broker's memory stays bounded."""
    with broker_process() as (proc, address):
        with worker_process(address, "--slots", "1"):
            wait_until(lambda: query_status(address)["slots"] >= 1, 30, message="slot")
            assert_serving(address)
            before = rss(proc)
            raw = Raw(ctx, address)
            raw.stop_reading()
            try:
                base = raw.hello().key << P.ID_SHIFT
                n = 4000  # 256 MiB of results
                blob = payload.python_task("builtins:bytes", (65536,), {})
                for seq, start in enumerate(range(1, n + 1, 500), 1):
                    ids = list(range(base + start, base + start + 500))
                    raw.send_msg(P.Submit(seq, 0, ids, [blob] * 500))
                wait_until(lambda: query_status(address)["done"] >= n, 120,
                           message="every task ran")
                status = query_status(address)
                assert status["dropped_results"] > 0
                # (what it keeps: 2 x MAX_WAITING_BYTES of results while it is taken
                # for listening, MAX_HELD_BYTES once quiet, and a window in the socket;
                # freed memory stays in the allocator)
                bound = 2 * core.MAX_WAITING_BYTES + core.SEND_WINDOW_BYTES + 24 * 2**20
                assert grew(proc, before, "256 MiB of results never read") < bound
                assert_serving(address)
            finally:
                raw.close()
