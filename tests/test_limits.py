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
    RSS_BOUND,
    Raw,
    assert_serving,
    broker_process,
    rss,
    served_broker,
    wait_until,
    worker_hello,
    worker_process,
)
from zfalkon import payload, query_status
from zfalkon import core
from zfalkon import protocol as P


@pytest.fixture(scope="module")
def served():
    with served_broker(name="limits-worker") as (proc, address, _):
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
        # (MAX_TAGS kept; STATUS lists STATUS_MAX_TAGS of them and counts the others)
        assert len(worker["tags"]) + worker["tags_omitted"] == core.MAX_TAGS
        assert len(worker["tags"]) == core.STATUS_MAX_TAGS
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
        wait_until(lambda: query_status(address)["clients"] >= 0, 5, message="broker up")
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
                # Every task ran, or is parked: results pile up for a client that reads
                # nothing, so its queued tasks may be parked (docs/protocol.md, section 2)
                # and wait for it to read, if it goes quiet first, or ever speaks again.
                wait_until(lambda: (lambda s: s["done"] + s["parked"])(
                    query_status(address)) >= n, 120, message="every task ran or parked")
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
    last = max((m for i, m in c.outbox if type(m) is P.Deliver), key=lambda m: m.seq)
    c.message(b"c", P.Ack(last.seq, last.token), None, 0.0)
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
    c.message(b"c", P.Ack(deliver.seq, deliver.token), None, now + core.STALE_SECONDS)
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


# -- acknowledgements a client cannot forge (issue 12) -------------------------------------


def _delivers(c: core.BrokerCore, ident: bytes = b"c") -> list[P.Deliver]:
    out = [m for i, m in c.outbox if i == ident and type(m) is P.Deliver]
    c.outbox.clear()
    return out


def _unread_results(n: int, size: int) -> tuple[core.BrokerCore, int, list[P.Deliver]]:
    """A core whose client ``b"c"`` has ``n`` results of ``size`` bytes (one DELIVER
    frame each) and has read none; returns the core, the key and the frames sent."""
    c = _core()
    _slot(c)
    key = _client(c, b"c")
    base = key << P.ID_SHIFT
    c.message(b"c", P.Submit(1, 0, list(range(base + 1, base + n + 1)), [b"t"] * n),
              None, 0.0)
    c.dispatch(0.0)
    slot = c.peers[b"s"]
    for i, tid in enumerate(list(slot.inflight)):  # one RESULTS frame (one DELIVER) each
        c.message(b"s", P.Results(i + 2, 0, 100, 0, [tid], [bytes(size)]), None, 0.0)
    return c, key, _delivers(c)


def test_core_blind_acks_do_not_open_the_send_window():
    """A client acknowledging frames it never read (seq numbers are guessable, tokens are
    not) gets nothing more sent, and its results stay live; the right token opens the
    window, once."""
    c, key, sent = _unread_results(8, 2 << 20)
    client = c.clients[key]
    assert [m.seq for m in sent] == [1, 2]  # 4 MiB: SEND_WINDOW_BYTES
    assert len({m.token for m in sent}) == 2 and all(len(m.token) == 8 for m in sent)
    base = key << P.ID_SHIFT
    forged = [P.Ack(10_000), P.Ack(2), P.Ack(2, b""), P.Ack(2, bytes(8)),
              P.Ack(2, sent[0].token),  # frame 1's token does not acknowledge frame 2
              P.Ack(3, sent[1].token), P.Ack(10_000, sent[1].token),
              P.Ping(1.0, 2, b"guess"), P.Resend(2, bytes(8)),
              P.Submit(2, 2, [base + 100], [b"t"], [], b"x" * 8),
              P.Cancel(3, 2, [], bytes(8))]
    for now, msg in enumerate(forged):
        c.message(b"c", msg, None, float(now))
        c.tick(float(now))
    # (the RESEND sends frames 1 and 2 again, as a RESEND does: nothing past them)
    assert [m.seq for m in _delivers(c)] == [1, 2]
    assert client.tx.acked() == 0 and client.live_tasks == 9 and client.in_flight == 4 << 20
    assert c.status(20.0)["unacknowledged_results"] == 8
    # the real token of frame 2 acknowledges frames 1 and 2 and sends the next two
    c.message(b"c", P.Ack(2, sent[1].token), None, 20.0)
    assert [m.seq for m in _delivers(c)] == [3, 4]
    assert client.tx.acked() == 2 and client.live_tasks == 7
    # the same acknowledgement again (or blind ones after it) sends nothing more
    for msg in (P.Ack(2, sent[1].token), P.Ack(4, sent[1].token), P.Ack(4)):
        c.message(b"c", msg, None, 20.0)
    assert not _delivers(c) and client.tx.acked() == 2


