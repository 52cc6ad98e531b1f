"""zfalkon.swarm: simulated workers on real connections, against a real or a raw broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import psutil
import pytest
import zmq

from conftest import (
    alive,
    broker_process,
    child_env,
    free_port,
    kill_tree,
    stop_process,
    wait_until,
)
from zfalkon import Executor, TaskError, query_status
from zfalkon import payload
from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import PROTOCOL_VERSION
from zfalkon.swarm import Swarm, SwarmError, simulate


@pytest.fixture(scope="module")
def broker():
    """A broker process for this module: yields its address."""
    with broker_process() as (_, address):
        yield address


def swarm_workers(address: str, swarm: Swarm) -> list[dict]:
    """The broker's worker entries that belong to ``swarm``."""
    return [w for w in query_status(address)["worker_list"]
            if w["name"].startswith(swarm.prefix + "-")]


def assert_stopped(address: str, swarm: Swarm, pids: list[int]) -> None:
    """Every swarm process is gone and the broker lists none of its workers."""
    assert pids and not any(alive(pid) for pid in pids)
    assert not any(psutil.pid_exists(pid) for pid in pids)  # reaped, not zombies
    wait_until(lambda: not swarm_workers(address, swarm), 10, 0.05,
               "the broker has forgotten the swarm")


# -- simulated execution --------------------------------------------------------------

def test_simulate():
    py = payload.python_task
    assert simulate(py("builtins:abs", [-7], {})) == (msgpack.packb([0, 7]), 0.0, False)
    assert simulate(py("time:sleep", [0.25], {})) == (msgpack.packb([0, None]), 0.25, False)
    assert simulate(py("tasks:square", [3], {})) == (msgpack.packb([0, None]), 0.0, False)
    shell = simulate(payload.shell_task("exit 3"))
    assert shell == (msgpack.packb([2, 0, b"", b"", 0.0, False]), 0.0, False)
    for bad in (py("builtins:abs", ["x"], {}), py("time:sleep", [-1], {}),
                py("time:sleep", [], {}), b"\xc1", msgpack.packb([7])):
        result, seconds, failed = simulate(bad)
        assert failed and seconds == 0.0 and msgpack.unpackb(result)[0] == 1
    with pytest.raises(TaskError, match="TypeError"):
        payload.result_value(simulate(py("builtins:abs", ["x"], {}))[0])


# -- against a raw ROUTER: the exact messages -----------------------------------------

def _recv(sock: zmq.Socket, timeout: float = 10.0) -> tuple[bytes, P.Message]:
    assert sock.poll(timeout * 1000), "no message from the swarm process"
    ident, frame = sock.recv_multipart()
    return ident, P.decode(frame)


class RouterStreams:
    """The broker's side of each slot's two streams, for a raw ROUTER: TASKS numbered
    1, 2, ... per slot, RESULTS checked to arrive in order, each once."""

    def __init__(self, router: zmq.Socket) -> None:
        self.router = router
        self.sent: dict[bytes, int] = {}  # last TASKS seq sent to each slot
        self.got: dict[bytes, int] = {}  # last RESULTS seq received from each slot

    def tasks(self, ident: bytes, ids: list[int], blobs: list[bytes],
              revoke: list[int] | None = None) -> None:
        seq = self.sent[ident] = self.sent.get(ident, 0) + 1
        self.router.send_multipart([ident, P.encode(
            P.Tasks(seq, self.got.get(ident, 0), ids, blobs, revoke or []))])

    def results(self, ident: bytes, msg: P.Results) -> None:
        assert msg.seq == self.got.get(ident, 0) + 1, (msg.seq, self.got.get(ident))
        assert msg.ack == self.sent.get(ident, 0)  # it has every TASKS frame sent so far
        self.got[ident] = msg.seq

    def pong(self, ident: bytes, ping: P.Ping) -> None:
        assert ping.ack <= self.sent.get(ident, 0)  # (TASKS may be on their way)
        self.router.send_multipart([ident, P.encode(
            P.Pong(ping.sent, self.got.get(ident, 0), self.sent.get(ident, 0)))])


