"""A slot: one process that runs tasks, started and supervised by a worker agent.

Each slot holds its own DEALER connection to the broker (one hop from broker to the code
that runs a task; see docs/protocol.md, "Why slots connect directly"). It runs tasks one at
a time, in the order it was sent them. Everything it says to the broker (its window,
batched results kept until acknowledged, PINGs that find lost frames) is decided by its
:class:`~zfalkon.slotcore.SlotSession`; this module is the socket loop around it.

When the broker no longer knows the slot (it restarted, or declared the worker lost), the
slot registers again and starts a new session: the tasks it held are the broker's again.

Before each task the slot writes the task id into a small shared file (the *state file*);
if the slot dies, its agent reads that id and reports which task killed it.

Run as ``python -m zfalkon.slot CONFIG_JSON`` by :mod:`zfalkon.worker` only.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import signal
import sys
import time

import zmq

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon.constants import CONNECT_TIMEOUT_SECONDS, MAX_RESULT_BYTES, OUTPUT_CAP_BYTES
from zfalkon.errors import ProtocolError
from zfalkon.cache import DataCache
from zfalkon.execute import Runner
from zfalkon.staging import Stager
from zfalkon.net import make_socket, readable
from zfalkon.security import PeerKeys
from zfalkon.slotcore import SlotSession

log = logging.getLogger("zfalkon.slot")

_IDLE_POLL_MS = 1000  # how often an idle slot checks that its agent is still alive
_HELLO_RETRY_SECONDS = 2.0  # a HELLO unanswered this long is sent again


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
    """The slot's event loop around its :class:`SlotSession`; see the module docstring."""

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
        self.session = SlotSession()
        self.stopping = False
        self.parent = os.getppid()
        self.hello_due = 0.0  # when to send HELLO again (0: not due)
        self.hello_sent = 0.0  # when the HELLO not yet answered with WELCOME left (0: none)

    def request_stop(self, *_: object) -> None:
        """Signal handler: finish the running task, return results, hand back the rest."""
        self.stopping = True

    def _hello(self) -> None:
        self.sock.send(P.encode(P.hello(P.ROLE_SLOT, {"worker_id": self.worker_id,
                                                      "slot": self.index})))
        self.hello_due = 0.0
        self.hello_sent = time.monotonic()

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
                self._send_out()
                sock.send(P.encode(P.Bye("stopping")))
            return code
        finally:
            sock.close()
            ctx.term()
            self.state.close()

    def _send_out(self) -> None:
        out = self.session.out
        if out:
            self.session.out = []
            send, encode = self.sock.send, P.encode
            for msg in out:
                send(encode(msg))
            if self.stager.new_held:  # tell data-aware dispatch what our machine caches
                send(encode(P.Holding(self.stager.take_new_held())))

    def _handshake(self) -> int:
        self._hello()
        deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
        while not self.stopping:
            if self.sock.poll(200):
                msg = P.decode(self.sock.recv())
                if isinstance(msg, P.Welcome):
                    self.hello_sent = 0.0
                    self.session.start(time.monotonic())
                    self._send_out()
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
        session = self.session
        run = self.runner.run
        state = self.state
        monotonic = time.monotonic
        while not self.stopping:
            now = monotonic()
            session.poll(now)
            self._send_out()  # (results go out before a HELLO that would end the session)
            if self.hello_sent and now - self.hello_sent > _HELLO_RETRY_SECONDS:
                self.hello_due = now  # the HELLO or its WELCOME was lost: again
            if self.hello_due and now >= self.hello_due:
                self._hello()
            if not session.queue:
                if not poller.poll(_IDLE_POLL_MS):
                    if os.getppid() != self.parent:
                        log.warning("slot %d: agent is gone, exiting", self.index)
                        return
                    continue
            self._receive()
            while not self.stopping:
                task = session.next_task(monotonic())
                if task is None:
                    break
                tid, blob = task
                state.set(tid)
                t0 = monotonic()
                result, failed = run(blob)
                now = monotonic()
                state.set(0)
                if len(result) > MAX_RESULT_BYTES:
                    result = payload.error_result(
                        "SerializationError", f"the result is {len(result)} bytes, over the "
                        f"{MAX_RESULT_BYTES} byte limit of one result")
                    failed = True
                session.finished(tid, result, failed, now - t0, now)
                if session.out:
                    self._send_out()
                    self._receive()
        session.flush(monotonic())

    def _receive(self) -> None:
        """Take every message already waiting, without blocking."""
        sock = self.sock
        session = self.session
        while readable(sock):
            try:
                msg = P.decode(sock.recv())
            except ProtocolError as exc:
                log.error("slot %d: bad message from broker: %s", self.index, exc)
                continue
            now = time.monotonic()
            if session.receive(msg, now):
                continue
            if isinstance(msg, P.Welcome):  # registered again (a new broker, or it forgot us)
                log.warning("slot %d registered again; dropped %d queued tasks", self.index,
                            len(session.queue))
                self.hello_sent = self.hello_due = 0.0
                session.start(now)
            elif isinstance(msg, P.Error) and msg.code in ("hello-required", "bad-hello"):
                # The broker does not know us: register again (after our agent has). While
                # a HELLO is unanswered, a hello-required answers a frame sent before it.
                if not self.hello_due and (msg.code == "bad-hello" or not self.hello_sent
                                           or now - self.hello_sent > _HELLO_RETRY_SECONDS):
                    self.hello_due = now + (0 if msg.code == "hello-required" else 1)
            elif isinstance(msg, P.Error):
                log.error("broker says: %s (%s)", msg.message, msg.code)
        self._send_out()


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
    return slot.run()


if __name__ == "__main__":
    sys.exit(main())
