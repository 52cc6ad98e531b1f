"""A swarm of simulated workers, to measure the broker with thousands of connected slots.

A *simulated worker* registers exactly as a real worker agent does (one ``worker`` HELLO
with ``worker_id``, name, hostname, slots, cpus, memory, tags ``["swarm"]`` and pid), then
opens one ``slot`` connection per slot that asks for work with CREDIT and returns RESULTS
batches with piggy-backed credit. Every connection is a real ZeroMQ DEALER speaking the
real wire protocol (:mod:`zfalkon.protocol`); only task *execution* is simulated, so one
process carries thousands of slots:

* ``time:sleep`` completes after that many seconds, on a timer (the slot is busy meanwhile:
  a slot runs one task at a time, like a real one);
* ``builtins:abs`` completes at once with the absolute value; any other Python callable
  completes at once with ``None``;
* a shell task completes at once with return code 0 and no output.

Each slot keeps a fixed credit window (``window`` tasks requested and not yet finished).

One event loop per process: an epoll selector over the ZeroMQ sockets' ``ZMQ_FD``\\ s
(edge-style notification: a socket is drained whenever its FD wakes the loop, and
re-checked after every send, since a send can consume the wake-up), a wake-up pipe for
signals, and a timer heap; the loop sleeps until the next timer. Connection setup is
staggered: each process keeps at most ``max_pending`` handshakes (HELLO sent, WELCOME not
yet received) in flight, and a worker's slots connect only after its WELCOME.

:class:`Swarm` starts the processes (``python -m zfalkon.swarm CONFIG_JSON``) and stops
them by PID. SIGTERM makes a process return finished results, say BYE on every slot
connection, wait (bounded) until the broker has dropped those slots, then say BYE on
every worker connection and exit. A task still "sleeping" is handed back (the broker
requeues it). A swarm process also exits when its parent dies (``PR_SET_PDEATHSIG`` and a
``getppid()`` check every second).

Example::

    with LocalCluster(workers=0) as cluster, Swarm(cluster.address, workers=1000) as swarm:
        with Executor(cluster.address) as ex:
            list(ex.map(abs, range(100_000)))
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import math
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, cast

import msgpack
import psutil
import zmq

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon.client import query_status
from zfalkon.constants import (
    HEARTBEAT_SECONDS,
    STOP_GRACE_SECONDS,
)
from zfalkon.errors import BrokerUnavailable, ConfigError, ProtocolError, ZfalkonError
from zfalkon.net import Waker, broker_endpoint, make_socket, readable
from zfalkon.slot import _die_with_parent
from zfalkon.slotcore import SlotSession

log = logging.getLogger("zfalkon.swarm")

#: A process simulates at most about this many connections (worker + slot sockets).
CONNECTIONS_PER_PROCESS = 2500
#: Tags every simulated worker registers with.
SWARM_TAGS = ["swarm"]
#: File descriptors a connection costs a swarm process: the TCP socket and the ZeroMQ
#: socket's mailbox (an eventfd).
FDS_PER_CONNECTION = 2
_FD_RESERVE = 128  # stdio, the ZeroMQ context, the selector, the wake-up pipe, slack

_NOBLOCK = int(zmq.NOBLOCK)
_LINGER_MS = 5000  # a closing socket keeps trying to deliver its BYE this long
_PPID_CHECK_SECONDS = 1.0
_HEARTBEAT_SLICES = 10  # heartbeats go out in this many slices per period, spread in time
_BYE_WAIT_SECONDS = 3.0  # most a stopping process waits for the broker to drop its slots
_STATUS_POLL_SECONDS = 0.25
_MAX_LOGGED_ERRORS = 5

_packb = msgpack.packb
_unpack = payload.unpack
_NONE_RESULT = _packb((payload.RESULT_VALUE, None))
_SHELL_RESULT = _packb((payload.RESULT_SHELL, 0, b"", b"", 0.0, False))


class SwarmError(ZfalkonError, RuntimeError):
    """The swarm could not start (processes died, or slots did not register in time)."""


# -- simulated execution --------------------------------------------------------------

def simulate(blob: bytes) -> tuple[bytes, float, bool]:
    """Simulate one task: ``(result blob, seconds it takes, failed)``; never raises.

    ``time:sleep`` takes its argument's seconds (returning ``None``), ``builtins:abs``
    returns the absolute value, any other callable ``None``, a shell task return code 0.
    """
    try:
        task = _unpack(blob)
        kind = task[0]
        if kind == payload.TASK_PYTHON:
            ref = task[1]
            if ref == "builtins:abs":
                return _packb((payload.RESULT_VALUE, abs(*task[2]))), 0.0, False
            if ref == "time:sleep":
                (seconds,) = task[2]
                if type(seconds) not in (int, float):
                    raise TypeError(f"'{type(seconds).__name__}' object cannot be interpreted "
                                    "as an integer or float")
                if seconds < 0:
                    raise ValueError("sleep length must be non-negative")
                return _NONE_RESULT, float(seconds), False
            return _NONE_RESULT, 0.0, False
        if kind == payload.TASK_SHELL:
            return _SHELL_RESULT, 0.0, False
        return payload.error_result("ProtocolError", f"unknown task kind {kind!r}"), 0.0, True
    except Exception as exc:  # the task's own failure (bad arguments, malformed blob)
        return payload.error_result(type(exc).__qualname__, str(exc)), 0.0, True


# -- one swarm process ----------------------------------------------------------------

class _Peer:
    """One DEALER connection of a swarm process."""

    __slots__ = ("engine", "ident", "sock", "welcomed")
    role = ""

    def __init__(self, engine: "_Engine") -> None:
        self.engine = engine
        self.ident = uuid.uuid4().bytes
        self.sock: zmq.Socket | None = None
        self.welcomed = False

    def hello_info(self) -> dict:
        raise NotImplementedError

    def send(self, msg: P.Message, flags: int = 0) -> None:
        sock = self.sock
        assert sock is not None
        sock.send(P.encode(msg), flags)
        if readable(sock):  # a send may have consumed the FD's wake-up
            self.engine.recheck(self)

    def service(self) -> None:
        """Take every message waiting on the socket."""
        sock = self.sock
        if sock is None:
            return
        while readable(sock):
            try:
                frame = sock.recv(_NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = P.decode(frame)
            except ProtocolError as exc:
                self.engine.error(f"bad message from broker: {exc}")
                continue
            self.on_message(msg)

    def on_message(self, msg: Any) -> None:
        if isinstance(msg, P.Welcome):
            if not self.welcomed:
                self.welcomed = True
                self.engine.welcomed(self, msg)
        elif isinstance(msg, P.Error):
            self.engine.refused(self, msg)
        # PONG, STATUS (answered during shutdown) and anything newer: nothing to do here


class _SimWorker(_Peer):
    """The simulated worker agent's registration connection."""

    __slots__ = ("worker_id", "name", "slots", "registered_slots")
    role = P.ROLE_WORKER

    def __init__(self, engine: "_Engine", name: str, nslots: int) -> None:
        super().__init__(engine)
        self.worker_id = uuid.uuid4().hex
        self.name = name
        self.slots = [_SimSlot(engine, self, i) for i in range(nslots)]

    def hello_info(self) -> dict:
        engine = self.engine
        return {
            "worker_id": self.worker_id, "name": self.name, "hostname": engine.hostname,
            "slots": len(self.slots), "cpus": engine.cpus, "memory": engine.memory,
            "tags": list(SWARM_TAGS), "pid": engine.pid,
        }


