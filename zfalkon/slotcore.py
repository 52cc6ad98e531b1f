"""A slot's side of its session with the broker, without sockets or clocks.

:class:`SlotSession` holds the tasks a slot was sent, the results it has not yet returned
or had acknowledged, its window, and its two streams (:mod:`zfalkon.stream`): TASKS in,
RESULTS out. The real slot (:mod:`zfalkon.slot`) and the swarm's simulated slots
(:mod:`zfalkon.swarm`) both drive it, so both run the same algorithm:

* the window: how many tasks the slot asks to hold (running, queued, or returned but not
  yet received by the broker), by Little's law from the measured task length and round
  trip (:func:`window_for`); every RESULTS frame carries it;
* results are returned in batches (RESULT_FLUSH_COUNT, FRAME_SOFT_BYTES, or the oldest
  waiting RESULT_FLUSH_SECONDS) and kept until the broker acknowledges them;
* PING every PING_SECONDS measures the round trip and finds frames that died with a
  replaced connection: the PONG says what the broker has and has sent;
* tasks the broker revokes (lease lapsed, or stolen for an idle slot) are dropped if not
  started;
* tasks their client cancels by force (TASKS ``kill``) are dropped with a CANCELLED result
  if still queued here; the others are left in :attr:`kills` for the owner to kill (if it
  runs them) and clear.

The owner calls :meth:`receive` for each message, :meth:`next_task` / :meth:`finished`
around each task, :meth:`poll` when idle or between tasks, and sends :attr:`out`.
"""

from __future__ import annotations

import collections
import math

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon.constants import (
    FRAME_SOFT_BYTES,
    MAX_WINDOW,
    MIN_WINDOW,
    PING_SECONDS,
    PREFETCH_SECONDS,
    RESULT_FLUSH_COUNT,
    RESULT_FLUSH_SECONDS,
)
from zfalkon.stream import ACCEPT, GAP, Inbound, Outbound, Pings

__all__ = ["SlotSession", "window_for", "FIRST_WINDOW"]

_EWMA = 0.2  # weight of the newest sample in the running estimates
FIRST_WINDOW = 2  #: the window before any task has been timed: start shallow


