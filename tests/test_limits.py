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


# -- the limits per peer at the core (sans-I/O: a BrokerCore driven directly) -------------


def _core(now: float = 0.0) -> core.BrokerCore:
    return core.BrokerCore(now)


def _client(c: core.BrokerCore, ident: bytes, now: float = 0.0, key: int = 0) -> int:
    info = {"name": "t"} | ({"key": key} if key else {})
    c.message(ident, P.hello(P.ROLE_CLIENT, info), None, now)
    welcome = [m for i, m in c.outbox if i == ident and type(m) is P.Welcome]
    c.outbox.clear()
    return welcome[-1].key if welcome else 0


def _slot(c: core.BrokerCore, window: int = 100) -> bytes:
    c.message(b"w", P.hello(P.ROLE_WORKER, {"worker_id": "w", "slots": 1}), None, 0.0)
    c.message(b"s", P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": 0}), None, 0.0)
    c.message(b"s", P.Results(1, 0, window, 0, [], []), None, 0.0)
    c.outbox.clear()
    return b"s"


def _run_all(c: core.BrokerCore, blob: bytes, now: float = 0.0) -> None:
    """Dispatch to the slot b"s" and return every task it holds with result ``blob``."""
    c.dispatch(now)
    slot = c.peers[b"s"]
    held = list(slot.inflight)
    if held:
        c.message(b"s", P.Results(slot.rx.last + 1, 0, 100, 0, held, [blob] * len(held)),
                  None, now)


def test_core_submit_past_the_task_limit_waits_and_is_told_limit():
    c = _core()
    c.max_client_tasks = 2500
    key = _client(c, b"c")
    base = key << P.ID_SHIFT
    for seq in (1, 2):
        ids = list(range(base + 1000 * seq, base + 1000 * seq + 1000))
        c.message(b"c", P.Submit(seq, 0, ids, [b"x"] * 1000), None, 0.0)
    assert c.clients[key].live_tasks == 2000
    ids = list(range(base + 5000, base + 6000))
    c.message(b"c", P.Submit(3, 0, ids, [b"x"] * 1000), None, 0.0)
    errors = [m for _, m in c.outbox if type(m) is P.Error]
    assert [e.code for e in errors] == ["limit"] and "2000 tasks live" in errors[0].message
    assert c.clients[key].rx.last == 2  # (not acknowledged: the client sends it again)
    assert len(c.queue) == 2000
    c.outbox.clear()
    c.message(b"c", P.Submit(3, 0, ids, [b"x"] * 1000), None, 1.0)  # told once per 2 s
    assert not [m for _, m in c.outbox if type(m) is P.Error]
    # cancelling tasks makes room: the frame is taken when sent again
    first = list(range(base + 1000, base + 2000))
    c.message(b"c", P.Cancel(3, 0, first), None, 1.0)
    assert c.clients[key].live_tasks == 1000
    c.message(b"c", P.Submit(4, 0, ids, [b"x"] * 1000), None, 1.0)
    assert c.clients[key].rx.last == 4 and c.clients[key].live_tasks == 2000


def test_core_limit_counts_until_results_are_acknowledged():
    c = _core()
    c.max_client_tasks = 1500
    _slot(c)
    key = _client(c, b"c")
    base = key << P.ID_SHIFT
    c.message(b"c", P.Submit(1, 0, list(range(base + 1, base + 1001)), [b"x"] * 1000),
              None, 0.0)
    more = list(range(base + 2001, base + 3001))
    for _ in range(12):
        _run_all(c, b"r")
    assert c.clients[key].live_tasks == 1000  # (done, not acknowledged)
    c.message(b"c", P.Submit(2, 0, more, [b"x"] * 1000), None, 0.0)
    assert c.clients[key].rx.last == 1
    sent = max(m.seq for i, m in c.outbox if type(m) is P.Deliver)
    c.message(b"c", P.Ack(sent), None, 0.0)
    assert c.clients[key].live_tasks == 0
    c.message(b"c", P.Submit(2, 0, more, [b"x"] * 1000), None, 0.0)
    assert c.clients[key].rx.last == 2


def test_core_hinted_tasks_and_bytes_are_bounded_per_client():
    c = _core()
    key = _client(c, b"c")
    base = key << P.ID_SHIFT
    seq, accepted = 0, 0
    for start in range(0, 200_000, 1000):  # 200,000 distinct hints, as the adversary
        seq += 1
        ids = list(range(base + start + 1, base + start + 1001))
        c.message(b"c", P.Submit(seq, 0, ids, [b""] * 1000, [f"{t:x}" for t in ids]),
                  None, 0.0)
        accepted = c.clients[key].rx.last
    assert accepted * 1000 <= core.MAX_CLIENT_HINTED + 1000
    assert len(c.queue) == accepted * 1000
    # bytes: a client with one live task may not add a frame past MAX_CLIENT_BYTES
    c2 = _core()
    c2.max_client_bytes = 10 << 20
    key = _client(c2, b"d")
    base = key << P.ID_SHIFT
    c2.message(b"d", P.Submit(1, 0, [base + 1], [bytes(6 << 20)]), None, 0.0)
    c2.message(b"d", P.Submit(2, 0, [base + 2], [bytes(6 << 20)]), None, 0.0)
    assert c2.clients[key].rx.last == 1
    assert [m.code for _, m in c2.outbox if type(m) is P.Error] == ["limit"]


def test_core_a_frame_over_max_batch_is_never_taken():
    c = _core()
    key = _client(c, b"c")
    base = key << P.ID_SHIFT
    n = 200_000
    c.message(b"c", P.Submit(1, 0, list(range(base + 1, base + n + 1)), [b""] * n),
              None, 0.0)
    assert len(c.queue) == 0 and c.clients[key].rx.last == 0
    assert [m.code for _, m in c.outbox if type(m) is P.Error] == ["limit"]


def test_core_hellos_per_routing_id_are_rate_limited():
    c = _core()
    hello = P.hello(P.ROLE_CLIENT, {"name": "x"})
    for _ in range(30):
        c.message(b"c", hello, None, 0.0)
    assert sum(type(m) is P.Welcome for _, m in c.outbox) == core.HELLOS_PER_TICK
    c.outbox.clear()
    c.tick(1.0)
    c.message(b"c", hello, None, 1.0)
    assert sum(type(m) is P.Welcome for _, m in c.outbox) == 1


def test_core_hello_again_does_not_send_unread_results_again():
    """A client that HELLOs with its key without reading: what it was sent in its last
    session still counts against its window; it is sent again only once its
    acknowledgement moves, or STALE_SECONDS later."""
    c = _core()
    _slot(c)
    key = _client(c, b"c")
    tid = (key << P.ID_SHIFT) + 1
    c.message(b"c", P.Submit(1, 0, [tid], [b"t"]), None, 0.0)
    _run_all(c, bytes(3 << 20))
    assert sum(type(m) is P.Deliver for _, m in c.outbox) == 1
    c.outbox.clear()
    now = 0.0
    delivered = []
    for i in range(30):
        now += 0.5
        c.message(b"c", P.hello(P.ROLE_CLIENT, {"name": "t", "key": key}), None, now)
        delivered += [m for _, m in c.outbox if type(m) is P.Deliver]
        c.outbox.clear()
        if i % 2:
            c.tick(now)
            delivered += [m for _, m in c.outbox if type(m) is P.Deliver]
            c.outbox.clear()
    assert not delivered  # (each HELLO renews the debt: nothing while it keeps on)
    # the client stops HELLOing and pings (as an Executor waiting for results): its
    # result goes STALE_SECONDS later; it reads it
    c.outbox.clear()
    c.tick(now + core.STALE_SECONDS)
    c.message(b"c", P.Ping(1.0, 0), None, now + core.STALE_SECONDS)
    (deliver,) = [m for _, m in c.outbox if type(m) is P.Deliver]
    c.message(b"c", P.Ack(deliver.seq), None, now + core.STALE_SECONDS)
    assert c.clients[key].live_tasks == 0 and not c.clients[key].stale


def test_core_status_answers_are_bounded_in_bytes_per_peer():
    c = _core()
    for i in range(100):  # a large worker list (~4 KB a worker)
        c.message(bytes([1, i]), P.hello(P.ROLE_WORKER, {
            "worker_id": f"w{i}", "slots": 1, "name": "n" * 128, "hostname": "h" * 128,
            "tags": [f"{j:02d}" + "t" * 62 for j in range(64)]}), None, 0.0)
    _client(c, b"c")
    c.outbox.clear()
    size = 0
    for second in range(10):
        for _ in range(8):
            c.message(b"c", P.StatusRequest(), None, float(second))
        size += sum(len(P.encode(m)) for _, m in c.outbox if type(m) is P.Status)
        c.outbox.clear()
        c.tick(second + 1.0)
    assert size <= 11 * core.STATUS_BYTES_PER_TICK


def test_core_idle_client_records_are_capped_and_forgotten():
    c = _core()
    c.max_idle_clients = 100
    for i in range(1000):
        _client(c, i.to_bytes(4, "big"))
    assert len(c.clients) == 100
    busy = _client(c, b"busy")
    c.message(b"busy", P.Submit(1, 0, [(busy << P.ID_SHIFT) + 1], [b"t"]), None, 0.0)
    for i in range(1000, 1300):
        _client(c, i.to_bytes(4, "big"))
    assert busy in c.clients  # (it has tasks: not idle)
    c.tick(core.IDLE_CLIENT_SECONDS + 1)  # silent: the idle ones go on the tick
    assert list(c.clients) == [busy]


def test_core_away_clients_and_their_results_are_bounded_together():
    c = _core()
    _slot(c)
    c.max_away_held_bytes = 32 << 20
    keys = []
    for i in range(6):  # 6 sessions, each leaving a 15 MiB result unread
        ident = bytes([9, i])
        key = _client(c, ident, float(i))
        keys.append(key)
        c.message(ident, P.Submit(1, 0, [(key << P.ID_SHIFT) + 1], [b"t"]), None, float(i))
        _run_all(c, bytes(15 << 20), float(i))
        c.send_failed(ident, float(i))  # (gone)
        c.outbox.clear()
    c.message(b"w", P.Heartbeat([]), None, 10.0)
    c.tick(10.0)
    held = sum(c.clients[k].held_bytes for k in keys)
    assert held <= 32 << 20
    assert c.dropped_results == 4  # (the 4 longest silent: counted, not lost)
    assert c.status(10.0)["unacknowledged_results"] == 6
    # the count of away clients is bounded too: those holding nothing go first
    c.max_away_clients = 3
    c.tick(11.0)
    assert len(c.clients) == 3
