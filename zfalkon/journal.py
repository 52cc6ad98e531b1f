"""The broker's journal: an append-only log of accepted tasks and finished results.

``zfalkon broker --journal DIR`` keeps one file, ``DIR/journal.log``: a stream of msgpack
records, written by the broker's loop in one ``write()`` per pass (group commit):

* ``[1, ids, blobs]`` SUBMIT: tasks accepted;
* ``[2, ids]`` DONE: finished for good: the client acknowledged their results, or
  cancelled them;
* ``[3, ids, blobs]`` HELD: finished, the results not yet acknowledged by a client that
  has gone quiet; kept for it;
* ``[4, key]`` GONE: the client said BYE or was forgotten; forget its tasks and results;
* ``[5, key, owner]`` KEY: a client key's first tasks, and who submitted them (its
  CurveZMQ ``ROLE:NAME``, or ``""``): only that identity may claim the key back, and a
  restarted broker never gives the key to another client.

Replaying the records in order gives back exactly the broker core's live tasks
(:attr:`zfalkon.core.BrokerCore.live`): every task accepted and not finished for good, in
submission order, with the results held for quiet clients. A record cut short by a
machine crash ends the replay there (the file is truncated to the last whole record).

**Durability** (``--fsync``): a ``kill -9`` of the broker loses nothing the broker has
written, under every policy (the data is in the kernel's page cache). The policy decides
what a *machine* crash may lose: ``always`` fsyncs after every pass that wrote (before
that pass's tasks are dispatched); ``interval`` (default) fsyncs at most once a second,
so a machine crash loses up to a second of accepted tasks (their clients, if alive,
resubmit them); ``never`` leaves it to the OS.

**Compaction**: once the file passes ``compact_bytes`` and twice its size at the last
compaction, the broker writes a snapshot of what is live (key owners, queued and running
tasks, held results) to ``journal.log.new``, fsyncs it and renames it over the log. When
no task is unfinished or held, the snapshot is just the key owners of clients still
known (often nothing at all): the common case at the end of a run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterable

import msgpack

from zfalkon.core import Recorder
from zfalkon.errors import ConfigError
from zfalkon.protocol import ID_SHIFT

log = logging.getLogger("zfalkon.journal")

SUBMIT, DONE, HELD, GONE, KEY = 1, 2, 3, 4, 5
FSYNC_POLICIES = ("always", "interval", "never")
#: A log smaller than this is never compacted (except by truncation when nothing is live).
COMPACT_BYTES = 256 * 1024 * 1024
_INTERVAL_SECONDS = 1.0
_READ_CHUNK = 1 << 20


@dataclass
class Replayed:
    """What a journal held: unfinished tasks in submission order, and held results."""

    tasks: dict[int, bytes] = field(default_factory=dict)
    held: dict[int, bytes] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)  # client key -> owner
    records: int = 0


class Journal:
    """The append-only log; see the module docstring. Used by the broker's loop only."""

    def __init__(self, directory: str, fsync: str = "interval",
                 compact_bytes: int = COMPACT_BYTES) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ConfigError(f"--fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.path = os.path.join(directory, "journal.log")
            self._file = open(self.path, "ab+")
        except OSError as exc:
            raise ConfigError(f"cannot open the journal in {directory}: {exc}") from None
        self.fsync = fsync
        self.compact_bytes = compact_bytes
        self._buffer = bytearray()
        self._pack = msgpack.Packer().pack
        self._size = self._file.seek(0, os.SEEK_END)
        self._compacted_size = 0
        self._dirty = False  # written since the last fsync
        self._last_sync = 0.0
        self.writes = self.syncs = self.compactions = 0

    # -- replay ------------------------------------------------------------------------

    def replay(self) -> Replayed:
        """Read the whole log; truncate a torn last record; return what is still live."""
        out = Replayed()
        self._file.seek(0)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=0)
        good = 0
        while chunk := self._file.read(_READ_CHUNK):
            try:
                unpacker.feed(chunk)
                for record in unpacker:
                    self._apply(record, out)
                    out.records += 1
                    good = unpacker.tell()
            except Exception as exc:  # a torn or corrupt record: stop here
                log.warning("journal %s: unreadable record at byte %d (%s); ignoring the rest",
                            self.path, good, exc)
                break
        if good < self._size:
            log.warning("journal %s: truncating %d bytes after the last whole record",
                        self.path, self._size - good)
            self._file.truncate(good)
            self._size = good
        self._file.seek(0, os.SEEK_END)
        self._compacted_size = self._size
        return out

    @staticmethod
    def _apply(record: list, out: Replayed) -> None:
        tasks, held = out.tasks, out.held
        kind = record[0]
        if kind == SUBMIT:
            for tid, blob in zip(record[1], record[2]):
                if tid not in held:
                    tasks.setdefault(tid, blob)
        elif kind == DONE:
            for tid in record[1]:
                tasks.pop(tid, None)
                held.pop(tid, None)
        elif kind == HELD:
            for tid, blob in zip(record[1], record[2]):
                tasks.pop(tid, None)
                held[tid] = blob
        elif kind == GONE:
            key = record[1]
            out.owners.pop(key, None)
            for table in (tasks, held):
                for tid in [t for t in table if t >> ID_SHIFT == key]:
                    del table[tid]
        elif kind == KEY:
            out.owners[record[1]] = record[2]
        else:
            raise ValueError(f"unknown journal record kind {kind!r}")

    # -- writing -----------------------------------------------------------------------

    def submit(self, ids: list[int], blobs: list[bytes]) -> None:
        self._buffer += self._pack((SUBMIT, ids, blobs))

    def done(self, ids: Iterable[int]) -> None:
        self._buffer += self._pack((DONE, list(ids)))

    def held(self, ids: list[int], blobs: list[bytes]) -> None:
        self._buffer += self._pack((HELD, ids, blobs))

    def gone(self, key: int) -> None:
        self._buffer += self._pack((GONE, key))

    def key(self, key: int, owner: str) -> None:
        self._buffer += self._pack((KEY, key, owner))

    def flush(self, now: float) -> None:
        """Write what this pass recorded; fsync as the policy says."""
        if self._buffer:
            self._file.write(self._buffer)
            self._file.flush()
            self._size += len(self._buffer)
            self._buffer.clear()
            self._dirty = True
            self.writes += 1
        if self._dirty and (self.fsync == "always" or (
                self.fsync == "interval" and now - self._last_sync >= _INTERVAL_SECONDS)):
            os.fsync(self._file.fileno())
            self._dirty = False
            self._last_sync = now
            self.syncs += 1

    def wants_compaction(self) -> bool:
        return self._size > max(self.compact_bytes, 2 * self._compacted_size)

    @property
    def grown(self) -> bool:
        """Written to since the last compaction (or replay)."""
        return self._size != self._compacted_size

    def compact(self, live_tasks: Iterable[tuple[list[int], list[bytes]]],
                held: Iterable[tuple[list[int], list[bytes]]],
                owners: dict[int, str] | None = None) -> None:
        """Replace the log by a snapshot of what is live: key owners, unfinished tasks,
        held results (an empty snapshot is an empty file)."""
        new_path = self.path + ".new"
        size = 0
        with open(new_path, "wb") as f:
            for key, owner in (owners or {}).items():
                size += f.write(self._pack((KEY, key, owner)))
            for ids, blobs in live_tasks:
                size += f.write(self._pack((SUBMIT, ids, blobs)))
            for ids, blobs in held:
                size += f.write(self._pack((HELD, ids, blobs)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(new_path, self.path)
        dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        self._file.close()
        self._file = open(self.path, "ab+")
        self._size = self._compacted_size = size
        self._buffer.clear()
        self.compactions += 1
        log.info("journal compacted to %d bytes", size)

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        self.flush(float("inf"))
        if self._dirty:
            os.fsync(self._file.fileno())
        self._file.close()


class JournalRecorder(Recorder):
    """The broker core's recorder with a journal: every fact goes to the log, so that a
    replay gives back the core's live tasks and the results it held."""

    durable = True

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def submit(self, ids: list[int], blobs: list[bytes]) -> None:
        self.journal.submit(ids, blobs)

    def done(self, ids: list[int]) -> None:
        self.journal.done(ids)

    def held(self, ids: list[int], blobs: list[bytes]) -> None:
        self.journal.held(ids, blobs)

    def gone(self, key: int) -> None:
        self.journal.gone(key)

    def key(self, key: int, owner: str) -> None:
        self.journal.key(key, owner)

    def stats(self) -> dict:
        j = self.journal
        return {"path": j.path, "bytes": j.size, "fsync": j.fsync, "writes": j.writes,
                "syncs": j.syncs, "compactions": j.compactions}