def test_core_tokens_ride_on_every_message_that_acknowledges():
    """ACK, PING, RESEND, SUBMIT and CANCEL each count with the frame's token."""
    for make in (lambda d: P.Ack(d.seq, d.token), lambda d: P.Ping(1.0, d.seq, d.token),
                 lambda d: P.Resend(d.seq, d.token),
                 lambda d: P.Cancel(1, d.seq, [], d.token)):
        c, key, sent = _unread_results(1, 100)
        c.message(b"c", make(sent[0]), None, 5.0)
        assert c.clients[key].tx.acked() == 1 and c.clients[key].live_tasks == 0, make
    c, key, sent = _unread_results(1, 100)
    base = key << P.ID_SHIFT
    c.message(b"c", P.Submit(2, 1, [base + 50], [b"t"], [], sent[0].token), None, 5.0)
    assert c.clients[key].tx.acked() == 1 and c.clients[key].live_tasks == 1


def test_core_a_token_is_good_for_one_session_only():
    """A client's stream is numbered from 1 again at each HELLO, so its tokens change
    (a new secret): a token read in an earlier session acknowledges nothing."""
    c, key, (first,) = _unread_results(1, 100)
    c.message(b"c", P.hello(P.ROLE_CLIENT, {"name": "t", "key": key}), None, 2.0)
    (again,) = _delivers(c)
    assert again.seq == first.seq == 1 and again.token != first.token
    c.message(b"c", P.Ack(1, first.token), None, 2.0)
    assert c.clients[key].live_tasks == 1  # stale token: ignored
    c.message(b"c", P.Ack(1, again.token), None, 2.0)
    assert c.clients[key].live_tasks == 0


def test_core_restart_from_the_journal_every_result_once(tmp_path):
    """The secret is not journaled: a restarted broker makes new ones. A client that
    read a result but whose acknowledgement died with the broker comes back (its ACK is
    answered hello-required, not counted), registers again, gets the result again under
    a new token (its session drops it: not pending any more) and acknowledges it with
    that token; every result reaches the user once, and the journal ends empty."""
    from zfalkon.clientcore import ClientSession
    from zfalkon.journal import Journal, JournalRecorder

    journal = Journal(str(tmp_path), "never")
    c = core.BrokerCore(0.0, recorder=JournalRecorder(journal))
    _slot(c)
    pending: dict[int, bytes] = {}
    session = ClientSession(0, "t", pending, {})
    got: list[int] = []

    def exchange(broker: core.BrokerCore, now: float) -> None:
        for _ in range(10):
            out, session.out = session.out, []
            for msg in out:
                broker.message(b"c", msg, None, now)
            broker.dispatch(now)
            slot = broker.peers.get(b"s")
            if slot is not None and slot.inflight:
                ids = list(slot.inflight)
                broker.message(b"s", P.Results(slot.rx.last + 1, 0, 100, 0, ids,
                                               [b"r%d" % t for t in ids]), None, now)
            inbox, broker.outbox = [m for i, m in broker.outbox if i == b"c"], []
            for msg in inbox:
                d = session.receive(msg, now)
                for tid in d.ids if d else ():
                    if pending.pop(tid, None) is not None:
                        got.append(tid)
            journal.flush(now)
            if not session.out:
                return

    session.hello(0.0)
    exchange(c, 0.0)
    ids = [(session.key << P.ID_SHIFT) + i for i in range(1, 6)]
    pending.update((t, b"t") for t in ids)
    session.out.extend(session.submit(ids[:3], [b"t"] * 3))
    exchange(c, 0.1)  # three results read, their acknowledgement not sent yet
    assert sorted(got) == ids[:3] and session.rx.last > session.told
    c.tick(0.2 + core.QUIET_SECONDS)  # the client falls silent: its results are HELD
    journal.flush(0.2 + core.QUIET_SECONDS)
    journal.close()  # kill -9: the client's next SUBMIT (with its ack) reaches no one
    session.out.extend(session.submit(ids[3:], [b"t"] * 2))
    assert session.out[-1].ack > 0 and session.out[-1].token

    journal = Journal(str(tmp_path), "never")
    c = core.BrokerCore(1.0, recorder=JournalRecorder(journal))
    c.restore(journal.replay(), 1.0)
    assert set(ids[:3]) <= c.live and len(c.clients[session.key].tx) >= 1  # held again
    _slot(c)
    # the SUBMIT (acknowledging frame 3 with the old session's token) meets a broker
    # that does not know it: hello-required, HELLO, the held results again under new
    # tokens (not pending: dropped, but acknowledged), WELCOME, the pending tasks again
    exchange(c, 1.0)
    for now in (2.0, 3.0):
        session.tick(now, waiting=bool(pending))
        exchange(c, now)
    session.ack()
    exchange(c, 4.0)
    assert sorted(got) == ids and len(got) == len(set(got))
    assert not c.live and not pending
    journal.close()
    replayed = Journal(str(tmp_path), "never").replay()
    assert not replayed.tasks and not replayed.held


