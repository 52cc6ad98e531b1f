"""A client's side of its session with the broker, without sockets, threads or clocks.

:class:`ClientSession` numbers and keeps the client's SUBMIT and CANCEL frames until the
broker acknowledges them, accepts DELIVER frames in order and once, acknowledges them
(each ``ack`` with that frame's token), sends again what the broker lacks (after RESEND,
or a PONG proving a replaced connection), asks for what it lacks, and registers again
(with its key) when the broker no longer knows it, submitting every pending task again
after WELCOME. The rules are the
ones in ``docs/protocol.md`` ("Sessions and streams").

The :class:`~zfalkon.client.Executor` drives one under its lock and sends
:attr:`ClientSession.out`; ``tests/test_core.py`` drives the same class through a
simulated network. The session reads the owner's dict of pending tasks' blobs (a task is
pending while its id is in it) and never changes it.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterator, Mapping

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon.constants import FRAME_SOFT_BYTES, MAX_BATCH, PING_SECONDS
from zfalkon.stream import ACCEPT, GAP, Inbound, Outbound, Pings

__all__ = ["ClientSession", "SUBMIT", "CANCEL", "CANCEL_EXACT", "CANCEL_FORCE", "ACK_EVERY",
           "JOURNAL_UNAVAILABLE"]

log = logging.getLogger("zfalkon.client")

SUBMIT = 0  #: a kept frame of tasks
CANCEL = 1  #: a kept frame of cancellations (P.CANCEL_DROP)
CANCEL_EXACT = 2  #: a kept frame of cancellations of queued tasks only (P.CANCEL_IF_QUEUED)
CANCEL_FORCE = 3  #: a kept frame of forced cancellations (P.CANCEL_KILL)
_MODES = {CANCEL: P.CANCEL_DROP, CANCEL_EXACT: P.CANCEL_IF_QUEUED, CANCEL_FORCE: P.CANCEL_KILL}
_KINDS = {mode: kind for kind, mode in _MODES.items()}
ACK_EVERY = 8  #: DELIVER frames received before an ACK goes out alone
#: Result bytes received before an ACK goes out at once (the broker sends a client at
#: most core.SEND_WINDOW_BYTES ahead of its acknowledgements).
ACK_BYTES = 1024 * 1024
JOURNAL_UNAVAILABLE = P.JOURNAL_UNAVAILABLE  #: ERROR code: SUBMIT refused for now
#: ERROR code: SUBMIT refused for now, the client has as many tasks live as the broker
#: takes from one client (the frame is sent again later, as for JOURNAL_UNAVAILABLE)
LIMIT = "limit"
_REHELLO_SECONDS = 2 * PING_SECONDS  # a HELLO unanswered this long is sent again


class ClientSession:
    """One client's session state; see the module docstring."""

    def __init__(self, key: int, name: str, blobs: Mapping[int, bytes],
                 hints: Mapping[int, str], functions: Mapping[bytes, bytes] = {},
                 run: str = "") -> None:
        self.key = key
        self.name = name
        self.run = run  # the run's label (HELLO ``run``): zfalkon runs shows it
        self.blobs = blobs  # pending tasks' blobs (the owner's)
        self.hints = hints  # data hints of pending tasks that have one (the owner's)
        #: The pickles of the functions its tasks by digest call (the owner's), and the
        #: frame of this session that carries each (the first whose tasks call it).
        self.functions = functions
        self.carried_by: dict[bytes, int] = {}
        self.tx: Outbound[tuple[int, list[int]]] = Outbound()  # SUBMIT/CANCEL: (kind, ids)
        self.rx = Inbound()  # DELIVER
        #: The token of DELIVER ``rx.last``, sent with every ``ack`` of it (the broker
        #: counts an acknowledgement only with the acknowledged frame's token)
        self.token = b""
        self.told = 0  # the last DELIVER seq the broker was told we have
        self._unacked_bytes = 0  # result bytes received since the last ACK
        self.out: list[P.Message] = []  #: messages to send, in order
        self.rejoining = False  #: HELLO sent again, WELCOME not yet here: send nothing else
        self.broken = ""  #: why the session cannot go on ("": it can)
        #: The broker refused our SUBMITs (ERROR journal-unavailable or limit) and has
        #: accepted none since: after a PONG proving frames missing, only the first is
        #: sent again.
        self.refused = False
        self.next_ping = 0.0
        self._hello_at = 0.0
        self._pings = Pings()

    # -- frames out --------------------------------------------------------------------

    def submit(self, ids: list[int], blobs: list[bytes]) -> list[P.Submit]:
        """The next SUBMIT frames (kept until acknowledged): the tasks', after one
        carrying the functions its tasks by digest call that this session has not sent
        yet (their own frame: up to 64 MiB of pickles beside up to a whole frame of
        tasks would not fit MAX_FRAME_BYTES)."""
        frames = []
        if self.functions:
            functions: list[bytes] = []
            carried_by, digest_of = self.carried_by, payload.stored_digest
            for blob in blobs:
                digest = digest_of(blob)
                if digest is not None and digest not in carried_by:
                    function = self.functions.get(digest)
                    if function is not None:
                        carried_by[digest] = self.tx.seq + 1
                        functions += (digest, function)
            if functions:
                frames.append(P.Submit(self.tx.push((SUBMIT, [])), self.rx.last, [], [], [],
                                       self.token, functions))
        seq = self.tx.push((SUBMIT, ids))
        self.told, self._unacked_bytes = self.rx.last, 0
        hints = self.hints
        frames.append(P.Submit(seq, self.rx.last, ids, blobs,
                               [hints.get(t, "") for t in ids] if hints else [], self.token))
        return frames

    def _carried(self, seq: int) -> list[bytes]:
        """The ``functions`` of SUBMIT ``seq`` (sent again as they were first sent)."""
        functions: list[bytes] = []
        for digest, carrier in self.carried_by.items():
            if carrier == seq:
                functions += (digest, self.functions[digest])
        return functions

    def unsubmit(self, frames: int = 1) -> None:
        """The last ``frames`` made were not sent after all (they go out later,
        renumbered)."""
        for _ in range(frames):
            self.tx.unacked.pop()
            seq = self.tx.seq
            self.tx.seq -= 1
            for digest in [d for d, carrier in self.carried_by.items() if carrier == seq]:
                del self.carried_by[digest]

    def cancel(self, ids: list[int], mode: int = P.CANCEL_DROP) -> P.Cancel:
        """The next CANCEL frame (kept until acknowledged)."""
        seq = self.tx.push((_KINDS.get(mode, CANCEL_EXACT), ids))
        self.told, self._unacked_bytes = self.rx.last, 0
        return P.Cancel(seq, self.rx.last, ids, self.token, mode)

    def chunks(self, ids: list[int], blobs: list[bytes]) -> Iterator[P.Submit]:
        """SUBMIT frames for these tasks, each within MAX_BATCH and FRAME_SOFT_BYTES."""
        start, size = 0, 0
        for i, blob in enumerate(blobs):
            size += len(blob)
            if i + 1 - start >= MAX_BATCH or size >= FRAME_SOFT_BYTES:
                yield from self.submit(ids[start:i + 1], blobs[start:i + 1])
                start, size = i + 1, 0
        if start < len(ids):
            yield from self.submit(ids[start:], blobs[start:])

    def hello(self, now: float) -> None:
        """Register (again): both streams start over; nothing else goes out until WELCOME."""
        self.rejoining = True
        self._hello_at = now
        self.rx.reset()
        self.tx.reset()
        self.carried_by.clear()  # (the broker may have forgotten them: carried again)
        self.token = b""
        self.told = 0
        info: dict = {"name": self.name}
        if self.run:
            info["run"] = self.run
        if self.key:
            info["key"] = self.key
        self.out.append(P.hello(P.ROLE_CLIENT, info))

    # -- the broker's messages ---------------------------------------------------------

    def receive(self, msg: P.Message, now: float) -> P.Deliver | None:
        """Handle one message; return it if it is a DELIVER to act on (its results are for
        the owner to match against its pending tasks: each arrives once per session)."""
        if isinstance(msg, P.Deliver):
            if self.rejoining:  # a frame of the session before our HELLO: the new stream
                return None  # starts over (the broker sends what it kept again)
            self._ack(msg.ack)
            verdict = self.rx.accept(msg.seq)
            if verdict == ACCEPT:
                self.token = msg.token
                self._unacked_bytes += sum(map(len, msg.blobs))
                if self._unacked_bytes >= ACK_BYTES:
                    self.ack()
                return msg
            if verdict == GAP and self.rx.should_ask():
                self.out.append(P.Resend(self.rx.last, self.token))
        elif isinstance(msg, P.Ack):
            self._ack(msg.ack)
        elif isinstance(msg, P.Pong):
            self._on_pong(msg)
        elif isinstance(msg, P.Resend):
            self._resend_after(msg.ack)
        elif isinstance(msg, P.Error) and msg.code == "hello-required":
            if not self.rejoining:  # (an idle client is forgotten: nothing lost, no warning)
                (log.warning if self.blobs else log.info)(
                    "the broker does not know this client; registering again")
                self.hello(now)
        elif isinstance(msg, P.Error) and msg.code in (JOURNAL_UNAVAILABLE, LIMIT):
            if not self.refused:
                log.warning("the broker refuses new tasks for now (%s); they stay pending "
                            "here and are sent again until it takes them", msg.message)
            self.refused = True
        elif isinstance(msg, P.Welcome) and self.rejoining:
            self.rejoining = False
            if self.key and msg.key != self.key:
                self.broken = ("the broker gave this client another key: its pending tasks "
                               "cannot be submitted again")
                return None
            self.key = msg.key
            pending = dict(self.blobs)
            if pending:
                log.warning("registered again; submitting %d pending tasks again", len(pending))
                self.out.extend(self.chunks(list(pending), list(pending.values())))
        return None

    def _ack(self, n: int) -> None:
        """The broker has our frames up to ``n``."""
        if self.refused and n > self.tx.acked():  # it took a frame: it takes tasks again
            self.refused = False
            log.info("the broker takes new tasks again")
        self.tx.ack(n)

    def _resend_after(self, ack: int, limit: int | None = None) -> None:
        """The broker lacks our frames after ``ack``: send them again (the first ``limit``
        of them), as numbered (tasks delivered meanwhile are left out of their SUBMIT)."""
        self._ack(ack)
        blobs, hints = self.blobs, self.hints
        for seq, (kind, ids) in itertools.islice(self.tx.unacked, limit):
            if kind == SUBMIT:
                ids = [t for t in ids if t in blobs]
                self.out.append(P.Submit(seq, self.rx.last, ids, [blobs[t] for t in ids],
                                         [hints.get(t, "") for t in ids] if hints else [],
                                         self.token, self._carried(seq)))
            else:
                self.out.append(P.Cancel(seq, self.rx.last, ids, self.token, _MODES[kind]))
        self.told, self._unacked_bytes = self.rx.last, 0

    def _on_pong(self, msg: P.Pong) -> None:
        """Frames sent before the PING (or the PONG) that have not arrived died with a
        replaced connection: send ours again, ask for theirs."""
        self._ack(msg.ack)
        if self._pings.lost_ours(msg.sent, msg.ack):
            if self.refused:  # (not lost: refused) one frame to see whether it is taken now
                self._resend_after(msg.ack, 1)
            else:
                log.warning("a connection to the broker was replaced; sending %d frames "
                            "again", len(self.tx))
                self._resend_after(msg.ack)
        if self.rx.last < msg.seq:
            self.out.append(P.Resend(self.rx.last, self.token))

    # -- time --------------------------------------------------------------------------

    def tick(self, now: float, waiting: bool) -> None:
        """Between messages: HELLO again if unanswered; PING while ``waiting`` for results
        (or while frames are unacknowledged); acknowledge deliveries far behind."""
        if self.rejoining:
            if now - self._hello_at > _REHELLO_SECONDS:
                self.hello(now)
        elif now >= self.next_ping and (waiting or self.tx.unacked):
            self._pings.sent(now, self.tx.seq)
            self.out.append(P.Ping(now, self.rx.last, self.token))
            self.told, self._unacked_bytes = self.rx.last, 0
            self.next_ping = now + PING_SECONDS
        elif self.rx.last - self.told >= ACK_EVERY:
            self.ack()

    def ack(self) -> None:
        """Acknowledge every delivery received (if not already)."""
        self._unacked_bytes = 0
        if self.rx.last != self.told:
            self.told = self.rx.last
            self.out.append(P.Ack(self.rx.last, self.token))