def test_wire_protocol_against_a_raw_router():
    """One simulated worker with 2 slots: HELLOs, the window announced on RESULTS, PINGs,
    numbered TASKS and RESULTS, revoked tasks, timers, heartbeats naming busy slots, BYEs."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    address = router.getsockopt_string(zmq.LAST_ENDPOINT)
    config = {"broker": address, "prefix": "raw", "first": 0, "count": 1,
              "slots_per_worker": 2, "window": 5, "heartbeat": True, "parent": os.getpid()}
    proc = subprocess.Popen([sys.executable, "-m", "zfalkon.swarm", json.dumps(config)],
                            env=child_env())
    welcome = P.encode(P.Welcome(PROTOCOL_VERSION, __version__, 0, 0.2))
    streams = RouterStreams(router)
    try:
        worker_ident, hello = _recv(router)
        assert isinstance(hello, P.Hello) and hello.role == P.ROLE_WORKER
        assert hello.protocol == PROTOCOL_VERSION and hello.version == __version__
        info = hello.info
        assert set(info) == {"worker_id", "name", "hostname", "slots", "cpus", "memory",
                             "tags", "pid"}
        assert info["name"] == "raw-0" and info["slots"] == 2 and info["tags"] == ["swarm"]
        assert info["pid"] == proc.pid and len(info["worker_id"]) == 32
        router.send_multipart([worker_ident, welcome])

        slots: dict[int, bytes] = {}
        windows = 0
        pinged: set[bytes] = set()
        while len(slots) < 2 or windows < 2 or len(pinged) < 2:
            ident, msg = _recv(router)
            if isinstance(msg, P.Hello):
                assert msg.role == P.ROLE_SLOT
                assert msg.info == {"worker_id": info["worker_id"], "slot": msg.info["slot"]}
                slots[msg.info["slot"]] = ident
                router.send_multipart([ident, welcome])
            elif isinstance(msg, P.Results):
                # after WELCOME: a RESULTS with no ids announces the window (no CREDIT)
                assert ident in slots.values()
                assert msg.window == 5 and msg.ids == [] and msg.failed == 0
                assert (msg.seq, msg.ack) == (1, 0)
                streams.results(ident, msg)
                windows += 1
            elif isinstance(msg, P.Ping):
                assert ident in slots.values() and msg.ack == 0
                streams.pong(ident, msg)
                pinged.add(ident)
            else:
                assert isinstance(msg, P.Heartbeat) and ident == worker_ident
                assert msg.busy == []  # no slot runs a task yet
        assert sorted(slots) == [0, 1]

        beats: list[tuple[float, list[bytes]]] = []

        def results(ident_wanted: bytes) -> P.Results:
            while True:
                ident, msg = _recv(router)
                if isinstance(msg, P.Heartbeat):
                    assert ident == worker_ident
                    beats.append((time.monotonic(), msg.busy))
                    continue
                if isinstance(msg, P.Ping):
                    streams.pong(ident, msg)
                    continue
                assert ident == ident_wanted and isinstance(msg, P.Results), msg
                streams.results(ident, msg)
                return msg

        # Immediate tasks come back in one batch, with the window.
        blobs = [payload.python_task("builtins:abs", [-i], {}) for i in range(3)]
        streams.tasks(slots[0], [11, 12, 13], blobs)
        msg = results(slots[0])
        assert msg.ids == [11, 12, 13] and msg.window == 5 and msg.failed == 0
        assert (msg.seq, msg.ack) == (2, 1)
        assert [payload.result_value(b) for b in msg.blobs] == [0, 1, 2]

        # A sleeping task holds its slot: the task behind it waits for the timer.
        sleep = payload.python_task("time:sleep", [0.5], {})
        shell = payload.shell_task("true")
        start = time.monotonic()
        streams.tasks(slots[1], [21, 22], [sleep, shell])
        got: dict[int, bytes] = {}
        while len(got) < 2:
            msg = results(slots[1])
            assert time.monotonic() - start >= 0.5
            assert msg.window == 5 and msg.failed == 0
            got.update(zip(msg.ids, msg.blobs))
        assert list(got) == [21, 22]
        assert payload.result_value(got[21]) is None
        assert payload.result_value(got[22]).returncode == 0
        # The WELCOME said heartbeat 0.2 s: the worker connection beat meanwhile, naming
        # the slot that ran the sleeping task as busy.
        assert len(beats) >= 2
        assert any(busy == [slots[1]] for _, busy in beats), beats

        # A failing task is counted in ``failed``.
        streams.tasks(slots[0], [31], [payload.python_task("builtins:abs", ["x"], {})])
        msg = results(slots[0])
        assert msg.ids == [31] and msg.failed == 1 and msg.window == 5

        # A revoked task that has not started is dropped: only the running one returns.
        streams.tasks(slots[1], [51, 52], [payload.python_task("time:sleep", [0.3], {}),
                                           shell])
        streams.tasks(slots[1], [], [], revoke=[52])
        msg = results(slots[1])
        assert msg.ids == [51] and msg.window == 5
        deadline = time.monotonic() + 0.5  # and nothing else comes back for the slot
        while router.poll(max(0.0, deadline - time.monotonic()) * 1000):
            ident, other = _recv(router)
            if isinstance(other, P.Ping):
                streams.pong(ident, other)
            else:
                assert isinstance(other, P.Heartbeat), other

        # SIGTERM: each slot says BYE, the process asks STATUS until its slots are gone,
        # then the worker says BYE and the process exits.
        streams.tasks(slots[1], [41], [sleep])
        while True:  # until a heartbeat names the slot busy: the sleeping task has started
            ident, msg = _recv(router)
            if isinstance(msg, P.Ping):
                streams.pong(ident, msg)
                continue
            assert isinstance(msg, P.Heartbeat) and ident == worker_ident, msg
            if msg.busy == [slots[1]]:
                break
        os.kill(proc.pid, signal.SIGTERM)
        byes: set[bytes] = set()
        status_requests = 0
        while True:
            ident, msg = _recv(router)
            if isinstance(msg, P.Bye) and ident == worker_ident:
                break
            if isinstance(msg, P.Bye):
                byes.add(ident)
            elif isinstance(msg, P.StatusRequest):
                assert ident == worker_ident
                status_requests += 1
                listed = {"name": "raw-0", "connected_slots": 2 - len(byes)}
                router.send_multipart([ident, P.encode(P.Status({"worker_list": [listed]}))])
            elif isinstance(msg, P.Ping):
                streams.pong(ident, msg)
            else:
                # the sleeping task is abandoned, not returned
                assert isinstance(msg, P.Heartbeat), msg
        # The worker's BYE came only once its slots had said BYE and STATUS showed them gone.
        assert byes == set(slots.values()) and status_requests >= 1
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
        router.close()
        ctx.term()


# -- against a real broker ------------------------------------------------------------

def test_register_run_and_stop(broker):
    swarm = Swarm(broker, workers=50, slots_per_worker=2)
    pids: list[int] = []
    try:
        status = swarm.start(timeout=30)
        pids = swarm.pids
        assert len(pids) == 1 and all(alive(pid) for pid in pids)
        mine = swarm_workers(broker, swarm)
        assert len(mine) == 50 and sum(w["connected_slots"] for w in mine) == 100
        assert status["slots"] >= 100
        # (entries past STATUS_MAX_WORKERS are short: no tags)
        assert all(w.get("tags", ["swarm"]) == ["swarm"] and w["slots"] == 2 for w in mine)

        with Executor(broker) as ex:
            values = list(range(-10000, 10000))
            assert list(ex.map(abs, values)) == [abs(v) for v in values]

            start = time.monotonic()
            assert list(ex.map(time.sleep, [0.2] * 200)) == [None] * 200
            elapsed = time.monotonic() - start
            # 200 tasks of 0.2 s on 100 slots, one task at a time per slot: 0.4 s ideal.
            assert 0.4 <= elapsed < 5.0, elapsed

            assert ex.shell("exit 7").result(10).returncode == 0
            assert ex.submit(os.getpid).result(10) is None  # unknown callables: None
            with pytest.raises(TaskError, match="TypeError"):
                ex.submit(abs, "x").result(10)

        mine = swarm_workers(broker, swarm)
        assert sum(w["done"] for w in mine) == 20000 + 200 + 3

        start = time.monotonic()
        swarm.stop()
        assert time.monotonic() - start < 10
        assert swarm.pids == []
        assert_stopped(broker, swarm, pids)
        swarm.stop()  # stopping again is harmless
    finally:
        swarm.stop()
        kill_tree(pids)


def test_thousand_workers(broker):
    """1,000 workers x 1 slot over 2 processes: 2,000 connections register and work."""
    swarm = Swarm(broker, workers=1000, slots_per_worker=1, processes=2, window=16)
    pids: list[int] = []
    try:
        start = time.monotonic()
        swarm.start(timeout=45)
        took = time.monotonic() - start
        pids = swarm.pids
        assert len(pids) == 2
        assert took < 30, f"2,000 connections took {took:.1f} s to register"
        mine = swarm_workers(broker, swarm)
        assert len(mine) == 1000 and sum(w["connected_slots"] for w in mine) == 1000
        assert len({w["name"] for w in mine}) == 1000
        with Executor(broker) as ex:
            assert list(ex.map(abs, range(-5000, 0))) == list(range(5000, 0, -1))
        swarm.stop()
        assert_stopped(broker, swarm, pids)
    finally:
        swarm.stop()
        kill_tree(pids)


def test_swarm_processes_exit_when_their_parent_dies(broker):
    script = textwrap.dedent("""
        import sys, time
        from zfalkon.swarm import Swarm
        swarm = Swarm(sys.argv[1], workers=4, slots_per_worker=2, processes=2)
        swarm.start(timeout=30)
        print(swarm.prefix, *swarm.pids, flush=True)
        time.sleep(60)  # (the parent idles until the test SIGKILLs it)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script, broker], stdout=subprocess.PIPE,
                              text=True, env=child_env())
    pids: list[int] = []
    try:
        line = parent.stdout.readline().split()
        assert len(line) == 3, "the parent did not start its swarm"
        prefix, pids = line[0], [int(p) for p in line[1:]]
        names = lambda: [w for w in query_status(broker)["worker_list"]  # noqa: E731
                         if w["name"].startswith(prefix + "-")]
        assert len(names()) == 4
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        wait_until(lambda: not any(alive(pid) for pid in pids), 10, 0.05,
                   "the orphaned swarm processes exit")
        wait_until(lambda: not names(), 10, 0.05, "their workers leave the broker")
    finally:
        stop_process(parent)
        parent.stdout.close()
        kill_tree(pids)


