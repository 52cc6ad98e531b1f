"""The broker core as a machine-checked state machine (hypothesis), plus targeted unit tests.

:class:`FabricMachine` drives a real :class:`BrokerCore` (with a real journal on disk)
and real :class:`SlotSession` slots through a simulated network in which every connection
can lose what it carries, be stalled, or be replaced; clients are a small model of the
client session (``zfalkon.client`` follows the same rules). Rules: submit (with and
without data hints), credit (including absurd credit from a hostile slot), results
(duplicates, forged, for tasks not held, on a stale session), acknowledgements of
results not read (blind, with a wrong token), slot crash, slot stall,
worker lost and back, connection replaced, partition and heal, cancel, client leave and
return, broker restart from the journal. Invariants: no task id reaches a user twice, and
every result that reaches a user is that task's own; no id is held by two slots; the
core's counters equal its queues; at quiescence every accepted, non-cancelled task of a
live client is delivered exactly once; a journal replay gives back exactly what the core
had unfinished.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon.constants import (
    HEARTBEAT_MISSES,
    HEARTBEAT_SECONDS,
    LEASE_SECONDS,
    MAX_CLIENT_KEY,
    MAX_CRASHES,
    PING_SECONDS,
)
from zfalkon.core import _DROPPED, BrokerCore
from zfalkon.errors import WorkerCrashed
from zfalkon.journal import Journal, JournalRecorder
from zfalkon.slotcore import SlotSession
from zfalkon.clientcore import ClientSession
from zfalkon.taskqueue import make_queue

FORGED = b"forged"
#: Functions the model's clients call by digest (their "pickles" are never loaded: the
#: model checks that each task by digest reaches its slot with its function).
FUNCTIONS = [payload.Function(f"f{i}", bytes([i]) * (40 + i),
                              payload.function_digest(bytes([i]) * (40 + i)))
             for i in range(4)]


def result_for(tid: int) -> bytes:
    """The result a well-behaved slot returns for ``tid``: the id itself."""
    return msgpack.packb((payload.RESULT_VALUE, tid))


class Conn:
    """One peer's connection: frames in flight each way. Replacing it loses them."""

    def __init__(self) -> None:
        self.up: collections.deque[P.Message] = collections.deque()  # peer -> broker
        self.down: collections.deque[P.Message] = collections.deque()  # broker -> peer
        self.stalled = False

    def replace(self) -> None:
        self.up.clear()
        self.down.clear()


class ClientModel:
    """A client: the real :class:`ClientSession` (as the Executor drives it) plus what a
    user of it sees."""

    def __init__(self, ident: bytes) -> None:
        self.ident = ident
        self.conn = Conn()
        self.pending: dict[int, bytes] = {}  # id -> blob, as the Executor's _blobs
        self.hints: dict[int, str] = {}
        self.functions: dict[bytes, bytes] = {}  # as the Executor's _stored
        self.session = ClientSession(0, "model", self.pending, self.hints, self.functions)
        self.next_seq = 1
        self.left = False
        self.got: collections.Counter[int] = collections.Counter()  # delivered to the user
        self.cancelled: set[int] = set()
        #: Tasks the broker handed to the hostile slot: only their results may be forged.
        self.given_to_evil: set[int] = set()
        self.dropped_seen = 0  # ResultDropped results that reached the user
        self.granted: set[int] = set()  # cancelled by the broker (a CANCELLED result)
        self.asked: set[int] = set()  # asked to cancel if queued (never submitted again)
        self.forced: set[int] = set()  # asked to cancel by force (CANCEL_KILL)

    @property
    def key(self) -> int:
        return self.session.key

    @property
    def welcomed(self) -> bool:
        return self.session.key != 0 and not self.session.rejoining

    def flush_out(self) -> None:
        self.conn.up.extend(self.session.out)
        self.session.out = []

    def send(self, msg: P.Message) -> None:
        self.flush_out()
        self.conn.up.append(msg)

    def hello(self, now: float = 0.0) -> None:
        self.session.hello(now)
        self.flush_out()

    def submit(self, n: int, hinted: bool, fn: int = 0) -> None:
        """``n`` tasks; ``fn`` > 0: by digest, calling FUNCTIONS[fn - 1] (or each its own
        of them, round robin, with ``fn`` past their number)."""
        ids = [(self.key << P.ID_SHIFT) + self.next_seq + i for i in range(n)]
        self.next_seq += n
        blobs = []
        for i, tid in enumerate(ids):
            if fn:
                f = FUNCTIONS[(fn - 1 + i * (fn > len(FUNCTIONS))) % len(FUNCTIONS)]
                self.functions[f.digest] = f.blob
                blobs.append(payload.python_task(f, (tid,), {}, stored=True))
            else:
                blobs.append(payload.python_task("builtins:abs", (tid,), {}))
        self.pending.update(zip(ids, blobs))
        if hinted:
            self.hints.update((t, f"s3://b/{t % 3}") for t in ids)
        for frame in self.session.submit(ids, blobs):
            self.send(frame)

    def cancel(self, ids: list[int]) -> None:
        for tid in ids:
            self.pending.pop(tid, None)
            self.hints.pop(tid, None)
        self.cancelled.update(ids)
        self.send(self.session.cancel(ids))

    def ping(self, now: float) -> None:
        self.session.next_ping = 0.0
        self.session.tick(now, waiting=True)
        self.flush_out()

    def receive(self, msg: P.Message, now: float) -> None:
        delivered = self.session.receive(msg, now)
        for tid, blob in zip(delivered.ids, delivered.blobs) if delivered else ():
            worker = delivered.worker if delivered else ""
            assert blob != FORGED or tid in self.given_to_evil, \
                f"a forged result reached the user for {tid}"
            if self.pending.pop(tid, None) is not None:
                self.hints.pop(tid, None)
                self.got[tid] += 1
                if blob == _DROPPED:
                    self.dropped_seen += 1
                if blob == payload.CANCELLED:
                    self.granted.add(tid)
                if blob != FORGED and blob[1:2] == b"\x00":
                    value = payload.result_value(blob, worker)
                    assert value == tid, f"task {tid} got the result of {value}"
        if isinstance(msg, P.Welcome) and self.session.broken:
            self.cancelled.update(self.pending)  # (the Executor fails them: given up)
            self.pending.clear()
        self.flush_out()


class WorkerModel:
    """A worker agent and its slots (each a real SlotSession)."""

    def __init__(self, ident: bytes, worker_id: str, nslots: int) -> None:
        self.ident = ident
        self.worker_id = worker_id
        self.conn = Conn()
        self.welcomed = False
        self.slots = [SlotModel(ident + bytes([i + 1]), self, i) for i in range(nslots)]

    def hello(self) -> None:
        self.welcomed = False
        self.conn.up.append(P.hello(P.ROLE_WORKER, {
            "worker_id": self.worker_id, "slots": len(self.slots), "name": self.worker_id}))

    def receive(self, msg: P.Message, now: float) -> None:
        if type(msg) is P.Welcome:
            self.welcomed = True
            for slot in self.slots:
                slot.hello()
        elif type(msg) is P.Error and msg.code == "hello-required":
            self.hello()


class SlotModel:
    ran: set[int] = set()  # every task an honest slot ran (the machine's own, set in init)
    #: Tasks by digest a slot came to run without their function (must stay empty).
    unresolved: set[int] = set()

    def __init__(self, ident: bytes, worker: WorkerModel, index: int) -> None:
        self.ident = ident
        self.worker = worker
        self.index = index
        self.conn = Conn()
        self.session = SlotSession()
        self.running: list[int] = []  # started, not finished: a kill can reach them

    def hello(self) -> None:
        self.session.welcomed = False
        self.conn.up.append(P.hello(P.ROLE_SLOT, {"worker_id": self.worker.worker_id,
                                                   "slot": self.index}))

    def flush_out(self) -> None:
        self.conn.up.extend(self.session.out)
        self.session.out = []

    def receive(self, msg: P.Message, now: float) -> None:
        if self.session.receive(msg, now):
            if self.session.kills:  # (as zfalkon.slot: kill what runs, answer CANCELLED)
                kills, self.session.kills = set(self.session.kills), []
                for tid in [t for t in self.running if t in kills]:
                    self.running.remove(tid)
                    self.session.finished(tid, payload.CANCELLED, False, 0.001, now)
        elif type(msg) is P.Welcome:
            self.session.start(now)
            self.running = []
        elif type(msg) is P.Error and msg.code == "hello-required":
            self.hello()  # (as zfalkon.slot: whether or not its agent saw a WELCOME)
        elif type(msg) is P.Error and msg.code == "bad-hello":
            if self.worker.welcomed:  # (zfalkon.slot waits a second: its agent may not
                self.hello()  # have registered again yet)
        self.flush_out()

    def run_one(self, now: float) -> bool:
        task = self.session.next_task(now)
        if task is None:
            self.session.poll(now)
            self.flush_out()
            return False
        tid, _ = task
        self.ran.add(tid)
        self.resolve(task)
        self.session.finished(tid, result_for(tid), False, 0.001, now)
        self.session.poll(now)
        self.flush_out()
        return True

    def start_one(self, now: float) -> None:
        """Start the next task and keep it running (until finish_one, or a kill)."""
        task = self.session.next_task(now)
        if task is not None:
            self.ran.add(task[0])
            self.resolve(task)
            self.running.append(task[0])

    def resolve(self, task: tuple[int, bytes]) -> None:
        """As zfalkon.slot: a task by digest runs with the function the broker sent."""
        digest = payload.stored_digest(task[1])
        if digest is not None:
            body = self.session.functions.get(
                payload.scoped_digest(task[0] >> P.ID_SHIFT, digest))
            if body is None or payload.function_digest(body) != digest:
                self.unresolved.add(task[0])

    def finish_one(self, now: float) -> None:
        if self.running:
            tid = self.running.pop(0)
            self.session.finished(tid, result_for(tid), False, 0.001, now)
            self.session.poll(now)
            self.flush_out()


