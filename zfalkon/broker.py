"""The broker: one ROUTER socket, one event loop, a FIFO queue of task blobs.

Clients, worker agents and slots all connect to the same port. The loop, top to bottom:

1. poll the socket (and a wake-up pipe for signals) until a message arrives or the next
   once-a-second tick is due: an idle broker sleeps;
2. take every message already waiting and handle it (queue SUBMITs, count CREDITs, route
   RESULTS to their clients, answer STATUS, ...);
3. dispatch: give each slot with credit a share of the queue, in one TASKS frame;
4. on the tick, sample the throughput counter.

Tasks are kept as the clients' msgpack blobs, in the chunks they arrived in: the broker
never decodes user data and holds no Python object per queued task beyond its id and blob.

With a journal (:mod:`zfalkon.journal`) the broker also keeps ``known``, the ids of every
accepted and unfinished task: a task submitted again (a client resubmitting after a
restart) is not queued twice, a result is delivered once even if two workers return it,
and results finished while their client is away are held for it.
"""

from __future__ import annotations

import collections
import logging
import resource
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import zmq

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import (
    DEFAULT_PORT,
    FRAME_SOFT_BYTES,
    HEARTBEAT_MISSES,
    CLIENT_HOLD_SECONDS,
    HEARTBEAT_SECONDS,
    MAX_ATTEMPTS,
    MAX_BATCH,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
)
from zfalkon.errors import ConfigError, ProtocolError
from zfalkon.journal import Journal
from zfalkon.net import Waker, is_loopback, listen_endpoint, make_socket
from zfalkon.security import BrokerAuthenticator, BrokerKeys

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
log = logging.getLogger("zfalkon.broker")

_RECV_BURST = 4096  # messages handled before dispatching again
_TICK_SECONDS = 1.0
_RATE_WINDOW = 10  # ticks of history behind tasks_per_second
_LISTEN_BACKLOG = 4096  # pending TCP connections (capped by the kernel's somaxconn)
_ERRORS_PER_TICK = 100  # ERROR answers per peer per tick; past that, bad frames are dropped
_MAX_DATA_KEYS = 100_000  # data keys remembered per worker (HOLDING)
DISPATCH_POLICIES = ("data", "fifo")


@dataclass(eq=False)
class Client:
    ident: bytes
    key: int
    name: str


@dataclass(eq=False)
class Worker:
    ident: bytes
    info: dict
    version: str
    last_seen: float
    slots: dict[bytes, "Slot"] = field(default_factory=dict)
    done: int = 0
    draining: bool = False  # said DRAIN: its slots get no more tasks
    data: set[str] = field(default_factory=set)  # data keys its cache holds (HOLDING)


@dataclass(eq=False)
class Slot:
    ident: bytes
    worker: Worker
    index: int
    name: str
    credit: int = 0
    ready: bool = False  # in the broker's ready deque
    inflight: dict[int, bytes] = field(default_factory=dict)


def _raise_fd_limit() -> None:
    """Every connection is a file descriptor: raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    log.info("open-file limit %d: room for about %d connections", soft, max(0, soft - 50))


class _RateLimitedLog:
    """Log each kind of peer error at most once a second, counting what it suppressed."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def __call__(self, code: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(code, -1e9) < 1.0:
            self._suppressed[code] += 1
            return
        self._last[code] = now
        extra = self._suppressed.pop(code, 0)
        log.warning("%s%s", text, f" ({extra} more like it suppressed)" if extra else "")


