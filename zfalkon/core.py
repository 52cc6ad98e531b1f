"""The broker's bookkeeping, without sockets: events in, messages out, the clock passed in.

:class:`BrokerCore` owns everything the broker knows: registered peers and the routing-id
/ key binding, client keys, the task queue, the tasks each slot holds and their leases,
slot windows, attempts, cancellations, and each session's streams (:mod:`zfalkon.stream`).
The socket shell (:mod:`zfalkon.broker`) decodes frames and feeds them in:

* :meth:`BrokerCore.message` a decoded message, with the CurveZMQ identity its connection
  proved (or None without keys); :meth:`BrokerCore.refuse` a frame that did not decode;
* :meth:`BrokerCore.send_failed` a send the socket could not make (the peer's connection
  is gone);
* :meth:`BrokerCore.dispatch` after each burst of messages (and after the journal flush):
  hand queued tasks to slots with room;
* :meth:`BrokerCore.tick` once a second: lost workers, expired leases, work stealing,
  quiet and expired clients;
* :meth:`BrokerCore.restore` a replayed journal, before any peer connects.

Every message to send is appended to :attr:`BrokerCore.outbox` as ``(routing id,
message)``; every durable fact goes to the :class:`Recorder` given at construction (the
journal, or nothing). Nothing here blocks, reads a clock or touches a file, so tests drive
it directly, thousands of steps a second (``tests/test_core.py``).

Delivery rules (``docs/protocol.md``, section 6, states them as MUST rules):

* a task is queued once per id; a result is accepted only from the slot holding the task,
  and only once; each result stays in its client's stream until the client acknowledges
  it, and is sent again after a replaced connection;
* a slot holds tasks under a lease renewed by its traffic and its agent's heartbeat; a
  lapsed lease puts them back in the queue (one attempt each) and revokes them at the
  slot; a task lost with MAX_ATTEMPTS slots fails with WorkerLost;
* a task running when its slot or its slot's agent died (SLOT_LOST names it) counts a
  crash and goes back to the queue, no attempt counted; at ``max_crashes`` (MAX_CRASHES)
  it fails with WorkerCrashed naming it (quarantined), never handed to another slot;
* dispatch never takes a slot past its window, nor past its fair share of the work
  (``max(2, ceil((queued + running) / active slots))``).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import msgpack

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import (
    CLIENT_AWAY_SECONDS,
    CLIENT_HOLD_SECONDS,
    HEARTBEAT_MISSES,
    HEARTBEAT_SECONDS,
    LEASE_SECONDS,
    MAX_ATTEMPTS,
    MAX_BATCH,
    MAX_CLIENT_KEY,
    MAX_CRASHES,
    MAX_WINDOW,
    PING_SECONDS,
    PROTOCOL_VERSION,
    STEAL_SECONDS,
)
from zfalkon.errors import ProtocolError
from zfalkon.stream import ACCEPT, GAP, Inbound, Outbound
from zfalkon.taskqueue import FifoQueue

log = logging.getLogger("zfalkon.broker")

#: What a result dropped by :meth:`BrokerCore._shed` becomes.
_DROPPED = payload.error_result(
    "ResultDropped", "the broker dropped this result: the client was not listening and "
    "more results were waiting for it than the broker keeps for one client")

__all__ = ["BrokerCore", "Recorder", "Client", "Usage", "Worker", "Slot"]

_RATE_WINDOW = 10  # ticks of history behind tasks_per_second
_ERRORS_PER_TICK = 100  # ERROR answers per peer per tick; past that, bad frames are dropped
#: Per-peer limits: what one peer can make the broker keep (documented in
#: docs/protocol.md, "Limits"). HELLO fields past these are cut, unknown ones dropped.
MAX_NAME_CHARS = 128  # a worker's id, name and hostname; a client's name; a version
MAX_TAGS = 64  # tags of a worker
MAX_TAG_CHARS = 64
MAX_WORKER_SLOTS = 4096  # slots one worker agent may register
MAX_DATA_KEYS = 10_000  # data keys remembered per worker (HOLDING); later ones ignored
MAX_DATA_KEY_CHARS = 512
#: Result bytes the broker sends a client ahead of its acknowledgements.
SEND_WINDOW_BYTES = 4 * 1024 * 1024
#: A client whose acknowledgements have not moved for this long while results wait for
#: it is not reading: it is treated as quiet (nothing sent until it speaks again, and its
#: waiting results kept within MAX_HELD_BYTES).
ACK_STALL_SECONDS = 10.0
#: Results waiting for a listening client past which its queued tasks are *parked*
#: (dispatch sets them aside, other clients' work goes on) until it has read half of
#: them: backpressure, so a client that reads slower than its tasks produce results
#: loses nothing. Past twice this, if its acknowledgements have not moved for a tick
#: or two, the oldest not yet sent are replaced by ResultDropped (its running tasks'
#: results cannot be parked).
MAX_WAITING_BYTES = 32 * 1024 * 1024
#: Results kept in full for a client that is not listening (quiet: silent, or its
#: connection refused more frames); past either bound the oldest are replaced by a short
#: ResultDropped error (logged, and journaled), so its futures still complete.
MAX_HELD_BYTES = 16 * 1024 * 1024
MAX_HELD_RESULTS = 50_000
_PURGE_SECONDS = 30.0
_PINGS_PER_TICK = 32  # PINGs answered per peer per tick; past that, they are dropped
_ACK_EVERY = 8  # frames a peer may be owed an acknowledgement before one is sent alone
_COSTLY_PER_TICK = 8  # STATUS_REQUESTs answered per peer per tick (each answer is large)
#: A peer's stream is sent again (RESEND) at most once in this many seconds.
RESEND_SECONDS = 2.0
#: ... and again only once its acknowledgement has moved since the last time (a client's
#: is proven by its token): otherwise the k-th RESEND in a row waits
#: RESEND_IDLE_SECONDS x 2^(k-1) (10 s, 20 s, 40 s, ...) after the previous one. A peer
#: that asks again and again without reading makes the broker queue its unacknowledged
#: frames again (a client: at most SEND_WINDOW_BYTES) about log2(T / 10 s) times over T
#: (13 times a day), not every RESEND_SECONDS; an honest peer whose re-sent frames were
#: lost too (its connection replaced again before it read them) waits 10 s more, then 20.
RESEND_IDLE_SECONDS = 10.0
#: HELLOs taken from one routing id per tick; past that, they are dropped unanswered (a
#: client HELLO that claims its record again makes the broker send its unacknowledged
#: results again).
HELLOS_PER_TICK = 2
#: Result bytes sent to a client in an earlier session (before its HELLO) and not
#: acknowledged still count against its SEND_WINDOW_BYTES in the new session until its
#: acknowledgement moves, or until it has not HELLOed for this long: a client that HELLOs
#: again and again without reading cannot make the broker copy its results into the
#: socket once a HELLO.
STALE_SECONDS = 5.0
#: STATUS answer bytes per peer per tick (unused allowance is not saved up; one answer
#: is always allowed when the peer is within it, so an answer larger than this goes out
#: once every few ticks): STATUS answers a peer does not read pile up in the socket.
STATUS_BYTES_PER_TICK = 1024 * 1024
#: One STATUS answer is bounded, so that the frames ZeroMQ may queue for a peer that asks
#: and never reads (broker.SEND_HWM = 256) stay well under the per-peer bound: the first
#: STATUS_MAX_WORKERS workers are listed in full (at most STATUS_MAX_TAGS tags, the rest
#: counted in ``tags_omitted``), the others in short (name, slots, running, done, ...),
#: until the list reaches STATUS_MAX_BYTES (msgpack); workers past it are counted in
#: ``workers_omitted`` (``workers`` and ``slots`` count them all).
STATUS_MAX_WORKERS = 32
STATUS_MAX_TAGS = 8
STATUS_MAX_BYTES = 96 * 1024
#: STATUS ``runs`` lists at most this many runs (newest first), within
#: STATUS_RUNS_BYTES of the STATUS_MAX_BYTES (the worker list gets the rest); the others
#: are counted in ``runs_omitted``.
STATUS_MAX_RUNS = 64
STATUS_RUNS_BYTES = 32 * 1024
#: Live tasks (queued, running, or delivered and not acknowledged) one client may have;
#: past any of these a SUBMIT frame is not accepted (not acknowledged: the client sends
#: it again later) and the client is told ERROR ``limit``: backpressure, nothing is lost.
#: With keys (CurveZMQ), these and the limits on stored functions
#: (payload.MAX_CLIENT_FUNCTIONS, MAX_CLIENT_FUNCTION_BYTES) count the sum over every
#: client record of one key (:class:`Usage`): a key opening many connections does not
#: multiply them. Without keys there is no identity to add up under: each record has its
#: own.
MAX_CLIENT_TASKS = 1_000_000
MAX_CLIENT_BYTES = 256 * 1024 * 1024  # their task blobs and data hints
MAX_CLIENT_HINTED = 32_768  # those with a data hint (a hint costs ~1 KB queued by key)
#: Client records one key may have; a HELLO for one more first forgets the key's longest
#: silent record holding nothing (no live task, no unacknowledged result; away ones
#: first), else is refused with ERROR ``limit`` (the client may try again later).
MAX_CLIENTS_PER_KEY = 64
#: Tasks cancelled with CANCEL_DROP stop counting against their client at once, but stay
#: in the queue (skipped when taken) while no slot is free to take them: past either of
#: these, counted since the last purge, every such task is removed from the queue (one
#: O(queue) pass, so a submit-and-cancel loop cannot fill the broker with dead blobs).
MAX_CANCELLED_QUEUED_BYTES = 32 * 1024 * 1024
MAX_CANCELLED_QUEUED = 65_536
#: Clients with no connection (quiet, or journal placeholders) the broker keeps; past
#: this, the oldest are forgotten, those holding nothing (no live task) first.
#: Functions a slot is counted on to keep (sent beside its tasks by digest, see
#: :meth:`BrokerCore._functions_for`); past these, the oldest are forgotten (TASKS
#: ``forget``) and sent again when next needed.
MAX_SLOT_FUNCTIONS = 256
MAX_SLOT_FUNCTION_BYTES = 64 * 1024 * 1024
#: Function bytes kept for clients away with nothing live or unread (past it, the longest
#: silent of them are forgotten: one that comes back registers again and sends its
#: functions again), and for all clients (past it, a SUBMIT storing more waits: ERROR
#: ``limit``).
MAX_AWAY_FUNCTION_BYTES = 32 * 1024 * 1024
MAX_FUNCTION_BYTES = 1024 * 1024 * 1024
MAX_AWAY_CLIENTS = 4096
#: Result bytes kept in full for all clients with no connection together (each also
#: within MAX_HELD_BYTES); past this, the results of the longest silent are replaced by
#: ResultDropped, sent ones included (counted in STATUS dropped_results).
MAX_AWAY_HELD_BYTES = 32 * 1024 * 1024
#: Client records that have never had a task accepted and hold nothing; past this, the
#: oldest is forgotten (if it speaks again it is told hello-required and registers again).
#: One silent IDLE_CLIENT_SECONDS is forgotten on the tick.
MAX_IDLE_CLIENTS = 4096
IDLE_CLIENT_SECONDS = 30.0
#: A client silent this long (it pings every PING_SECONDS while it waits) is *quiet*:
#: with a journal, results for it are journaled as HELD from then on.
QUIET_SECONDS = 3 * PING_SECONDS


class Recorder:
    """Where the core records durable facts: here, nowhere (no journal).

    :class:`zfalkon.journal.JournalRecorder` records them in the journal: a replay gives
    back exactly the core's live tasks (:attr:`BrokerCore.live`).
    """

    durable = False

    def submit(self, ids: list[int], blobs: list[bytes]) -> None: ...
    def done(self, ids: list[int]) -> None: ...
    def held(self, ids: list[int], blobs: list[bytes]) -> None: ...
    def gone(self, key: int) -> None: ...
    def key(self, key: int, owner: str) -> None: ...
    def function(self, key: int, digest: bytes, blob: bytes) -> None: ...

    def stats(self) -> dict | None:
        """What STATUS shows of it (None: no journal)."""
        return None


class Replay(Protocol):
    """What a journal replay gives back (see :class:`zfalkon.journal.Replayed`)."""

    tasks: dict[int, bytes]
    held: dict[int, bytes]
    owners: dict[int, str]
    functions: dict[int, dict[bytes, bytes]]


@dataclass(eq=False)
class Usage:
    """What the client records of one key hold together, counted against the client limits
    (MAX_CLIENT_TASKS, _BYTES, _HINTED, _FUNCTIONS, _FUNCTION_BYTES): the sums of their
    own counters, kept in step with them (:meth:`BrokerCore._track`, :meth:`_untrack`,
    :meth:`_store`, :meth:`_drop_functions`). With keys, one per CurveZMQ identity
    (``owner``, ``ROLE:NAME``), shared by its records; without, one per record."""

    owner: str = ""
    clients: dict[int, "Client"] = field(default_factory=dict)  # its records, by client key
    live_tasks: int = 0
    task_bytes: int = 0
    hinted: int = 0
    functions: int = 0
    function_bytes: int = 0


@dataclass(eq=False)
class Client:
    ident: bytes  # b"": none yet (results held for it from a journal)
    key: int
    name: str
    last_heard: float
    rx: Inbound = field(default_factory=Inbound)  # its SUBMIT/CANCEL stream
    tx: Outbound = field(default_factory=Outbound)  # DELIVER frames: (worker, ids, blobs)
    told: int = 0  # the last ack of its stream it was sent
    quiet: bool = False  # silent QUIET_SECONDS: results are journaled as HELD
    submitted: bool = False  # has had tasks accepted (forgetting it has work to do)
    resent_at: float = -1e9  # when its stream was last sent again (RESEND)
    resend_mark: int = -1  # the last frame sent again then (read once acknowledged)
    resends: int = 0  # RESENDs honoured since its acknowledgement last moved
    sent: int = 0  # the last frame of its stream sent to it (none is sent while quiet)
    in_flight: int = 0  # result bytes sent to it and not acknowledged
    reading: int = 0  # bit 0: its acknowledgement moved this tick; bit 1: the last one
    journaled: int = 0  # the last frame of its stream journaled as HELD
    ack_mark: int = -1  # its acknowledgement when last seen to move, and when
    ack_since: float = 0.0
    held_bytes: int = 0  # result bytes in its stream kept in full (not yet dropped)
    held_results: int = 0
    refused_at: float = -1e9  # when it was last told its SUBMIT was refused
    stale: int = 0  # result bytes sent in an earlier session, not known to be read
    stale_at: float = 0.0
    live_tasks: int = 0  # its tasks in BrokerCore.live
    task_bytes: int = 0  # their blobs and hints (approximately, once some finish)
    hinted: int = 0  # those with a data hint (approximately)
    #: Functions its tasks by digest call: digest -> pickle (SUBMIT ``functions``), kept
    #: as long as this record (journaled), within MAX_CLIENT_FUNCTIONS / _BYTES.
    functions: dict[bytes, bytes] = field(default_factory=dict)
    function_bytes: int = 0
    #: What it and the other records of its CurveZMQ key hold (the limits count this).
    usage: Usage = field(default_factory=Usage)
    #: The key of its session's acknowledgement tokens (:func:`ack_token`): new at each
    #: HELLO (its stream's numbers start again from 1), never sent, never journaled.
    secret: bytes = field(default_factory=lambda: os.urandom(16))
    #: Its *run* (``zfalkon runs``): the label from HELLO ``run``; an observer (HELLO
    #: ``observer``: a status or cancel connection) is not counted as a client.
    run: str = ""
    observer: bool = False
    #: The run's counters, kept per event (O(1), or O(1) per key in a frame):
    #: ``queued``: its live tasks in the queue or parked and not cancelled; ``held``: its
    #: tasks slots hold (running or prefetched, live or not); ``done``/``failed``:
    #: results accepted for it (from slots, or made by the broker for a lost or crashed
    #: slot); ``cancelled``: tasks cancelled before any slot had them; ``tasks``:
    #: tasks accepted.
    queued: int = 0
    held: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    tasks: int = 0


def ack_token(secret: bytes, seq: int) -> bytes:
    """The token of DELIVER ``seq`` in a client session keyed by ``secret``: a keyed hash
    of the number, so the broker keeps nothing per frame, and a client that has not read
    the frame cannot acknowledge it (it would have to guess 64 bits)."""
    return hashlib.blake2b(seq.to_bytes(8, "little"), digest_size=8, key=secret).digest()


@dataclass(eq=False)
class Worker:
    ident: bytes
    worker_id: str
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
    lease: float  # when its tasks go back to the queue unless renewed
    window: int = 0  # tasks it asks to hold
    inflight: dict[int, bytes] = field(default_factory=dict)  # dispatch order
    progress: float = 0.0  # last result accepted (or first task handed to it idle)
    stalled: bool = False  # its lease lapsed: nothing more until it speaks again
    ready: bool = False  # in the core's ready deque
    active: bool = False  # counted in BrokerCore.active_slots
    rx: Inbound = field(default_factory=Inbound)  # its RESULTS stream
    tx: Outbound = field(default_factory=Outbound)  # TASKS frames: (ids, revoke)
    told: int = 0
    resent_at: float = -1e9  # when its stream was last sent again (RESEND)
    resend_mark: int = -1  # the last frame sent again then (read once acknowledged)
    resends: int = 0  # RESENDs honoured since its acknowledgement last moved
    #: Functions sent to it this session (TASKS ``functions``): scoped digest (client
    #: key and digest) -> size, oldest first; it keeps them until told to forget them.
    functions: collections.OrderedDict[bytes, int] = field(
        default_factory=collections.OrderedDict)
    function_bytes: int = 0


Peer = Client | Worker | Slot


def worker_info(info: dict) -> dict | None:
    """What the broker keeps of a worker's HELLO ``info``: the known fields, each checked
    and cut to its limit (unknown fields are dropped, so a HELLO cannot make the broker
    keep more than a few kilobytes); None if ``worker_id`` or ``slots`` is missing or
    wrong."""
    worker_id, slots = info.get("worker_id"), info.get("slots")
    if type(worker_id) is not str or not 0 < len(worker_id) <= MAX_NAME_CHARS \
            or type(slots) is not int or not 0 < slots <= MAX_WORKER_SLOTS:
        return None
    tags = info.get("tags")
    kept: dict = {"worker_id": worker_id, "slots": slots,
                  "tags": [t[:MAX_TAG_CHARS] for t in tags[:MAX_TAGS] if type(t) is str]
                  if type(tags) is list else []}
    for name in ("name", "hostname"):
        value = info.get(name)
        kept[name] = value[:MAX_NAME_CHARS] if type(value) is str else None
    for name in ("cpus", "memory", "pid"):
        value = info.get(name)
        kept[name] = value if type(value) is int else None
    return kept


_FAILED_KINDS = frozenset((payload.RESULT_ERROR, payload.RESULT_TIMEOUT,
                           payload.RESULT_CRASHED, payload.RESULT_LOST))


def _failures(blobs: list[bytes]) -> int:
    """How many of these results are failures (docs/protocol.md, section 5), read from
    each blob's kind; a result with captured output (kind 7) by the result it wraps."""
    kinds = _FAILED_KINDS
    return sum(1 for b in blobs if len(b) > 1 and (
        b[1] in kinds or (b[1] == payload.RESULT_OUTPUT and _wrapped_failed(b))))