# -- issue 12, round 2: answers re-sent or re-computed for a peer that never reads --------


def test_core_one_status_answer_is_bounded_in_bytes():
    """However many (and however large) the workers, one STATUS answer stays within
    STATUS_MAX_BYTES (plus the counters): 256 of them queued for a peer that never reads
    stay well under the per-peer bound; the workers left out are counted."""
    c = _core()
    n = 1000
    for i in range(n):
        c.message(i.to_bytes(4, "big"), P.hello(P.ROLE_WORKER, {
            "worker_id": f"w{i}", "slots": 1, "name": f"{i:04d}" + "n" * 124,
            "hostname": "h" * 128, "tags": [f"{j:02d}" + "t" * 62 for j in range(64)]}),
            None, 0.0)
    status = c.status(1.0)
    size = len(P.encode(P.Status(status)))
    assert size <= core.STATUS_MAX_BYTES + 4096
    assert 256 * size < RSS_BOUND // 2
    listed = status["worker_list"]
    assert status["workers"] == n and len(listed) + status["workers_omitted"] == n
    full = listed[:core.STATUS_MAX_WORKERS]
    assert all(len(w["tags"]) == core.STATUS_MAX_TAGS and w["tags_omitted"] == 64 - 8
               for w in full)
    assert all("tags" not in w and w["name"] for w in listed[core.STATUS_MAX_WORKERS:])
    # a swarm of 1,000 workers with short names is listed whole (in short past the first)
    c = _core()
    for i in range(n):
        c.message(i.to_bytes(4, "big"), P.hello(P.ROLE_WORKER, {
            "worker_id": f"w{i}", "slots": 1, "name": f"swarm-{i}"}), None, 0.0)
    status = c.status(1.0)
    assert len(status["worker_list"]) == n and status["workers_omitted"] == 0


def test_core_resend_from_a_client_that_never_reads_is_honoured_rarely():
    """RESEND sends the window again at most once per RESEND_SECONDS, and without the
    client's (token-proven) acknowledgement moving, only after RESEND_IDLE_SECONDS,
    doubling: over 10 minutes of RESEND every 2 s, a few copies of the window, not 300;
    the client turns quiet (it does not read). Reading (a real token) lets it ask again
    at once."""
    c, key, sent = _unread_results(8, 2 << 20)
    client = c.clients[key]
    assert [m.seq for m in sent] == [1, 2]
    now, copies = 0.0, 0
    quiet_seen = False
    while now < 600:
        now += core.RESEND_SECONDS + 0.05
        c.message(b"c", P.Resend(0), None, now)
        copies += len(_delivers(c))
        c.tick(now)
        quiet_seen |= client.quiet
        _delivers(c)
    # honoured at 2, 12, 32, 72, 152, 312 s: 6 times the window (2 frames each)
    assert copies <= 2 * 6, copies
    assert quiet_seen
    # an honest recovery: it reads frame 2 (its token) and asks: honoured at once
    now += 0.1
    c.message(b"c", P.Resend(2, sent[1].token), None, now)
    assert [m.seq for m in _delivers(c)] == [3, 4]
    now += core.RESEND_SECONDS
    c.message(b"c", P.Resend(2, sent[1].token), None, now)  # (frames 3-4 lost again)
    assert [m.seq for m in _delivers(c)] == [3, 4]
    now += core.RESEND_SECONDS
    c.message(b"c", P.Resend(2, sent[1].token), None, now)  # (no proof it read them)
    assert not _delivers(c)
    c.message(b"c", P.Resend(2, sent[1].token), None, now + core.RESEND_IDLE_SECONDS)
    assert [m.seq for m in _delivers(c)] == [3, 4]


