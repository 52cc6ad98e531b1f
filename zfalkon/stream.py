"""Reliable, ordered streams of frames over connections that may be replaced.

TCP (and ZeroMQ above it) delivers in order on one connection, but a connection that dies
takes the frames still in its buffers with it, and a DEALER reconnects silently. So each
peer's session with the broker carries, per direction, a *stream*: numbered frames that
the sender keeps until the receiver acknowledges them, and that the receiver accepts in
order, once (go-back-N):

* the sender numbers each frame ``seq = 1, 2, ...`` (:meth:`Outbound.push`) and keeps it;
  every frame the other way carries ``ack``, the last frame received, and the sender
  forgets what is acknowledged (:meth:`Outbound.ack`);
* the receiver accepts a frame only if its ``seq`` is the next one (:meth:`Inbound.accept`).
  An older ``seq`` is a duplicate (dropped, acknowledged again); a newer one means frames
  were lost: it is dropped and the receiver asks once, with RESEND, for everything after
  the last frame it has;
* tail loss (the last frames died with a connection, nothing follows them) is found by
  PING/PONG: a frame sent before a PING arrives before it on the same connection, so a PONG
  that acknowledges less than was sent before its PING (or announces more than arrived
  before the PONG) proves a replaced connection, and the missing frames are sent again.

Nothing here does I/O or reads a clock: the broker core, the slot and the client own one
:class:`Outbound` and one :class:`Inbound` per session and move frames themselves.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

__all__ = ["Outbound", "Inbound", "Pings", "ACCEPT", "DUPLICATE", "GAP"]

T = TypeVar("T")

ACCEPT = 0  #: the next frame: process it
DUPLICATE = 1  #: seen before: drop it (acknowledge again)
GAP = 2  #: frames before it are missing: drop it, ask for a resend


class Outbound(Generic[T]):
    """The sending half: numbers frames and keeps each until it is acknowledged."""

    __slots__ = ("seq", "unacked")

    def __init__(self) -> None:
        self.seq = 0  #: the last number handed out
        self.unacked: collections.deque[tuple[int, T]] = collections.deque()

    def push(self, frame: T) -> int:
        """Keep ``frame``; return its number."""
        self.seq += 1
        self.unacked.append((self.seq, frame))
        return self.seq

    def ack(self, n: int) -> None:
        """The receiver has every frame up to ``n``: forget them."""
        unacked = self.unacked
        while unacked and unacked[0][0] <= n:
            unacked.popleft()

    def acked(self) -> int:
        """The last frame known to have arrived."""
        return self.unacked[0][0] - 1 if self.unacked else self.seq

    def reset(self) -> None:
        """A new session: start again from 1 with nothing kept."""
        self.seq = 0
        self.unacked.clear()

    def __len__(self) -> int:
        return len(self.unacked)


class Inbound:
    """The receiving half: accepts frames in order, each once."""

    __slots__ = ("last", "_asked")

    def __init__(self) -> None:
        self.last = 0  #: the last frame accepted (what ``ack`` fields carry)
        self._asked = -1  # ``last`` when a resend was last asked for

    def accept(self, seq: int) -> int:
        """ACCEPT, DUPLICATE or GAP for a frame numbered ``seq``."""
        if seq == self.last + 1:
            self.last = seq
            return ACCEPT
        return DUPLICATE if seq <= self.last else GAP

    def should_ask(self) -> bool:
        """After a GAP: True once per ``last`` (ask for a resend only once until it moves)."""
        if self._asked == self.last:
            return False
        self._asked = self.last
        return True

    def reset(self) -> None:
        self.last = 0
        self._asked = -1


class Pings:
    """A peer's outstanding PINGs, to find frames that died with a replaced connection.

    Frames sent before a PING arrive before it on one connection. So a PONG whose ``ack``
    is below the stream position the PING was sent at proves those frames lost (send
    them again); likewise frames the other side sent before its PONG and that have not
    arrived (ask with RESEND).
    """

    __slots__ = ("_sent",)

    def __init__(self) -> None:
        self._sent: collections.deque[tuple[float, int]] = collections.deque(maxlen=8)

    def sent(self, when: float, seq: int) -> None:
        """A PING stamped ``when`` left after our frame ``seq``."""
        self._sent.append((when, seq))

    def lost_ours(self, pong_sent: float, pong_ack: int) -> bool:
        """The PONG to the PING stamped ``pong_sent`` acknowledges ``pong_ack``: True if
        frames we sent before that PING are missing on the other side."""
        sent = self._sent
        while sent and sent[0][0] < pong_sent:
            sent.popleft()  # their PONGs were lost with a connection
        return bool(sent) and sent[0][0] == pong_sent and pong_ack < sent.popleft()[1]
