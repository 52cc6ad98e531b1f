"""zfalkon.broker: a real broker process, spoken to with a raw DEALER and a real client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest

import tasks
from conftest import (
    Raw,
    broker_process,
    child_env,
    descendants,
    kill_tree,
    served_broker,
    start_broker,
    start_worker,
    stop_process,
    submit_markers,
    wait_until,
    worker_process,
)
from zfalkon import Executor, payload, query_status
from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import PROTOCOL_VERSION

STATUS_KEYS = {"version", "protocol", "uptime", "clients", "away_clients", "workers", "slots",
               "queued", "running", "submitted", "done", "failed", "tasks_per_second",
               "worker_list", "journal", "dispatch", "expired_leases", "stolen",
               "unacknowledged_results", "duplicate_submits", "dropped_results", "parked",
               "workers_omitted", "partial", "prefetched", "rate_window_seconds", "runs",
               "runs_omitted", "hold_seconds"}
WORKER_KEYS = {"name", "hostname", "slots", "connected_slots", "cpus", "memory", "tags",
               "version", "running", "prefetched", "done", "window", "stalled_slots", "draining",
               "idle_seconds", "data_keys", "tags_omitted"}


@pytest.fixture(scope="module")
def served():
    """A broker process with one worker (1 slot) attached: yields (broker proc, address,
    worker proc)."""
    with served_broker(name="broker-test-worker") as served:
        yield served


@pytest.fixture
def raw(served, ctx):
    conn = Raw(ctx, served[1])
    yield conn
    conn.close()


def next_message(conn: Raw, timeout: float = 5.0) -> P.Message:
    """The next message from the broker other than ACK (the broker acknowledges a client's
    stream frames on its own, once a tick, when no DELIVER has carried the ack)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = conn.recv(max(0.01, deadline - time.monotonic()))
        if not isinstance(msg, P.Ack):
            return msg


def expect_error(conn: Raw, code: str, timeout: float = 5.0) -> P.Error:
    msg = next_message(conn, timeout)
    assert isinstance(msg, P.Error), msg
    assert msg.code == code, msg
    assert msg.message
    return msg


def only_acks(conn: Raw, seconds: float) -> list[P.Ack]:
    """Read for ``seconds``: every message must be an ACK; return them."""
    acks = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if conn.sock.poll(left * 1000):
            msg = conn.recv()
            assert isinstance(msg, P.Ack), msg
            acks.append(msg)
    return acks


def deliveries(conn: Raw, want: int, timeout: float = 30.0) -> dict[int, bytes]:
    """Read DELIVERs (skipping ACKs) until ``want`` results came; return them by id."""
    got: dict[int, bytes] = {}
    seqs = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        msg = next_message(conn, timeout=max(0.01, deadline - time.monotonic()))
        assert isinstance(msg, P.Deliver), msg
        seqs.append(msg.seq)
        got.update(zip(msg.ids, msg.blobs))
    assert seqs == list(range(1, len(seqs) + 1))  # the broker's stream: 1, 2, ...
    return got


def assert_serving(served) -> None:
    """The broker is alive and a real client gets correct results through it."""
    proc, address, _ = served
    assert proc.poll() is None, "the broker process died"
    with Executor(address, connect_timeout=10) as ex:
        futures = [ex.submit(tasks.add, i, 1) for i in range(20)]
        assert [f.result(timeout=30) for f in futures] == list(range(1, 21))
        assert ex.shell("echo served").result(timeout=30).stdout == "served\n"


# -- lifecycle ---------------------------------------------------------------------------


def test_ready_line_names_a_loopback_port(served):
    address = served[1]
    assert address.startswith("tcp://127.0.0.1:")
    assert int(address.rsplit(":", 1)[1]) > 0


def test_sigterm_stops_broker_cleanly(ctx):
    proc, address = start_broker()
    try:
        conn = Raw(ctx, address)
        conn.hello()  # a connected client must not keep the broker alive
        conn.send_msg(P.Submit(1, 0, [(1 << P.ID_SHIFT) + 1],
                               [payload.python_task("tasks:add", (1, 2), {})]))
        # the broker holds the task (queued: no worker) when it is told to stop
        wait_until(lambda: query_status(address, timeout=5)["queued"] == 1, 10,
                   message="task queued")
        code, seconds = stop_process(proc, timeout=10)
        assert code == 0
        assert seconds < 5
        conn.close()
    finally:
        stop_process(proc)
        proc.stdout.close()