class _SimSlot(_Peer):
    """One simulated slot: a real :class:`SlotSession`, tasks simulated by timers."""

    __slots__ = ("worker", "index", "session", "busy")
    role = P.ROLE_SLOT

    def __init__(self, engine: "_Engine", worker: _SimWorker, index: int) -> None:
        super().__init__(engine)
        self.worker = worker
        self.index = index
        self.session = SlotSession()
        self.session.fixed_window = engine.window  # 0: adaptive, as a real slot
        self.busy: tuple[int, bytes, bool, float] | None = None  # the task on a timer

    def hello_info(self) -> dict:
        return {"worker_id": self.worker.worker_id, "slot": self.index}

    def on_message(self, msg: Any) -> None:
        if not self.session.receive(msg, time.monotonic()):
            super().on_message(msg)

    def service(self) -> None:
        super().service()
        if self.welcomed:
            self.run()

    def run(self) -> None:
        """Run queued tasks until the queue is empty or one sleeps; send what is due."""
        session = self.session
        now = time.monotonic()
        while self.busy is None:
            task = session.next_task(now)
            if task is None:
                break
            tid, blob = task
            result, seconds, failed = simulate(blob)
            if seconds > 0:
                self.busy = (tid, result, failed, seconds)
                self.engine.call_later(seconds, self.finish_busy)
                break
            session.finished(tid, result, failed, 0.0, now)
        session.poll(now)
        self.send_out()

    def send_out(self) -> None:
        out = self.session.out
        if out and self.sock is not None:
            self.session.out = []
            for msg in out:
                self.send(msg)

    def finish_busy(self) -> None:
        if self.busy is None or self.sock is None or self.engine.stopping:
            return
        tid, result, failed, seconds = self.busy
        self.busy = None
        self.session.finished(tid, result, failed, seconds, time.monotonic())
        self.run()