class Broker:
    """Serves clients and workers on one ROUTER socket; see the module docstring."""

    def __init__(self, listen: str = f"tcp://0.0.0.0:{DEFAULT_PORT}",
                 journal: Journal | None = None, keys: BrokerKeys | None = None,
                 insecure: bool = False, dispatch: str = "data") -> None:
        self.endpoint = listen_endpoint(listen)
        if keys is None and not insecure and not is_loopback(self.endpoint):
            raise ConfigError(
                f"refusing to listen on {self.endpoint} without --keys: anyone who can reach "
                "it could run code on every worker. Create keys (zfalkon keys init DIR) and "
                "pass --keys DIR, or pass --insecure to accept the risk")
        if dispatch not in DISPATCH_POLICIES:
            raise ConfigError(f"--dispatch must be one of {', '.join(DISPATCH_POLICIES)}")
        self.data_aware = dispatch == "data"
        # Data-aware dispatch: tasks with a data key wait here, by key, not in self.queue.
        self.local: dict[str, collections.deque[tuple[int, bytes]]] = {}
        self.ctx = zmq.Context()
        self.keys = keys
        self.auth: BrokerAuthenticator | None = None
        self.sock = make_socket(self.ctx, zmq.ROUTER, self.endpoint)
        if keys is not None:
            # The ZAP handler runs in this context before the socket binds: no window in
            # which a connection is accepted unauthenticated.
            self.auth = BrokerAuthenticator(self.ctx, keys)
            self.auth.start()
            keys.serve(self.sock)
        self.bound: dict[bytes, str] = {}  # keys: routing id -> "ROLE:NAME" of its key
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.peers: dict[bytes, Client | Worker | Slot] = {}
        self.clients: dict[int, Client] = {}
        self.workers: dict[str, Worker] = {}
        self.queue: collections.deque[list] = collections.deque()  # [ids, blobs, pos]
        self.ready: collections.deque[Slot] = collections.deque()
        self.queued = 0
        self.submitted = self.done = self.failed = 0
        self.cancelled: set[int] = set()
        self.gone_clients: set[int] = set()
        self.attempts: dict[int, int] = {}  # task id -> lost workers it was held by
        self.journal = journal
        self.known: set[int] | None = None  # journal only: accepted, unfinished task ids
        self.held: dict[int, list[tuple[list, list]]] = {}  # key -> results held for it
        self.away: dict[int, float] = {}  # journal only: key -> when its client went away
        self.duplicate_submits = 0
        self.key_owner: dict[int, str] = {}  # key -> "ROLE:NAME" ("" without keys) of
        # the client that first submitted under it; only that identity may claim it back
        self._next_key = 1
        self._started = time.monotonic()
        self._rate: collections.deque[tuple[float, int]] = collections.deque(maxlen=_RATE_WINDOW + 1)
        self._stopping = False
        self._waker = Waker()
        self._warn = _RateLimitedLog()
        self._errors_sent: collections.Counter[bytes] = collections.Counter()
        self._handlers: dict[type, Callable] = {
            P.Submit: self._on_submit, P.Cancel: self._on_cancel,
            P.Credit: self._on_credit, P.Results: self._on_results,
            P.StatusRequest: self._on_status, P.Heartbeat: self._on_heartbeat,
            P.Bye: self._on_bye, P.SlotLost: self._on_slot_lost, P.Ping: self._on_ping,
            P.Drain: self._on_drain, P.Holding: self._on_holding,
        }
        self._allowed: dict[type, type] = {
            P.Submit: Client, P.Cancel: Client, P.Credit: Slot, P.Results: Slot,
            P.Heartbeat: Worker, P.SlotLost: Worker, P.Drain: Worker, P.Holding: Slot,
        }
        if journal is not None:
            self._recover(journal)

    def _recover(self, journal: Journal) -> None:
        """Queue the journal's unfinished tasks; hold its results for their clients."""
        got = journal.replay()
        self.known = set(got.tasks)
        self.key_owner = dict(got.owners)
        if got.tasks:
            self.queue.append([list(got.tasks), list(got.tasks.values()), 0])
            self.queued = len(got.tasks)
        by_key: dict[int, tuple[list, list]] = {}
        for tid, blob in got.held.items():
            ids, blobs = by_key.setdefault(P.client_key(tid), ([], []))
            ids.append(tid)
            blobs.append(blob)
        self.held = {key: [group] for key, group in by_key.items()}
        now = time.monotonic()
        keys = {P.client_key(t) for t in got.tasks} | set(by_key)
        self.away = dict.fromkeys(keys, now)
        self._next_key = max(keys | set(got.owners), default=0) + 1
        log.info("journal %s: %d records; %d unfinished tasks queued, %d results held for "
                 "%d absent clients", journal.path, got.records, len(got.tasks), len(got.held),
                 len(by_key))

    # -- lifecycle ---------------------------------------------------------------------

    def bind(self) -> str:
        """Bind the socket; return the address peers should connect to."""
        _raise_fd_limit()
        self.sock.setsockopt(zmq.BACKLOG, _LISTEN_BACKLOG)
        try:
            self.sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot listen on {self.endpoint}: {exc}") from None
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self, *_: object) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True
        self._waker.wake()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.sock.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self._waker.close()

    def serve(self) -> None:
        """Run the event loop until :meth:`stop`."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        next_tick = time.monotonic() + _TICK_SECONDS
        while not self._stopping:
            timeout = max(0.0, next_tick - time.monotonic())
            for what, _ in poller.poll(timeout * 1000):
                if what == self._waker.fd:
                    self._waker.drain()
            self._receive()
            now = time.monotonic()
            if self.journal is not None:
                self.journal.flush(now)  # before dispatch: tasks are logged before they run
            if self.queued and self.ready:
                self._dispatch()
            if now >= next_tick:
                self._rate.append((now, self.done))
                self._errors_sent.clear()
                self._find_lost_workers(now)
                if self.journal is not None:
                    self._journal_tick(now)
                next_tick = now + _TICK_SECONDS
        log.info("broker stopping")

    # -- receiving ---------------------------------------------------------------------

    def _receive(self) -> None:
        sock = self.sock
        secure = self.keys is not None
        for _ in range(_RECV_BURST):
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                return
            if secure:
                parts = sock.recv_multipart(copy=False)
                self._handle([p.bytes for p in parts], parts[-1].get("User-Id"))
            else:
                self._handle(sock.recv_multipart())

    def _handle(self, frames: list[bytes], user: str | None = None) -> None:
        """One message. ``user``: with keys, the ``ROLE:NAME`` its connection proved."""
        ident = frames[0]
        if len(frames) != 2:
            self._refuse(ident, ProtocolError(
                f"expected one body frame, got {len(frames) - 1}", "malformed"))
            return
        try:
            msg = P.decode(frames[1])
        except ProtocolError as exc:
            self._refuse(ident, exc)
            return
        peer = self.peers.get(ident)
        if user is not None and not self._authorized(ident, msg, user):
            return
        if type(msg) is P.Hello:
            self._on_hello(ident, peer, msg, user)
            if user is not None and ident in self.peers:
                self.bound[ident] = user  # this routing id is now this key's
            return
        if peer is None:
            self._refuse(ident, ProtocolError(
                f"{type(msg).__name__} before HELLO", "hello-required"))
            return
        needed = self._allowed.get(type(msg))
        handler = self._handlers.get(type(msg))
        if handler is None or (needed is not None and type(peer) is not needed):
            self._refuse(ident, ProtocolError(
                f"{type(msg).__name__} is not allowed for a {type(peer).__name__.lower()}",
                "not-allowed"))
            return
        handler(peer, msg)

    def _authorized(self, ident: bytes, msg: P.Message, user: str) -> bool:
        """With keys: a key acts only in its role, and a routing id belongs to one key."""
        bound = self.bound.get(ident)
        if bound is not None and bound != user:
            self._refuse(ident, ProtocolError(
                f"routing id {ident.hex()} belongs to another key", "unauthorized"))
            return False
        if type(msg) is P.Hello:
            role = user.partition(":")[0]
            if msg.role not in ((P.ROLE_WORKER, P.ROLE_SLOT) if role == "worker" else (role,)):
                self._refuse(ident, ProtocolError(
                    f"key {user} may not register as a {msg.role}", "unauthorized"))
                return False
        return True

    def _refuse(self, ident: bytes, exc: ProtocolError) -> None:
        """Log (rate-limited) and answer ERROR, at most _ERRORS_PER_TICK a tick per peer:
        a peer flooding bad frames without reading the answers cannot fill our memory."""
        self._warn(exc.code, f"refused a message from peer {ident.hex()}: {exc}")
        sent = self._errors_sent[ident]
        if sent < _ERRORS_PER_TICK:
            self._errors_sent[ident] = sent + 1
            self._send(ident, P.Error(exc.code, str(exc)))

    def _send(self, ident: bytes, msg: P.Message) -> bool:
        try:
            self.sock.send_multipart((ident, P.encode(msg)), zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            peer = self.peers.get(ident)
            if isinstance(peer, Slot):
                # Keep what it held until its agent's SLOT_LOST says which task killed it;
                # requeueing now could run that task again, on another slot.
                log.info("slot %s unreachable (%s); waiting for its agent", peer.name, exc)
                self._unready(peer)
            elif peer is not None:
                log.info("peer %s unreachable (%s); dropping it", ident.hex(), exc)
                self._drop(peer)
            return False

    # -- handlers ----------------------------------------------------------------------

    def _on_hello(self, ident: bytes, peer: object, msg: P.Hello,
                  user: str | None = None) -> None:
        info = msg.info
        if peer is not None:
            self._drop(peer)  # a reconnect under the same id starts afresh
        key = 0
        if msg.role == P.ROLE_CLIENT:
            # A client coming back (this broker restarted) asks for its old key: its task
            # ids carry it. Granted unless another live client holds it, or (with keys) the
            # key's tasks were submitted under another CurveZMQ identity.
            key = info.get("key")
            if type(key) is not int or not 0 < key < 1 << 23 or key in self.clients or \
                    self.key_owner.get(key, user or "") != (user or ""):
                key = self._next_key
            self._next_key = max(self._next_key, key + 1)
            self.gone_clients.discard(key)
            client = Client(ident, key, str(info.get("name", "")))
            self.peers[ident] = self.clients[key] = client
            self.away.pop(key, None)
            for ids, blobs in self.held.pop(key, ()):
                # Before WELCOME, so that the client does not submit these again.
                self._deliver(key, "", ids, blobs)
        elif msg.role == P.ROLE_WORKER:
            worker_id = info.get("worker_id")
            if not isinstance(worker_id, str) or not isinstance(info.get("slots"), int):
                self._refuse(ident, ProtocolError("worker HELLO needs worker_id and slots",
                                                  "bad-hello"))
                return
            old = self.workers.get(worker_id)
            if old is not None:
                self._drop(old)
            worker = Worker(ident, info, msg.version, time.monotonic())
            self.peers[ident] = self.workers[worker_id] = worker
            log.info("worker %s registered: %s slots on %s", info.get("name"), info.get("slots"),
                     info.get("hostname"))
        elif msg.role == P.ROLE_SLOT:
            worker_id, index = info.get("worker_id"), info.get("slot")
            worker = self.workers.get(worker_id) if isinstance(worker_id, str) else None
            if worker is None or type(index) is not int:
                self._refuse(ident, ProtocolError(
                    "slot HELLO names no registered worker", "bad-hello"))
                return
            slot = Slot(ident, worker, index, f"{worker.info.get('name', '?')}/{index}")
            self.peers[ident] = worker.slots[ident] = slot
        else:
            self._refuse(ident, ProtocolError(f"unknown role {msg.role!r}", "bad-hello"))
            return
        self._send(ident, P.Welcome(PROTOCOL_VERSION, __version__, key, HEARTBEAT_SECONDS))

    def _on_submit(self, client: Client, msg: P.Submit) -> None:
        ids = msg.ids
        if not ids:
            return
        key = client.key
        if P.client_key(min(ids)) != key or P.client_key(max(ids)) != key:
            self._refuse(client.ident, ProtocolError(
                "SUBMIT has task ids outside this client's key", "malformed"))
            return
        if key not in self.key_owner:  # its first tasks: who may claim the key back
            self.key_owner[key] = self.bound.get(client.ident, "")
            if self.journal is not None:
                self.journal.key(key, self.key_owner[key])
        blobs, hints = msg.blobs, msg.hints
        known = self.known
        if known is not None:
            if not known.isdisjoint(ids):  # submitted again: queue each task once
                keep = [i for i, t in enumerate(ids) if t not in known]
                self.duplicate_submits += len(ids) - len(keep)
                if not keep:
                    return
                ids, blobs = [ids[i] for i in keep], [blobs[i] for i in keep]
                hints = [hints[i] for i in keep] if hints else hints
            known.update(ids)
            self.journal.submit(ids, blobs)  # type: ignore[union-attr]
        self.queued += len(ids)
        self.submitted += len(ids)
        if hints and self.data_aware:
            plain_ids, plain_blobs = [], []
            for tid, blob, hint in zip(ids, blobs, hints):
                if hint:
                    self.local.setdefault(hint, collections.deque()).append((tid, blob))
                else:
                    plain_ids.append(tid)
                    plain_blobs.append(blob)
            ids, blobs = plain_ids, plain_blobs
            if not ids:
                return
        self.queue.append([ids, blobs, 0])

    def _on_cancel(self, client: Client, msg: P.Cancel) -> None:
        key = client.key
        self.cancelled.update(i for i in msg.ids if P.client_key(i) == key)

    def _on_credit(self, slot: Slot, msg: P.Credit) -> None:
        self._add_credit(slot, msg.n)

    def _on_drain(self, worker: Worker, msg: P.Drain) -> None:
        log.info("worker %s is draining (%s)", worker.info.get("name"), msg.reason)
        worker.draining = True
        for slot in worker.slots.values():
            self._unready(slot)

    def _on_holding(self, slot: Slot, msg: P.Holding) -> None:
        data = slot.worker.data
        if len(data) < _MAX_DATA_KEYS:
            data.update(msg.keys[:_MAX_DATA_KEYS - len(data)])

    def _add_credit(self, slot: Slot, n: int) -> None:
        if n > 0 and not slot.worker.draining:
            slot.credit += n
            if not slot.ready:
                slot.ready = True
                self.ready.append(slot)

    def _on_results(self, slot: Slot, msg: P.Results) -> None:
        self._add_credit(slot, msg.credit)
        inflight = slot.inflight
        known = self.known
        groups: dict[int, tuple[list[int], list[bytes]]] = {}
        shift = P.ID_SHIFT
        for tid, blob in zip(msg.ids, msg.blobs):
            if known is None:
                if inflight.pop(tid, None) is None:
                    continue  # not held by this slot (cancelled client, or a late duplicate)
            else:
                # Journal: any unfinished task's first result counts, even one this slot
                # no longer holds (sent again after a broker restart).
                inflight.pop(tid, None)
                if tid not in known:
                    continue
            key = tid >> shift
            group = groups.get(key)
            if group is None:
                group = groups[key] = ([], [])
            group[0].append(tid)
            group[1].append(blob)
        self.failed += msg.failed
        if self.attempts:
            for tid in msg.ids:
                self.attempts.pop(tid, None)
        for key, (ids, blobs) in groups.items():
            self.done += len(ids)
            slot.worker.done += len(ids)
            self._deliver(key, slot.name, ids, blobs)

    def _deliver(self, key: int, worker: str, ids: list[int], blobs: list[bytes]) -> None:
        """Send finished tasks' results to their client (journal: or hold them for it)."""
        if self.cancelled:
            self.cancelled.difference_update(ids)
        client = self.clients.get(key)
        journal = self.journal
        sent = client is not None and self._send(client.ident, P.Deliver(worker, ids, blobs))
        if journal is not None:
            self.known.difference_update(ids)  # type: ignore[union-attr]
            if not sent and key in self.away:  # (a failed send has just made it away)
                self.held.setdefault(key, []).append((ids, blobs))
                journal.held(ids, blobs)
            else:
                journal.done(ids)

    def _on_status(self, peer: object, msg: P.StatusRequest) -> None:
        self._send(peer.ident, P.Status(self.status()))  # type: ignore[attr-defined]

    def _on_ping(self, peer: Client | Worker | Slot, msg: P.Ping) -> None:
        self._send(peer.ident, P.Pong(msg.sent))

    def _on_heartbeat(self, worker: Worker, msg: P.Heartbeat) -> None:
        worker.last_seen = time.monotonic()

    def _on_bye(self, peer: Client | Worker | Slot, msg: P.Bye) -> None:
        self._drop(peer, left=True)

    def _on_slot_lost(self, worker: Worker, msg: P.SlotLost) -> None:
        worker.last_seen = time.monotonic()
        slot = worker.slots.get(msg.slot)
        if slot is None:
            return  # it never registered, or said BYE first
        blob = slot.inflight.pop(msg.task, None) if msg.task else None
        if blob is not None:
            self.done += 1
            self.failed += 1
            self._deliver(P.client_key(msg.task), slot.name, [msg.task], [payload.crashed_result(
                f"the worker process running this task died ({msg.reason}; worker {slot.name})")])
        self._drop(slot)

    # -- peers leaving -----------------------------------------------------------------

    def _find_lost_workers(self, now: float) -> None:
        """Declare lost every worker silent for HEARTBEAT_MISSES heartbeats."""
        limit = HEARTBEAT_SECONDS * HEARTBEAT_MISSES
        for worker in [w for w in self.workers.values() if now - w.last_seen > limit]:
            held = sum(len(s.inflight) for s in worker.slots.values())
            log.warning("worker %s lost: no heartbeat for %.1f s; requeueing %d tasks",
                        worker.info.get("name"), now - worker.last_seen, held)
            self._drop(worker, lost=True)

    def _drop(self, peer: Client | Worker | Slot, lost: bool = False,
              left: bool = False) -> None:
        """Forget a peer; requeue what a slot held; drop a client's queued tasks.

        ``lost``: the peer vanished (no heartbeat) rather than leaving; each task it held
        counts an attempt, and a task at MAX_ATTEMPTS fails with WorkerLost.
        ``left``: the peer said BYE. With a journal, a client that vanished without BYE
        is only *away*: its tasks run and their results are held for CLIENT_HOLD_SECONDS.
        """
        if self.peers.get(peer.ident) is peer:
            del self.peers[peer.ident]
            self.bound.pop(peer.ident, None)
        if isinstance(peer, Slot):
            peer.worker.slots.pop(peer.ident, None)
            self._unready(peer)
            if peer.inflight:
                self._requeue(peer.inflight, peer.name if lost else None)
                peer.inflight = {}
        elif isinstance(peer, Worker):
            self.workers.pop(peer.info["worker_id"], None)
            for slot in list(peer.slots.values()):
                self._drop(slot, lost)
        elif isinstance(peer, Client):
            if self.clients.get(peer.key) is peer:
                del self.clients[peer.key]
                if self.journal is not None and not left:
                    self.away[peer.key] = time.monotonic()
                else:
                    self._forget_client(peer.key)

    def _forget_client(self, key: int) -> None:
        """The client is gone for good: skip its queued tasks, drop its held results."""
        self.gone_clients.add(key)
        had_state = self.key_owner.pop(key, None) is not None or key in self.held or \
            key in self.away
        if had_state and self.journal is not None:
            self.journal.gone(key)  # (a status query's key has no records to undo)
        self.held.pop(key, None)
        self.away.pop(key, None)

    def _journal_tick(self, now: float) -> None:
        """Forget clients away too long; write and fsync; compact the journal if due."""
        journal = self.journal
        assert journal is not None and self.known is not None
        for key, since in list(self.away.items()):
            if now - since > CLIENT_HOLD_SECONDS:
                log.warning("client %d has been away %.0f s: dropping its tasks and results",
                            key, now - since)
                self._forget_client(key)
        journal.flush(now)
        known = self.known
        if not known and not self.held:
            if journal.grown:  # nothing unfinished: a tiny snapshot of the key owners
                journal.compact((), (), self.key_owner)
        elif journal.wants_compaction():
            journal.compact(self._unfinished(), [g for gs in self.held.values() for g in gs],
                            self.key_owner)

    def _unfinished(self) -> Iterator[tuple[list[int], list[bytes]]]:
        """Every unfinished task (running, then queued) in (ids, blobs) groups."""
        known = self.known
        assert known is not None
        groups: list[Iterable[tuple[int, bytes]]] = [
            s.inflight.items() for w in self.workers.values() for s in w.slots.values()]
        groups += [zip(ids[pos:], blobs[pos:]) for ids, blobs, pos in self.queue]
        groups += list(self.local.values())
        for pairs in groups:
            kept = [(t, b) for t, b in pairs if t in known]
            for i in range(0, len(kept), MAX_BATCH):  # records of a bounded size
                ids, blobs = zip(*kept[i:i + MAX_BATCH])
                yield list(ids), list(blobs)

    def _unready(self, slot: Slot) -> None:
        """Send this slot nothing more."""
        slot.credit = 0
        if slot.ready:
            self.ready.remove(slot)
            slot.ready = False

    def _requeue(self, tasks: dict[int, bytes], lost_on: str | None = None) -> None:
        """Put a slot's unfinished tasks back at the head of the queue, in order.

        ``lost_on``: the name of the lost slot that held them; each counts an attempt, and
        those at MAX_ATTEMPTS are failed with WorkerLost instead.
        """
        if lost_on is not None:
            attempts = self.attempts
            given_up = []
            for tid in list(tasks):
                n = attempts.get(tid, 0) + 1
                if n >= MAX_ATTEMPTS:
                    del tasks[tid]
                    attempts.pop(tid, None)
                    given_up.append(tid)
                else:
                    attempts[tid] = n
            for tid in given_up:
                self.done += 1
                self.failed += 1
                self._deliver(P.client_key(tid), lost_on, [tid],
                              [payload.lost_result(lost_on, MAX_ATTEMPTS)])
        if tasks:
            self.queue.appendleft([list(tasks), list(tasks.values()), 0])
            self.queued += len(tasks)

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Give each slot with credit a fair share of the queue, one frame each."""
        ready = self.ready
        while self.queued and ready:
            slot = ready[0]
            share = -(-self.queued // len(ready))  # ceil: spread a short queue over slots
            n = min(slot.credit, MAX_BATCH, share)
            if self.local:
                # Data-aware: tasks whose data the slot's machine holds, then the FIFO,
                # then (rather than leave the slot idle) anyone's.
                ids, blobs = self._take_local(slot.worker.data, n)
                if len(ids) < n:
                    more = self._take(n - len(ids))
                    ids, blobs = ids + more[0], blobs + more[1]
                if len(ids) < n and self.local:
                    more = self._take_local(None, n - len(ids))
                    ids, blobs = ids + more[0], blobs + more[1]
            else:
                ids, blobs = self._take(n)
            if not ids:
                continue  # everything taken was cancelled; the queue shrank
            if not self._send(slot.ident, P.Tasks(ids, blobs)):
                self._requeue(dict(zip(ids, blobs)))
                continue  # _send took the slot off the ready list
            slot.inflight.update(zip(ids, blobs))
            slot.credit -= len(ids)
            ready.popleft()
            if slot.credit > 0:
                ready.append(slot)
            else:
                slot.ready = False

    def _take(self, n: int) -> tuple[list[int], list[bytes]]:
        """Pop up to ``n`` tasks from the head of the queue, skipping dropped ones."""
        ids: list[int] = []
        blobs: list[bytes] = []
        queue = self.queue
        size = 0
        while n > 0 and queue and size < FRAME_SOFT_BYTES:
            chunk = queue[0]
            cids, cblobs, pos = chunk
            end = min(pos + n, len(cids))
            part = cblobs[pos:end]
            part_size = sum(map(len, part))
            if size + part_size > FRAME_SOFT_BYTES and len(part) > 1:
                # Large blobs: stop the frame near its byte limit (always take one task).
                keep = 0
                for blob in part:
                    if keep and size + len(blob) > FRAME_SOFT_BYTES:
                        break
                    size += len(blob)
                    keep += 1
                end = pos + keep
                part = part[:keep]
            else:
                size += part_size
            ids += cids[pos:end]
            blobs += part
            n -= end - pos
            if end == len(cids):
                queue.popleft()
            else:
                chunk[2] = end
        self.queued -= len(ids)
        if self.cancelled or self.gone_clients or self.known is not None:
            ids, blobs = self._without_dropped(ids, blobs)
        if not queue and not self.local:  # nothing left that a cancel could refer to
            self.gone_clients.clear()
            self.cancelled.clear()
        return ids, blobs

    def _take_local(self, held: set[str] | None, n: int) -> tuple[list[int], list[bytes]]:
        """Pop up to ``n`` data-keyed tasks: of keys in ``held``, or (None) of any key,
        oldest key first. Costs O(tasks taken + min(len(held), keys queued))."""
        local = self.local
        if held is None:
            keys: Iterator[str] = iter(lambda: next(iter(local), ""), "")  # head, until empty
        elif len(held) < len(local):
            keys = iter([k for k in held if k in local])
        else:
            keys = iter([k for k in local if k in held])
        ids: list[int] = []
        blobs: list[bytes] = []
        size = 0
        while len(ids) < n and size < FRAME_SOFT_BYTES:
            key = next(keys, None)
            if key is None:
                break
            tasks = local[key]
            while tasks and len(ids) < n and size < FRAME_SOFT_BYTES:
                tid, blob = tasks.popleft()
                ids.append(tid)
                blobs.append(blob)
                size += len(blob)
            if not tasks:
                del local[key]
        self.queued -= len(ids)
        if self.cancelled or self.gone_clients or self.known is not None:
            ids, blobs = self._without_dropped(ids, blobs)
        return ids, blobs

    def _without_dropped(self, ids: list[int], blobs: list[bytes]) -> tuple[list, list]:
        """Skip cancelled tasks, departed clients' tasks and (journal) finished ones."""
        cancelled, gone = self.cancelled, self.gone_clients
        known = self.known
        keep_ids, keep_blobs, dropped = [], [], []
        for tid, blob in zip(ids, blobs):
            if tid in cancelled:
                cancelled.discard(tid)
                dropped.append(tid)
            elif tid >> P.ID_SHIFT in gone:
                dropped.append(tid)
            elif known is None or tid in known:
                keep_ids.append(tid)
                keep_blobs.append(blob)
        if dropped and known is not None:
            known.difference_update(dropped)
            self.journal.done(dropped)  # type: ignore[union-attr]
        return keep_ids, keep_blobs

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict:
        """Counters and workers, as answered to STATUS (documented in docs/protocol.md)."""
        rate = 0.0
        if len(self._rate) >= 2:
            (t0, d0), (t1, d1) = self._rate[0], self._rate[-1]
            rate = (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
        workers = []
        for w in self.workers.values():
            workers.append({
                "name": w.info.get("name"), "hostname": w.info.get("hostname"),
                "slots": w.info.get("slots"), "connected_slots": len(w.slots),
                "cpus": w.info.get("cpus"), "memory": w.info.get("memory"),
                "tags": w.info.get("tags", []), "version": w.version,
                "running": sum(len(s.inflight) for s in w.slots.values()), "done": w.done,
                "window": sum(len(s.inflight) + s.credit for s in w.slots.values()),
                "draining": w.draining, "data_keys": len(w.data),
                "idle_seconds": round(time.monotonic() - w.last_seen, 3),
            })
        return {
            "version": __version__, "protocol": PROTOCOL_VERSION,
            "uptime": round(time.monotonic() - self._started, 3),
            "clients": len(self.clients), "workers": len(self.workers),
            "slots": sum(len(w.slots) for w in self.workers.values()),
            "queued": self.queued, "dispatch": "data" if self.data_aware else "fifo",
            "running": sum(len(s.inflight) for w in self.workers.values() for s in w.slots.values()),
            "submitted": self.submitted, "done": self.done, "failed": self.failed,
            "tasks_per_second": round(rate, 1), "worker_list": workers,
            "journal": None if self.journal is None else {
                "path": self.journal.path, "bytes": self.journal.size,
                "fsync": self.journal.fsync, "writes": self.journal.writes,
                "syncs": self.journal.syncs, "compactions": self.journal.compactions,
                "held_results": sum(len(ids) for g in self.held.values() for ids, _ in g),
                "away_clients": len(self.away), "duplicate_submits": self.duplicate_submits,
            },
        }


def run_broker(listen: str, *, journal: str | None = None, fsync: str = "interval",
               keys: str | None = None, insecure: bool = False, dispatch: str = "data",
               ready_line: bool = True) -> int:
    """Run a broker in this process until SIGTERM/SIGINT; return the exit status.

    ``journal``: a directory for the journal (see :mod:`zfalkon.journal`), or None.
    ``keys``: a broker key directory (see :mod:`zfalkon.security`): CurveZMQ on, only
    allow-listed keys. Without keys a non-loopback ``listen`` needs ``insecure``.
    Prints ``zfalkon broker listening on ADDRESS`` on stdout once bound (LocalCluster and
    scripts read it to learn the port when ``--listen`` gave port 0).
    """
    if insecure and not keys and not is_loopback(listen_endpoint(listen)):
        log.warning("INSECURE: listening on %s with no keys: no encryption, and anyone who "
                    "can connect can run code on every worker and read every result", listen)
    broker = Broker(listen, Journal(journal, fsync) if journal else None,
                    BrokerKeys(keys) if keys else None, insecure, dispatch)
    address = broker.bind()
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    if ready_line:
        print(f"zfalkon broker listening on {address}", flush=True)
    log.info("zfalkon %s broker listening on %s (protocol %d)", __version__, address,
                PROTOCOL_VERSION)
    try:
        broker.serve()
    finally:
        broker.close()
    return 0