def test_sigterm_stops_broker_with_worker_attached():
    with broker_process() as (proc, address):
        worker = start_worker(address, "--slots", "1")
        try:
            wait_until(lambda: query_status(address, timeout=5)["slots"] >= 1, 30)
            code, seconds = stop_process(proc, timeout=10)
            assert code == 0
            assert seconds < 5
        finally:
            # with its broker gone the worker would linger on unsent messages: kill it
            # and its slots by PID rather than wait for that
            kids = descendants(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)
            kill_tree(kids)


def test_sigint_stops_broker_cleanly():
    proc, address = start_broker()
    try:
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(10) == 0
        assert time.monotonic() - start < 5
    finally:
        stop_process(proc)
        proc.stdout.close()


def failed_broker(listen: str) -> tuple[subprocess.Popen, str, str]:
    """Start a broker expected to refuse ``listen``; return it with its stdout and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "zfalkon", "broker", "--listen", listen],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        stop_process(proc)
    assert proc.returncode != 0
    assert "listening on" not in out
    return proc, out, err


def test_second_broker_on_same_port_fails(served):
    _, _, err = failed_broker(served[1])
    assert "cannot listen" in err
    assert served[0].poll() is None


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "tcp://127.0.0.1:70000", "udp://x:1"])
def test_bad_listen_address_fails(listen):
    _, _, err = failed_broker(listen)
    assert listen in err


# -- a client over the raw protocol ------------------------------------------------------


def test_raw_client_round_trip(raw):
    welcome = raw.hello()
    assert welcome.protocol == PROTOCOL_VERSION and welcome.version == __version__
    assert welcome.key > 0 and welcome.heartbeat > 0
    base = welcome.key << P.ID_SHIFT
    ids = [base + 1, base + 2]
    blobs = [payload.python_task("tasks:add", (20, 22), {}), payload.shell_task("echo raw")]
    raw.send_msg(P.Submit(1, 0, ids, blobs))
    got = {}
    deadline = time.monotonic() + 30
    expected_seq = 1
    token = b""
    while len(got) < 2 and time.monotonic() < deadline:
        msg = next_message(raw, timeout=30)
        assert isinstance(msg, P.Deliver), msg
        assert msg.worker.startswith("broker-test-worker/")
        assert msg.seq == expected_seq and msg.ack == 1  # it has our SUBMIT, frame 1
        expected_seq += 1
        token = msg.token
        got.update(zip(msg.ids, msg.blobs))
    assert set(got) == set(ids)
    raw.send_msg(P.Ack(expected_seq - 1, token))  # we have every result: the broker forgets them
    assert payload.result_value(got[ids[0]]) == 42
    assert payload.result_value(got[ids[1]]).stdout == "raw\n"


def test_each_client_gets_its_own_key(served, ctx):
    conns = [Raw(ctx, served[1]) for _ in range(3)]
    try:
        keys = [c.hello().key for c in conns]
        assert len(set(keys)) == 3 and all(k > 0 for k in keys)
    finally:
        for c in conns:
            c.close()


def test_submit_outside_client_key_is_refused(served, raw):
    key = raw.hello().key
    raw.send_msg(P.Submit(1, 0, [((key + 1) << P.ID_SHIFT) + 1],
                          [payload.python_task("tasks:add", (1, 2), {})]))
    expect_error(raw, "malformed")
    # the refused frame still took its place in the stream: the next one is frame 2
    raw.send_msg(P.Submit(2, 0, [(key << P.ID_SHIFT) + 1, -1], [b"a", b"b"]))
    expect_error(raw, "malformed")
    assert_serving(served)


def test_empty_submit_is_ignored(served, raw):
    raw.hello()
    before = query_status(served[1])["submitted"]
    raw.send_msg(P.Submit(1, 0, [], []))
    # no ERROR and no DELIVER: only the ACK of the frame (sent on the broker's tick, once
    # a second), which also shows the broker has taken the frame before the count below
    acks = only_acks(raw, 1.5)
    assert acks and all(a.ack == 1 for a in acks), acks
    assert query_status(served[1])["submitted"] == before
    assert_serving(served)


# -- refusals ----------------------------------------------------------------------------


def test_wrong_protocol_version(served, raw):
    raw.send(msgpack.packb([P.TAGS[P.Hello], PROTOCOL_VERSION + 1, "9.9.9", "client",
                            {"name": "x"}]))
    err = raw.expect_error("version")
    assert f"protocol {PROTOCOL_VERSION + 1}" in err.message
    assert f"protocol {PROTOCOL_VERSION}" in err.message
    assert "9.9.9" in err.message and __version__ in err.message
    # the same connection can still say a correct HELLO afterwards
    raw.hello()
    assert_serving(served)


@pytest.mark.parametrize("frame", [
    b"\xc1",
    b"",
    b"not msgpack at all \xff\xfe",
    msgpack.packb({"tag": 1}),
    msgpack.packb([]),
    msgpack.packb(["x"]),
    msgpack.packb([P.TAGS[P.Results], 1, 0, "1", 0, [], []]),
    msgpack.packb([P.TAGS[P.Submit], 1, 0, [1, 2], [b"a"]]),
    msgpack.packb([P.TAGS[P.Submit], [1], [b"a"]]),
    msgpack.packb([P.TAGS[P.Hello], PROTOCOL_VERSION, __version__, "client"]),
    msgpack.packb([P.TAGS[P.Hello], PROTOCOL_VERSION, __version__, "client", {1: 2}]),
    msgpack.packb([P.TAGS[P.Bye], msgpack.ExtType(1, b"x")]),
], ids=["bad-byte", "empty", "garbage", "map", "empty-array", "str-tag", "wrong-type",
        "length-mismatch", "protocol-1-submit", "short-hello", "int-keys", "ext-type"])
def test_garbage_frames_before_hello(served, raw, frame):
    raw.send(frame)
    raw.expect_error("malformed")
    assert_serving(served)


def test_garbage_frames_after_hello_keep_the_session(served, raw):
    raw.hello()
    for frame in (b"\xc1", msgpack.packb([P.TAGS[P.Cancel], 1, 0, [True]]), b"x" * 1000):
        raw.send(frame)
        raw.expect_error("malformed")
    raw.send_msg(P.StatusRequest())
    assert isinstance(raw.recv(), P.Status)  # still registered as a client
    assert_serving(served)


def test_unknown_message_type(served, raw):
    raw.send(msgpack.packb([200, "x"]))
    err = raw.expect_error("unknown-type")
    assert "200" in err.message
    assert_serving(served)


@pytest.mark.parametrize("nframes", [2, 3])
def test_multi_frame_messages(served, raw, nframes):
    raw.send(*[P.encode(P.StatusRequest())] * nframes)
    err = raw.expect_error("malformed")
    assert str(nframes) in err.message
    assert_serving(served)


@pytest.mark.parametrize("msg", [
    P.StatusRequest(),
    P.Submit(1, 0, [1], [b"x"]),
    P.Cancel(1, 0, [1]),
    P.Heartbeat(),
    P.Results(1, 0, 5, 0, [], []),
    P.Ack(1),
    P.Resend(0),
    P.Ping(1.0),
    P.Bye("bye"),
], ids=lambda m: type(m).__name__)
def test_messages_before_hello(served, raw, msg):
    raw.send_msg(msg)
    err = raw.expect_error("hello-required")
    assert type(msg).__name__ in err.message
    assert_serving(served)


@pytest.mark.parametrize("msg", [
    P.Heartbeat(),
    P.SlotLost(b"slot", 0, "gone"),
    P.Results(1, 0, 10, 0, [], []),
    P.Results(1, 0, 5, 0, [1], [b"x"]),
    P.Welcome(PROTOCOL_VERSION, __version__, 1, 2.0),
    P.Tasks(1, 0, [1], [b"x"]),
    P.Deliver(1, 0, "w", [1], [b"x"], b"t" * 8),
    P.Status({}),
    P.Error("malformed", "x"),
    P.Pong(1.0),
    P.Drain("x"),
    P.Holding(["s3://b/k"]),
], ids=lambda m: type(m).__name__)
def test_client_sends_message_of_another_role(served, raw, msg):
    raw.hello()
    raw.send_msg(msg)
    err = raw.expect_error("not-allowed")
    assert type(msg).__name__ in err.message and "client" in err.message
    assert_serving(served)


def test_worker_cannot_submit(served, raw):
    raw.hello(P.ROLE_WORKER, {"worker_id": "raw-worker-1", "slots": 1, "name": "raw-worker-1"})
    raw.send_msg(P.Submit(1, 0, [1], [payload.python_task("tasks:add", (1, 2), {})]))
    err = raw.expect_error("not-allowed")
    assert "worker" in err.message
    raw.send_msg(P.Results(1, 0, 3, 0, [], []))  # a window is a slot's to announce
    raw.expect_error("not-allowed")
    raw.send_msg(P.Ack(1))  # a worker connection has no stream
    raw.expect_error("not-allowed")
    raw.send_msg(P.Bye("done"))
    assert_serving(served)


@pytest.mark.parametrize("role, info", [
    (P.ROLE_WORKER, {"slots": 1}),
    (P.ROLE_WORKER, {"worker_id": "w", "slots": "1"}),
    (P.ROLE_WORKER, {"worker_id": 5, "slots": 1}),
    (P.ROLE_SLOT, {"worker_id": "no-such-worker", "slot": 0}),
    (P.ROLE_SLOT, {"slot": 0}),
    ("overlord", {}),
], ids=["worker-no-id", "worker-str-slots", "worker-int-id", "slot-unknown-worker",
        "slot-no-worker", "unknown-role"])
def test_bad_hello(served, raw, role, info):
    raw.send_msg(P.hello(role, info))
    raw.expect_error("bad-hello")
    raw.send_msg(P.StatusRequest())
    raw.expect_error("hello-required")  # a refused HELLO registers nothing
    assert_serving(served)


@pytest.mark.parametrize("worker_id", [[1], {"a": 1}], ids=["list", "map"])
def test_slot_hello_with_unhashable_worker_id(ctx, worker_id):
    """A slot HELLO whose worker_id is a list or map must be refused, not crash the broker."""
    with broker_process() as (proc, address):
        conn = Raw(ctx, address)
        try:
            conn.send_msg(P.hello(P.ROLE_SLOT, {"worker_id": worker_id, "slot": 0}))
            conn.expect_error("bad-hello", timeout=2)
            assert proc.poll() is None, "the broker process died"
            conn.hello()
            conn.send_msg(P.StatusRequest())
            assert isinstance(conn.recv(), P.Status)
        finally:
            conn.close()


def test_flood_of_bad_frames_gets_a_bounded_number_of_errors(served, raw):
    for _ in range(500):
        raw.send(b"\xc1")
    errors = 0
    while raw.sock.poll(1000):  # read answers until they stop (bounded: the budget)
        raw.expect_error("malformed")
        errors += 1
        assert errors <= 300
    assert 0 < errors <= 300  # 100 a second per peer, not one per frame
    assert_serving(served)


# -- status ------------------------------------------------------------------------------


def test_status_answer(served, raw):
    raw.hello()
    raw.send_msg(P.StatusRequest())
    msg = raw.recv()
    assert isinstance(msg, P.Status)
    # Without a token (no answer read before): the counters only.
    assert msg.info["partial"] and msg.info["worker_list"] == [] and msg.token
    assert msg.info["workers_omitted"] == msg.info["workers"] == 1
    raw.send_msg(P.StatusRequest(b"not its token"))
    forged = raw.recv()
    assert isinstance(forged, P.Status) and forged.info["partial"]
    raw.send_msg(P.StatusRequest(forged.token))
    msg = raw.recv()
    assert isinstance(msg, P.Status)
    info = msg.info
    assert set(info) == STATUS_KEYS and not info["partial"]
    assert info["version"] == __version__ and info["protocol"] == PROTOCOL_VERSION
    assert info["workers"] == 1 and info["slots"] == 1
    # the asker is not counted: an observer's query (not a client either) sees as many
    assert info["clients"] == query_status(served[1])["clients"] - 1  # (it counts the asker)
    assert info["uptime"] >= 0
    for key in ("queued", "running", "submitted", "done", "failed"):
        assert type(info[key]) is int and info[key] >= 0
    assert isinstance(info["tasks_per_second"], float)
    (worker,) = info["worker_list"]
    assert set(worker) == WORKER_KEYS
    assert worker["name"] == "broker-test-worker"
    assert worker["slots"] == 1 and worker["connected_slots"] == 1
    assert worker["version"] == __version__
    assert worker["cpus"] >= 1 and worker["memory"] > 0
    assert worker["idle_seconds"] >= 0


def test_status_counts_work(served):
    address = served[1]
    before = query_status(address)
    with Executor(address) as ex:
        futures = [ex.submit(tasks.add, 1, 1) for _ in range(30)] + [ex.submit(tasks.boom)]
        for f in futures:
            f.exception(timeout=30)
    after = query_status(address)
    assert after["submitted"] - before["submitted"] == 31
    assert after["done"] - before["done"] == 31
    assert after["failed"] - before["failed"] == 1
    assert after["queued"] == 0 and after["running"] == 0
    assert after["worker_list"][0]["done"] - before["worker_list"][0]["done"] == 31


def test_raw_worker_registers_and_leaves(served, raw):
    address = served[1]
    raw.hello(P.ROLE_WORKER, {"worker_id": "raw-worker-2", "name": "raw-worker-2", "slots": 3,
                              "hostname": "h", "cpus": 1, "memory": 1, "tags": ["t"]})
    names = {w["name"]: w for w in query_status(address)["worker_list"]}
    assert names["raw-worker-2"]["slots"] == 3
    assert names["raw-worker-2"]["connected_slots"] == 0
    assert names["raw-worker-2"]["tags"] == ["t"]
    raw.send_msg(P.Heartbeat())
    assert raw.silent()
    raw.send_msg(P.Bye("leaving"))
    wait_until(lambda: "raw-worker-2" not in
               {w["name"] for w in query_status(address)["worker_list"]}, 5,
               message="raw worker dropped")
    assert_serving(served)


def test_queued_tasks_of_a_client_that_said_bye_are_dropped(ctx, tmp_path):
    """BYE from a client drops every task it still has queued: none of them may run."""
    marker = tmp_path / "ran.txt"
    with broker_process() as (_, address):  # no worker yet: everything stays queued
        conn = Raw(ctx, address)
        try:
            submit_markers(conn, marker)
            conn.send_msg(P.Bye("leaving"))
            wait_until(lambda: query_status(address)["clients"] == 0, 5,
                       message="client dropped")  # (the status query is not counted)
            # with no slot waiting for work, its queued tasks leave memory on the tick
            wait_until(lambda: query_status(address)["queued"] == 0, 5,
                       message="the departed client's queued tasks purged")
        finally:
            conn.close()
        with worker_process(address, "--slots", "1"):
            with Executor(address) as ex:
                # FIFO on one slot: when this result is back, anything dispatched before
                # it has run
                assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
    ran = marker.read_text().split() if marker.exists() else []
    assert ran == [], f"tasks {ran} of a departed client ran"


def test_cancelled_queued_tasks_do_not_run(ctx, tmp_path):
    marker = tmp_path / "ran.txt"
    with broker_process() as (_, address):
        conn = Raw(ctx, address)
        try:
            ids = submit_markers(conn, marker)
            conn.send_msg(P.Cancel(2, 0, ids[1:4]))  # frame 2 of the client's stream
            with worker_process(address, "--slots", "1"):
                got = deliveries(conn, 2)
                assert sorted(got) == [ids[0], ids[4]]
                only_acks(conn, 0.3)  # nothing more is delivered
        finally:
            conn.close()
    assert marker.read_text().split() == [str(ids[0]), str(ids[4])]