def test_start_without_a_broker_fails_clearly():
    swarm = Swarm(f"tcp://127.0.0.1:{free_port()}", workers=3)
    start = time.monotonic()
    with pytest.raises(SwarmError, match="did not register"):
        swarm.start(timeout=2)
    assert time.monotonic() - start < 10
    assert swarm.pids == []


def test_refused_registration_fails_clearly():
    """A broker that refuses the simulated workers: start() says the processes exited."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    address = router.getsockopt_string(zmq.LAST_ENDPOINT)
    stop = threading.Event()

    def serve() -> None:  # welcome clients (status queries), refuse everyone else
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            if not router.poll(50):
                continue
            ident, frame = router.recv_multipart()
            msg = P.decode(frame)
            if isinstance(msg, P.Hello) and msg.role == P.ROLE_CLIENT:
                answer: P.Message = P.Welcome(PROTOCOL_VERSION, __version__, 1, 2.0)
            elif isinstance(msg, P.Hello):
                answer = P.Error("bad-hello", "this broker refuses everyone")
            elif isinstance(msg, P.StatusRequest):
                answer = P.Status({"worker_list": []})
            else:
                continue
            router.send_multipart([ident, P.encode(answer)])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    swarm = Swarm(address, workers=2)
    try:
        with pytest.raises(SwarmError, match=r"exited during startup.*, 3\)"):
            swarm.start(timeout=20)
        assert swarm.pids == []
    finally:
        swarm.stop()
        stop.set()
        thread.join(5)
        router.close()
        ctx.term()
