"""The broker's queue of tasks waiting for a slot, and where each one should go.

Tasks are kept as the clients' blobs, in the chunks they arrived in (``[ids, blobs,
position]``): no Python object per queued task beyond its id and blob. Two placement
strategies, chosen when the broker starts (``--dispatch``):

* :class:`FifoQueue`: first submitted, first dispatched;
* :class:`DataAwareQueue`: tasks with a data hint (the S3 key of their first input) wait
  by key; a slot gets the tasks whose data its machine caches first, then the FIFO, then
  (rather than idle) anyone's.

``take`` never looks at cancellations: the broker core filters what it takes.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator

from zfalkon.constants import FRAME_SOFT_BYTES, MAX_BATCH
from zfalkon.protocol import ID_SHIFT

__all__ = ["FifoQueue", "DataAwareQueue", "make_queue", "DISPATCH_POLICIES"]

DISPATCH_POLICIES = ("data", "fifo")

Batch = tuple[list[int], list[bytes]]


class FifoQueue:
    """Tasks in submission order (requeued ones at the head)."""

    policy = "fifo"

    def __init__(self) -> None:
        #: [ids, blobs, pos, key]: ``key`` the client key of every id in the chunk (a
        #: SUBMIT frame's ids all carry their client's key), -1 if they may differ
        self._chunks: collections.deque[list] = collections.deque()
        self.count = 0  #: tasks queued (including ones the core will drop when taken)
        #: The client key of every task the last ``take`` returned, -1 if they may differ:
        #: the core counts them per run at one lookup a frame (not one per task).
        self.taken_key = -1

    def __len__(self) -> int:
        return self.count

    def add(self, ids: list[int], blobs: list[bytes], hints: list[str]) -> None:
        """Queue tasks at the tail (``hints``: one data key per task, or empty). They are
        one client's (its SUBMIT frame, checked by the core)."""
        self._chunks.append([ids, blobs, 0, ids[0] >> ID_SHIFT if ids else -1])
        self.count += len(ids)

    def push_front(self, ids: list[int], blobs: list[bytes]) -> None:
        """Queue tasks at the head, in this order (requeued after a slot lost them)."""
        if ids:
            self._chunks.appendleft([ids, blobs, 0, -1])
            self.count += len(ids)

    def take(self, held: set[str], n: int) -> Batch:
        """Up to ``n`` tasks for a slot whose machine caches ``held``, within one frame."""
        return self._take_fifo(n, 0)

    def _take_fifo(self, n: int, size: int) -> Batch:
        ids: list[int] = []
        blobs: list[bytes] = []
        chunks = self._chunks
        key = None
        while n > 0 and chunks and size < FRAME_SOFT_BYTES:
            chunk = chunks[0]
            cids, cblobs, pos, ckey = chunk
            if key != ckey:
                key = ckey if key is None else -1
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
                chunks.popleft()
            else:
                chunk[2] = end
        self.count -= len(ids)
        self.taken_key = -1 if key is None else key
        return ids, blobs

    def remove(self, dead: "set[int]", ids: "set[int] | None" = None) -> list[int]:
        """Remove every queued task whose client key is in ``dead`` or whose id is in
        ``ids``; return their ids. O(queue)."""
        gone = _gone(dead, ids)
        removed: list[int] = []
        kept: collections.deque[list] = collections.deque()
        for tids, blobs, pos, key in self._chunks:
            keep = [i for i in range(pos, len(tids)) if not gone(tids[i])]
            if len(keep) < len(tids) - pos:
                removed += [tids[i] for i in range(pos, len(tids)) if gone(tids[i])]
                if keep:
                    kept.append([[tids[i] for i in keep], [blobs[i] for i in keep], 0, key])
            else:
                kept.append([tids, blobs, pos, key])
        self._chunks = kept
        self.count -= len(removed)
        return removed

    def batches(self) -> Iterator[Batch]:
        """Every queued task, in order, in batches of at most MAX_BATCH (for snapshots)."""
        for ids, blobs, pos, _ in self._chunks:
            for i in range(pos, len(ids), MAX_BATCH):
                yield ids[i:i + MAX_BATCH], blobs[i:i + MAX_BATCH]


class DataAwareQueue(FifoQueue):
    """FIFO for tasks without a hint; tasks with one wait by data key."""

    policy = "data"

    def __init__(self) -> None:
        super().__init__()
        self._local: dict[str, collections.deque[tuple[int, bytes]]] = {}

    def add(self, ids: list[int], blobs: list[bytes], hints: list[str]) -> None:
        if not hints:
            super().add(ids, blobs, hints)
            return
        plain_ids, plain_blobs = [], []
        local = self._local
        for tid, blob, hint in zip(ids, blobs, hints):
            if hint:
                local.setdefault(hint, collections.deque()).append((tid, blob))
                self.count += 1
            else:
                plain_ids.append(tid)
                plain_blobs.append(blob)
        if plain_ids:
            super().add(plain_ids, plain_blobs, [])

    def take(self, held: set[str], n: int) -> Batch:
        if not self._local:
            return self._take_fifo(n, 0)
        ids, blobs = self._take_local(held, n)
        if len(ids) < n:
            more = self._take_fifo(n - len(ids), sum(map(len, blobs)))
            ids, blobs = ids + more[0], blobs + more[1]
        if len(ids) < n and self._local:
            more = self._take_local(None, n - len(ids))
            ids, blobs = ids + more[0], blobs + more[1]
        self.taken_key = -1  # (data-keyed tasks: anyone's)
        return ids, blobs

    def _take_local(self, held: set[str] | None, n: int) -> Batch:
        """Up to ``n`` data-keyed tasks: of keys in ``held``, or (None) of any key, oldest
        key first. Costs O(tasks taken + min(len(held), keys queued))."""
        local = self._local
        keys: Iterator[str]
        if held is None:
            keys = iter(lambda: next(iter(local), ""), "")  # the head, until empty
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
        self.count -= len(ids)
        return ids, blobs

    def remove(self, dead: "set[int]", ids: "set[int] | None" = None) -> list[int]:
        removed = super().remove(dead, ids)
        gone_ = _gone(dead, ids)
        for key in list(self._local):
            tasks = self._local[key]
            gone = [t for t in tasks if gone_(t[0])]
            if gone:
                removed += [t for t, _ in gone]
                self.count -= len(gone)
                left = collections.deque(t for t in tasks if not gone_(t[0]))
                if left:
                    self._local[key] = left
                else:
                    del self._local[key]
        return removed

    def batches(self) -> Iterator[Batch]:
        yield from super().batches()
        for tasks in self._local.values():
            pairs = list(tasks)
            for i in range(0, len(pairs), MAX_BATCH):
                part: Iterable[tuple[int, bytes]] = pairs[i:i + MAX_BATCH]
                ids, blobs = zip(*part)
                yield list(ids), list(blobs)


def _gone(dead: "set[int]", ids: "set[int] | None") -> "Callable[[int], bool]":
    """Whether a task id is to be removed: its client key in ``dead``, or it in ``ids``."""
    if not ids:
        return lambda t: t >> ID_SHIFT in dead
    return lambda t: t in ids or t >> ID_SHIFT in dead


def make_queue(policy: str) -> FifoQueue:
    """The queue for a ``--dispatch`` policy (see :data:`DISPATCH_POLICIES`)."""
    return DataAwareQueue() if policy == "data" else FifoQueue()