def window_for(task_seconds: float, rtt: float) -> int:
    """Tasks a slot should hold (running, queued, or returned and in flight), by Little's law.

    While results travel to the broker and new tasks travel back (``rtt``, plus up to
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


class SlotSession:
    """One slot's session state; see the module docstring."""

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self.rx = Inbound()  # TASKS
        self.tx: Outbound[tuple[int, int, list[int], list[bytes]]] = Outbound()  # RESULTS
        self.out: list[P.Message] = []  #: messages to send, in order
        self.result_ids: list[int] = []
        self.result_blobs: list[bytes] = []
        self.result_bytes = 0
        self.failed = 0
        self.first_result_at = 0.0
        self.mean = -1.0  #: running estimate of one task's seconds (-1: none yet)
        self.rtt = 0.0  #: smoothed round trip to the broker (0 until the first PONG)
        self.next_ping = 0.0
        self._pings = Pings()
        self.welcomed = False
        self.fixed_window = 0  #: a window to use instead of the adaptive one (0: adaptive)
        #: Tasks to kill that were not queued here (started, or done): the owner's to kill
        #: if it still runs or holds them, and to clear.
        self.kills: list[int] = []
        #: The functions of tasks by digest the broker sent this session (TASKS
        #: ``functions``): scoped digest (client key and digest,
        #: :func:`zfalkon.payload.scoped_digest`) -> pickle, kept until it says ``forget``.
        self.functions: dict[bytes, bytes] = {}

    # -- the broker's messages ---------------------------------------------------------

    def start(self, now: float) -> None:
        """WELCOME: a new session. Whatever the old one held is the broker's again."""
        self.queue.clear()
        self.rx.reset()
        self.tx.reset()
        self.result_ids, self.result_blobs = [], []
        self.result_bytes = self.failed = 0
        self.kills = []
        self.functions = {}
        self.welcomed = True
        self._send_results(now)  # announce the first window
        self.ping(now)

    def receive(self, msg: P.Message, now: float) -> bool:
        """Handle a stream message (TASKS, ACK, RESEND, PONG); False for any other."""
        kind = type(msg)
        if kind is P.Tasks:
            assert isinstance(msg, P.Tasks)
            self.tx.ack(msg.ack)
            verdict = self.rx.accept(msg.seq)
            if verdict == ACCEPT:
                if msg.forget or msg.functions:
                    functions = self.functions
                    for digest in msg.forget:
                        functions.pop(digest, None)
                    pairs = msg.functions
                    functions.update(zip(pairs[::2], pairs[1::2]))
                if msg.revoke:
                    revoked = set(msg.revoke)
                    self.queue = collections.deque(t for t in self.queue if t[0] not in revoked)
                self.queue.extend(zip(msg.ids, msg.blobs))
                if msg.kill:
                    self._kill(msg.kill, now)
            elif verdict == GAP and self.rx.should_ask():
                self.out.append(P.Resend(self.rx.last))
        elif kind is P.Ack:
            assert isinstance(msg, P.Ack)
            self.tx.ack(msg.ack)
        elif kind is P.Resend:
            assert isinstance(msg, P.Resend)
            self._resend_after(msg.ack)
        elif kind is P.Pong:
            assert isinstance(msg, P.Pong)
            self.tx.ack(msg.ack)
            if self._pings.lost_ours(msg.sent, msg.ack):
                self._resend_after(msg.ack)
            if self.rx.last < msg.seq:  # sent before the PONG, yet not here: lost
                self.out.append(P.Resend(self.rx.last))
            sample = now - msg.sent
            self.rtt = sample if self.rtt == 0 else self.rtt + _EWMA * (sample - self.rtt)
        else:
            return False
        return True

    def _kill(self, ids: list[int], now: float) -> None:
        """Cancelled by force: a CANCELLED result for each task still queued here; the
        others go to :attr:`kills`."""
        wanted = set(ids)
        queued = [t for t, _ in self.queue if t in wanted]
        if queued:
            gone = set(queued)
            self.queue = collections.deque(t for t in self.queue if t[0] not in gone)
            if not self.result_ids:
                self.first_result_at = now
            self.result_ids += queued
            self.result_blobs += [payload.CANCELLED] * len(queued)
            self.result_bytes += len(payload.CANCELLED) * len(queued)
            self.flush(now)
            wanted -= gone
        self.kills.extend(t for t in ids if t in wanted)

    def _resend_after(self, ack: int) -> None:
        self.tx.ack(ack)
        for seq, (window, failed, ids, blobs) in self.tx.unacked:
            self.out.append(P.Results(seq, self.rx.last, window, failed, ids, blobs))

    # -- running tasks -----------------------------------------------------------------

    def next_task(self, now: float) -> tuple[int, bytes] | None:
        """The next task to run, or None. Returns results first if the next task would
        hold them back past RESULT_FLUSH_SECONDS."""
        if not self.queue:
            return None
        if self.result_ids and (now - self.first_result_at + self.mean >= RESULT_FLUSH_SECONDS):
            self.flush(now)
        return self.queue.popleft()

    def finished(self, tid: int, result: bytes, failed: bool, seconds: float,
                 now: float) -> None:
        """A task finished after ``seconds``; its result is returned with the next batch."""
        self.finished_many([tid], [result], [failed], seconds, now)

    def finished_many(self, ids: list[int], results: list[bytes], failed: list[bool],
                      seconds: float, now: float) -> None:
        """Tasks finished, one after the other, in ``seconds`` together; their results are
        returned with the next batches (of at most RESULT_FLUSH_COUNT each)."""
        n = len(ids)
        if not n:
            return
        each = seconds / n  # (n samples of the mean: the newest weighs 1 - (1 - _EWMA)**n)
        self.mean = each if self.mean < 0 else \
            self.mean + (1 - (1 - _EWMA) ** min(n, 64)) * (each - self.mean)
        start = 0
        while start < n:
            if not self.result_ids:
                self.first_result_at = now
            stop = min(n, start + RESULT_FLUSH_COUNT - len(self.result_ids))
            part = results[start:stop]
            self.result_ids += ids[start:stop]
            self.result_blobs += part
            self.result_bytes += sum(map(len, part))
            self.failed += sum(failed[start:stop])
            start = stop
            if (len(self.result_ids) >= RESULT_FLUSH_COUNT
                    or self.result_bytes >= FRAME_SOFT_BYTES
                    or now - self.first_result_at >= RESULT_FLUSH_SECONDS):
                self.flush(now)

    def flush(self, now: float) -> None:
        """Return the results waiting (if any), with the window."""
        if self.result_ids:
            self._send_results(now)

    def poll(self, now: float) -> None:
        """Between tasks or idle: return waiting results if the queue is empty; PING when
        due."""
        if self.result_ids and not self.queue:
            self._send_results(now)
        if self.welcomed and now >= self.next_ping:
            self.ping(now)

    def window(self) -> int:
        """The window to announce: fixed, or (before any task was timed) FIRST_WINDOW, or
        :func:`window_for` the measured task length and round trip."""
        if self.fixed_window:
            return self.fixed_window
        return FIRST_WINDOW if self.mean < 0 else window_for(self.mean, self.rtt)

    def _send_results(self, now: float) -> None:
        window = self.window()
        frame = (window, self.failed, self.result_ids, self.result_blobs)
        seq = self.tx.push(frame)
        self.out.append(P.Results(seq, self.rx.last, *frame))
        self.result_ids, self.result_blobs = [], []
        self.result_bytes = self.failed = 0
        if now >= self.next_ping:
            self.ping(now)

    def ping(self, now: float) -> None:
        """PING now (its PONG acknowledges every RESULTS frame the broker has)."""
        self._pings.sent(now, self.tx.seq)
        self.out.append(P.Ping(now, self.rx.last))
        self.next_ping = now + PING_SECONDS
