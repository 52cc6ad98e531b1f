"""Shared fixtures and helpers for the zfalkon test suite.

Every process a test starts runs on 127.0.0.1 and is stopped by PID in a ``finally`` or a
fixture teardown. Task functions live in ``tests/tasks.py``: workers import them as
``tasks:NAME``, so this directory goes on ``sys.path`` here and on ``PYTHONPATH`` for the
worker processes.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import psutil
import pytest
import zmq

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from zfalkon import Executor, LocalCluster, query_status  # noqa: E402
from zfalkon import payload  # noqa: E402
from zfalkon import protocol as P  # noqa: E402

READY_PREFIX = "zfalkon broker listening on "

#: Most a broker's resident memory may grow under one hostile peer's attack
#: (docs/protocol.md, "Limits per peer").
RSS_BOUND = 50 * 2**20

#: ``tox -e long`` (ZFALKON_LONG=1) runs the tests marked ``long`` at the durations of
#: record: 30 s link freezes and hung tasks, attacks kept up for a minute. The default run
#: gives them shorter ones that still cross every threshold the test is about (the 6 s
#: lease and ZMTP heartbeat timeout, enough RESEND periods that an unbounded broker would
#: pass the bound).
LONG = os.environ.get("ZFALKON_LONG") == "1"


def seconds(long: float, short: float) -> float:
    """``long`` under ``tox -e long``, ``short`` in the default run."""
    return long if LONG else short


def worker_env() -> dict[str, str]:
    """Environment for worker processes: the tests directory first on PYTHONPATH."""
    existing = os.environ.get("PYTHONPATH", "")
    path = TESTS_DIR + (os.pathsep + existing if existing else "")
    return {"PYTHONPATH": path}


def child_env() -> dict[str, str]:
    """Full environment for a process started directly with subprocess."""
    return {**os.environ, **worker_env()}


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02,
               message: str = "condition") -> object:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> tuple[int, float]:
    """SIGTERM ``proc`` by PID, wait up to ``timeout``, SIGKILL if needed.

    Returns ``(returncode, seconds it took to exit after SIGTERM)``.
    """
    start = time.monotonic()
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode, time.monotonic() - start


def kill_tree(pids: list[int]) -> None:
    """SIGKILL any of these PIDs still alive (cleanup of last resort, by PID only)."""
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
        except psutil.NoSuchProcess:
            pass


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid``."""
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def outer_pid(who: tuple[int, int]) -> int:
    """The PID here of the process a task described with ``tasks.whoami()``: (its PID,
    its PID namespace). A task host in a sandbox (worker ``--sandbox``) has a PID namespace
    of its own, where it is PID 2: found by the namespace and /proc/PID/status's NSpid.
    0 if no such process is left."""
    pid, ns = who
    if os.stat("/proc/self/ns/pid").st_ino == ns:
        return pid
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{name}/ns/pid").st_ino != ns:
                continue
            with open(f"/proc/{name}/status") as f:
                nspid = next(line for line in f if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if int(nspid.split()[-1]) == pid:
            return int(name)
    return 0


def written_pid(path, timeout: float = 20.0) -> int:
    """The PID here of the process that wrote "PID PIDNS" in ``path`` (``tasks.whoami()``,
    or ``$! $(stat -Lc %i /proc/self/ns/pid)`` in a shell task), once it has."""
    def written() -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    text = wait_until(written, timeout, message=f"a PID written in {path}")
    pid, ns = map(int, str(text).split())
    return outer_pid((pid, ns))


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_ready_line(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    """Read the broker's ready line from its stdout; return the address it names."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX):].strip()
            if not line:
                break
        if proc.poll() is not None:
            break
    raise AssertionError(f"broker printed no ready line (exit status {proc.poll()})")


def start_broker(listen: str = "tcp://127.0.0.1:0",
                 *extra: str) -> tuple[subprocess.Popen, str]:
    """Start ``python -m zfalkon broker [EXTRA...]``; return the process and its address."""
    proc = subprocess.Popen([sys.executable, "-m", "zfalkon", "broker", "--listen", listen,
                             *extra], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        return proc, read_ready_line(proc)
    except BaseException:
        stop_process(proc)
        proc.stdout.close()
        raise


@contextlib.contextmanager
def broker_process(*extra: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A broker process for the duration of the block, stopped by PID afterwards."""
    proc, address = start_broker("tcp://127.0.0.1:0", *extra)
    try:
        yield proc, address
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def start_worker(address: str, *extra: str, stderr=None) -> subprocess.Popen:
    """Start ``python -m zfalkon worker --broker ADDRESS``."""
    return subprocess.Popen([sys.executable, "-m", "zfalkon", "worker", "--broker", address,
                             *extra], env=child_env(), stderr=stderr, text=True)


@contextlib.contextmanager
def worker_process(address: str, *extra: str, stderr=None) -> Iterator[subprocess.Popen]:
    """A worker agent for the duration of the block; it and its slots stopped by PID."""
    proc = start_worker(address, *extra, stderr=stderr)
    try:
        yield proc
    finally:
        kids = descendants(proc.pid)
        stop_process(proc)
        kill_tree(kids)


@contextlib.contextmanager
def served_broker(*extra: str, slots: int = 1, name: str | None = None
                  ) -> Iterator[tuple[subprocess.Popen, str, subprocess.Popen]]:
    """A broker process (``EXTRA`` arguments) with one worker of ``slots`` slots (named
    ``name``) registered: yields (broker process, address, worker process)."""
    named = ("--name", name) if name else ()
    with broker_process(*extra) as (proc, address):
        with worker_process(address, "--slots", str(slots), *named) as worker:
            wait_until(lambda: query_status(address, timeout=5)["slots"] >= slots, 30,
                       message="worker slots registered")
            yield proc, address, worker


def marker_lines(path) -> list[str]:
    """The lines tasks appended to the file ``path`` (none if no task wrote it)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def status_brief(status: Callable[[], dict]) -> dict | str:
    """The counters of ``status()`` for a failure message, or the error asking raised."""
    try:
        s = status()
        return {k: s[k] for k in ("submitted", "done", "failed", "queued", "running",
                                  "slots", "workers")}
    except Exception as exc:  # noqa: BLE001
        return repr(exc)


class Raw:
    """A raw DEALER connection to the broker."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def send_msg(self, msg) -> None:
        self.send(P.encode(msg))

    def recv(self, timeout: float = 5.0):
        assert self.sock.poll(timeout * 1000), "no answer from the broker"
        frames = self.sock.recv_multipart()
        assert len(frames) == 1
        return P.decode(frames[0])

    def expect_error(self, code: str, timeout: float = 5.0) -> P.Error:
        msg = self.recv(timeout)
        assert isinstance(msg, P.Error), msg
        assert msg.code == code, msg
        assert msg.message
        return msg

    def silent(self, timeout: float = 0.3) -> bool:
        return not self.sock.poll(timeout * 1000)

    def hello(self, role: str = P.ROLE_CLIENT, info: dict | None = None) -> P.Welcome:
        self.send_msg(P.hello(role, info if info is not None else {"name": "raw"}))
        msg = self.recv()
        assert isinstance(msg, P.Welcome), msg
        return msg

    def sync(self, timeout: float = 30.0) -> list:
        """PING the broker and read until its PONG: the broker has then handled every frame
        this connection sent before the PING (it handles one connection's frames in order).
        Returns the other messages read meanwhile. For a registered peer."""
        mark = time.monotonic()
        self.send_msg(P.Ping(mark))
        others = []
        deadline = mark + timeout
        for _ in range(100_000):
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(left * 1000), f"no PONG within {timeout} s"
            msg = P.decode(self.sock.recv())
            if isinstance(msg, P.Pong) and msg.sent == mark:
                return others
            others.append(msg)
        raise AssertionError("no PONG among 100,000 messages")

    def stop_reading(self) -> "Raw":
        """Read nothing more than ZeroMQ and the kernel must (a peer that does not read)."""
        self.sock.setsockopt(zmq.RCVHWM, 1)
        self.sock.setsockopt(zmq.RCVBUF, 4096)
        return self

    def close(self) -> None:
        self.sock.close(0)


def submit_markers(conn: Raw, marker, n: int = 5) -> list[int]:
    """Register ``conn`` as a client and queue ``n`` shell tasks that each append their
    id to the file ``marker``; return the ids. The SUBMIT is frame 1 of the client's
    stream (acknowledging no DELIVER): the caller's next stream frame is number 2."""
    base = conn.hello().key << P.ID_SHIFT
    ids = [base + i for i in range(1, n + 1)]
    conn.send_msg(P.Submit(1, 0, ids,
                           [payload.shell_task(f"echo {i} >> {marker}") for i in ids]))
    return ids


class FakeBroker:
    """A raw ROUTER on 127.0.0.1 that answers every HELLO with a fixed message."""

    def __init__(self, answer: P.Message) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.answer = answer
        self.hellos: list[P.Hello] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            ident, frame = self.sock.recv_multipart()
            try:
                msg = P.decode(frame)
            except P.ProtocolError:
                continue
            if isinstance(msg, P.Hello):
                self.hellos.append(msg)
                self.sock.send_multipart([ident, P.encode(self.answer)])

    def __enter__(self) -> "FakeBroker":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """One LocalCluster (2 workers x 1 slot) shared by the whole session."""
    with LocalCluster(workers=2, slots_per_worker=1, env=worker_env()) as c:
        yield c


@pytest.fixture
def executor(cluster: LocalCluster) -> Iterator[Executor]:
    """A fresh Executor on the shared cluster; pending tasks are cancelled afterwards."""
    ex = Executor(cluster.address, connect_timeout=10)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)  # a second shutdown is harmless


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    """A ZeroMQ context for raw sockets, destroyed (linger 0) after the test."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def rss(proc) -> int:
    """A process's resident memory in bytes."""
    return psutil.Process(proc.pid).memory_info().rss


def steady_rss(proc, timeout: float = 15.0, interval: float = 0.2,
               tolerance: int = 2**20) -> int:
    """Wait until ``proc``'s resident memory holds still: two readings ``interval`` s
    apart within ``tolerance`` bytes (e.g. a baseline once ZeroMQ's io thread is done
    copying frames, which no status shows); return the last reading."""
    readings: list[int] = []

    def steady() -> bool:
        readings.append(rss(proc))
        return len(readings) > 1 and abs(readings[-1] - readings[-2]) <= tolerance

    wait_until(steady, timeout, interval, message="a steady RSS")
    return readings[-1]


def cpu_seconds(proc) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    times = psutil.Process(proc.pid).cpu_times()
    return times.user + times.system


def assert_serving(address: str, n: int = 20) -> None:
    """A real client gets ``n`` correct results through the broker at ``address``."""
    import tasks

    with Executor(address, connect_timeout=10) as ex:
        futures = [ex.submit(tasks.add, i, 1) for i in range(n)]
        assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(n)]


def worker_hello(info: dict) -> bytes:
    """A worker HELLO frame with ``info`` as given (unchecked: for hostile peers)."""
    import msgpack

    from zfalkon.constants import PROTOCOL_VERSION

    return msgpack.packb([P.TAGS[P.Hello], PROTOCOL_VERSION, "0", P.ROLE_WORKER, info])
