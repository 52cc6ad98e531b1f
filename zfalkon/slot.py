"""A slot: one process that runs tasks, started and supervised by a worker agent.

Each slot holds its own DEALER connection to the broker (one hop from broker to the code
that runs a task; see docs/protocol.md, "Why slots connect directly"). It asks for work with
credit, runs tasks one at a time, and returns results in batches that carry its next credit.

A slot keeps each RESULTS batch it sent until a PONG to a later PING proves the broker
read it; after registering with a restarted broker it sends those batches again (a broker
with a journal takes them; the results of tasks finished while the broker was away are not
lost).

Before each task the slot writes the task id into a small shared file (the *state file*);
if the slot dies, its agent reads that id and reports which task killed it.

Run as ``python -m zfalkon.slot CONFIG_JSON`` by :mod:`zfalkon.worker` only.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import math
import mmap
import os
import signal
import sys
import time

import zmq

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon.constants import (
    CONNECT_TIMEOUT_SECONDS,
    FRAME_SOFT_BYTES,
    MAX_RESULT_BYTES,
    MAX_WINDOW,
    MIN_WINDOW,
    OUTPUT_CAP_BYTES,
    PING_SECONDS,
    PREFETCH_SECONDS,
    RESULT_FLUSH_COUNT,
    RESULT_FLUSH_SECONDS,
)
from zfalkon.errors import ProtocolError
from zfalkon.cache import DataCache
from zfalkon.execute import Runner
from zfalkon.staging import Stager
from zfalkon.net import make_socket
from zfalkon.security import PeerKeys

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
log = logging.getLogger("zfalkon.slot")

_IDLE_POLL_MS = 1000  # how often an idle slot checks that its agent is still alive
_EWMA = 0.2  # weight of the newest task duration in the running estimate


def window_for(task_seconds: float, rtt: float) -> int:
    """Tasks a slot should have requested but not finished, by Little's law.

    While a slot's credit travels to the broker and tasks travel back (``rtt``, plus up to
    RESULT_FLUSH_SECONDS that results wait to be batched), the slot finishes
    ``cover = (rtt + flush) / task_seconds`` tasks; it asks for twice that (slack for
    variance and batching) plus the one it is running. A slot never prefetches a long
    task when the round trip is under 1 % of it (on a LAN a window of one costs < 1 %,
    and a prefetched long task could wait behind it while another slot idles at the end
    of a run), and it always keeps PREFETCH_SECONDS of short tasks.
    """
    d = max(task_seconds, 1e-7)
    need = 1
    if rtt >= 0.01 * d:
        need += math.ceil(2 * (rtt + RESULT_FLUSH_SECONDS) / d)
    need = max(need, math.ceil(PREFETCH_SECONDS / d))
    return max(MIN_WINDOW, min(MAX_WINDOW, need))


class StateFile:
    """The shared 8-byte cell holding the id of the task a slot is running (0: idle)."""

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 8)
        self._cell = memoryview(self._map).cast("q")

    @staticmethod
    def create(path: str) -> None:
        with open(path, "wb") as f:
            f.write(bytes(8))

    def set(self, task_id: int) -> None:
        self._cell[0] = task_id

    def get(self) -> int:
        return self._cell[0]

    def close(self) -> None:
        self._cell.release()
        self._map.close()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent (the agent) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the idle loop's getppid() check covers it


class Slot:
    """The slot's event loop; see the module docstring."""

    def __init__(self, broker: str, ident: bytes, worker_id: str, index: int,
                 state_path: str, output_cap: int = OUTPUT_CAP_BYTES,
                 keys: str | None = None, cache_dir: str | None = None,
                 cache_bytes: int = 0) -> None:
        self.broker = broker
        self.keys = PeerKeys(keys) if keys else None
        self.ident = ident
        self.worker_id = worker_id
        self.index = index
        self.state = StateFile(state_path)
        self.stager = Stager(DataCache(cache_dir, cache_bytes)
                             if cache_dir and cache_bytes > 0 else None)
        self.runner = Runner(output_cap, self.stager)
        self.stopping = False
        self.queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self.result_ids: list[int] = []
        self.result_blobs: list[bytes] = []
        self.result_bytes = 0
        self.failed = 0
        # RESULTS sent and not yet known to have arrived: (sent, failed, ids, blobs).
        self.unconfirmed: collections.deque[tuple[float, int, list, list]] = collections.deque()
        self.first_result_at = 0.0
        self.mean_seconds = -1.0  # running estimate of one task's duration (-1: none yet)
        self.rtt = 0.0  # smoothed round trip to the broker (PING/PONG; 0 until the first)
        self.next_ping = 0.0
        self.owed = 0  # credit granted and not yet used up by a finished task
        self.parent = os.getppid()
        self.hello_due = 0.0  # when to send HELLO again (0: not due)

    def request_stop(self, *_: object) -> None:
        """Signal handler: finish the running task, return results, hand back the rest."""
        self.stopping = True

    def request_hello(self, *_: object) -> None:
        """Signal handler (SIGUSR1, from the agent after a broker restart): register again."""
        self.hello_due = time.monotonic()

    def _hello(self) -> None:
        self._send(P.hello(P.ROLE_SLOT, {"worker_id": self.worker_id, "slot": self.index}))
        self.hello_due = 0.0

    def run(self) -> int:
        ctx = zmq.Context()
        sock = make_socket(ctx, zmq.DEALER, self.broker, self.keys)
        sock.setsockopt(zmq.ROUTING_ID, self.ident)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(self.broker)
        self.sock = sock
        try:
            code = self._handshake()
            if code == 0:
                self._loop()
                self._send(P.Bye("stopping"))
            return code
        finally:
            sock.close()
            ctx.term()
            self.state.close()

    def _send(self, msg: P.Message) -> None:
        self.sock.send(P.encode(msg))

    def _handshake(self) -> int:
        self._hello()
        deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
        while not self.stopping:
            if self.sock.poll(200):
                msg = P.decode(self.sock.recv())
                if isinstance(msg, P.Welcome):
                    # HELLO -> WELCOME also spans the connection's setup, so measure the
                    # round trip with a PING instead.
                    self.owed = 2  # start shallow: two tasks, then size by measured duration
                    self._send(P.Credit(self.owed))
                    self._ping(time.monotonic())
                    return 0
                if isinstance(msg, P.Error):
                    log.error("broker refused slot %d: %s", self.index, msg.message)
                    return 3
            elif time.monotonic() > deadline:
                log.error("no welcome from broker %s for slot %d", self.broker, self.index)
                return 4
        return 0

    def _loop(self) -> None:
        sock = self.sock
        poller = zmq.Poller()  # one poller for the life of the loop (Socket.poll makes one a call)
        poller.register(sock, zmq.POLLIN)
        queue = self.queue
        run = self.runner.run
        state = self.state
        monotonic = time.monotonic
        while True:
            if not queue or self.stopping:
                if self.result_ids:
                    self._flush()
                if self.stopping:
                    return
                now = time.monotonic()
                if self.hello_due and now >= self.hello_due:
                    self._hello()
                elif self.unconfirmed and now >= self.next_ping:
                    self._ping(now)  # idle: confirm the last results
                if not poller.poll(_IDLE_POLL_MS):
                    if os.getppid() != self.parent:
                        log.warning("slot %d: agent is gone, exiting", self.index)
                        return
                    continue
            self._receive()
            while queue and not self.stopping:
                if self.result_ids and (monotonic() - self.first_result_at + self.mean_seconds
                                        >= RESULT_FLUSH_SECONDS):
                    self._flush()  # the next task would hold these results back too long
                tid, blob = queue.popleft()
                state.set(tid)
                t0 = monotonic()
                result, failed = run(blob)
                now = monotonic()
                state.set(0)
                if self.mean_seconds < 0:
                    self.mean_seconds = now - t0
                else:
                    self.mean_seconds += _EWMA * ((now - t0) - self.mean_seconds)
                if not self.result_ids:
                    self.first_result_at = now
                if len(result) > MAX_RESULT_BYTES:
                    result = payload.error_result(
                        "SerializationError", f"the result is {len(result)} bytes, over the "
                        f"{MAX_RESULT_BYTES} byte limit of one result")
                    failed = True
                self.result_ids.append(tid)
                self.result_blobs.append(result)
                self.result_bytes += len(result)
                self.failed += failed
                self.owed -= 1
                if (len(self.result_ids) >= RESULT_FLUSH_COUNT
                        or self.result_bytes >= FRAME_SOFT_BYTES
                        or now - self.first_result_at >= RESULT_FLUSH_SECONDS):
                    self._flush()
                    self._receive()

    def _receive(self) -> None:
        """Take every message already waiting, without blocking."""
        sock = self.sock
        while sock.getsockopt(_EVENTS) & _POLLIN:
            try:
                msg = P.decode(sock.recv())
            except ProtocolError as exc:
                log.error("slot %d: bad message from broker: %s", self.index, exc)
                continue
            if isinstance(msg, P.Tasks):
                self.queue.extend(zip(msg.ids, msg.blobs))
            elif isinstance(msg, P.Welcome):  # registered again with a new broker
                now = time.monotonic()
                resent = self.unconfirmed
                self.unconfirmed = collections.deque()
                for _, failed, ids, blobs in resent:
                    self._send(P.Results(0, failed, ids, blobs))
                    self.unconfirmed.append((now, failed, ids, blobs))
                self.owed = len(self.queue) + 2  # what it holds, and two more to start
                self._send(P.Credit(2))
                self._ping(now)
                log.warning("slot %d registered again; sent %d results again", self.index,
                            sum(len(r[2]) for r in resent))
            elif isinstance(msg, P.Error) and msg.code in ("hello-required", "bad-hello"):
                # A new broker: register again (after our agent has, if it has not yet).
                if not self.hello_due:
                    self.hello_due = time.monotonic() + (0 if msg.code == "hello-required" else 1)
            elif isinstance(msg, P.Pong):
                unconfirmed = self.unconfirmed
                while unconfirmed and unconfirmed[0][0] <= msg.sent:
                    unconfirmed.popleft()  # the broker read this batch before the PING
                sample = time.monotonic() - msg.sent
                self.rtt = sample if self.rtt == 0 else self.rtt + _EWMA * (sample - self.rtt)
            elif isinstance(msg, P.Error):
                log.error("broker says: %s (%s)", msg.message, msg.code)

    def _ping(self, now: float) -> None:
        self._send(P.Ping(now))
        self.next_ping = now + PING_SECONDS

    def _flush(self) -> None:
        """Send finished results with the credit that keeps the window full."""
        target = window_for(self.mean_seconds, self.rtt)
        credit = max(0, target - self.owed)
        self.owed += credit
        self._send(P.Results(credit, self.failed, self.result_ids, self.result_blobs))
        now = time.monotonic()
        self.unconfirmed.append((now, self.failed, self.result_ids, self.result_blobs))
        if now >= self.next_ping:
            self._ping(now)
        self.result_ids = []
        self.result_blobs = []
        self.result_bytes = 0
        self.failed = 0
        if self.stager.new_held:  # tell the broker's data-aware dispatch what we cache
            self._send(P.Holding(self.stager.take_new_held()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the slot process."""
    config = json.loads((argv or sys.argv)[1])
    logging.basicConfig(level=config.get("log_level", "WARNING"),
                        format="%(asctime)s zfalkon-slot %(levelname)s %(message)s")
    _die_with_parent()
    slot = Slot(config["broker"], bytes.fromhex(config["ident"]), config["worker_id"],
                config["index"], config["state_path"], config.get("output_cap", OUTPUT_CAP_BYTES),
                config.get("keys"), config.get("cache_dir"), config.get("cache_bytes", 0))
    signal.signal(signal.SIGTERM, slot.request_stop)
    signal.signal(signal.SIGINT, slot.request_stop)
    signal.signal(signal.SIGUSR1, slot.request_hello)
    return slot.run()


if __name__ == "__main__":
    sys.exit(main())