def _wrapped_failed(blob: bytes) -> bool:
    """Whether a captured-output result (a slot's bytes: anything) wraps a failure."""
    unpacker = msgpack.Unpacker(max_buffer_size=len(blob))
    unpacker.feed(blob)
    try:
        unpacker.read_array_header()
        unpacker.skip()  # (the kind)
        inner = unpacker.unpack()
    except Exception:  # (malformed: the client reports it; not counted here)
        return False
    return type(inner) is bytes and len(inner) > 1 and inner[1] in _FAILED_KINDS


class BrokerCore:
    """The broker's state machine; see the module docstring."""

    def __init__(self, now: float, *, queue: FifoQueue | None = None,
                 recorder: Recorder | None = None) -> None:
        self.queue = queue if queue is not None else FifoQueue()
        self.recorder = recorder if recorder is not None else Recorder()
        self.hold_seconds = CLIENT_HOLD_SECONDS if self.recorder.durable else CLIENT_AWAY_SECONDS
        self.outbox: list[tuple[bytes, P.Message]] = []
        self.peers: dict[bytes, Peer] = {}
        self.bound: dict[bytes, str] = {}  # with keys: routing id -> "ROLE:NAME" of its key
        self.clients: dict[int, Client] = {}
        self.workers: dict[str, Worker] = {}
        self.ready: collections.deque[Slot] = collections.deque()
        self.key_owner: dict[int, str] = {}  # key -> identity that first submitted under it
        self.usage: dict[str, Usage] = {}  # with keys: identity -> its records' usage
        self.next_key = 1
        self.running = 0  # tasks held by slots
        self.active_slots = 0  # slots asking for work, not stalled nor draining
        self.submitted = self.done = self.failed = 0
        self.duplicate_submits = self.expired_leases = self.stolen = 0
        self.dropped_results = 0  # replaced by ResultDropped for clients not listening
        #: Every task accepted and not finished for good: queued, held by a slot, or
        #: delivered and not yet acknowledged (and not cancelled). A task id is queued
        #: once while live; a journal replay gives back exactly this set.
        self.live: set[int] = set()
        self._dead_queued = False  # tasks no longer live may sit in the queue
        #: Tasks (and their bytes, approximately) cancelled with DROP since the last purge
        #: of the queue (:meth:`_purge_cancelled`).
        self._dropped_tasks = self._dropped_bytes = 0
        self.cancelled: set[int] = set()  # cancelled while queued or running (not live)
        #: Tasks cancelled exactly (CANCEL IF_QUEUED, KILL) since the last purge: they may
        #: wait in the queue after their CANCELLED result is acknowledged.
        self._exact_dead: set[int] = set()
        # Tasks that may have run although no slot holds them now (taken back from a slot,
        # or restored from the journal: restored_max, the highest such id per client key):
        # a CANCEL (IF_QUEUED) does not cancel them.
        self.maybe_ran: set[int] = set()
        self.restored_max: dict[int, int] = {}
        self.announced: set[int] = set()  # running tasks their client was told of (STARTED)
        self._held_last_tick: set[int] = set()  # what slots held at the last tick
        self.killing: set[int] = set()  # held by slots told to kill them (CANCEL_KILL)
        #: Client key -> its queued tasks set aside while it is far behind reading.
        self.parked: dict[int, tuple[list[int], list[bytes]]] = {}
        self.parked_count = 0
        self.gone: set[int] = set()  # keys of forgotten clients whose tasks may be queued
        self.attempts: dict[int, int] = {}  # task id -> slots it was lost with
        #: Task id -> why each process running it died (SLOT_LOST naming it), while fewer
        #: than max_crashes; at max_crashes it fails with WorkerCrashed (quarantined).
        self.crashes: dict[int, list[str]] = {}
        self.max_crashes = MAX_CRASHES
        self.storing = 0  # clients with functions stored (tasks by digest may be queued)
        self.function_bytes = 0  # stored, over all clients
        self.started = now
        self._purged_at = now
        self._rate: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=_RATE_WINDOW + 1)
        self._errors_sent: collections.Counter[bytes] = collections.Counter()
        self._costly: collections.Counter[bytes] = collections.Counter()
        self._pings: collections.Counter[bytes] = collections.Counter()
        self._dropped: collections.Counter[int] = collections.Counter()  # this tick, by key
        self.refused: collections.Counter[str] = collections.Counter()  # this tick, by code
        #: Set by the shell while new tasks cannot be taken (why: the journal cannot be
        #: written): a SUBMIT frame is then not accepted into the client's stream (not
        #: acknowledged: the client sends it again later) and the client is told so.
        self.submits_refused: str | None = None
        #: The limits per peer (the module's constants; tests make them small).
        self.max_client_tasks = MAX_CLIENT_TASKS
        self.max_client_bytes = MAX_CLIENT_BYTES
        self.max_client_hinted = MAX_CLIENT_HINTED
        self.max_clients_per_key = MAX_CLIENTS_PER_KEY
        self.max_away_clients = MAX_AWAY_CLIENTS
        self.max_away_held_bytes = MAX_AWAY_HELD_BYTES
        self.max_idle_clients = MAX_IDLE_CLIENTS
        self.max_away_function_bytes = MAX_AWAY_FUNCTION_BYTES
        self.max_function_bytes = MAX_FUNCTION_BYTES
        self.max_slot_functions = MAX_SLOT_FUNCTIONS
        self.max_slot_function_bytes = MAX_SLOT_FUNCTION_BYTES
        self._idle: dict[int, None] = {}  # keys of clients never given a task (oldest first)
        self._hellos: collections.Counter[bytes] = collections.Counter()
        self._status_bytes: collections.Counter[bytes] = collections.Counter()
        self._status_tokens: dict[bytes, bytes] = {}  # routing id -> its last STATUS token
        self._owed: dict[Client | Slot, None] = {}  # peers owed an acknowledgement (ordered)
        self._handlers: dict[type, Callable] = {
            P.Submit: self._on_submit, P.Cancel: self._on_cancel, P.Results: self._on_results,
            P.StatusRequest: self._on_status, P.Heartbeat: self._on_heartbeat,
            P.Bye: self._on_bye, P.SlotLost: self._on_slot_lost, P.Ping: self._on_ping,
            P.Drain: self._on_drain, P.Holding: self._on_holding, P.Ack: self._on_ack,
            P.Resend: self._on_resend, P.CancelRun: self._on_cancel_run,
        }
        self._allowed: dict[type, tuple[type, ...]] = {
            P.Submit: (Client,), P.Cancel: (Client,), P.CancelRun: (Client,),
            P.Results: (Slot,),
            P.Heartbeat: (Worker,), P.SlotLost: (Worker, Slot), P.Drain: (Worker,),
            P.Holding: (Slot,), P.Ack: (Client, Slot), P.Resend: (Client, Slot),
        }

    # -- events ------------------------------------------------------------------------

    def restore(self, got: Replay, now: float) -> None:
        """Take a replayed journal: queue unfinished tasks, hold results for their clients."""
        self.key_owner = dict(got.owners)
        self.live = set(got.tasks) | set(got.held)
        self.submitted = len(got.tasks)  # (so that done never passes submitted)
        if got.tasks:
            self.queue.push_front(list(got.tasks), list(got.tasks.values()))
        by_key: dict[int, tuple[list[int], list[bytes]]] = {}
        for tid, blob in got.held.items():
            ids, blobs = by_key.setdefault(tid >> P.ID_SHIFT, ([], []))
            ids.append(tid)
            blobs.append(blob)
        keys = {t >> P.ID_SHIFT for t in got.tasks} | set(by_key)
        counts: collections.Counter[int] = collections.Counter()
        sizes: collections.Counter[int] = collections.Counter()
        for tid, blob in got.tasks.items():
            counts[tid >> P.ID_SHIFT] += 1
            sizes[tid >> P.ID_SHIFT] += len(blob)
        for key in keys:  # absent until they come back with their key (or expire)
            client = self.clients[key] = Client(b"", key, "", now, quiet=True, submitted=True)
            self._attach(client, self.key_owner.get(key, ""))
            ids, blobs = by_key.get(key, ([], []))
            self._track(client, counts[key] + len(ids), sizes[key], 0)
            client.queued = client.tasks = counts[key]
            self._store(client, list(got.functions.get(key, {}).items()), journal=False)
            for i in range(0, len(ids), MAX_BATCH):
                client.tx.push(("", ids[i:i + MAX_BATCH], blobs[i:i + MAX_BATCH]))
        self.next_key = max(keys | set(got.owners), default=0) + 1
        for tid in got.tasks:  # (they may have run before the restart)
            key = tid >> P.ID_SHIFT
            if tid > self.restored_max.get(key, 0):
                self.restored_max[key] = tid

    def message(self, ident: bytes, msg: P.Message, user: str | None, now: float) -> None:
        """One decoded message from ``ident``. ``user``: with keys, the ``ROLE:NAME`` its
        connection proved (None without keys)."""
        peer = self.peers.get(ident)
        if user is not None and not self._authorized(ident, msg, user):
            return
        if type(msg) is P.Hello:
            n = self._hellos[ident]
            self._hellos[ident] = n + 1
            if n < HELLOS_PER_TICK:
                self._on_hello(ident, peer, msg, user, now)
            elif n == HELLOS_PER_TICK:
                log.warning("peer %s sends more than %d HELLOs a second; ignoring the rest",
                            ident.hex(), HELLOS_PER_TICK)
            return
        if peer is None:
            self.refuse(ident, ProtocolError(
                f"{type(msg).__name__} before HELLO", "hello-required"))
            return
        needed = self._allowed.get(type(msg))
        handler = self._handlers.get(type(msg))
        if handler is None or (needed is not None and type(peer) not in needed):
            self.refuse(ident, ProtocolError(
                f"{type(msg).__name__} is not allowed for a {type(peer).__name__.lower()}",
                "not-allowed"))
            return
        if type(peer) is Slot:
            if type(msg) is not P.Resend:  # (asking alone is no sign of work)
                peer.lease = now + LEASE_SECONDS
            if peer.stalled:
                peer.stalled = False
                self._count(peer)
                self._make_ready(peer)
        elif type(peer) is Client:
            peer.last_heard = now
            if peer.quiet:  # listening again: what it was not sent meanwhile goes now
                peer.quiet = False
                self._send_unsent(peer)
        handler(peer, msg, now)

    def refuse(self, ident: bytes, exc: ProtocolError) -> None:
        """Answer ERROR, at most _ERRORS_PER_TICK a tick per peer: a peer flooding bad
        frames without reading the answers cannot fill the broker's memory."""
        self.refused[exc.code] += 1
        if self.refused[exc.code] == 1:
            log.warning("refused a message from peer %s: %s", ident.hex(), str(exc)[:200])
        sent = self._errors_sent[ident]
        if sent < _ERRORS_PER_TICK:
            self._errors_sent[ident] = sent + 1
            self.outbox.append((ident, P.Error(exc.code, str(exc)[:512])))

    def send_failed(self, ident: bytes, now: float) -> None:
        """A send to ``ident`` failed: its connection is gone (for now). Streams keep what
        it missed; a client becomes quiet, a slot gets nothing more until it speaks."""
        peer = self.peers.get(ident)
        if type(peer) is Client:
            self._quiet(peer)
        elif type(peer) is Slot:
            peer.stalled = True
            self._count(peer)
            self._unready(peer)

    def tick(self, now: float) -> None:
        """Once a second: counters, lost workers, leases, stealing, quiet and gone clients."""
        self._rate.append((now, self.done))
        self._errors_sent.clear()
        self._costly.clear()
        self._pings.clear()
        self._hellos.clear()
        if self._status_bytes:
            self._status_bytes = collections.Counter({
                i: n - STATUS_BYTES_PER_TICK for i, n in self._status_bytes.items()
                if n > STATUS_BYTES_PER_TICK})
        for key, n in self._dropped.items():
            log.warning("client %d is not listening and more than %d results or %d MiB wait "
                        "for it: replaced its %d oldest results by ResultDropped errors",
                        key, MAX_HELD_RESULTS, MAX_HELD_BYTES >> 20, n)
        self._dropped.clear()
        for code, n in self.refused.items():
            if n > 1:
                log.warning("refused %d more messages (%s) in the last second", n - 1, code)
        self.refused.clear()
        limit = HEARTBEAT_SECONDS * HEARTBEAT_MISSES
        for worker in [w for w in self.workers.values() if now - w.last_seen > limit]:
            held = sum(len(s.inflight) for s in worker.slots.values())
            log.warning("worker %s lost: no heartbeat for %.1f s; requeueing %d tasks",
                        worker.info.get("name"), now - worker.last_seen, held)
            self._drop(worker, lost=True)
        idle = False
        for worker in self.workers.values():
            for slot in worker.slots.values():
                if slot.inflight and now > slot.lease:
                    log.warning("slot %s silent for %.1f s: its lease on %d tasks lapsed",
                                slot.name, now - slot.lease + LEASE_SECONDS, len(slot.inflight))
                    self.expired_leases += 1
                    slot.stalled = True
                    self._count(slot)
                    self._unready(slot)
                    self._take_back(slot, list(slot.inflight), lost=True)
                elif not slot.inflight and slot.ready:
                    idle = True
        if idle and not self.queue.count:
            self._steal(now)
        if self.gone and (not self.ready or now - self._purged_at >= _PURGE_SECONDS):
            # Forgotten clients' queued tasks leave memory within a tick when no slot
            # waits for work (dispatch skips them anyway), else every _PURGE_SECONDS: a
            # purge walks the whole queue.
            self._purge(set(self.gone))
            self._purged_at = now
        away: list[Client] = []
        for client in list(self.clients.values()):
            client.reading = (client.reading << 1) & 3
            silent = now - client.last_heard
            if client.stale and now - client.stale_at >= STALE_SECONDS:
                client.stale = 0
                self._send_unsent(client)
            if silent > self.hold_seconds:
                log.warning("client %d silent for %.0f s: dropping its tasks and results",
                            client.key, silent)
                self._forget(client)
                continue
            if silent > IDLE_CLIENT_SECONDS and not client.submitted and not client.tx.unacked:
                self._forget(client)  # (never given a task, gone: nothing to keep)
                continue
            if silent > QUIET_SECONDS and not client.quiet:
                self._quiet(client)
            elif not client.quiet and (client.sent < client.tx.seq or (
                    client.resends and client.tx.unacked)):
                acked = client.tx.acked()  # results wait behind its window, or were sent
                # again (RESEND) and not acknowledged: reading?
                if acked != client.ack_mark:
                    client.ack_mark, client.ack_since = acked, now
                elif now - client.ack_since > ACK_STALL_SECONDS:
                    self._quiet(client)  # (it pings but does not read)
            if client.quiet or not client.ident:
                away.append(client)
        if away:
            self._bound_away(away)
        if self.running or self._held_last_tick:
            self._announce()
        for peer in self._owed:
            self._send_ack(peer)
        self._owed.clear()

    # -- registration ------------------------------------------------------------------

    def _authorized(self, ident: bytes, msg: P.Message, user: str) -> bool:
        """With keys: a key acts only in its role, and a routing id belongs to one key."""
        bound = self.bound.get(ident)
        if bound is not None and bound != user:
            # A connection of another key presents this routing id (after its owner's
            # connection closed): send the owner nothing more until the owner speaks
            # again on its own connection.
            self.send_failed(ident, 0.0)
            self.refuse(ident, ProtocolError(
                f"routing id {ident.hex()} belongs to another key", "unauthorized"))
            return False
        if type(msg) is P.Hello:
            role = user.partition(":")[0]
            if msg.role not in ((P.ROLE_WORKER, P.ROLE_SLOT) if role == "worker" else (role,)):
                self.refuse(ident, ProtocolError(
                    f"key {user} may not register as a {msg.role}", "unauthorized"))
                return False
        return True

    def _on_hello(self, ident: bytes, peer: Peer | None, msg: P.Hello, user: str | None,
                  now: float) -> None:
        info = msg.info
        key = 0
        if msg.role == P.ROLE_CLIENT:
            key = self._client_hello(ident, peer, info, user or "", now)
            if key < 0:  # (refused: its identity has too many records)
                return
            if not key:
                self.refuse(ident, ProtocolError("every client key is in use", "bad-hello"))
                return
        elif msg.role == P.ROLE_WORKER:
            kept = worker_info(info)
            if kept is None:
                self.refuse(ident, ProtocolError(
                    f"worker HELLO needs worker_id (a string of at most {MAX_NAME_CHARS}) and "
                    f"slots (1 to {MAX_WORKER_SLOTS})", "bad-hello"))
                return
            old = self.workers.get(kept["worker_id"])
            if old is not None and user is not None and self.bound.get(old.ident) != user:
                self.refuse(ident, ProtocolError(
                    "that worker_id is registered by another key", "unauthorized"))
                return
            if peer is not None:
                self._drop(peer)  # a new registration under the same id starts afresh
            if old is not None and old is not peer:
                self._drop(old)
            worker = Worker(ident, kept["worker_id"], kept, msg.version[:MAX_NAME_CHARS], now)
            self.peers[ident] = self.workers[worker.worker_id] = worker
            log.info("worker %s registered: %s slots on %s", kept["name"], kept["slots"],
                     kept["hostname"])
        elif msg.role == P.ROLE_SLOT:
            worker_id, index = info.get("worker_id"), info.get("slot")
            owner = self.workers.get(worker_id) if type(worker_id) is str else None
            if owner is None or type(index) is not int or (
                    user is not None and self.bound.get(owner.ident) != user):
                self.refuse(ident, ProtocolError(
                    "slot HELLO names no registered worker of this key", "bad-hello"))
                return
            if peer is not None:
                self._drop(peer)
                if owner is peer:  # a worker's own routing id cannot be one of its slots
                    self.refuse(ident, ProtocolError(
                        "a worker's routing id cannot register a slot", "bad-hello"))
                    return
            if len(owner.slots) >= 2 * owner.info["slots"]:  # (room for restarted slots
                self.refuse(ident, ProtocolError(  # whose old registration lingers)
                    "the worker has registered twice as many slots as it has", "limit"))
                return
            slot = Slot(ident, owner, index, f"{owner.info.get('name', '?')}/{index}",
                        now + LEASE_SECONDS)
            self.peers[ident] = owner.slots[ident] = slot
        else:
            self.refuse(ident, ProtocolError(f"unknown role {P.short(msg.role, 32)}",
                                             "bad-hello"))
            return
        if user is not None:
            self.bound[ident] = user  # this routing id is now this key's
        self.outbox.append(
            (ident, P.Welcome(PROTOCOL_VERSION, __version__, key, HEARTBEAT_SECONDS)))

    def _client_hello(self, ident: bytes, peer: Peer | None, info: dict, user: str,
                      now: float) -> int:
        """Register a client; return its key. A client coming back (the broker restarted,
        or forgot it) asks for its old key (its task ids carry it): granted unless another
        connected client holds it, or the key's tasks came from another identity. -1: refused
        (the identity has max_clients_per_key records, none of which can be forgotten)."""
        claimed = info.get("key")
        record: Client | None = None
        key = 0
        if type(claimed) is int and 0 < claimed < MAX_CLIENT_KEY and \
                self.key_owner.get(claimed, user) == user:
            record = self.clients.get(claimed)
            if record is None:
                key = claimed
            elif record.ident in (b"", ident) and record.usage.owner == user:
                key = claimed  # its held results are waiting for it
            else:
                record = None
        if peer is not None and peer is not record:
            self._drop(peer)
        if record is None and user and not self._room_for_client(ident, user):
            return -1
        if not key:
            key = self._new_key()
            if not key:
                return 0
        if key in self.gone:  # a forgotten client's key again: its old tasks must not run
            self._purge({key})
        name = info.get("name")
        name = name[:MAX_NAME_CHARS] if type(name) is str else ""
        run = info.get("run")
        run = run[:MAX_NAME_CHARS] if type(run) is str else ""
        observer = info.get("observer") is True
        if record is None:
            record = Client(ident, key, name, now, run=run, observer=observer)
            self.clients[key] = record
            self._attach(record, user)
            self._idle[key] = None  # (until it has tasks accepted)
            if len(self._idle) > self.max_idle_clients:
                oldest = self.clients.get(next(iter(self._idle)))
                if oldest is not None and oldest is not record:
                    log.info("more than %d clients without tasks: forgetting client %d",
                             self.max_idle_clients, oldest.key)
                    self._forget(oldest)
        else:
            if record.ident and record.ident != ident:
                self.peers.pop(record.ident, None)
            record.ident, record.name, record.last_heard, record.quiet = ident, name, now, False
            record.run, record.observer = run, observer
        self.peers[ident] = record
        # A new session: streams start again. Results it has not acknowledged go first,
        # before WELCOME, so that it does not submit those tasks again.
        frames = [f for _, f in record.tx.unacked]
        all_journaled = record.journaled >= record.tx.seq  # (as HELD: not again)
        # What it was sent and has not acknowledged may still sit in the socket: it
        # counts against the new session's window until its acknowledgement moves.
        stale = record.in_flight + record.stale
        record.rx.reset()
        record.tx.reset()
        record.secret = os.urandom(16)  # (numbers start again: so do tokens)
        record.resend_mark = 1  # (a HELLO does not count as reading: frame 1 must be acked)
        record.told = record.sent = record.in_flight = record.journaled = 0
        if stale:
            record.stale, record.stale_at = stale, now
        record.held_bytes = record.held_results = 0
        for worker, ids, blobs in frames:
            self._send_deliver(record, worker, ids, blobs)
        if all_journaled:
            record.journaled = record.tx.seq
        if key in self.parked and record.held_bytes <= MAX_WAITING_BYTES // 2:
            self._unpark(key)
        return key

    def _attach(self, client: Client, owner: str) -> None:
        """Count a new client record under its identity ``owner`` (``""``: none, without
        keys: the record counts alone)."""
        usage = self.usage.get(owner) if owner else None
        if usage is None:
            usage = Usage(owner)
            if owner:
                self.usage[owner] = usage
        usage.clients[client.key] = client
        client.usage = usage

    def _room_for_client(self, ident: bytes, owner: str) -> bool:
        """May identity ``owner`` have one more client record? At max_clients_per_key its
        longest silent record holding nothing (no live task, no unacknowledged result;
        those away first) is forgotten; if none is, the HELLO is refused (ERROR
        ``limit``) and False returned."""
        usage = self.usage.get(owner)
        if usage is None or len(usage.clients) < self.max_clients_per_key:
            return True
        idle = [c for c in usage.clients.values() if not c.live_tasks and not c.tx.unacked]
        if idle:
            oldest = min(idle, key=lambda c: (not (c.quiet or not c.ident), c.last_heard))
            log.info("%s has %d client records: forgetting its client %d (holding nothing)",
                     owner, len(usage.clients), oldest.key)
            self._forget(oldest)
            return True
        self.refuse(ident, ProtocolError(
            f"{owner[:MAX_NAME_CHARS]} has {len(usage.clients)} client records holding "
            f"tasks or results (at most {self.max_clients_per_key} per key): try again "
            "once one has finished", "limit"))
        return False

    def _new_key(self) -> int:
        """The next free client key, wrapping below MAX_CLIENT_KEY (0: none is free)."""
        key = self.next_key
        for _ in range(MAX_CLIENT_KEY):
            if key >= MAX_CLIENT_KEY:
                key = 1
            if key not in self.clients and key not in self.key_owner:
                self.next_key = key + 1
                return key
            key += 1
        return 0

    # -- clients -----------------------------------------------------------------------

    def _stream_in(self, peer: Client | Slot, seq: int, ack: int, token: bytes = b"") -> bool:
        """A stream frame arrived: True if it is the next one (process it)."""
        self._peer_has(peer, ack, token)
        verdict = peer.rx.accept(seq)
        if verdict == ACCEPT:
            if seq - peer.told >= _ACK_EVERY:  # far behind: acknowledge now
                self._send_ack(peer)
                self._owed.pop(peer, None)
            else:  # (most acks ride on DELIVER and TASKS frames; the rest go on the tick)
                self._owed[peer] = None
            return True
        if verdict == GAP:
            if peer.rx.should_ask():
                self.outbox.append((peer.ident, P.Resend(peer.rx.last)))
        else:  # a duplicate: our ack may have been lost: say again how far we are
            peer.told = -1
            self._owed[peer] = None
        return False

    def _send_ack(self, peer: Client | Slot) -> None:
        if peer.ident and peer.told != peer.rx.last:
            peer.told = peer.rx.last
            self.outbox.append((peer.ident, P.Ack(peer.rx.last)))

    def _refuse_submit(self, client: Client, msg: P.Submit, now: float) -> None:
        """New tasks cannot be taken (:attr:`submits_refused`): the frame is dropped, not
        acknowledged; the client is told at most once per RESEND_SECONDS."""
        self._peer_has(client, msg.ack, msg.token)
        if now - client.refused_at >= RESEND_SECONDS:
            client.refused_at = now
            self.outbox.append((client.ident, P.Error(
                P.JOURNAL_UNAVAILABLE, str(self.submits_refused)[:512])))

    def _on_submit(self, client: Client, msg: P.Submit, now: float) -> None:
        if self.submits_refused is not None and msg.seq > client.rx.last:
            self._refuse_submit(client, msg, now)
            return
        if msg.seq == client.rx.last + 1 and msg.ids and self._over_limit(client, msg, now):
            return
        functions = None
        if msg.functions and msg.seq == client.rx.last + 1:
            functions = self._new_functions(client, msg, now)
            if functions is None:
                return
        if not self._stream_in(client, msg.seq, msg.ack, msg.token):
            return
        if functions:
            self._store(client, functions)
        ids = msg.ids
        if not ids:
            return
        key = client.key
        if min(ids) >> P.ID_SHIFT != key or max(ids) >> P.ID_SHIFT != key:
            self.refuse(client.ident, ProtocolError(
                "SUBMIT has task ids outside this client's key", "malformed"))
            return
        if key not in self.key_owner:  # its first tasks: who may claim the key back
            owner = self.key_owner[key] = self.bound.get(client.ident, "")
            self.recorder.key(key, owner)
        blobs, hints = msg.blobs, msg.hints
        live, cancelled = self.live, self.cancelled
        before = len(live)
        fresh = live.isdisjoint(ids) and (not cancelled or cancelled.isdisjoint(ids))
        if fresh:
            before = len(live)
            live.update(ids)
            if len(live) - before != len(ids):  # an id repeated within the frame
                live.difference_update(ids)
                fresh = False
        if not fresh:  # queue each task once
            seen: set[int] = set()
            keep = []
            revived = []
            for i, tid in enumerate(ids):
                if tid in cancelled and tid not in live:  # submitted again after a cancel
                    cancelled.discard(tid)  # (DROP): its copy still queued (or running)
                    live.add(tid)  # is wanted again. (A live one has a CANCELLED result
                    self.recorder.submit([tid], [blobs[i]])  # on its way: it stays so.)
                    revived.append(tid)
                elif tid not in live and tid not in seen:
                    seen.add(tid)
                    keep.append(i)
            live.update(seen)
            self.duplicate_submits += len(ids) - len(keep)
            grown = len(live) - before
            client.queued += len(keep)
            client.tasks += len(keep)
            if revived:  # (counted queued again unless a slot holds its copy)
                held = self._dispatched() if client.held else set()
                client.queued += sum(1 for t in revived if t not in held)
            if not keep:
                self._track(client, grown, 0, 0)
                return
            ids, blobs = [ids[i] for i in keep], [blobs[i] for i in keep]
            hints = [hints[i] for i in keep] if hints else hints
        else:
            grown = len(ids)
            client.queued += len(ids)
            client.tasks += len(ids)
        self.recorder.submit(ids, blobs)
        self.submitted += len(ids)
        if not client.submitted:
            client.submitted = True
            self._idle.pop(key, None)
        size = sum(map(len, blobs))
        hinted = 0
        if hints:
            size += sum(map(len, hints))
            hinted = len(hints) - hints.count("")
        self._track(client, grown, size, hinted)
        self.queue.add(ids, blobs, hints)

    def _over_limit(self, client: Client, msg: P.Submit, now: float) -> bool:
        """True if the client's next SUBMIT frame would take it past its limits
        (MAX_CLIENT_TASKS, MAX_CLIENT_BYTES, MAX_CLIENT_HINTED; with keys, counted over
        every record of its key: :class:`Usage`): the frame is dropped, not acknowledged
        (the client sends it again later: backpressure), and the client is told ERROR
        ``limit`` at most once per RESEND_SECONDS. A frame of at most MAX_BATCH tasks is
        taken whatever its size when the client (its key) has no live task (a larger one
        never is)."""
        n = len(msg.ids)
        usage = client.usage
        if not usage.live_tasks and n <= MAX_BATCH:
            return False
        size = sum(map(len, msg.blobs))
        hinted = 0
        if msg.hints:
            size += sum(map(len, msg.hints))
            hinted = n - msg.hints.count("")
        if n > MAX_BATCH:  # (never taken: an Executor splits its frames at MAX_BATCH)
            n = self.max_client_tasks + 1
        n += usage.live_tasks
        size += usage.task_bytes
        hinted += usage.hinted
        if n <= self.max_client_tasks and size <= self.max_client_bytes and \
                hinted <= self.max_client_hinted:
            return False
        self._wait_submit(client, msg, now, lambda: (
            f"client {client.key}"
            + (f" with the other clients of {usage.owner[:MAX_NAME_CHARS]}"
               if usage.owner else "")
            + f" has {usage.live_tasks} tasks live (queued, running, "
            f"or results not acknowledged): limits {self.max_client_tasks} tasks, "
            f"{self.max_client_bytes >> 20} MiB of tasks and hints, "
            f"{self.max_client_hinted} tasks with a data hint; this SUBMIT waits"))
        return True

    def _wait_submit(self, client: Client, msg: P.Submit, now: float,
                     why: Callable[[], str]) -> None:
        """A SUBMIT frame past a limit is dropped, not acknowledged (the client sends it
        again later: backpressure); the client is told ERROR ``limit`` at most once per
        RESEND_SECONDS."""
        self._peer_has(client, msg.ack, msg.token)
        if now - client.refused_at >= RESEND_SECONDS:
            client.refused_at = now
            self.refused["limit"] += 1
            self.outbox.append((client.ident, P.Error("limit", why()[:512])))

    def _new_functions(self, client: Client, msg: P.Submit,
                       now: float) -> list[tuple[bytes, bytes]] | None:
        """The functions of a SUBMIT frame not yet stored for the client, checked (each
        pickle must have its digest: a slot keeps one pickle per digest for every client);
        None if the frame is refused: malformed, or past the client's function limits
        (told ERROR ``limit``, as for :meth:`_over_limit`)."""
        pairs, stored, usage = msg.functions, client.functions, client.usage
        new: list[tuple[bytes, bytes]] = []
        size = 0  # (of the new ones)
        if len(pairs) % 2 == 0:
            for i in range(0, len(pairs), 2):
                digest, blob = pairs[i], pairs[i + 1]
                if digest in stored:
                    continue
                if len(blob) > payload.MAX_STORED_FUNCTION_BYTES or \
                        payload.function_digest(blob) != digest:
                    break
                new.append((digest, blob))
                size += len(blob)
            else:
                if usage.functions + len(new) <= payload.MAX_CLIENT_FUNCTIONS and \
                        usage.function_bytes + size <= payload.MAX_CLIENT_FUNCTION_BYTES \
                        and self.function_bytes + size <= self.max_function_bytes:
                    return new
                self._wait_submit(client, msg, now, lambda: (
                    f"client {client.key}"
                    + (f" with the other clients of {usage.owner[:MAX_NAME_CHARS]}"
                       if usage.owner else "")
                    + " would store more than "
                    f"{payload.MAX_CLIENT_FUNCTIONS} functions or "
                    f"{payload.MAX_CLIENT_FUNCTION_BYTES >> 20} MiB of them at the "
                    f"broker, or the broker more than {self.max_function_bytes >> 20} MiB "
                    "for all clients; this SUBMIT waits"))
                return None
        self.refuse(client.ident, ProtocolError(
            "SUBMIT functions must be [digest, pickle, ...] pairs, each pickle at most "
            f"{payload.MAX_STORED_FUNCTION_BYTES >> 20} MiB with its BLAKE2b-128 digest",
            "malformed"))
        return None

    def _store(self, client: Client, functions: list[tuple[bytes, bytes]],
               journal: bool = True) -> None:
        """Keep these functions for the client's tasks by digest (and journal them)."""
        if not functions:
            return
        if not client.functions:
            self.storing += 1
        usage, stored = client.usage, client.functions
        for digest, blob in functions:
            if digest in stored:  # (counted once)
                continue
            stored[digest] = blob
            client.function_bytes += len(blob)
            usage.function_bytes += len(blob)
            usage.functions += 1
            self.function_bytes += len(blob)
            if journal:
                self.recorder.function(client.key, digest, blob)

    def _drop_functions(self, client: Client) -> None:
        """Forget the functions stored for the client."""
        if client.functions:
            usage = client.usage
            usage.functions -= len(client.functions)
            usage.function_bytes -= client.function_bytes
            self.function_bytes -= client.function_bytes
            client.functions, client.function_bytes = {}, 0
            self.storing -= 1

    def _functions_for(self, slot: Slot, ids: list[int], blobs: list[bytes]
                       ) -> tuple[int, list[bytes], list[bytes]]:
        """For a TASKS frame to ``slot``: how many of these tasks to send (the pickles sent
        beside them stay within MAX_SLOT_FUNCTION_BYTES, but the first task's always go),
        the ``functions`` of theirs the slot was not sent yet, and the digests it may
        ``forget`` (the oldest, past MAX_SLOT_FUNCTIONS / _BYTES, that no task it holds
        or is sent calls)."""
        sent, clients, digest_of = slot.functions, self.clients, payload.stored_digest
        functions: list[bytes] = []
        needed: set[bytes] = set()  # (scoped digests: key and digest)
        forget: list[bytes] = []
        for i, (tid, blob) in enumerate(zip(ids, blobs)):
            digest = digest_of(blob)
            if digest is None:
                continue
            key = tid >> P.ID_SHIFT
            scoped = payload.scoped_digest(key, digest)
            needed.add(scoped)
            if scoped in sent:
                continue
            client = clients.get(key)
            body = client.functions.get(digest) if client is not None else None
            if body is None:
                continue  # (not its client's: the slot answers that it is missing)
            if slot.function_bytes + len(body) > self.max_slot_function_bytes or \
                    len(sent) >= self.max_slot_functions:
                forget += self._forget_functions(slot, needed, len(body))
                if (i or slot.inflight) and (
                        slot.function_bytes + len(body) > self.max_slot_function_bytes
                        or len(sent) >= self.max_slot_functions):
                    return i, functions, forget  # (the rest wait for the next frame)
            sent[scoped] = len(body)
            slot.function_bytes += len(body)
            functions += (scoped, body)
        return len(ids), functions, forget

    def _forget_functions(self, slot: Slot, needed: set[bytes], room: int) -> list[bytes]:
        """Forget the oldest functions sent to ``slot`` that neither ``needed`` nor a task
        it holds calls, until ``room`` more bytes and one more function fit its limits."""
        sent = slot.functions
        digest_of = payload.stored_digest
        for tid, blob in slot.inflight.items():  # (rare: only at the limits)
            digest = digest_of(blob)
            if digest is not None:
                needed.add(payload.scoped_digest(tid >> P.ID_SHIFT, digest))
        forget = []
        for scoped in list(sent):
            if slot.function_bytes + room <= self.max_slot_function_bytes and \
                    len(sent) < self.max_slot_functions:
                break
            if scoped not in needed:
                slot.function_bytes -= sent.pop(scoped)
                forget.append(scoped)
        return forget

    def _track(self, client: Client, n: int, size: int, hinted: int) -> None:
        """``n`` more live tasks of the client, with ``size`` bytes of blobs and hints,
        ``hinted`` of them with a data hint: counted for it and its key."""
        client.live_tasks += n
        client.task_bytes += size
        client.hinted += hinted
        usage = client.usage
        usage.live_tasks += n
        usage.task_bytes += size
        usage.hinted += hinted

    def _untrack(self, client: Client, n: int) -> None:
        """``n`` of the client's live tasks are no longer live (their bytes and hints are
        counted in proportion): no longer counted for it and its key."""
        live = client.live_tasks
        if n >= live:
            n, size, hinted = live, client.task_bytes, client.hinted
        elif n:
            size, hinted = client.task_bytes * n // live, client.hinted * n // live
        else:
            return
        self._track(client, -n, -size, -hinted)

    def _on_cancel(self, client: Client, msg: P.Cancel, now: float) -> None:
        if self._stream_in(client, msg.seq, msg.ack, msg.token):
            key, live, cancelled = client.key, self.live, self.cancelled
            ids = [t for t in msg.ids
                   if t >> P.ID_SHIFT == key and t in live and t not in cancelled]
            if ids and client.tx.unacked:  # (a task whose result is on its way is done)
                done = {t for _, (_, tids, _) in client.tx.unacked for t in tids}
                ids = [t for t in ids if t not in done]
            if not ids:  # (a task already cancelled is not cancelled again)
                return
            exact = msg.mode != P.CANCEL_DROP
            if msg.mode == P.CANCEL_KILL:  # the slots holding some kill them; the rest
                ids = self._kill(ids)  # are cancelled here, whether or not they ran
            elif exact:  # only tasks no slot ever had; the client hears of the others
                held = self._dispatched()
                maybe, below = self.maybe_ran, self.restored_max.get(key, 0)
                late = [t for t in ids if t in held or t in maybe or t <= below]
                if late:
                    if client.ident and not client.quiet:
                        self.outbox.append((client.ident, P.Started(late)))
                    self.announced.update(t for t in late if t in held)
                    gone = set(late)
                    ids = [t for t in ids if t not in gone]
            if not ids:
                return
            self.cancelled.update(ids)  # skipped when taken from the queue
            self._dead_queued = True
            if client.live_tasks:  # (their blobs may wait in the queue: purged past a bound)
                self._dropped_bytes += client.task_bytes * len(ids) // client.live_tasks
            self._dropped_tasks += len(ids)
            if exact:  # results: live until acknowledged, journaled (a restart keeps them)
                self._exact_dead.update(ids)  # (no longer in ``cancelled`` once acknowledged)
                client.queued -= len(ids)  # (none of them is held by a slot)
                client.cancelled += len(ids)
                self._cancelled_results(client, ids)
            else:  # not live any more: skipped if queued, its result dropped if running
                holding = self._dispatched() if client.held else set()
                queued = sum(1 for t in ids if t not in holding)
                client.queued -= queued
                client.cancelled += queued
                self.recorder.done(ids)
                live.difference_update(ids)
                if self.killing:  # (a slot killing one answers: the answer is dropped)
                    self.killing.difference_update(ids)
                self._untrack(client, len(ids))
            if self._dropped_bytes > MAX_CANCELLED_QUEUED_BYTES or \
                    self._dropped_tasks > MAX_CANCELLED_QUEUED:
                self._purge_cancelled()

    def _cancelled_results(self, client: Client, ids: list[int]) -> None:
        """A CANCELLED result for each of these tasks in the client's stream: live until
        acknowledged, journaled as HELD (a restart keeps them)."""
        for i in range(0, len(ids), MAX_BATCH):
            chunk = ids[i:i + MAX_BATCH]
            blobs = [payload.CANCELLED] * len(chunk)
            if not client.quiet:  # (else _send_deliver journals them)
                self.recorder.held(chunk, blobs)
                if client.journaled == client.tx.seq:
                    client.journaled += 1
            self._send_deliver(client, "", chunk, blobs)

    def _on_cancel_run(self, asker: Client, msg: P.CancelRun, now: float) -> None:
        """CANCEL_RUN: a client (``zfalkon cancel``) cancels a run, its own or another
        session's of the same CURVE identity (without keys, anyone's)."""
        if not self._afford(asker.ident):
            return
        client = self.clients.get(msg.key) if type(msg.key) is int else None
        if client is None or not client.submitted:
            self.refuse(asker.ident, ProtocolError(
                f"no run {P.short(msg.key)} (a client key with tasks) on this broker",
                "unknown-run"))
            return
        if self.key_owner.get(msg.key, "") != self.bound.get(asker.ident, ""):
            self.refuse(asker.ident, ProtocolError(
                f"run {msg.key} belongs to another key", "unauthorized"))
            return
        queued, killing = self.cancel_run(client, kill=msg.mode == P.CANCEL_KILL)
        log.info("run %d (%s) cancelled by client %d: %d queued tasks removed, %d being "
                 "killed", client.key, client.run or client.name, asker.key, queued, killing)
        self.outbox.append((asker.ident, P.RunCancelled(client.key, queued, killing)))

    def cancel_run(self, client: Client, kill: bool = True) -> tuple[int, int]:
        """Cancel a run: remove its queued (and parked) tasks from the queue, each with a
        CANCELLED result in its stream; with ``kill``, tell the slots holding its live
        tasks to kill them (each then ends as for CANCEL mode 2); without, those run on
        and their results are delivered (a slot may have started any of them: only its
        answer would tell). Returns ``(queued tasks cancelled, held tasks being
        killed)``. O(queue + held): not on the hot path."""
        key, live, cancelled = client.key, self.live, self.cancelled
        removed = self.queue.remove({key})
        if key in self.parked:
            ids, _ = self.parked[key]
            self.parked[key] = ([], [])
            self.parked_count -= len(ids)
            removed += ids
        if cancelled:  # (their copies are gone: a dropped one is done with for good)
            cancelled.difference_update([t for t in removed if t not in live])
        wanted = [t for t in removed if t in live and t not in cancelled]
        if wanted and client.tx.unacked:  # (one whose result is on its way is done)
            done = {t for _, (_, tids, _) in client.tx.unacked for t in tids}
            wanted = [t for t in wanted if t not in done]
        if wanted:
            wanted.sort()
            client.queued -= len(wanted)
            client.cancelled += len(wanted)
            if self.maybe_ran:
                self.maybe_ran.difference_update(wanted)
            self._cancelled_results(client, wanted)
        killing = 0
        if kill and client.held:
            for worker in self.workers.values():
                for slot in worker.slots.values():
                    mine = [t for t in slot.inflight if t >> P.ID_SHIFT == key]
                    if mine:
                        doomed = [t for t in mine if t in live]  # (the others' results
                        self.killing.update(doomed)  # are dropped anyway)
                        killing += len(doomed)
                        if slot.ident in self.peers:
                            self._send_tasks(slot, [], [], [], mine)
        return len(wanted), killing

    def _purge_cancelled(self) -> None:
        """Remove from the queue (and the parked tasks) every cancelled task that waits
        there: it will only be skipped when taken (a task cancelled exactly has its
        CANCELLED result; one cancelled with DROP is no longer live)."""
        self._dropped_tasks = self._dropped_bytes = 0
        dead = {t for t in self.cancelled if t not in self.live} | self._exact_dead
        self._exact_dead = set()
        if not dead:
            return
        removed = self.queue.remove(set(), dead)
        for key, (ids, blobs) in list(self.parked.items()):
            keep = [i for i, t in enumerate(ids) if t not in dead]
            if len(keep) < len(ids):
                removed += [t for t in ids if t in dead]
                self.parked_count -= len(ids) - len(keep)
                self.parked[key] = ([ids[i] for i in keep], [blobs[i] for i in keep])
        live = self.live  # (a live one keeps its mark until its CANCELLED result is read)
        self.cancelled.difference_update([t for t in removed if t not in live])
        log.info("removed %d cancelled tasks from the queue", len(removed))

    def _kill(self, ids: list[int]) -> list[int]:
        """CANCEL_KILL: tell the slots holding some of ``ids`` to kill them (each answers a
        CANCELLED result, or the task's own if it finished first; a slot lost meanwhile
        leaves a CANCELLED result, see :meth:`_requeue`); return the others."""
        wanted = set(ids)
        for worker in self.workers.values():
            for slot in worker.slots.values():
                inflight = slot.inflight
                mine = [t for t in wanted if t in inflight]
                if mine:
                    wanted.difference_update(mine)
                    self.killing.update(mine)
                    if slot.ident in self.peers:
                        self._send_tasks(slot, [], [], [], sorted(mine))
                    if not wanted:
                        break
        return [t for t in ids if t in wanted]

    def _dispatched(self) -> set[int]:
        """The ids of every task a slot holds now."""
        held: set[int] = set()
        for worker in self.workers.values():
            for slot in worker.slots.values():
                held.update(slot.inflight)
        return held

    def _announce(self) -> None:
        """Tell each listening client which of its tasks slots have held for a whole tick
        (STARTED), once: short tasks, done within the tick, cost no message."""
        held: set[int] = set()
        for worker in self.workers.values():
            for slot in worker.slots.values():
                held.update(slot.inflight)
        due = (held & self._held_last_tick) - self.announced
        self._held_last_tick = held
        if not due:
            return
        self.announced |= due
        by_key: dict[int, list[int]] = {}
        shift = P.ID_SHIFT
        for tid in sorted(due):
            by_key.setdefault(tid >> shift, []).append(tid)
        for key, ids in by_key.items():
            client = self.clients.get(key)
            if client is not None and client.ident and not client.quiet:
                for i in range(0, len(ids), MAX_BATCH):
                    self.outbox.append((client.ident, P.Started(ids[i:i + MAX_BATCH])))

    def _on_ack(self, peer: Client | Slot, msg: P.Ack, now: float) -> None:
        self._peer_has(peer, msg.ack, msg.token)

    def _peer_has(self, peer: Client | Slot, ack: int, token: bytes) -> None:
        """The peer has our stream up to ``ack``: forget it (a client's results are then
        done for good, if ``token`` proves it)."""
        if type(peer) is Client:
            self._acked(peer, ack, token)
        else:
            peer.tx.ack(ack)

    def _acked(self, client: Client, ack: int, token: bytes) -> None:
        """The client has its results up to frame ``ack``: they are done for good, if
        ``token`` is that frame's (:func:`ack_token`). Otherwise (a forged or blind
        acknowledgement, one past the last frame sent, or one from an earlier session)
        it counts for nothing: a client that does not read cannot open its window again.
        One hash per acknowledgement that would move, none per task."""
        unacked = client.tx.unacked
        if unacked and unacked[0][0] <= ack <= client.sent:
            if not hmac.compare_digest(token, ack_token(client.secret, ack)):
                if not self.refused["bad-ack"]:
                    log.warning("client %d acknowledged frame %d with a wrong token "
                                "(ignored)", client.key, ack)
                self.refused["bad-ack"] += 1
                return
            done: list[int] = []
            for seq, (_, ids, blobs) in unacked:
                if seq > ack:
                    break
                done += ids
                if blobs[0] is not _DROPPED:
                    size = sum(map(len, blobs))
                    client.held_bytes -= size
                    client.held_results -= len(ids)
                    if seq <= client.sent:
                        client.in_flight -= size
            before = len(self.live)
            self.live.difference_update(done)
            self._untrack(client, before - len(self.live))
            client.stale = 0  # (it reads: what an earlier session sent is past)
            client.resends = 0
            if self.cancelled:
                self.cancelled.difference_update(done)
            self.recorder.done(done)
            client.tx.ack(ack)
            client.reading |= 1
            if client.sent < client.tx.seq:
                self._send_unsent(client)  # (its window opened)
            if client.key in self.parked and client.held_bytes <= MAX_WAITING_BYTES // 2:
                self._unpark(client.key)

    def _on_resend(self, peer: Client | Slot, msg: P.Resend, now: float) -> None:
        """The peer missed frames after ``ack`` (a replaced connection): send them again,
        at most once per RESEND_SECONDS, and unless its acknowledgement has reached the
        last frame sent again the time before (it read them), only after
        RESEND_IDLE_SECONDS (doubling each time): a peer that asks again without reading
        (or reading a frame more each time) must not make the broker copy its stream
        into the socket's buffers without bound."""
        before = peer.sent if type(peer) is Client else 0  # (its ack may send more)
        self._peer_has(peer, msg.ack, msg.token)
        acked = peer.tx.acked()
        if acked >= peer.resend_mark:
            peer.resends = 0
        wait = RESEND_SECONDS if not peer.resends else \
            RESEND_IDLE_SECONDS * 2.0 ** min(peer.resends - 1, 30)
        if now - peer.resent_at < wait or not peer.tx.unacked or (
                type(peer) is Client and peer.tx.unacked[0][0] > before):
            return  # (too soon, or nothing it was sent is unacknowledged)
        last = peer.tx.unacked[-1][0]
        peer.resent_at, peer.resend_mark = now, min(last, before) if type(peer) is Client \
            else last
        peer.resends += 1
        if type(peer) is Client:
            if peer.resends == 1:  # (it must read them: see the ACK_STALL check)
                peer.ack_mark, peer.ack_since = acked, now
            secret = peer.secret
            for seq, (worker, ids, blobs) in peer.tx.unacked:
                if seq > before:
                    break
                self.outbox.append((peer.ident, P.Deliver(
                    seq, peer.rx.last, worker, ids, blobs, ack_token(secret, seq))))
            self._send_unsent(peer)
        else:
            assert type(peer) is Slot
            held = peer.inflight
            for seq, (ids, revoke, kill, functions) in peer.tx.unacked:
                ids = [t for t in ids if t in held]
                self.outbox.append((peer.ident, P.Tasks(
                    seq, peer.rx.last, ids, [held[t] for t in ids], revoke, kill,
                    *functions)))
        peer.told = peer.rx.last
        self._owed.pop(peer, None)

    def _send_deliver(self, client: Client, worker: str, ids: list[int],
                      blobs: list[bytes]) -> None:
        client.tx.push((worker, ids, blobs))
        if blobs[0] is not _DROPPED:
            client.held_bytes += sum(map(len, blobs))
            client.held_results += len(ids)
        if client.quiet:  # not listening: kept, within bounds, until it speaks
            self.recorder.held(ids, blobs)  # (undone by DONE once acknowledged)
            client.journaled = client.tx.seq
            self._shed(client, MAX_HELD_BYTES)
        else:
            self._send_unsent(client)
            if client.held_bytes > MAX_WAITING_BYTES:
                if client.key not in self.parked:
                    self.parked[client.key] = ([], [])  # far behind: its queued tasks wait
                if client.held_bytes > 2 * MAX_WAITING_BYTES and not client.reading:
                    self._shed(client, 2 * MAX_WAITING_BYTES)  # (and it is not reading)

    def _send_unsent(self, client: Client) -> None:
        """Send the frames of the client's stream it has not been sent: while it listens
        (not quiet), and while what it was sent and has not acknowledged stays within
        SEND_WINDOW_BYTES (a client that does not read cannot make the broker buffer more;
        the rest goes as it acknowledges)."""
        unacked = client.tx.unacked
        if client.quiet or not client.ident or client.sent >= client.tx.seq or not unacked:
            return
        rx_last = client.rx.last
        stale = client.stale
        secret = client.secret
        for i in range(max(0, client.sent + 1 - unacked[0][0]), len(unacked)):
            seq, (worker, ids, blobs) = unacked[i]
            size = 0 if blobs[0] is _DROPPED else sum(map(len, blobs))
            ahead = client.in_flight + stale
            if ahead and ahead + size > SEND_WINDOW_BYTES:
                break
            client.in_flight += size
            client.sent = seq
            self.outbox.append((client.ident, P.Deliver(seq, rx_last, worker, ids, blobs,
                                                        ack_token(secret, seq))))
        client.told = rx_last
        self._owed.pop(client, None)

    def _shed(self, client: Client, limit: int, sent: bool = False) -> None:
        """Keep the results of a client that is not listening (or not acknowledging)
        within MAX_HELD_BYTES and MAX_HELD_RESULTS: the oldest kept in full and not yet
        sent (``sent``: sent ones too) are replaced by a short ResultDropped error
        (journaled, so a restart keeps the replacement); the count is logged on the tick."""
        if client.held_bytes <= limit and client.held_results <= MAX_HELD_RESULTS:
            return
        unacked, dropped = client.tx.unacked, 0
        # (frames already sent are left alone unless ``sent``: the socket holds them
        # until acknowledged, and they are within SEND_WINDOW_BYTES)
        start = 0 if sent else max(0, client.sent + 1 - unacked[0][0])
        for i in range(start, len(unacked)):
            seq, (worker, ids, blobs) = unacked[i]
            if blobs[0] is _DROPPED:
                continue
            size = sum(map(len, blobs))
            client.held_bytes -= size
            client.held_results -= len(ids)
            if seq <= client.sent:
                client.in_flight -= size
            dropped += len(ids)
            blobs = [_DROPPED] * len(ids)
            unacked[i] = (seq, (worker, ids, blobs))
            self.recorder.held(ids, blobs)
            if client.held_bytes <= limit and client.held_results <= MAX_HELD_RESULTS:
                break
        self.dropped_results += dropped
        self._dropped[client.key] += dropped

    def _bound_away(self, away: list[Client]) -> None:
        """Keep the clients with no connection within MAX_AWAY_CLIENTS (the longest silent
        of those holding nothing are forgotten first), their results within
        MAX_AWAY_HELD_BYTES (the longest silent lose theirs to ResultDropped first), and
        the functions of those with no task queued or running within
        MAX_AWAY_FUNCTION_BYTES (the longest silent lose theirs, and their connection:
        back, they are told ``hello-required``, register again, get their results and
        send their functions again)."""
        idle = [c for c in away if c.functions and c.live_tasks <= sum(
            len(ids) for _, (_, ids, _) in c.tx.unacked)]
        stored = sum(c.function_bytes for c in idle)
        if stored > self.max_away_function_bytes:
            idle.sort(key=lambda c: c.last_heard)
            for client in idle:
                if stored <= self.max_away_function_bytes:
                    break
                stored -= client.function_bytes
                self._drop_functions(client)
                if client.ident:  # (its results stay held for it)
                    if self.peers.get(client.ident) is client:
                        del self.peers[client.ident]
                        self.bound.pop(client.ident, None)
                    client.ident = b""
        extra = len(away) - self.max_away_clients
        if extra > 0:
            away.sort(key=lambda c: (c.live_tasks > 0 or len(c.tx) > 0, c.last_heard))
            log.warning("more than %d clients away: forgetting the %d longest silent",
                        self.max_away_clients, extra)
            for client in away[:extra]:
                self._forget(client)
            away = away[extra:]
        held = sum(c.held_bytes for c in away)
        if held > self.max_away_held_bytes:
            away.sort(key=lambda c: c.last_heard)
            for client in away:
                over = held - self.max_away_held_bytes
                if over <= 0:
                    break
                had = client.held_bytes
                self._shed(client, max(0, had - over), sent=True)
                held -= had - client.held_bytes

    def _deliver(self, key: int, worker: str, ids: list[int], blobs: list[bytes],
                 count: bool = True) -> None:
        """Finished tasks: into their client's stream (dropped if cancelled, or if the
        client is gone). ``count``: results made by the broker (a lost or crashed slot, a
        killed task taken back) count in the run's ``done`` and ``failed`` here."""
        if count:
            run = self.clients.get(key)
            if run is not None:
                run.done += len(ids)
                run.failed += _failures(blobs)
        if self.maybe_ran:
            self.maybe_ran.difference_update(ids)
        if self.announced:
            self.announced.difference_update(ids)
        if self.killing:
            self.killing.difference_update(ids)
        live = self.live
        if not live.issuperset(ids):
            self.cancelled.difference_update(ids)
            kept = [i for i, t in enumerate(ids) if t in live]
            ids, blobs = [ids[i] for i in kept], [blobs[i] for i in kept]
            if not ids:
                return
        client = self.clients.get(key)
        if client is None:
            live.difference_update(ids)
            self.recorder.done(ids)
        else:
            self._send_deliver(client, worker, ids, blobs)

    def _quiet(self, client: Client) -> None:
        """The client is not listening: nothing more is sent to it until it speaks (then
        its stream is sent again); its unacknowledged results are journaled as HELD, and
        kept within bounds."""
        if not client.quiet:
            client.quiet = True
            if self.recorder.durable:  # (each frame once: a client may flap quiet)
                for seq, (_, ids, blobs) in client.tx.unacked:
                    if seq > client.journaled:
                        self.recorder.held(ids, blobs)
                client.journaled = client.tx.seq
            self._shed(client, MAX_HELD_BYTES)

    def _forget(self, client: Client) -> None:
        """The client is gone for good: its queued tasks are skipped, its results dropped."""
        key = client.key
        if self.clients.get(key) is client:
            del self.clients[key]
            self._idle.pop(key, None)
        if client.ident and self.peers.get(client.ident) is client:
            del self.peers[client.ident]
            self.bound.pop(client.ident, None)
            self._status_tokens.pop(client.ident, None)
        self._owed.pop(client, None)
        if client.submitted:  # its queued tasks are purged on the tick (``gone``), its
            self.gone.add(key)  # running ones are revoked, its results are dropped
            shift = P.ID_SHIFT
            if self.cancelled:
                self.cancelled = {t for t in self.cancelled if t >> shift != key}
            if self.maybe_ran:
                self.maybe_ran = {t for t in self.maybe_ran if t >> shift != key}
            if self.announced:
                self.announced = {t for t in self.announced if t >> shift != key}
            if self.killing:
                self.killing = {t for t in self.killing if t >> shift != key}
            if self.crashes:
                self.crashes = {t: r for t, r in self.crashes.items() if t >> shift != key}
            self.restored_max.pop(key, None)
            if key in self.parked:  # (its parked tasks die with it)
                ids, _ = self.parked.pop(key)
                self.parked_count -= len(ids)
                self.live.difference_update(ids)
            self._dead_queued = True
            live = self.live
            live.difference_update([t for _, (_, ids, _) in client.tx.unacked for t in ids])
            for worker in self.workers.values():
                for slot in worker.slots.values():
                    ids = [t for t in slot.inflight if t >> P.ID_SHIFT == key]
                    if ids:  # taken back, and killed if running (TASKS kill: nobody
                        live.difference_update(ids)  # wants their results)
                        self._revoke(slot, ids, kill=True)
                        self._make_ready(slot)
        self._drop_functions(client)
        self._untrack(client, client.live_tasks)  # (no longer counted for its key)
        usage = client.usage
        if usage.clients.get(key) is client:
            del usage.clients[key]
            if not usage.clients and self.usage.get(usage.owner) is usage:
                del self.usage[usage.owner]
        if self.key_owner.pop(key, None) is not None or client.submitted:
            self.recorder.gone(key)

    def _purge(self, keys: set[int]) -> None:
        """Remove the queued tasks of forgotten clients whose keys are given out again (the
        client may submit the same ids again)."""
        removed = self.queue.remove(keys)
        self.live.difference_update(removed)
        self.cancelled.difference_update(removed)
        self.gone -= keys

    # -- slots -------------------------------------------------------------------------

    def _on_results(self, slot: Slot, msg: P.Results, now: float) -> None:
        if not self._stream_in(slot, msg.seq, msg.ack):
            return
        window = min(max(msg.window, 0), MAX_WINDOW)
        if (window > 0) != (slot.window > 0):
            slot.window = window
            self._count(slot)
        slot.window = window
        inflight = slot.inflight
        groups: dict[int, tuple[list[int], list[bytes]]] = {}
        shift = P.ID_SHIFT
        accepted = 0
        for tid, blob in zip(msg.ids, msg.blobs):
            if inflight.pop(tid, None) is None:
                continue  # not this slot's (taken back, or a duplicate)
            accepted += 1
            key = tid >> shift
            group = groups.get(key)
            if group is None:
                group = groups[key] = ([], [])
            group[0].append(tid)
            group[1].append(blob)
        if accepted:
            slot.progress = now
            self.running -= accepted
            self.failed += min(max(msg.failed, 0), accepted)
            self.done += accepted
            slot.worker.done += accepted
            if self.attempts or self.crashes:
                for ids, _ in groups.values():
                    for tid in ids:
                        self.attempts.pop(tid, None)
                        self.crashes.pop(tid, None)
            clients = self.clients
            for key, (ids, blobs) in groups.items():
                run = clients.get(key)
                if run is not None:
                    run.held -= len(ids)
                    run.done += len(ids)
                    if msg.failed:  # (the slot's count if the frame is all this run's)
                        run.failed += min(max(msg.failed, 0), len(ids)) \
                            if len(groups) == 1 else _failures(blobs)
                self._deliver(key, slot.name, ids, blobs, False)
        if not slot.ready and not slot.stalled and len(inflight) < slot.window:
            self._make_ready(slot)

    def _on_holding(self, slot: Slot, msg: P.Holding, now: float) -> None:
        data = slot.worker.data
        if len(data) < MAX_DATA_KEYS:
            data.update(k for k in msg.keys[:MAX_DATA_KEYS - len(data)]
                        if len(k) <= MAX_DATA_KEY_CHARS)

    def _hold_runs(self, ids: list[int]) -> None:
        """Slots took these queued tasks (of several runs): count them per run."""
        clients, shift = self.clients, P.ID_SHIFT
        for key, n in collections.Counter(t >> shift for t in ids).items():
            run = clients.get(key)
            if run is not None:
                run.queued -= n
                run.held += n

    def _unhold(self, ids) -> None:
        """Slots no longer hold these tasks (taken back, or lost with their slot)."""
        clients, shift = self.clients, P.ID_SHIFT
        for key, n in collections.Counter(t >> shift for t in ids).items():
            run = clients.get(key)
            if run is not None:
                run.held -= n

    def _queued_again(self, ids) -> None:
        """These tasks go back to the queue: the live ones not cancelled count as queued
        in their runs again."""
        live, cancelled, clients, shift = self.live, self.cancelled, self.clients, P.ID_SHIFT
        for key, n in collections.Counter(
                t >> shift for t in ids if t in live and t not in cancelled).items():
            run = clients.get(key)
            if run is not None:
                run.queued += n

    def _make_ready(self, slot: Slot) -> None:
        if not slot.ready and not slot.worker.draining and len(slot.inflight) < slot.window:
            slot.ready = True
            self.ready.append(slot)

    def _count(self, slot: Slot) -> None:
        """Keep :attr:`active_slots` (the fair share's divisor) up to date for ``slot``."""
        active = slot.window > 0 and not slot.stalled and not slot.worker.draining
        if active != slot.active:
            slot.active = active
            self.active_slots += 1 if active else -1

    def _unready(self, slot: Slot) -> None:
        if slot.ready:
            self.ready.remove(slot)
            slot.ready = False

    def _send_tasks(self, slot: Slot, ids: list[int], blobs: list[bytes],
                    revoke: list[int], kill: list[int] | None = None,
                    functions: tuple[list[bytes], list[bytes]] = ([], [])) -> None:
        seq = slot.tx.push((ids, revoke, kill or [], functions))
        slot.told = slot.rx.last
        self._owed.pop(slot, None)
        self.outbox.append((slot.ident, P.Tasks(seq, slot.rx.last, ids, blobs, revoke,
                                                kill or [], *functions)))

    def _take_back(self, slot: Slot, ids: list[int], lost: bool) -> None:
        """Take tasks away from a slot (lease lapsed, or stolen): revoke them there, queue
        them again at the head. ``lost``: each counts an attempt (see :meth:`_requeue`)."""
        self._requeue(self._revoke(slot, ids), slot.name if lost else None)

    def _revoke(self, slot: Slot, ids: list[int], kill: bool = False) -> dict[int, bytes]:
        """Take tasks away from a slot and tell it (it drops them unless started; with
        ``kill``, it kills them if started); return them, in order."""
        inflight = slot.inflight
        tasks = {t: inflight.pop(t) for t in ids}
        self.running -= len(tasks)
        self._unhold(tasks)
        if slot.ident in self.peers:
            if kill:
                self._send_tasks(slot, [], [], [], ids)
            else:
                self._send_tasks(slot, [], [], ids)
        return tasks

    def _requeue(self, tasks: dict[int, bytes], lost_on: str | None = None) -> None:
        """Put tasks back at the head of the queue, in order. ``lost_on``: the slot that
        lost them; each counts an attempt, and one at MAX_ATTEMPTS fails with WorkerLost.
        A task its client cancelled by force (``killing``) ends cancelled instead."""
        if self.killing:
            killed = [t for t in tasks if t in self.killing]
            for tid in killed:
                del tasks[tid]
                self.attempts.pop(tid, None)
                self.done += 1
                self._deliver(tid >> P.ID_SHIFT, "", [tid], [payload.CANCELLED])
        if lost_on is not None:
            attempts = self.attempts
            for tid in list(tasks):
                n = attempts.get(tid, 0) + 1
                if n >= MAX_ATTEMPTS:
                    del tasks[tid]
                    attempts.pop(tid, None)
                    self.done += 1
                    self.failed += 1
                    self._deliver(tid >> P.ID_SHIFT, lost_on, [tid],
                                  [payload.lost_result(lost_on, MAX_ATTEMPTS)])
                else:
                    attempts[tid] = n
        if tasks:
            self.maybe_ran.update(tasks)
            self._queued_again(tasks)
            self.queue.push_front(list(tasks), list(tasks.values()))

    def _steal(self, now: float) -> None:
        """Slots idle and the queue empty: take prefetched tasks back from slots that have
        returned nothing for STEAL_SECONDS (stuck behind a long task). The oldest task a
        slot holds may be running and stays; the rest have not started (a slot runs its
        tasks in order)."""
        for worker in self.workers.values():
            for slot in worker.slots.values():
                if len(slot.inflight) > 1 and now - slot.progress > STEAL_SECONDS:
                    ids = list(slot.inflight)[1:]
                    log.info("slot %s stuck for %.1f s: %d prefetched tasks taken back",
                             slot.name, now - slot.progress, len(ids))
                    self.stolen += len(ids)
                    self._take_back(slot, ids, lost=False)
                    slot.progress = now

    def dispatch(self, now: float) -> None:
        """Give each slot with room its share of the queue, one frame each."""
        ready, queue = self.ready, self.queue
        if not queue.count or not ready:
            return
        cap = max(2, -(-(queue.count + self.running) // max(1, self.active_slots)))
        while queue.count and ready:
            slot = ready[0]
            room = min(slot.window, cap) - len(slot.inflight)
            n = min(room, MAX_BATCH, -(-queue.count // len(ready)))
            if n <= 0:
                ready.popleft()
                slot.ready = False
                continue
            ids, blobs = queue.take(slot.worker.data, n)
            if self._dead_queued:
                ids, blobs = self._live(ids, blobs)
            if self.parked:
                ids, blobs = self._park(ids, blobs)
            if not ids:
                continue  # everything taken was cancelled; the queue shrank
            functions: tuple[list[bytes], list[bytes]] = ([], [])
            if self.storing:  # (tasks by digest may be queued: their functions go along)
                n, fns, forget = self._functions_for(slot, ids, blobs)
                if n < len(ids):
                    queue.push_front(ids[n:], blobs[n:])
                    ids, blobs = ids[:n], blobs[:n]
                functions = (fns, forget)
                if not ids:  # (its functions at their limits, all called by what it
                    ready.popleft()  # holds: more once it returns some)
                    slot.ready = False
                    if forget:
                        self._send_tasks(slot, [], [], [], None, functions)
                    continue
            if not slot.inflight:
                slot.progress = now
                slot.lease = max(slot.lease, now + LEASE_SECONDS)
            slot.inflight.update(zip(ids, blobs))
            self.running += len(ids)
            key = queue.taken_key  # (the run counters: one lookup for a frame of one run)
            if key >= 0:
                run = self.clients.get(key)
                if run is not None:
                    run.queued -= len(ids)
                    run.held += len(ids)
            else:
                self._hold_runs(ids)
            self._send_tasks(slot, ids, blobs, [], None, functions)
            if len(slot.inflight) >= min(slot.window, cap):
                ready.popleft()
                slot.ready = False
            else:
                ready.rotate(-1)
        if not queue.count:  # nothing queued that is no longer live
            self._dead_queued = False
            self.gone.clear()

    def _park(self, ids: list[int], blobs: list[bytes]) -> tuple[list[int], list[bytes]]:
        """Set aside the tasks of clients far behind in reading their results; return
        the others."""
        parked, shift = self.parked, P.ID_SHIFT
        keep = []
        for i, t in enumerate(ids):
            spot = parked.get(t >> shift)
            if spot is None:
                keep.append(i)
            else:
                spot[0].append(t)
                spot[1].append(blobs[i])
        if len(keep) == len(ids):
            return ids, blobs
        self.parked_count += len(ids) - len(keep)
        return [ids[i] for i in keep], [blobs[i] for i in keep]

    def _unpark(self, key: int) -> None:
        """The client caught up: its parked tasks go back to the head of the queue."""
        ids, blobs = self.parked.pop(key)
        self.parked_count -= len(ids)
        self.queue.push_front(ids, blobs)
        if ids:
            self._dead_queued = True  # (some may have been cancelled meanwhile)

    def _live(self, ids: list[int], blobs: list[bytes]) -> tuple[list[int], list[bytes]]:
        """Skip tasks no longer live or cancelled (a task cancelled before any slot had it
        stays live until its CANCELLED result is acknowledged), and tasks of forgotten
        clients (``gone``)."""
        live, gone, cancelled, shift = self.live, self.gone, self.cancelled, P.ID_SHIFT
        keep = [i for i, t in enumerate(ids)
                if t in live and t not in cancelled and t >> shift not in gone]
        if len(keep) == len(ids):
            return ids, blobs
        dead = [ids[i] for i in set(range(len(ids))) - set(keep)]
        live.difference_update([t for t in dead if t >> shift in gone])
        cancelled.difference_update([t for t in dead if t not in live])  # (the others:
        # until their CANCELLED result is acknowledged, so no CANCEL takes them again)
        return [ids[i] for i in keep], [blobs[i] for i in keep]

    # -- workers -----------------------------------------------------------------------

    def _on_heartbeat(self, worker: Worker, msg: P.Heartbeat, now: float) -> None:
        worker.last_seen = now
        for ident in msg.busy[:len(worker.slots)]:
            slot = worker.slots.get(ident)
            if slot is not None:
                slot.lease = now + LEASE_SECONDS  # running a (long) task: still alive

    def _on_drain(self, worker: Worker, msg: P.Drain, now: float) -> None:
        log.info("worker %s is draining (%s)", worker.info.get("name"), msg.reason[:200])
        worker.draining = True
        for slot in worker.slots.values():
            self._count(slot)
            self._unready(slot)

    def _on_slot_lost(self, peer: Worker | Slot, msg: P.SlotLost, now: float) -> None:
        """A slot died (its agent says so), or a slot's agent died (the slot says so, of
        itself only): the task it was running counts a crash (:meth:`_crashed`); the
        slot is dropped, its other tasks requeued with no attempt counted."""
        slot: Slot | None
        if isinstance(peer, Slot):
            if msg.slot != peer.ident:
                return  # (a slot speaks for itself only)
            slot = peer
        else:
            peer.last_seen = now
            slot = peer.slots.get(msg.slot)
        if slot is None:
            return  # it never registered, or said BYE first
        if msg.task and msg.task in slot.inflight:
            self._crashed(slot, msg.task, msg.reason[:200])
        self._drop(slot)

    def _crashed(self, slot: Slot, tid: int, reason: str) -> None:
        """``slot`` (or its agent) died running ``tid``: count a crash. Below
        ``max_crashes`` the task goes back to the head of the queue (no attempt counted:
        its slot did not vanish, it was killed); at ``max_crashes`` it fails with
        WorkerCrashed naming it and every crash (quarantined: no other slot gets it)."""
        blob = slot.inflight.pop(tid)
        self.running -= 1
        self._unhold((tid,))
        if tid in self.killing:  # (cancelled by force meanwhile: it ends CANCELLED)
            self._requeue({tid: blob})
            return
        reasons = self.crashes.get(tid, [])
        reasons.append(f"{reason} on {slot.name}")
        if len(reasons) < self.max_crashes:
            self.crashes[tid] = reasons
            log.warning("task %d crashed %s (%s): crash %d of %d, queued again", tid,
                        slot.name, reason, len(reasons), self.max_crashes)
            self._requeue({tid: blob})
            return
        self.crashes.pop(tid, None)
        self.attempts.pop(tid, None)
        log.error("task %d crashed its worker %d times: quarantined (%s)", tid,
                  len(reasons), "; ".join(reasons))
        self.done += 1
        self.failed += 1
        self._deliver(tid >> P.ID_SHIFT, slot.name, [tid], [payload.crashed_result(
            f"the process running task {tid} died {len(reasons)} "
            f"time{'s' if len(reasons) > 1 else ''} ({'; '.join(reasons)}); "
            "quarantined: not run again")])

    # -- everyone ----------------------------------------------------------------------

    def _on_status(self, peer: Peer, msg: P.StatusRequest, now: float) -> None:
        """The worker list only for a peer that read its last answer (its token), within
        STATUS_BYTES_PER_TICK; else the counters: what ZeroMQ queues for a peer that asks
        and never reads stays ~1 KB an answer, whatever its number of routing ids."""
        ident = peer.ident
        if not self._afford(ident):
            return
        tokens = self._status_tokens
        full = bool(msg.token) and hmac.compare_digest(msg.token, tokens.get(ident, b"")) \
            and self._status_bytes[ident] < STATUS_BYTES_PER_TICK
        tokens[ident] = token = os.urandom(8)
        answer = P.Status(self.status(now, peer, full), token)
        if full:
            self._status_bytes[ident] += len(P.encode(answer))
        self.outbox.append((ident, answer))

    def _afford(self, ident: bytes) -> bool:
        """A costly answer (STATUS): at most _COSTLY_PER_TICK per peer per tick, so that a
        peer that asks without reading cannot make the broker buffer without bound."""
        n = self._costly[ident]
        self._costly[ident] = n + 1
        if n == _COSTLY_PER_TICK:
            log.warning("peer %s asks for more than %d statuses a second; "
                        "ignoring the rest", ident.hex(), _COSTLY_PER_TICK)
        return n < _COSTLY_PER_TICK

    def _on_ping(self, peer: Peer, msg: P.Ping, now: float) -> None:
        n = self._pings[peer.ident]
        self._pings[peer.ident] = n + 1
        if n >= _PINGS_PER_TICK:
            return  # (a peer pinging without reading the PONGs must not fill our buffers)
        if isinstance(peer, Worker):
            ack = seq = 0
        else:
            self._peer_has(peer, msg.ack, msg.token)
            ack = peer.rx.last  # (and the last frame sent, not one waiting to be)
            seq = peer.sent if type(peer) is Client else peer.tx.seq
        self.outbox.append((peer.ident, P.Pong(msg.sent, ack, seq)))

    def _on_bye(self, peer: Peer, msg: P.Bye, now: float) -> None:
        self._drop(peer)

    def _drop(self, peer: Peer, lost: bool = False) -> None:
        """Forget a peer. A slot's tasks go back to the queue (``lost``: each counts an
        attempt); a worker takes its slots with it; a client is forgotten."""
        if self.peers.get(peer.ident) is peer:
            del self.peers[peer.ident]
            self.bound.pop(peer.ident, None)
            self._status_tokens.pop(peer.ident, None)
        if type(peer) is Slot:
            peer.worker.slots.pop(peer.ident, None)
            self._unready(peer)
            if peer.active:
                peer.active = False
                self.active_slots -= 1
            self._owed.pop(peer, None)
            if peer.inflight:
                self.running -= len(peer.inflight)
                self._unhold(peer.inflight)
                self._requeue(peer.inflight, peer.name if lost else None)
                peer.inflight = {}
        elif type(peer) is Worker:
            if self.workers.get(peer.worker_id) is peer:
                del self.workers[peer.worker_id]
            for slot in list(peer.slots.values()):
                self._drop(slot, lost)
        elif type(peer) is Client:
            self._forget(peer)

    # -- views -------------------------------------------------------------------------

    def unfinished(self) -> Iterator[tuple[list[int], list[bytes]]]:
        """Every unfinished task (running, then queued) in batches, for journal snapshots."""
        groups: list[tuple[list[int], list[bytes]]] = [
            (list(s.inflight), list(s.inflight.values()))
            for w in self.workers.values() for s in w.slots.values()]
        for ids, blobs in [*groups, *self.parked.values(), *self.queue.batches()]:
            ids, blobs = self._live(ids, blobs)
            for i in range(0, len(ids), MAX_BATCH):
                yield ids[i:i + MAX_BATCH], blobs[i:i + MAX_BATCH]

    def functions(self) -> Iterator[tuple[int, bytes, bytes]]:
        """Every function stored for tasks by digest, ``(key, digest, pickle)``, for
        journal snapshots."""
        for client in self.clients.values():
            for digest, blob in client.functions.items():
                yield client.key, digest, blob

    def held(self) -> Iterator[tuple[list[int], list[bytes]]]:
        """Every result delivered and not yet acknowledged, for journal snapshots."""
        for client in self.clients.values():
            for _, (_, ids, blobs) in client.tx.unacked:
                yield ids, blobs

    def status(self, now: float, asker: Peer | None = None, full: bool = True) -> dict:
        """Counters, workers and runs, as answered to STATUS (documented in
        docs/protocol.md). ``asker``: the peer asking, not counted as a client; not
        ``full``: no worker or run list (``partial``).

        A slot runs its tasks one at a time, oldest first: of the tasks a slot holds, the
        oldest is counted ``running`` (started), the others ``prefetched``. O(workers +
        slots + clients): the per-run counters are kept as events happen."""
        rate = 0.0
        window = 0.0
        if len(self._rate) >= 2:
            (t0, d0), (t1, d1) = self._rate[0], self._rate[-1]
            window = t1 - t0
            rate = (d1 - d0) / window if window > 0 else 0.0
        runs, runs_omitted, size, started = self._runs(now)
        workers: list[dict] = []
        omitted = 0
        if not full:
            runs_omitted, runs = runs_omitted + len(runs), []
        for w in self.workers.values() if full else ():
            if size > STATUS_MAX_BYTES:
                omitted += 1
                continue
            info = w.info
            held = sum(len(s.inflight) for s in w.slots.values())
            running = sum(1 for s in w.slots.values() if s.inflight)
            entry = {
                "name": info.get("name"), "slots": info.get("slots"),
                "connected_slots": len(w.slots),
                "running": running, "prefetched": held - running, "done": w.done,
                "draining": w.draining}
            if len(workers) < STATUS_MAX_WORKERS:
                tags = info.get("tags", [])
                entry.update({
                    "hostname": info.get("hostname"), "cpus": info.get("cpus"),
                    "memory": info.get("memory"), "tags": tags[:STATUS_MAX_TAGS],
                    "tags_omitted": max(0, len(tags) - STATUS_MAX_TAGS),
                    "version": w.version,
                    "window": sum(s.window for s in w.slots.values()),
                    "stalled_slots": sum(s.stalled for s in w.slots.values()),
                    "data_keys": len(w.data),
                    "idle_seconds": round(now - w.last_seen, 3)})
            n = len(msgpack.packb(entry))
            if size + n > STATUS_MAX_BYTES:
                size = STATUS_MAX_BYTES + 1  # (full: the rest are counted, not listed)
                omitted += 1
                continue
            size += n
            workers.append(entry)
        counted = [c for c in self.clients.values() if not c.observer and c is not asker]
        return {
            "version": __version__, "protocol": PROTOCOL_VERSION,
            "uptime": round(now - self.started, 3),
            "clients": sum(1 for c in counted if c.ident and not c.quiet),
            "away_clients": sum(1 for c in counted if not c.ident or c.quiet),
            "workers": len(self.workers),
            "slots": sum(len(w.slots) for w in self.workers.values()),
            "queued": len(self.queue) + self.parked_count, "dispatch": self.queue.policy,
            "running": started, "prefetched": self.running - started,
            "parked": self.parked_count,
            "submitted": self.submitted, "done": self.done, "failed": self.failed,
            "tasks_per_second": round(rate, 1), "rate_window_seconds": round(window, 1),
            "worker_list": workers,
            "workers_omitted": omitted if full else len(self.workers), "partial": not full,
            "runs": runs, "runs_omitted": runs_omitted,
            "hold_seconds": self.hold_seconds,
            "expired_leases": self.expired_leases, "stolen": self.stolen,
            "unacknowledged_results": sum(
                len(ids) for c in self.clients.values() for _, (_, ids, _) in c.tx.unacked),
            "duplicate_submits": self.duplicate_submits, "dropped_results": self.dropped_results,
            "journal": self.recorder.stats(),
        }

    def _runs(self, now: float) -> tuple[list[dict], int, int, int]:
        """STATUS ``runs``: the newest STATUS_MAX_RUNS runs (clients that have had tasks
        accepted) within STATUS_RUNS_BYTES; with how many more there are, the bytes
        listed, and the tasks slots have started (over all runs)."""
        started: collections.Counter[int] = collections.Counter()
        shift = P.ID_SHIFT
        for w in self.workers.values():
            for s in w.slots.values():
                if s.inflight:
                    started[next(iter(s.inflight)) >> shift] += 1
        runs: list[dict] = []
        size = omitted = 0
        for key in sorted((k for k, c in self.clients.items() if c.submitted),
                          reverse=True):
            if len(runs) >= STATUS_MAX_RUNS or size > STATUS_RUNS_BYTES:
                omitted += 1
                continue
            c = self.clients[key]
            away = not c.ident or c.quiet
            running = started[key]
            entry = {
                "id": key, "name": c.name, "run": c.run,
                "state": "away" if away else "connected",
                "silent_seconds": round(now - c.last_heard, 1),
                "queued": c.queued, "running": running, "prefetched": c.held - running,
                "done": c.done, "failed": c.failed, "cancelled": c.cancelled,
                "submitted": c.tasks, "unacknowledged": len(c.tx) and sum(
                    len(ids) for _, (_, ids, _) in c.tx.unacked)}
            n = len(msgpack.packb(entry))
            if size + n > STATUS_RUNS_BYTES:
                size = STATUS_RUNS_BYTES + 1
                omitted += 1
                continue
            size += n
            runs.append(entry)
        return runs, omitted, size if size <= STATUS_RUNS_BYTES else STATUS_RUNS_BYTES, \
            sum(started.values())