class _Engine:
    """The event loop of one swarm process and every connection it simulates."""

    def __init__(self, config: dict) -> None:
        self.broker = broker_endpoint(config["broker"])
        self.window = int(config.get("window", 2))
        self.max_pending = int(config.get("max_pending", 64))
        self.heartbeat_on = bool(config.get("heartbeat", True))
        self.parent = int(config.get("parent", os.getppid()))
        self.hostname = socket.gethostname()
        self.cpus = os.cpu_count() or 1
        self.memory = psutil.virtual_memory().total
        self.pid = os.getpid()
        prefix, first, count = config["prefix"], int(config["first"]), int(config["count"])
        spw = int(config["slots_per_worker"])
        self.workers = [_SimWorker(self, f"{prefix}-{i}", spw) for i in range(first, first + count)]
        self.names = {w.name for w in self.workers}
        self.connections = count * (1 + spw)
        self.stopping = False
        self.exit_code = 0
        self.heartbeat = HEARTBEAT_SECONDS
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._pending: dict[_Peer, None] = {}  # peers to service without waiting
        self._to_connect: collections.deque[_Peer] = collections.deque(self.workers)
        self._slots_to_connect: collections.deque[_Peer] = collections.deque()
        self._handshaking = 0
        self._errors = 0
        self._beat_slice = 0
        self._waker = Waker()

    # -- plumbing used by the peers ----------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """Signal handler: say BYE everywhere and exit."""
        self.stopping = True
        self._waker.wake()

    def call_later(self, seconds: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._seq), fn))

    def recheck(self, peer: _Peer) -> None:
        self._pending[peer] = None

    def error(self, text: str) -> None:
        self._errors += 1
        if self._errors <= _MAX_LOGGED_ERRORS:
            log.error("%s%s", text, " (further errors not logged)"
                      if self._errors == _MAX_LOGGED_ERRORS else "")

    def welcomed(self, peer: _Peer, msg: P.Welcome) -> None:
        self._handshaking -= 1
        if isinstance(peer, _SimWorker):
            self.heartbeat = msg.heartbeat if msg.heartbeat > 0 else HEARTBEAT_SECONDS
            self._slots_to_connect.extend(peer.slots)
        else:
            assert isinstance(peer, _SimSlot)
            peer.session.start(time.monotonic())
            peer.send_out()

    def refused(self, peer: _Peer, msg: P.Error) -> None:
        if peer.welcomed:
            self.error(f"broker says: {msg.message} ({msg.code})")
            return
        log.error("broker %s refused a simulated %s: %s (%s)", self.broker, peer.role,
                  msg.message, msg.code)
        self.exit_code = 3
        self.request_stop()

    # -- setup -------------------------------------------------------------------------

    def _raise_fd_limit(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError) as exc:
                log.warning("cannot raise RLIMIT_NOFILE to %d: %s", hard, exc)
        needed = FDS_PER_CONNECTION * self.connections + _FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < needed:
            log.warning("%d connections need about %d file descriptors, the limit is %d: "
                        "use more swarm processes", self.connections, needed, soft)

    def _connect(self, peer: _Peer) -> None:
        sock = make_socket(self.ctx, zmq.DEALER, self.broker)
        sock.setsockopt(zmq.ROUTING_ID, peer.ident)
        sock.setsockopt(zmq.LINGER, _LINGER_MS)
        sock.connect(self.broker)
        peer.sock = sock
        self.selector.register(cast(int, sock.getsockopt(zmq.FD)), selectors.EVENT_READ, peer)
        self._handshaking += 1
        peer.send(P.hello(peer.role, peer.hello_info()))

    def _connect_more(self) -> None:
        while self._handshaking < self.max_pending:
            if self._slots_to_connect:  # finish registered workers first
                self._connect(self._slots_to_connect.popleft())
            elif self._to_connect:
                self._connect(self._to_connect.popleft())
            else:
                return

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        self._raise_fd_limit()
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, self.connections + 64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self._waker.fd, selectors.EVENT_READ, None)
        self.call_later(_PPID_CHECK_SECONDS, self._check_parent)
        if self.heartbeat_on:
            self.call_later(self.heartbeat / _HEARTBEAT_SLICES, self._beat)
        try:
            self._loop()
            self._say_bye()
        finally:
            self._close()
        return self.exit_code

    def _loop(self) -> None:
        select = self.selector.select
        timers = self._timers
        monotonic = time.monotonic
        while not self.stopping:
            if self._handshaking < self.max_pending and (self._to_connect
                                                         or self._slots_to_connect):
                self._connect_more()
            timeout: float | None = 0.0
            if not self._pending:
                timeout = max(0.0, timers[0][0] - monotonic()) if timers else None
            for key, _ in select(timeout):
                peer = key.data
                if peer is None:
                    self._waker.drain()
                else:
                    self._pending[peer] = None
            batch, self._pending = self._pending, {}
            for peer in batch:
                peer.service()
                if self.stopping:
                    return
            now = monotonic()
            while timers and timers[0][0] <= now:
                heapq.heappop(timers)[2]()

    def _check_parent(self) -> None:
        if os.getppid() != self.parent:
            log.warning("swarm process %d: parent %d is gone, exiting", self.pid, self.parent)
            self.request_stop()
            return
        self.call_later(_PPID_CHECK_SECONDS, self._check_parent)

    def _beat(self) -> None:
        """Send HEARTBEAT for one slice of the workers (all of them once a period)."""
        for worker in self.workers[self._beat_slice::_HEARTBEAT_SLICES]:
            if worker.welcomed:
                try:
                    busy = [s.ident for s in worker.slots if s.busy is not None]
                    worker.send(P.Heartbeat(busy), _NOBLOCK)
                except zmq.Again:
                    pass  # the broker is not reading: a lost heartbeat is harmless
        self._beat_slice = (self._beat_slice + 1) % _HEARTBEAT_SLICES
        self.call_later(self.heartbeat / _HEARTBEAT_SLICES, self._beat)

    # -- leaving -----------------------------------------------------------------------

    def _say_bye(self) -> None:
        """Slots return their results and say BYE; once the broker has dropped them (or
        after a bound), the workers say BYE: the order a real agent and its slots use."""
        slots_said_bye = False
        for worker in self.workers:
            for slot in worker.slots:
                if slot.sock is None:
                    continue
                slot.session.flush(time.monotonic())
                slot.send_out()
                slot.send(P.Bye("stopping"))
                slots_said_bye = True
        if slots_said_bye:
            self._wait_slots_dropped(time.monotonic() + _BYE_WAIT_SECONDS)
        for worker in self.workers:
            if worker.sock is not None:
                worker.send(P.Bye("worker stopping"))

    def _wait_slots_dropped(self, deadline: float) -> None:
        """Ask the broker for STATUS on a worker connection until it lists none of this
        process's slots (messages on one connection are handled in order, those of
        different connections are not: without this a worker's BYE could overtake its
        slots' and the broker would refuse the late slot BYEs)."""
        asker = next((w for w in self.workers if w.welcomed and w.sock is not None), None)
        if asker is None:
            return
        sock = asker.sock
        assert sock is not None
        token = b""
        while time.monotonic() < deadline:
            sock.send(P.encode(P.StatusRequest(token)))
            status = None
            while status is None:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000)):
                    return
                try:
                    msg = P.decode(sock.recv())
                except ProtocolError:
                    continue
                if isinstance(msg, P.Status):
                    status, token = msg.info, msg.token
            if status.get("partial"):
                continue  # (the counters only: again, with the token, for the worker list)
            remaining = sum(w.get("connected_slots", 0) for w in status.get("worker_list", [])
                            if w.get("name") in self.names)
            if remaining == 0:
                return
            time.sleep(0.02)

    def _close(self) -> None:
        for worker in self.workers:
            for peer in (*worker.slots, worker):
                if peer.sock is not None:
                    # Never welcomed: the broker is not there; do not linger on its BYE.
                    peer.sock.close(None if peer.welcomed else 0)
                    peer.sock = None
        self.selector.close()
        self.ctx.term()  # waits (up to the linger) for the BYEs to go out
        self._waker.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a swarm process: ``python -m zfalkon.swarm CONFIG_JSON``."""
    config = json.loads((argv or sys.argv)[1])
    logging.basicConfig(level=config.get("log_level", "WARNING"),
                        format="%(asctime)s zfalkon-swarm %(levelname)s %(message)s")
    _die_with_parent()
    engine = _Engine(config)
    signal.signal(signal.SIGTERM, engine.request_stop)
    signal.signal(signal.SIGINT, engine.request_stop)
    if os.getppid() != engine.parent:  # the parent died before PR_SET_PDEATHSIG was set
        return 0
    return engine.run()


# -- the parent side ------------------------------------------------------------------

_swarm_numbers = itertools.count(1)


def connections_per_process_limit() -> int:
    """Connections one swarm process may hold: CONNECTIONS_PER_PROCESS, or fewer if the
    hard RLIMIT_NOFILE cannot give each of them its file descriptors."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return CONNECTIONS_PER_PROCESS
    return max(1, min(CONNECTIONS_PER_PROCESS, (hard - _FD_RESERVE) // FDS_PER_CONNECTION))


class Swarm:
    """``workers`` simulated worker agents of ``slots_per_worker`` slots each.

    Args:
        broker: the broker's address, ``tcp://HOST:PORT``.
        workers: simulated worker agents.
        slots_per_worker: slot connections per simulated worker.
        processes: swarm processes to spread them over; default: enough that none holds
            more than :data:`CONNECTIONS_PER_PROCESS` connections (a worker costs
            ``1 + slots_per_worker``).
        window: each slot's fixed credit window (tasks requested and not yet finished);
            0 sizes it like a real slot (the same :class:`~zfalkon.slotcore.SlotSession`
            over the simulated task length and the measured round trip).
        heartbeat: send HEARTBEAT from every simulated worker, as real agents do.
        max_pending: handshakes each process keeps in flight while connecting.
        log_level: log level of the swarm processes (they log to this stderr).

    :meth:`start` spawns the processes and waits until the broker counts every slot;
    :meth:`stop` stops them by PID. Use as a context manager.
    """

    def __init__(self, broker: str, workers: int, slots_per_worker: int = 1,
                 processes: int | None = None, window: int = 2, *, heartbeat: bool = True,
                 max_pending: int = 64, log_level: str = "WARNING") -> None:
        if workers < 1 or slots_per_worker < 1:
            raise ConfigError("a swarm needs workers >= 1 and slots_per_worker >= 1")
        if window < 0:
            raise ConfigError(f"window must be >= 0 (0: adaptive), got {window}")
        self.broker = broker_endpoint(broker)
        self.workers = workers
        self.slots_per_worker = slots_per_worker
        self.window = window
        self.heartbeat = heartbeat
        self.max_pending = max_pending
        self.log_level = log_level
        per_worker = 1 + slots_per_worker
        if processes is None:
            processes = math.ceil(workers * per_worker / connections_per_process_limit())
        self.processes = max(1, min(processes, workers))
        #: Every simulated worker is named ``f"{prefix}-{i}"``.
        self.prefix = f"swarm{os.getpid()}x{next(_swarm_numbers)}"
        self.procs: list[subprocess.Popen] = []

    @property
    def slots(self) -> int:
        """Slot connections in the swarm."""
        return self.workers * self.slots_per_worker

    @property
    def connections(self) -> int:
        """All connections of the swarm: worker registrations and slots."""
        return self.workers * (1 + self.slots_per_worker)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> "Swarm":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _config(self, first: int, count: int) -> dict:
        return {
            "broker": self.broker, "prefix": self.prefix, "first": first, "count": count,
            "slots_per_worker": self.slots_per_worker, "window": self.window,
            "heartbeat": self.heartbeat, "max_pending": self.max_pending,
            "log_level": self.log_level, "parent": os.getpid(),
        }

    def start(self, timeout: float | None = None) -> dict:
        """Spawn the processes; return the broker's status once it counts every slot.

        ``timeout`` defaults to 30 s plus 1 s per 500 connections. Raises
        :class:`SwarmError` (after stopping the processes) if a process exits or the
        slots do not all register in time.
        """
        if self.procs:
            raise SwarmError("this swarm is already started")
        if timeout is None:
            timeout = 30.0 + self.connections / 500
        try:
            base, extra = divmod(self.workers, self.processes)
            first = 0
            for i in range(self.processes):
                count = base + (i < extra)
                config = json.dumps(self._config(first, count))
                self.procs.append(subprocess.Popen([sys.executable, "-m", "zfalkon.swarm", config],
                                                   stdin=subprocess.DEVNULL))
                first += count
            return self.wait_registered(timeout)
        except BaseException:
            self.stop()
            raise

    def registered(self, status: dict) -> tuple[int, int]:
        """``(workers, slots)`` of this swarm that ``status`` (a broker STATUS) lists."""
        prefix = self.prefix + "-"
        workers = slots = 0
        for w in status.get("worker_list", []):
            name = w.get("name")
            if isinstance(name, str) and name.startswith(prefix):
                workers += 1
                slots += w.get("connected_slots", 0)
        return workers, slots

    def wait_registered(self, timeout: float) -> dict:
        """Wait until the broker counts every worker and slot of the swarm."""
        deadline = time.monotonic() + timeout
        status: dict = {}
        workers = slots = 0
        last_error: Exception | None = None
        while True:
            dead = [(p.pid, p.returncode) for p in self.procs if p.poll() is not None]
            if dead:
                raise SwarmError(f"swarm processes exited during startup (pid, status): {dead}; "
                                 "see their log on stderr")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                status = query_status(self.broker, timeout=min(5.0, max(0.5, left)))
                last_error = None
            except BrokerUnavailable as exc:
                last_error = exc
            else:
                workers, slots = self.registered(status)
                if workers == self.workers and slots == self.slots:
                    return status
            time.sleep(min(_STATUS_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        why = f" (last status query: {last_error})" if last_error else ""
        raise SwarmError(
            f"swarm did not register with {self.broker} within {timeout:g} s: the broker "
            f"counts {workers} of {self.workers} simulated workers and {slots} of "
            f"{self.slots} slots{why}")

    def stop(self, timeout: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM every process by PID (they say BYE and exit); SIGKILL after ``timeout``."""
        procs, self.procs = self.procs, []
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("swarm process %d did not stop in %g s; killing it", proc.pid,
                            timeout)
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