def test_core_resend_from_a_slot_that_never_reads_is_honoured_rarely():
    """A slot's RESEND rebuilds its unacknowledged TASKS frames at most once per
    RESEND_SECONDS, and without its acknowledgement moving only after
    RESEND_IDLE_SECONDS (doubling); a RESEND does not renew its lease: its tasks go back
    to the queue when the lease lapses, and then nothing is rebuilt."""
    c = _core()
    slot = _slot(c)
    key = _client(c, b"c")
    base = key << P.ID_SHIFT
    c.message(b"c", P.Submit(1, 0, list(range(base + 1, base + 17)), [bytes(1 << 20)] * 16),
              None, 0.0)
    c.dispatch(0.0)
    c.outbox.clear()
    assert len(c.peers[slot].inflight) == 16
    now, rebuilt = 0.0, 0
    while now < 120:
        now += core.RESEND_SECONDS + 0.05
        c.message(slot, P.Resend(0), None, now)
        c.message(b"w", P.Heartbeat([]), None, now)
        rebuilt += sum(len(m.ids) for i, m in c.outbox if i == slot and type(m) is P.Tasks)
        c.outbox.clear()
        c.tick(now)
        c.outbox.clear()
    assert rebuilt <= 2 * 16  # at 2 s (and 12 s); then its lease lapsed
    assert not c.peers[slot].inflight and c.expired_leases == 1
    assert len(c.queue) == 16


def test_core_submit_and_cancel_in_a_loop_does_not_fill_the_queue():
    """CANCEL (DROP) frees the client's limits at once; the cancelled tasks wait in the
    queue (no slot takes them) only until MAX_CANCELLED_QUEUED_BYTES (or
    MAX_CANCELLED_QUEUED) of them have been cancelled: then they are removed."""
    c = _core()
    key = _client(c, b"c")
    base = key << P.ID_SHIFT
    seq, tid = 0, base
    blob = bytes(15 << 20)
    for _ in range(20):  # 20 rounds of 4 x 15 MiB: 1.2 GiB submitted and cancelled
        ids = []
        for _ in range(4):
            seq, tid = seq + 1, tid + 1
            ids.append(tid)
            c.message(b"c", P.Submit(seq, 0, [tid], [blob]), None, 0.0)
        assert c.clients[key].rx.last == seq  # (taken: within the client's limits)
        seq += 1
        c.message(b"c", P.Cancel(seq, 0, ids, b"", P.CANCEL_DROP), None, 0.0)
        queued = sum(sum(map(len, blobs)) for _, blobs in c.queue.batches())
        assert queued <= core.MAX_CANCELLED_QUEUED_BYTES + 4 * len(blob)
    assert c.clients[key].live_tasks == 0 and not c.live
    assert len(c.cancelled) <= 4
    # many small ones: bounded by count
    c = _core()
    key = _client(c, b"d")
    base = key << P.ID_SHIFT
    for r in range(100):
        ids = list(range(base + 1000 * r + 1, base + 1000 * r + 1001))
        c.message(b"d", P.Submit(2 * r + 1, 0, ids, [b"x"] * 1000), None, 0.0)
        c.message(b"d", P.Cancel(2 * r + 2, 0, ids, b"", P.CANCEL_DROP), None, 0.0)
        assert len(c.queue) <= core.MAX_CANCELLED_QUEUED + 1000
    # a task cancelled and submitted again is not lost by a purge
    _slot(c)
    keep = base + 10_000_000
    c.message(b"d", P.Submit(201, 0, [keep], [b"k"]), None, 0.0)
    c.message(b"d", P.Cancel(202, 0, [keep], b"", P.CANCEL_DROP), None, 0.0)
    c.message(b"d", P.Submit(203, 0, [keep], [b"k"]), None, 0.0)
    c._purge_cancelled()
    c.dispatch(0.0)
    assert keep in c.peers[b"s"].inflight