class FabricMachine(RuleBasedStateMachine):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.dir = tempfile.mkdtemp(prefix="zfalkon-core-")
        self.journal: Journal | None = None
        self.core: BrokerCore
        self.clients: list[ClientModel] = []
        self.workers: list[WorkerModel] = []
        self.evil: SlotModel | None = None
        self.policy = "fifo"
        self.tight = False  # the per-peer limits made tiny (so that the model hits them)
        self.max_crashes = 2
        self.dropped_before = 0  # dropped_results of cores before a restart
        SlotModel.ran = set()  # (one machine at a time: hypothesis runs them in turn)
        SlotModel.unresolved = set()

    def teardown(self) -> None:
        if self.journal is not None:
            self.journal.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- plumbing ----------------------------------------------------------------------

    def peers(self) -> list:
        out: list = list(self.clients)
        for w in self.workers:
            out.append(w)
            out.extend(w.slots)
        if self.evil is not None:
            out.append(self.evil)
        return out

    def by_ident(self) -> dict[bytes, object]:
        return {p.ident: p for p in self.peers()}

    def make_core(self, durable: bool, policy: str) -> None:
        recorder = None
        if durable:
            self.journal = Journal(self.dir, "never")
            recorder = JournalRecorder(self.journal)
        if getattr(self, "core", None) is not None:
            self.dropped_before += self.core.dropped_results
        self.core = BrokerCore(self.now, queue=make_queue(policy), recorder=recorder)
        if self.tight:
            core = self.core
            core.max_client_tasks, core.max_client_bytes, core.max_client_hinted = 6, 400, 3
            core.max_away_clients, core.max_away_held_bytes, core.max_idle_clients = 1, 30, 2
            core.max_slot_functions, core.max_slot_function_bytes = 2, 100
        if recorder is not None:
            self.core.restore(self.journal.replay(), self.now)
        self._watch_crashes()

    def _watch_crashes(self) -> None:
        """Count, per task, the crashes this core blamed it for (SLOT_LOST naming it while
        a slot held it, not being killed); note those it must have quarantined."""
        core = self.core
        core.max_crashes = self.max_crashes
        self.crash_counts: collections.Counter[int] = collections.Counter()
        self.quarantined: set[int] = set()
        crashed = core._crashed

        def observe(slot, tid: int, reason: str) -> None:
            counted = tid not in core.killing
            crashed(slot, tid, reason)
            if counted:
                self.crash_counts[tid] += 1
                if self.crash_counts[tid] >= core.max_crashes:
                    self.quarantined.add(tid)

        core._crashed = observe  # type: ignore[method-assign]

    def route(self) -> None:
        """Move the core's outbox onto connections (a send to nobody fails)."""
        idents = self.by_ident()
        outbox, self.core.outbox = self.core.outbox, []
        for ident, msg in outbox:
            peer = idents.get(ident)
            if peer is not None and peer is self.evil and type(msg) is P.Tasks:
                for c in self.clients:
                    c.given_to_evil.update(msg.ids)
            if peer is None:
                self.core.send_failed(ident, self.now)
            else:
                peer.conn.down.append(msg)

    def pump_up(self, peer, n: int) -> None:
        conn = peer.conn
        for _ in range(n):
            if not conn.up or conn.stalled:
                break
            self.core.message(peer.ident, conn.up.popleft(), None, self.now)
        if self.journal is not None:
            self.journal.flush(self.now)
        self.core.dispatch(self.now)
        self.route()

    def pump_down(self, peer, n: int) -> None:
        conn = peer.conn
        for _ in range(n):
            if not conn.down or conn.stalled:
                break
            peer.receive(conn.down.popleft(), self.now)

    def unfinished(self) -> set[int]:
        """What the core holds as live, checked against where each task is."""
        core = self.core
        queued = {t for ids, _ in core.queue.batches() for t in ids}
        queued |= {t for ids, _ in core.parked.values() for t in ids}
        held = {t for w in core.workers.values() for s in w.slots.values() for t in s.inflight}
        unacked = {t for c in core.clients.values() for _, (_, ids, _) in c.tx.unacked
                   for t in ids}
        assert core.live <= queued | held | unacked, "a live task is nowhere"
        assert unacked <= core.live, "an unacknowledged result is not live"
        # (a forgotten client's queued tasks leave ``live`` as they are taken)
        return {t for t in core.live if t >> P.ID_SHIFT not in core.gone}

    # -- rules -------------------------------------------------------------------------

    @initialize(durable=st.booleans(), policy=st.sampled_from(["fifo", "data"]),
                nclients=st.integers(1, 2), nworkers=st.integers(1, 2),
                nslots=st.integers(1, 2), evil=st.booleans(), tight=st.booleans(),
                max_crashes=st.integers(1, 3))
    def setup(self, durable: bool, policy: str, nclients: int, nworkers: int, nslots: int,
              evil: bool, tight: bool, max_crashes: int) -> None:
        self.policy = policy
        self.tight = tight
        self.max_crashes = max_crashes
        self.make_core(durable, policy)
        for i in range(nworkers):
            w = WorkerModel(bytes([0x10 + i]) * 4, f"w{i}", nslots)
            self.workers.append(w)
            w.hello()
        if evil:  # a hostile slot: absurd window, never runs anything, forges results
            ew = WorkerModel(b"\xee" * 4, "evil", 1)
            self.workers.append(ew)
            ew.hello()
            self.evil = ew.slots.pop()
        for i in range(nclients):
            c = ClientModel(bytes([0x20 + i]) * 4)
            self.clients.append(c)
            c.hello(self.now)
        self.settle_registration()

    def settle_registration(self) -> None:
        for _ in range(6):
            for p in self.peers():
                self.pump_up(p, 100)
                self.pump_down(p, 100)

    @rule(i=st.integers(0, 1), n=st.integers(1, 5), hinted=st.booleans(),
          fn=st.sampled_from([0, 0, 1, 2, 3, 4, 5]))
    def submit(self, i: int, n: int, hinted: bool, fn: int) -> None:
        c = self.clients[i % len(self.clients)]
        if c.welcomed and not c.left:
            c.submit(n, hinted and self.policy == "data", fn)

    @rule(i=st.integers(0, 1), k=st.integers(1, 3))
    def cancel(self, i: int, k: int) -> None:
        c = self.clients[i % len(self.clients)]
        if c.welcomed and c.pending and not c.left:
            c.cancel(sorted(c.pending)[:k])

    @rule(i=st.integers(0, 1), k=st.integers(1, 4))
    def cancel_if_queued(self, i: int, k: int) -> None:
        """As TaskFuture.cancel(): cancel only what no slot has had; the tasks stay pending
        until the broker answers (a CANCELLED result, or their own result)."""
        c = self.clients[i % len(self.clients)]
        if c.welcomed and c.pending and not c.left:
            ids = sorted(c.pending)[-k:]
            c.asked.update(ids)
            c.send(c.session.cancel(ids, P.CANCEL_IF_QUEUED))

    @rule(i=st.integers(0, 1), k=st.integers(1, 4))
    def cancel_kill(self, i: int, k: int) -> None:
        """As TaskFuture.cancel(force=True): queued tasks are cancelled, running ones killed
        by their slot; each ends with a CANCELLED result or its own, once."""
        c = self.clients[i % len(self.clients)]
        if c.welcomed and c.pending and not c.left:
            ids = sorted(c.pending)[:k]
            c.asked.update(ids)
            c.forced.update(ids)
            c.send(c.session.cancel(ids, P.CANCEL_KILL))

    @rule(i=st.integers(0, 1), other=st.booleans(), kill=st.booleans())
    def cancel_run(self, i: int, other: bool, kill: bool) -> None:
        """``zfalkon cancel RUN``: a client (this one, or the other: no keys here, so
        anyone may) cancels a run; its queued tasks end CANCELLED, running ones are killed
        (``kill``) or run on; each pending task ends once either way."""
        c = self.clients[i % len(self.clients)]
        asker = self.clients[(i + other) % len(self.clients)]
        if c.welcomed and not c.left and asker.welcomed and not asker.left:
            c.asked.update(c.pending)
            c.forced.update(c.pending)  # (queued ones may have run before: taken back)
            asker.send(P.CancelRun(c.key, P.CANCEL_KILL if kill else P.CANCEL_IF_QUEUED))

    @rule(i=st.integers(0, 1))
    def submit_cancelled_ids_again(self, i: int) -> None:
        """A client (not the Executor, which never reuses an id) submits ids it cancelled."""
        c = self.clients[i % len(self.clients)]
        again = sorted(c.cancelled - set(c.got) - c.asked)[:3]
        if c.welcomed and not c.left and again and all(t >> P.ID_SHIFT == c.key for t in again):
            blobs = [payload.python_task("builtins:abs", (t,), {}) for t in again]
            c.cancelled.difference_update(again)
            c.pending.update(zip(again, blobs))
            for frame in c.session.submit(again, blobs):
                c.send(frame)

    @rule(data=st.data())
    def deliver_up(self, data) -> None:
        peers = self.peers()
        p = peers[data.draw(st.integers(0, len(peers) - 1))]
        self.pump_up(p, data.draw(st.integers(1, 4)))

    @rule(data=st.data())
    def deliver_down(self, data) -> None:
        peers = self.peers()
        p = peers[data.draw(st.integers(0, len(peers) - 1))]
        self.pump_down(p, data.draw(st.integers(1, 4)))

    @rule(data=st.data())
    def slot_runs(self, data) -> None:
        slots = [s for w in self.workers for s in w.slots]
        if slots:
            s = slots[data.draw(st.integers(0, len(slots) - 1))]
            for _ in range(data.draw(st.integers(1, 3))):
                s.run_one(self.now)

    @rule(data=st.data(), finish=st.booleans())
    def slot_starts_or_finishes(self, data, finish: bool) -> None:
        """A slot starts a task and keeps it running (a CANCEL_KILL may reach it), or
        finishes the oldest it runs."""
        slots = [s for w in self.workers for s in w.slots]
        if slots:
            s = slots[data.draw(st.integers(0, len(slots) - 1))]
            if finish:
                s.finish_one(self.now)
            else:
                s.start_one(self.now)

    @rule(data=st.data())
    def replace_connection(self, data) -> None:
        """A connection dies with what it carried; the peer reconnects (same routing id)."""
        peers = self.peers()
        peers[data.draw(st.integers(0, len(peers) - 1))].conn.replace()

    @rule(data=st.data(), stall=st.booleans())
    def partition(self, data, stall: bool) -> None:
        peers = self.peers()
        peers[data.draw(st.integers(0, len(peers) - 1))].conn.stalled = stall

    @rule(dt=st.sampled_from([0.3, PING_SECONDS, LEASE_SECONDS + 0.5,
                              HEARTBEAT_SECONDS * HEARTBEAT_MISSES + 1]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.core.tick(self.now)
        self.route()

    @rule()
    def heartbeats(self) -> None:
        for w in self.workers:  # (an agent heartbeats whether or not it is registered:
            w.conn.up.append(P.Heartbeat([]))  # that is how it learns it must register)

    @rule()
    def clients_ping(self) -> None:
        for c in self.clients:
            if c.welcomed and not c.left:
                c.ping(self.now)

    @rule()
    def slots_poll(self) -> None:
        for w in self.workers:
            for s in w.slots:
                if s.session.welcomed:
                    s.session.next_ping = 0.0
                    s.session.poll(self.now)
                    s.flush_out()

    @rule(data=st.data(), by_slot=st.booleans())
    def slot_crash(self, data, by_slot: bool) -> None:
        """A slot process dies: its agent says SLOT_LOST and starts a fresh one. Or
        (``by_slot``) the slot's agent dies: the slot says SLOT_LOST of itself, and (the
        model's agent lives on) registers again."""
        slots = [s for w in self.workers for s in w.slots]
        if not slots:
            return
        s = slots[data.draw(st.integers(0, len(slots) - 1))]
        running = (s.running[0] if s.running
                   else s.session.queue[0][0] if s.session.queue else 0)
        s.session = SlotSession()
        s.running = []
        if by_slot:
            s.conn.up.append(P.SlotLost(s.ident, running, "its worker agent died"))
            if s.worker.welcomed:
                s.hello()
            return
        s.conn.replace()
        if s.worker.welcomed:
            s.worker.conn.up.append(P.SlotLost(s.ident, running, "killed by SIGKILL"))
            s.hello()

    @precondition(lambda self: self.evil is not None)
    @rule(window=st.sampled_from([0, 5, 10**9]), forge=st.booleans())
    def evil_slot(self, window: int, forge: bool) -> None:
        evil = self.evil
        assert evil is not None
        if not evil.session.welcomed:
            evil.hello()
            return
        ids: list[int] = []
        if forge:  # results for tasks it may not hold (others' pending, its own twice)
            for c in self.clients:
                ids += list(c.pending)[:2]
            for w in self.core.workers.values():
                for s in w.slots.values():
                    ids += list(s.inflight)[:1]
        seq = evil.session.tx.push((window, 0, ids, [FORGED] * len(ids)))
        evil.conn.up.append(P.Results(seq, evil.session.rx.last, window, 0, ids,
                                      [FORGED] * len(ids)))

    @rule(i=st.integers(0, 1), ahead=st.integers(1, 3), resend=st.booleans(),
          token=st.one_of(st.just(b""), st.just(None), st.binary(min_size=8, max_size=8)))
    def client_acks_blindly(self, i: int, ahead: int, resend: bool,
                            token: bytes | None) -> None:
        """A hostile client acknowledges DELIVERs it has not read (their numbers are
        guessable) with no token, the token of the last frame it has (None), or a guessed
        one: the broker must not count it."""
        c = self.clients[i % len(self.clients)]
        if c.welcomed and not c.left:
            self.blind_ack(c, ahead, resend, token)

    def blind_ack(self, c: ClientModel, ahead: int, resend: bool,
                  token: bytes | None) -> None:
        if token is None:
            token = c.session.token
        seq = c.session.rx.last + ahead
        c.send(P.Resend(seq, token) if resend else P.Ack(seq, token))

    @rule(i=st.integers(0, 1), ahead=st.integers(1, 3), resend=st.booleans(),
          token=st.one_of(st.just(b""), st.just(None), st.binary(min_size=8, max_size=8)))
    def client_acks_blindly_then_loses_the_frames(self, i: int, ahead: int, resend: bool,
                                                  token: bytes | None) -> None:
        """The same while DELIVERs are on their way to it (the slots run what they hold
        first); the broker takes the ACK, then the connection dies with the DELIVERs in
        it: had the ACK counted, those results would be forgotten, and quiescence would
        find them never delivered."""
        c = self.clients[i % len(self.clients)]
        if not c.welcomed or c.left:
            return
        self.pump_up(c, 100)
        for w in self.workers:
            for s in w.slots:
                self.pump_down(s, 100)
                while s.run_one(self.now):
                    pass
                self.pump_up(s, 100)
        self.blind_ack(c, ahead, resend, token)
        self.pump_up(c, len(c.conn.up))
        c.conn.replace()

    @rule(i=st.integers(0, 1))
    def client_leaves_and_returns(self, i: int) -> None:
        c = self.clients[i % len(self.clients)]
        if not c.welcomed or c.left:
            return
        c.send(P.Bye("leaving"))
        c.left = True
        for tid in c.pending:
            c.cancelled.add(tid)  # a client that left gives up its pending tasks
        c.pending.clear()

    @rule(i=st.integers(0, 1))
    def client_rejoins(self, i: int) -> None:
        """A client the broker may have forgotten registers again with its key."""
        c = self.clients[i % len(self.clients)]
        if c.welcomed and not c.left:
            c.hello(self.now)

    @rule(i=st.integers(0, 1))
    def client_comes_back(self, i: int) -> None:
        """A client that left registers again with its old key and submits anew."""
        c = self.clients[i % len(self.clients)]
        if c.left:
            c.left = False
            c.hello(self.now)

    @rule()
    def a_long_silence(self) -> None:
        """Nobody speaks for longer than the broker holds a silent client: silent clients
        are forgotten (their tasks dropped), and their models know it."""
        self.now += self.core.hold_seconds + 1
        silent = {c.key for c in self.clients}
        self.core.tick(self.now)
        self.route()
        for c in self.clients:
            if c.key in silent and c.key not in self.core.clients:
                c.cancelled.update(c.pending)  # given up: the broker forgot them
                c.pending.clear()

    @precondition(lambda self: self.journal is not None)
    @rule()
    def broker_restarts(self) -> None:
        """kill -9 of the broker and a restart from its journal."""
        assert self.journal is not None
        self.journal.flush(self.now)
        expected = self.unfinished()
        self.journal.close()
        for p in self.peers():
            p.conn.replace()
        self.make_core(True, self.policy)
        assert self.journal is not None
        got = self.unfinished()
        assert got == expected, f"replay differs: lost {expected - got}, extra {got - expected}"

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def a_task_cancelled_by_the_broker_never_ran(self) -> None:
        """A CANCELLED result only for a task that never started, unless forced."""
        for c in self.clients:
            ran = (c.granted - c.forced) & SlotModel.ran
            assert not ran, f"cancelled (CANCELLED result) but ran: {sorted(ran)[:5]}"

    @invariant()
    def tasks_being_killed_are_held_by_a_slot(self) -> None:
        """A task cancelled by force waits for its slot's answer only while a slot holds
        it: taken back from a slot, it ends cancelled at once (never runs again)."""
        killing = self.core.killing
        assert killing <= self.core._dispatched(), sorted(killing - self.core._dispatched())
        assert killing <= self.core.live

    @invariant()
    def tasks_by_digest_reach_slots_with_their_function(self) -> None:
        assert not SlotModel.unresolved, \
            f"tasks by digest without their function at the slot: {SlotModel.unresolved}"

    @invariant()
    def a_task_blamed_max_crashes_times_is_never_handed_out_again(self) -> None:
        """R18: a task is blamed for at most max_crashes crashes per broker run (a crash
        count is not journaled): the one that reaches it quarantines it, so no slot
        holds it again and it is not queued."""
        core = self.core
        over = {t: n for t, n in self.crash_counts.items() if n > core.max_crashes}
        assert not over, f"requeued past max_crashes: {over}"
        assert all(len(r) < core.max_crashes for r in core.crashes.values())
        queued = {t for ids, _ in core.queue.batches() for t in ids}
        queued |= {t for ids, _ in core.parked.values() for t in ids}
        again = self.quarantined & (queued | core._dispatched())
        assert not again, f"quarantined but handed out again: {sorted(again)}"

    @invariant()
    def no_task_reaches_a_user_twice(self) -> None:
        for c in self.clients:
            twice = [t for t, n in c.got.items() if n > 1]
            assert not twice, f"delivered twice: {twice}"

    @invariant()
    def no_task_on_two_slots(self) -> None:
        seen: set[int] = set()
        running = 0
        for w in self.core.workers.values():
            for s in w.slots.values():
                assert seen.isdisjoint(s.inflight)
                seen.update(s.inflight)
                running += len(s.inflight)
        assert self.core.running == running
        active = sum(1 for w in self.core.workers.values() for s in w.slots.values()
                     if s.window > 0 and not s.stalled and not w.draining)
        assert self.core.active_slots == active
        assert self.core.done <= self.core.submitted

    @invariant()
    def live_tasks_are_somewhere(self) -> None:
        self.unfinished()

    @invariant()
    def live_tasks_are_counted_per_client(self) -> None:
        counts = collections.Counter(t >> P.ID_SHIFT for t in self.core.live)
        for key, c in self.core.clients.items():
            assert c.live_tasks == counts[key], f"client {key}: {c.live_tasks} != {counts[key]}"
            assert c.live_tasks or not (c.task_bytes or c.hinted)

    @invariant()
    def usage_is_the_sum_of_its_records(self) -> None:
        """What the limits count (a record's :class:`Usage`; here, without keys, its own)
        is the sum of its records' counters, and forgets a forgotten record."""
        core = self.core
        groups: dict[int, list] = collections.defaultdict(list)
        for key, c in core.clients.items():
            assert c.usage.clients.get(key) is c
            groups[id(c.usage)].append(c)
        for records in groups.values():
            u = records[0].usage
            assert set(u.clients.values()) == set(records)
            assert (u.live_tasks, u.task_bytes, u.hinted, u.functions, u.function_bytes) == (
                sum(c.live_tasks for c in records), sum(c.task_bytes for c in records),
                sum(c.hinted for c in records), sum(len(c.functions) for c in records),
                sum(c.function_bytes for c in records))
        assert all(u.clients for u in core.usage.values())

    @invariant()
    def dropped_results_are_counted(self) -> None:
        seen = sum(c.dropped_seen for c in self.clients)
        assert seen <= self.dropped_before + self.core.dropped_results

    @invariant()
    def counters_equal_queues(self) -> None:
        core = self.core
        queued = sum(len(ids) for ids, _ in core.queue.batches())
        assert len(core.queue) == queued
        assert core.parked_count == sum(len(ids) for ids, _ in core.parked.values())
        ready = [s for s in core.ready]
        assert len(ready) == len(set(map(id, ready)))
        assert all(s.ready for s in ready)

    @invariant()
    def run_counters_equal_queues(self) -> None:
        """Each run's counters (STATUS ``runs``), kept per event, equal what the queue,
        the parked tasks and the slots hold; its running + prefetched are what slots
        hold."""
        core, shift = self.core, P.ID_SHIFT
        queued: collections.Counter[int] = collections.Counter()
        batches = [*core.queue.batches(), *core.parked.values()]
        for ids, _ in batches:
            queued.update(t >> shift for t in ids
                          if t in core.live and t not in core.cancelled)
        held: collections.Counter[int] = collections.Counter()
        for w in core.workers.values():
            for s in w.slots.values():
                held.update(t >> shift for t in s.inflight)
        for key, c in core.clients.items():
            assert c.queued == queued[key], f"run {key}: queued {c.queued} != {queued[key]}"
            assert c.held == held[key], f"run {key}: held {c.held} != {held[key]}"
            assert c.failed <= c.done
        status = core.status(self.now)
        runs = {r["id"]: r for r in status["runs"]}
        assert status["running"] + status["prefetched"] == core.running
        assert status["running"] <= sum(len(w.slots) for w in core.workers.values())
        for key, r in runs.items():
            assert r["queued"] == queued[key]
            assert r["running"] + r["prefetched"] == held[key] and r["prefetched"] >= 0

    @invariant()
    def hostile_slot_holds_a_fair_share_at_most(self) -> None:
        if self.evil is None:
            return
        for w in self.core.workers.values():
            for s in w.slots.values():
                if s.ident == self.evil.ident:
                    total = len(self.core.queue) + self.core.running
                    assert len(s.inflight) <= max(2, total)

    # -- quiescence --------------------------------------------------------------------

    @rule()
    def quiescence(self) -> None:
        """Heal everything and let it run: every accepted task of a live client that was
        not cancelled reaches its user exactly once."""
        for p in self.peers():
            p.conn.stalled = False
        # (up to 150 s: a peer whose re-sent frames were lost again before it read them
        # waits RESEND_IDLE_SECONDS, then twice that, ... before they are sent again)
        for _ in range(300):
            for w in self.workers:
                w.conn.up.append(P.Heartbeat([]))
            for c in self.clients:
                if not c.left:  # (as the Executor's I/O thread: PING, HELLO again, ACK)
                    c.session.tick(self.now, waiting=bool(c.pending))
                    c.flush_out()
            for p in self.peers():
                self.pump_up(p, 10_000)
            for p in self.peers():
                self.pump_down(p, 10_000)
            for w in self.workers:
                for s in w.slots:
                    while s.running:
                        s.finish_one(self.now)
                    for _ in range(200):
                        if not s.run_one(self.now):
                            break
                    s.session.next_ping = 0.0
                    s.session.poll(self.now)
                    s.flush_out()
            for w in self.workers:
                for s in w.slots:
                    if w.welcomed and not s.session.welcomed:
                        s.hello()
            self.now += 0.5
            self.core.tick(self.now)
            self.route()
            if all(not c.pending for c in self.clients if not c.left):
                break
        for c in self.clients:
            if not c.left:
                assert not c.pending, f"never delivered: {sorted(c.pending)[:10]}"


FabricMachine.TestCase.settings = settings(  # (tox -e core-deep runs 20,000)
    max_examples=int(os.environ.get("ZFALKON_CORE_EXAMPLES", "2000")),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestFabric = FabricMachine.TestCase


# -- targeted unit tests ---------------------------------------------------------------

def registered(core: BrokerCore, now: float = 0.0, window: int = 10) -> bytes:
    """A worker with one slot announcing ``window``; returns the slot's ident."""
    core.message(b"w", P.hello(P.ROLE_WORKER, {"worker_id": "w", "slots": 1}), None, now)
    core.message(b"s", P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": 0}), None, now)
    core.message(b"s", P.Results(1, 0, window, 0, [], []), None, now)
    core.outbox.clear()
    return b"s"


def client(core: BrokerCore, ident: bytes = b"c", now: float = 0.0, key: int = 0) -> int:
    info = {"name": "t"} | ({"key": key} if key else {})
    core.message(ident, P.hello(P.ROLE_CLIENT, info), None, now)
    welcome = [m for i, m in core.outbox if type(m) is P.Welcome][-1]
    core.outbox.clear()
    return welcome.key


def one_task_dispatched(core: BrokerCore) -> tuple[bytes, int]:
    """A registered slot, a client, and one task of the client's dispatched to the slot;
    returns (slot ident, task id), with the outbox cleared."""
    slot = registered(core)
    key = client(core)
    tid = (key << P.ID_SHIFT) + 1
    core.message(b"c", P.Submit(1, 0, [tid], [b"t"]), None, 0.0)
    core.dispatch(0.0)
    assert [m for i, m in core.outbox if i == slot and type(m) is P.Tasks][0].ids == [tid]
    core.outbox.clear()
    return slot, tid


def test_a_claimed_key_at_the_top_of_the_range_does_not_push_later_keys_past_it():
    core = BrokerCore(0.0)
    key = client(core, b"a", key=MAX_CLIENT_KEY - 1)
    assert key == MAX_CLIENT_KEY - 1
    assert client(core, b"b") < MAX_CLIENT_KEY
    assert client(core, b"c", key=MAX_CLIENT_KEY + 5) < MAX_CLIENT_KEY  # refused claim


def test_keys_wrap_around_and_skip_those_in_use():
    core = BrokerCore(0.0)
    core.next_key = MAX_CLIENT_KEY - 1
    assert client(core, b"a") == MAX_CLIENT_KEY - 1
    first = client(core, b"b")
    assert first == 1
    assert client(core, b"c") == 2


def test_a_lapsed_lease_requeues_and_revokes_and_the_late_result_is_refused():
    core = BrokerCore(0.0)
    slot, tid = one_task_dispatched(core)
    core.message(b"w", P.Heartbeat([]), None, LEASE_SECONDS)  # the agent lives on
    core.tick(LEASE_SECONDS + 0.1)
    assert core.expired_leases == 1 and len(core.queue) == 1 and core.running == 0
    revoke = [m for i, m in core.outbox if i == slot and type(m) is P.Tasks]
    assert revoke and revoke[0].revoke == [tid]
    core.outbox.clear()
    core.message(slot, P.Results(2, 1, 10, 0, [tid], [b"late"]), None, LEASE_SECONDS + 0.2)
    assert not [m for i, m in core.outbox if type(m) is P.Deliver]  # not its task any more


def test_a_busy_heartbeat_keeps_a_long_task_leased():
    core = BrokerCore(0.0)
    slot = registered(core)
    key = client(core)
    core.message(b"c", P.Submit(1, 0, [(key << P.ID_SHIFT) + 1], [b"t"]), None, 0.0)
    core.dispatch(0.0)
    for t in range(1, 100):  # 99 s of one task, the agent saying the slot is busy
        core.message(b"w", P.Heartbeat([slot]), None, float(t))
        core.tick(float(t) + 0.5)
    assert core.expired_leases == 0 and core.running == 1


def test_prefetched_tasks_behind_a_stuck_task_are_stolen_for_an_idle_slot():
    core = BrokerCore(0.0)
    core.message(b"w", P.hello(P.ROLE_WORKER, {"worker_id": "w", "slots": 2}), None, 0.0)
    for s in (b"s1", b"s2"):
        core.message(s, P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": s[-1]}), None, 0.0)
    core.message(b"s1", P.Results(1, 0, 100, 0, [], []), None, 0.0)
    key = client(core)
    ids = [(key << P.ID_SHIFT) + i for i in range(1, 11)]
    core.message(b"c", P.Submit(1, 0, ids, [b"t"] * 10), None, 0.0)
    core.dispatch(0.0)
    assert len(core.peers[b"s1"].inflight) == 10
    core.message(b"s2", P.Results(1, 0, 100, 0, [], []), None, 0.5)  # s2 arrives, idle
    core.message(b"w", P.Heartbeat([b"s1"]), None, 1.0)
    core.outbox.clear()
    core.tick(2.0)
    core.dispatch(2.0)
    assert list(core.peers[b"s1"].inflight) == ids[:1]  # the one it may be running
    assert sorted(core.peers[b"s2"].inflight) == ids[1:6]  # its fair share; the rest wait
    assert len(core.queue) == 4 and core.stolen == 9
    revoked = [m for i, m in core.outbox if i == b"s1" and type(m) is P.Tasks]
    assert revoked[0].revoke == ids[1:]


def test_an_absurd_window_gets_a_fair_share_only():
    core = BrokerCore(0.0)
    core.message(b"w", P.hello(P.ROLE_WORKER, {"worker_id": "w", "slots": 2}), None, 0.0)
    for s in (b"s1", b"s2"):
        core.message(s, P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": s[-1]}), None, 0.0)
        core.message(s, P.Results(1, 0, 10**9, 0, [], []), None, 0.0)
    key = client(core)
    ids = [(key << P.ID_SHIFT) + i for i in range(1, 1001)]
    core.message(b"c", P.Submit(1, 0, ids, [b"t"] * 1000), None, 0.0)
    core.dispatch(0.0)
    assert len(core.peers[b"s1"].inflight) == 500 == len(core.peers[b"s2"].inflight)


def test_results_are_kept_until_acknowledged_and_resent_on_request():
    core = BrokerCore(0.0)
    slot, tid = one_task_dispatched(core)
    core.message(slot, P.Results(2, 1, 10, 0, [tid], [b"r"]), None, 0.1)
    first = [m for i, m in core.outbox if i == b"c" and type(m) is P.Deliver]
    assert first and first[0].seq == 1
    core.outbox.clear()
    core.message(b"c", P.Resend(0), None, 0.2)  # the DELIVER died with a connection
    again = [m for i, m in core.outbox if i == b"c" and type(m) is P.Deliver]
    assert again == first
    core.outbox.clear()
    core.message(b"c", P.Ack(1, first[0].token), None, 0.3)
    core.message(b"c", P.Resend(1), None, 0.4)
    assert not [m for i, m in core.outbox if type(m) is P.Deliver]


def test_a_submit_after_a_gap_is_refused_until_the_missing_frame_comes():
    core = BrokerCore(0.0)
    key = client(core)
    ids = [(key << P.ID_SHIFT) + i for i in range(1, 4)]
    core.message(b"c", P.Submit(2, 0, ids[1:], [b"t"] * 2), None, 0.0)
    assert len(core.queue) == 0
    assert [m for i, m in core.outbox if type(m) is P.Resend] == [P.Resend(0)]
    core.message(b"c", P.Submit(1, 0, ids[:1], [b"t"]), None, 0.0)
    core.message(b"c", P.Submit(2, 0, ids[1:], [b"t"] * 2), None, 0.0)
    core.message(b"c", P.Submit(2, 0, ids[1:], [b"t"] * 2), None, 0.0)  # a duplicate
    assert len(core.queue) == 3 and core.submitted == 3


def test_a_forgotten_clients_queued_tasks_do_not_run_when_its_key_returns():
    core = BrokerCore(0.0)
    key = client(core)
    tid = (key << P.ID_SHIFT) + 1
    core.message(b"c", P.Submit(1, 0, [tid], [b"t"]), None, 0.0)
    core.message(b"c", P.Bye("gone"), None, 0.0)
    assert client(core, b"c2", key=key) == key
    slot = registered(core)
    core.dispatch(1.0)
    assert not [m for i, m in core.outbox if i == slot and type(m) is P.Tasks and m.ids]


@pytest.mark.parametrize("field", ["busy", "revoke"])
def test_new_fields_decode_with_their_defaults_when_left_out(field):
    tag = P.TAGS[P.Heartbeat] if field == "busy" else P.TAGS[P.Tasks]
    frame = msgpack.packb([tag] if field == "busy" else [tag, 1, 0, [], []])
    msg = P.decode(frame)
    assert getattr(msg, field) == []


def test_a_key_held_by_a_connected_client_is_not_given_to_another_claimant():
    core = BrokerCore(0.0)
    key = client(core, b"a")
    core.message(b"a", P.Submit(1, 0, [(key << P.ID_SHIFT) + 1], [b"t"]), None, 0.0)
    assert client(core, b"b", key=key) != key  # a is connected and holds it
    core.message(b"a", P.Bye("done"), None, 1.0)
    assert client(core, b"c", key=key) == key  # free again once a has left


def test_with_keys_only_the_first_submitter_may_claim_a_key_back():
    core = BrokerCore(0.0)
    core.message(b"a", P.hello(P.ROLE_CLIENT, {"name": "a"}), "client:alice", 0.0)
    key = [m for i, m in core.outbox if type(m) is P.Welcome][-1].key
    core.message(b"a", P.Submit(1, 0, [(key << P.ID_SHIFT) + 1], [b"t"]), "client:alice", 0.0)
    core.message(b"a", P.Bye("gone"), "client:alice", 0.0)
    core.key_owner[key] = "client:alice"  # (as a journal would remember it)
    core.outbox.clear()
    core.message(b"m", P.hello(P.ROLE_CLIENT, {"name": "m", "key": key}), "client:mallory", 0.0)
    assert [m for i, m in core.outbox if type(m) is P.Welcome][-1].key != key
    core.message(b"a2", P.hello(P.ROLE_CLIENT, {"name": "a", "key": key}), "client:alice", 0.0)
    assert [m for i, m in core.outbox if type(m) is P.Welcome][-1].key == key


def test_a_task_dropped_by_its_client_while_its_slot_kills_it_is_not_left_killing():
    """cancel_run kills a held task, then the client gives up on it (CANCEL_DROP): it is
    no longer live, nor waiting for its slot's answer (which is dropped when it comes)."""
    core = BrokerCore(0.0)
    slot, tid = one_task_dispatched(core)
    core.cancel_run(core.clients[tid >> P.ID_SHIFT], kill=True)
    assert tid in core.killing
    core.message(b"c", P.Cancel(2, 0, [tid], b"", P.CANCEL_DROP), None, 0.1)
    assert tid not in core.live and tid not in core.killing
    core.outbox.clear()
    core.message(slot, P.Results(2, 1, 10, 0, [tid], [payload.CANCELLED]), None, 0.2)
    assert not [m for i, m in core.outbox if type(m) is P.Deliver]


def test_a_task_killed_by_force_whose_slot_is_lost_ends_cancelled_and_is_not_requeued():
    """CANCEL mode 2 reaches the broker while a slot holds the task; the slot's lease
    lapses before it answers: the task gets a CANCELLED result from the broker and is never
    dispatched again (R14)."""
    core = BrokerCore(0.0)
    slot, tid = one_task_dispatched(core)
    core.message(b"c", P.Cancel(2, 0, [tid], b"", P.CANCEL_KILL), None, 0.1)
    kill = [m for i, m in core.outbox if i == slot and type(m) is P.Tasks]
    assert kill and kill[0].kill == [tid]
    core.outbox.clear()
    core.message(b"w", P.Heartbeat([]), None, LEASE_SECONDS)  # the agent lives on
    core.tick(LEASE_SECONDS + 0.1)  # the slot never answered: its lease lapses
    delivered = [m for i, m in core.outbox if i == b"c" and type(m) is P.Deliver]
    assert [(m.ids, m.blobs) for m in delivered] == [([tid], [payload.CANCELLED])]
    assert len(core.queue) == 0 and core.running == 0
    registered2 = b"s2"
    core.message(registered2, P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": 1}), None,
                 LEASE_SECONDS + 0.2)
    core.message(registered2, P.Results(1, 0, 10, 0, [], []), None, LEASE_SECONDS + 0.2)
    core.dispatch(LEASE_SECONDS + 0.3)
    assert not [m for i, m in core.outbox if type(m) is P.Tasks and tid in m.ids]


def _new_slot(core: BrokerCore, ident: bytes, index: int, now: float) -> None:
    core.message(ident, P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": index}), None, now)
    core.message(ident, P.Results(1, 0, 10, 0, [], []), None, now)


def test_a_task_crashing_its_slot_max_crashes_times_is_quarantined_not_requeued():
    """R18: a task blamed by SLOT_LOST goes back to the queue (no attempt counted) until
    its max_crashes-th crash; then it fails with WorkerCrashed naming it and each crash,
    and no slot gets it again. The slot's prefetched tasks are requeued without a crash."""
    core = BrokerCore(0.0)
    assert core.max_crashes == MAX_CRASHES == 2
    slot = registered(core)
    key = client(core)
    poison, other = (key << P.ID_SHIFT) + 1, (key << P.ID_SHIFT) + 2
    core.message(b"c", P.Submit(1, 0, [poison, other], [b"p", b"o"]), None, 0.0)
    core.dispatch(0.0)
    assert list(core.peers[slot].inflight) == [poison, other]
    core.outbox.clear()
    core.message(b"w", P.SlotLost(slot, poison, "killed by SIGKILL"), None, 0.5)
    assert not [m for _, m in core.outbox if type(m) is P.Deliver]  # not failed yet
    assert core.crashes[poison] == ["killed by SIGKILL on None/0"] and not core.attempts
    queued = [t for ids, _ in core.queue.batches() for t in ids]
    assert sorted(queued) == [poison, other] and core.running == 0
    _new_slot(core, b"s2", 1, 1.0)
    core.dispatch(1.0)
    assert sorted(core.peers[b"s2"].inflight) == [poison, other]  # its second chance
    core.outbox.clear()
    # the second crash: here the slot itself says its agent died while it ran the task
    core.message(b"s2", P.SlotLost(b"s2", poison, "its worker agent died"), None, 1.5)
    (deliver,) = [m for i, m in core.outbox if i == b"c" and type(m) is P.Deliver]
    assert deliver.ids == [poison]
    with pytest.raises(WorkerCrashed) as info:
        payload.result_value(deliver.blobs[0])
    text = str(info.value)
    assert f"task {poison}" in text and "2 times" in text and "quarantined" in text
    assert "killed by SIGKILL on None/0" in text and "its worker agent died on None/1" in text
    assert poison not in core.crashes and core.failed == 1
    assert [t for ids, _ in core.queue.batches() for t in ids] == [other]  # (no crash)
    _new_slot(core, b"s3", 2, 2.0)
    core.dispatch(2.0)
    assert list(core.peers[b"s3"].inflight) == [other]


def test_max_crashes_1_fails_at_the_first_crash_and_a_result_clears_the_count():
    core = BrokerCore(0.0)
    core.max_crashes = 1
    slot, tid = one_task_dispatched(core)
    core.message(b"w", P.SlotLost(slot, tid, "killed by SIGSEGV"), None, 0.5)
    (deliver,) = [m for i, m in core.outbox if i == b"c" and type(m) is P.Deliver]
    with pytest.raises(WorkerCrashed, match="1 time "):
        payload.result_value(deliver.blobs[0])
    core = BrokerCore(0.0)
    slot, tid = one_task_dispatched(core)
    core.message(b"w", P.SlotLost(slot, tid, "killed by SIGKILL"), None, 0.5)
    _new_slot(core, b"s2", 1, 1.0)
    core.dispatch(1.0)
    core.message(b"s2", P.Results(2, 1, 10, 0, [tid], [b"ok"]), None, 1.5)
    assert not core.crashes  # (it finished: nothing kept for it)


def test_a_slot_cannot_report_another_slots_task_crashed():
    """SLOT_LOST from a slot speaks for itself only: naming another slot does nothing."""
    core = BrokerCore(0.0)
    slot, tid = one_task_dispatched(core)
    _new_slot(core, b"s2", 1, 0.1)
    core.outbox.clear()
    core.message(b"s2", P.SlotLost(slot, tid, "lies"), None, 0.2)
    assert not core.crashes and tid in core.peers[slot].inflight
    assert b"s2" in core.peers  # (and it is not dropped either)


# -- runs (issue 14) ---------------------------------------------------------------------

def _run(core: BrokerCore, key: int) -> dict:
    return {r["id"]: r for r in core.status(0.0)["runs"]}[key]


def test_a_run_lists_its_counters_with_started_and_prefetched_apart():
    core = BrokerCore(0.0)
    slot = registered(core, window=2)
    core.message(b"c", P.hello(P.ROLE_CLIENT, {"name": "me", "run": "nightly"}), None, 0.0)
    key = [m for i, m in core.outbox if type(m) is P.Welcome][-1].key
    ids = [(key << P.ID_SHIFT) + i for i in range(1, 6)]
    core.message(b"c", P.Submit(1, 0, ids, [b"t"] * 5), None, 0.0)
    run = _run(core, key)
    assert (run["name"], run["run"], run["state"]) == ("me", "nightly", "connected")
    assert (run["queued"], run["running"], run["prefetched"], run["submitted"]) == (5, 0, 0, 5)
    core.dispatch(0.0)  # the slot holds 2 (its window), runs the oldest
    run = _run(core, key)
    assert (run["queued"], run["running"], run["prefetched"]) == (3, 1, 1)
    status = core.status(0.0)
    assert (status["running"], status["prefetched"]) == (1, 1)
    assert status["worker_list"][0]["running"] == 1
    assert status["worker_list"][0]["prefetched"] == 1
    error = payload.error_result("ValueError", "no")
    core.message(slot, P.Results(2, 1, 2, 1, ids[:2], [result_for(ids[0]), error]), None, 0.1)
    run = _run(core, key)
    assert (run["done"], run["failed"]) == (2, 1)


def test_a_frame_of_two_runs_counts_a_failure_wrapped_with_captured_output():
    core = BrokerCore(0.0)
    slot = registered(core, window=4)
    keys = [client(core, ident) for ident in (b"a", b"b")]
    ids = [(key << P.ID_SHIFT) + 1 for key in keys]
    for ident, tid in zip((b"a", b"b"), ids):
        core.message(ident, P.Submit(1, 0, [tid], [b"t"]), None, 0.0)
    core.dispatch(0.0)
    failed = msgpack.packb((payload.RESULT_OUTPUT, payload.error_result("ValueError", "no"),
                            b"out", b"", False))
    fine = msgpack.packb((payload.RESULT_OUTPUT, result_for(ids[1]), b"", b"", False))
    core.message(slot, P.Results(2, 1, 4, 1, ids, [failed, fine]), None, 0.1)
    assert [(_run(core, k)["done"], _run(core, k)["failed"]) for k in keys] == [(1, 1), (1, 0)]


def test_the_status_asker_and_observers_are_not_counted_as_clients():
    core = BrokerCore(0.0)
    client(core, b"c")
    core.message(b"o", P.hello(P.ROLE_CLIENT, {"name": "status", "observer": True}), None, 0.0)
    core.message(b"q", P.hello(P.ROLE_CLIENT, {"name": "status"}), None, 0.0)
    core.outbox.clear()
    core.message(b"q", P.StatusRequest(), None, 0.0)
    (answer,) = [m for i, m in core.outbox if i == b"q" and type(m) is P.Status]
    assert answer.info["clients"] == 1  # b"c" only
    assert answer.info["runs"] == [] and answer.info["runs_omitted"] == 0
    assert "rate_window_seconds" in answer.info


def test_cancel_run_removes_queued_tasks_and_kills_held_ones_for_the_owner_only():
    core = BrokerCore(0.0)
    slot = registered(core, window=2)
    core.message(b"c", P.hello(P.ROLE_CLIENT, {"name": "run"}), "client:alice", 0.0)
    key = [m for i, m in core.outbox if type(m) is P.Welcome][-1].key
    ids = [(key << P.ID_SHIFT) + i for i in range(1, 6)]
    core.message(b"c", P.Submit(1, 0, ids, [b"t"] * 5), "client:alice", 0.0)
    core.dispatch(0.0)
    held = list(next(iter(core.workers.values())).slots[slot].inflight)
    core.message(b"m", P.hello(P.ROLE_CLIENT, {"name": "x"}), "client:mallory", 0.0)
    core.message(b"a", P.hello(P.ROLE_CLIENT, {"name": "y"}), "client:alice", 0.0)
    core.outbox.clear()
    core.message(b"m", P.CancelRun(key, P.CANCEL_KILL), "client:mallory", 0.0)
    assert [m.code for i, m in core.outbox if i == b"m"] == ["unauthorized"]
    core.message(b"m", P.CancelRun(key + 100, P.CANCEL_KILL), "client:mallory", 0.0)
    assert [m.code for i, m in core.outbox if i == b"m"][-1] == "unknown-run"
    core.outbox.clear()
    core.message(b"a", P.CancelRun(key, P.CANCEL_KILL), "client:alice", 0.0)
    assert [m for i, m in core.outbox if i == b"a"] == [P.RunCancelled(key, 3, 2)]
    (kill,) = [m for i, m in core.outbox if i == slot and type(m) is P.Tasks]
    assert sorted(kill.kill) == held and not kill.ids
    cancelled = [t for i, m in core.outbox if i == b"c" and type(m) is P.Deliver
                 for t in m.ids]
    assert sorted(cancelled) == sorted(set(ids) - set(held))
    assert len(core.queue) == 0
    run = _run(core, key)
    assert (run["queued"], run["cancelled"]) == (0, 3)
    core.dispatch(0.0)
    assert not [m for i, m in core.outbox if type(m) is P.Tasks and m.ids]
    # the slot kills them and answers CANCELLED: the run is empty
    core.message(slot, P.Results(2, 1, 0, 0, held, [payload.CANCELLED] * 2), None, 0.1)
    run = _run(core, key)
    assert (run["queued"], run["running"], run["prefetched"]) == (0, 0, 0)


def test_an_abandoned_run_is_cancelled_after_the_hold_time_and_its_running_tasks_killed():
    core = BrokerCore(0.0)
    core.hold_seconds = 20.0
    slot = registered(core, window=10)
    key = client(core)
    ids = [(key << P.ID_SHIFT) + i for i in range(1, 6)]
    core.message(b"c", P.Submit(1, 0, ids, [b"t"] * 5), None, 0.0)
    core.dispatch(0.0)
    held = list(next(iter(core.workers.values())).slots[slot].inflight)
    core.outbox.clear()
    now = 0.0
    while now < 19.0:  # the client is silent; its slot works on (and keeps its lease)
        now += 1.0
        core.message(b"w", P.Heartbeat([slot]), None, now)
        core.tick(now)
    assert _run(core, key)["state"] == "away"
    assert not [m for i, m in core.outbox if i == slot and type(m) is P.Tasks]
    core.message(b"w", P.Heartbeat([slot]), None, 21.0)
    core.tick(21.0)  # past the hold time: forgotten
    (kill,) = [m for i, m in core.outbox if i == slot and type(m) is P.Tasks]
    assert sorted(kill.kill) == held and not kill.revoke
    assert core.status(21.0)["runs"] == [] and core.running == 0
    core.dispatch(21.0)  # its queued tasks never go out
    assert not [m for i, m in core.outbox if type(m) is P.Tasks and m.ids]
    assert len(core.queue) == 0


# -- per key (CurveZMQ identity): the client limits count all its records together ------

ALICE, BOB = "client:alice", "client:bob"


def keyed_client(core: BrokerCore, ident: bytes, user: str | None, now: float = 0.0,
                 key: int = 0) -> int:
    """Register a client whose connection proved ``user``; its key, or 0 if refused."""
    info = {"name": "t"} | ({"key": key} if key else {})
    core.message(ident, P.hello(P.ROLE_CLIENT, info), user, now)
    welcome = [m for i, m in core.outbox if i == ident and type(m) is P.Welcome]
    core.outbox.clear()
    return welcome[-1].key if welcome else 0


def keyed_submit(core: BrokerCore, ident: bytes, user: str | None, seq: int, n: int,
                 size: int = 1, hinted: bool = False, now: float = 0.0) -> bool:
    """SUBMIT frame ``seq`` of ``n`` tasks of ``size`` bytes: True if it was accepted."""
    record = core.peers[ident]
    assert type(record).__name__ == "Client"
    ids = [(record.key << P.ID_SHIFT) + seq * 1000 + i for i in range(n)]
    hints = [f"s3://b/{t}" for t in ids] if hinted else []
    core.message(ident, P.Submit(seq, 0, ids, [bytes(size)] * n, hints), user, now)
    return record.rx.last == seq


def limit_errors(core: BrokerCore, ident: bytes) -> list[str]:
    errors = [m.message for i, m in core.outbox
              if i == ident and type(m) is P.Error and m.code == "limit"]
    core.outbox.clear()
    return errors


@pytest.mark.parametrize("user2", [ALICE, None])
def test_with_keys_the_client_limits_count_every_record_of_the_key(user2):
    """Two connections of one key share its bytes, tasks and hinted-tasks limits (a third
    of another key has its own); without keys each record has its own."""
    user1 = ALICE if user2 else None
    for limit, first, second in [("bytes", dict(n=2, size=300), dict(n=1, size=500)),
                                 ("tasks", dict(n=6), dict(n=5)),
                                 ("hinted", dict(n=2, hinted=True), dict(n=2, hinted=True))]:
        core = BrokerCore(0.0)
        core.max_client_bytes, core.max_client_tasks, core.max_client_hinted = 1000, 10, 3
        keyed_client(core, b"a1", user1)
        keyed_client(core, b"a2", user2)
        keyed_client(core, b"b", BOB)
        assert keyed_submit(core, b"a1", user1, 1, **first)
        taken = keyed_submit(core, b"a2", user2, 1, **second)
        if user2 is None:  # (no identity: per record, as before)
            assert taken, limit
            continue
        assert not taken, limit  # not acknowledged: the Executor sends it again later
        (why,) = limit_errors(core, b"a2")
        assert ALICE in why
        assert keyed_submit(core, b"b", BOB, 1, **second), limit  # another key: its own
        usage = core.usage[ALICE]
        assert usage is core.peers[b"a1"].usage is core.peers[b"a2"].usage
        assert usage.live_tasks == first["n"]
        # the first connection's tasks cancelled: room again for the second's frame
        a1 = core.peers[b"a1"]
        core.message(b"a1", P.Cancel(2, 0, sorted(core.live & {
            t for t in core.live if t >> P.ID_SHIFT == a1.key})), user1, 1.0)
        assert usage.live_tasks == usage.task_bytes == usage.hinted == 0
        assert keyed_submit(core, b"a2", user2, 1, now=3.0, **second), limit


def test_with_keys_stored_functions_count_every_record_of_the_key():
    core = BrokerCore(0.0)
    blobs = [i.to_bytes(4, "big") * 8 for i in range(400)]
    pairs = [x for b in blobs for x in (payload.function_digest(b), b)]
    for ident, user in ((b"a1", ALICE), (b"a2", ALICE), (b"b", BOB)):
        keyed_client(core, ident, user)

    def store(ident: bytes, user: str, seq: int, lo: int, hi: int) -> bool:
        core.message(ident, P.Submit(seq, 0, [], [], functions=pairs[2 * lo:2 * hi]), user,
                     float(seq))
        return core.peers[ident].rx.last == seq

    assert store(b"a1", ALICE, 1, 0, 200)
    assert not store(b"a2", ALICE, 1, 200, 300)  # 300 > MAX_CLIENT_FUNCTIONS for alice
    assert limit_errors(core, b"a2")
    assert store(b"b", BOB, 1, 200, 300)  # bob's own 256
    assert core.usage[ALICE].functions == 200
    core.message(b"a1", P.Bye("done"), ALICE, 2.0)  # forgotten: its functions with it
    assert core.usage[ALICE].functions == core.usage[ALICE].function_bytes == 0
    assert store(b"a2", ALICE, 1, 200, 300)
    assert core.usage[ALICE].functions == 100


def test_per_key_usage_returns_to_zero_as_tasks_finish_are_cancelled_and_clients_leave():
    """No leak: results acknowledged, tasks cancelled (DROP, IF_QUEUED with its CANCELLED
    result acknowledged), a client leaving with live tasks: the key's usage goes back to
    0, and the key's entry goes once its last record is forgotten."""
    core = BrokerCore(0.0)
    slot = registered(core, window=100)
    keys = {i: keyed_client(core, i, ALICE) for i in (b"a1", b"a2", b"a3")}
    for ident in keys:
        assert keyed_submit(core, ident, ALICE, 1, 4, size=100, hinted=True)
    usage = core.usage[ALICE]
    assert (usage.live_tasks, usage.task_bytes, usage.hinted) == (12, 12 * 100 + sum(
        len(f"s3://b/{t}") for t in core.live), 12)
    # a1's tasks run, their results are acknowledged
    core.dispatch(0.0)
    tasks = [m for i, m in core.outbox if i == slot and type(m) is P.Tasks]
    mine = [t for m in tasks for t in m.ids if t >> P.ID_SHIFT == keys[b"a1"]]
    assert len(mine) == 4
    core.outbox.clear()
    core.message(slot, P.Results(core.peers[slot].rx.last + 1, 0, 100, 0, mine,
                                 [b"r"] * 4), None, 0.1)
    (deliver,) = [m for i, m in core.outbox if i == b"a1" and type(m) is P.Deliver]
    assert usage.live_tasks == 12  # (live until acknowledged)
    core.message(b"a1", P.Ack(deliver.seq, deliver.token), ALICE, 0.2)
    assert usage.live_tasks == 8
    # a2 cancels two (DROP) and two (IF_QUEUED: CANCELLED results, live until acknowledged)
    a2 = sorted(t for t in core.live if t >> P.ID_SHIFT == keys[b"a2"])
    core.outbox.clear()
    core.message(b"a2", P.Cancel(2, 0, a2[:2], b"", P.CANCEL_DROP), ALICE, 0.3)
    assert usage.live_tasks == 6
    core.message(b"a2", P.Cancel(3, 0, a2[2:], b"", P.CANCEL_IF_QUEUED), ALICE, 0.3)
    delivers = [m for i, m in core.outbox if i == b"a2" and type(m) is P.Deliver]
    if delivers:  # (some were dispatched: STARTED instead, they finish as results)
        last = max(delivers, key=lambda m: m.seq)
        core.message(b"a2", P.Ack(last.seq, last.token), ALICE, 0.4)
    held = core._dispatched()
    running = [t for t in a2[2:] if t in held]
    if running:
        core.message(slot, P.Results(core.peers[slot].rx.last + 1, 0, 100, 0, running,
                                     [b"r"] * len(running)), None, 0.5)
        last = max((m for i, m in core.outbox if i == b"a2" and type(m) is P.Deliver),
                   key=lambda m: m.seq)
        core.message(b"a2", P.Ack(last.seq, last.token), ALICE, 0.6)
    assert usage.live_tasks == 4  # a3's
    core.message(b"a3", P.Bye("gone"), ALICE, 1.0)  # leaves with its 4 live tasks
    assert (usage.live_tasks, usage.task_bytes, usage.hinted) == (0, 0, 0)
    assert ALICE in core.usage
    core.message(b"a1", P.Bye("done"), ALICE, 1.0)
    core.message(b"a2", P.Bye("done"), ALICE, 1.0)
    assert ALICE not in core.usage


def test_a_key_has_at_most_max_clients_per_key_records():
    """Past the cap, a HELLO forgets the key's longest silent record holding nothing (away
    ones first), else is refused with ERROR limit; a record claimed back is not a new
    one; another key, and clients without keys, are not affected."""
    core = BrokerCore(0.0)
    core.max_clients_per_key = 3
    for n, ident in enumerate((b"a1", b"a2", b"a3")):
        assert keyed_client(core, ident, ALICE, float(n))
        assert keyed_submit(core, ident, ALICE, 1, 1, now=float(n))
    core.outbox.clear()
    core.message(b"a4", P.hello(P.ROLE_CLIENT, {"name": "t"}), ALICE, 5.0)
    (err,) = [m for i, m in core.outbox if i == b"a4"]
    assert type(err) is P.Error and err.code == "limit" and ALICE in err.message
    assert len(core.usage[ALICE].clients) == 3 and b"a4" not in core.peers
    core.outbox.clear()
    assert keyed_client(core, b"b", BOB, 5.0)  # another key: its own records
    key1 = core.peers[b"a1"].key
    assert keyed_client(core, b"a1", ALICE, 5.0, key=key1) == key1  # claimed back
    assert keyed_client(core, b"a1x", ALICE, 5.0, key=key1) == 0  # (a new record: no room)
    core.outbox.clear()
    # a2 holds nothing any more (its task cancelled): a4 takes its place
    a2 = core.peers[b"a2"]
    core.message(b"a2", P.Cancel(2, 0, [t for t in core.live if t >> P.ID_SHIFT == a2.key]),
                 ALICE, 6.0)
    assert keyed_client(core, b"a4", ALICE, 7.0)
    assert a2.key not in core.clients and b"a2" not in core.peers
    assert len(core.usage[ALICE].clients) == 3
    # of two records holding nothing, the one away goes first, even if heard last
    core = BrokerCore(0.0)
    core.max_clients_per_key = 2
    keyed_client(core, b"old", ALICE, 0.0)
    keyed_client(core, b"away", ALICE, 1.0)
    core.send_failed(b"away", 1.0)  # (its connection is gone: quiet)
    assert keyed_client(core, b"new", ALICE, 2.0)
    assert b"old" in core.peers and b"away" not in core.peers
    # without keys: no identity, no cap
    core = BrokerCore(0.0)
    core.max_clients_per_key = 2
    assert all(keyed_client(core, bytes([i]), None) for i in range(10))
    assert not core.usage
