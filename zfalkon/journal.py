"""The broker's journal: an append-only log of accepted tasks and finished results.

``zfalkon broker --journal DIR`` keeps one file, ``DIR/journal.log``, written by the
broker's loop in one ``write()`` per pass (group commit). The file starts with a header
(:data:`MAGIC` and :data:`FORMAT_VERSION`); then come records, each one framed as
``RECORD_MARK, length, crc32`` (:data:`_FRAME`) followed by ``length`` bytes of msgpack:

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
submission order, with the results held for quiet clients.

**Damage.** A *torn tail* (the last record cut short by a machine crash, or failing its
checksum with no valid record after it) is cut off with a warning. Anything else (a bad
record with valid records after it, a bad header, an unframed journal of an older
version) makes :meth:`Journal.replay` raise :class:`~zfalkon.errors.ConfigError` naming
the file and byte offset, and change nothing. With ``repair`` (``--journal-repair``) the
damaged file is kept as ``journal.log.corrupt-TIMESTAMP`` and replaced by one holding
every valid record found (scanning forward for the next record mark after damage).

**Ownership.** The directory is locked (``flock`` on ``DIR/lock``, which names the
holder's PID) for the journal's life: a second broker on it is refused. The directory is
kept at mode 0700 and every file at 0600 (they hold every task and result).

**Disk errors** (ENOSPC, EIO, EFBIG, ...) never stop the broker: the unwritten records
stay in memory (:data:`MAX_BACKLOG_BYTES` at most; past that they are dropped and a
snapshot replaces the log once it can be written), :attr:`Journal.failure` says why, and
the broker refuses new tasks until :meth:`Journal.retry` (each tick) or a snapshot
(:meth:`Journal.compact`) has written everything. A failed fsync may have lost written
pages, so it too is mended by a snapshot.

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

import errno
import fcntl
import itertools
import logging
import mmap
import os
import shutil
import stat
import struct
import time
import zlib
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
#: Unwritten journal bytes kept in memory while the disk refuses them; past this they
#: are dropped, and a snapshot of the broker's state replaces the log once it can.
MAX_BACKLOG_BYTES = 64 * 1024 * 1024
#: The file's first bytes, then FORMAT_VERSION as a little-endian uint32.
MAGIC = b"\x89zfjournal\r\n"
FORMAT_VERSION = 1
HEADER = MAGIC + struct.pack("<I", FORMAT_VERSION)
#: Starts every record (0xc1 is a byte msgpack never uses: found only inside user data).
RECORD_MARK = b"\xc1\xfa\x1c\x0d"
_FRAME = struct.Struct("<4sII")  # RECORD_MARK, payload length, zlib.crc32(payload)
_FRAME_PACK, _crc32 = _FRAME.pack, zlib.crc32
_FILE_MODE, _DIR_MODE = 0o600, 0o700
_INTERVAL_SECONDS = 1.0
_REPAIR_CHUNK = 1 << 20


@dataclass
class Replayed:
    """What a journal held: unfinished tasks in submission order, and held results."""

    tasks: dict[int, bytes] = field(default_factory=dict)
    held: dict[int, bytes] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)  # client key -> owner
    records: int = 0


def _open_private(path: str, flags: int) -> int:
    """Open (creating) ``path`` at mode 0600 whatever the umask; warn if it was looser."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode != _FILE_MODE:
            if mode & 0o077:
                log.warning("%s was mode %04o (others could read it); now 0600", path, mode)
            os.fchmod(fd, _FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_directory(directory: str) -> None:
    existed = os.path.isdir(directory)
    os.makedirs(directory, mode=_DIR_MODE, exist_ok=True)
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    if mode != _DIR_MODE:
        if existed and mode & 0o077:
            log.warning("journal directory %s was mode %04o (others could look in); now 0700",
                        directory, mode)
        os.chmod(directory, _DIR_MODE)


def _lock(directory: str) -> int:
    """Take ``DIR/lock`` for this process (flock) and write our PID in it."""
    fd = _open_private(os.path.join(directory, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"the journal directory {directory} is in use by another broker (pid {holder}): "
            "two brokers on one journal would mix their task ids and damage it. Stop that "
            "broker, or give this one another --journal directory") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _fsync_directory(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make a rename durable
    finally:
        os.close(dir_fd)


def _frame_end(buf: memoryview, pos: int, size: int) -> int | None:
    """The end of a whole, valid frame at ``pos`` (None: there is none)."""
    if pos + _FRAME.size > size:
        return None
    mark, length, crc = _FRAME.unpack_from(buf, pos)
    end = pos + _FRAME.size + length
    if mark != RECORD_MARK or end > size or zlib.crc32(buf[pos + _FRAME.size:end]) != crc:
        return None
    return end


def _next_frame(data: mmap.mmap, buf: memoryview, pos: int, size: int) -> int | None:
    """The offset of the first valid frame at or after ``pos`` (None: there is none)."""
    while (pos := data.find(RECORD_MARK, pos)) >= 0:
        if _frame_end(buf, pos, size) is not None:
            return pos
        pos += 1
    return None


def _looks_unframed(data: bytes) -> bool:
    """The first bytes of an unframed journal (zfalkon before FORMAT_VERSION 1): a
    msgpack array of 2 or 3 items starting with a record kind."""
    return len(data) >= 2 and data[0] in (0x92, 0x93) and data[1] in (SUBMIT, DONE, HELD,
                                                                      GONE, KEY)


class Journal:
    """The append-only log; see the module docstring. Used by the broker's loop only.

    ``repair``: :meth:`replay` mends a damaged log (``--journal-repair``) instead of
    refusing it.
    """

    def __init__(self, directory: str, fsync: str = "interval",
                 compact_bytes: int = COMPACT_BYTES, repair: bool = False) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ConfigError(f"--fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        self.directory = directory
        self.path = os.path.join(directory, "journal.log")
        self._fd = self._lock_fd = -1
        try:
            _private_directory(directory)
            self._lock_fd = _lock(directory)
            self._fd = _open_private(self.path, os.O_RDWR | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size
            if self._size == 0:
                self._write_all(self._fd, HEADER)
                os.fsync(self._fd)
                self._size = len(HEADER)
        except OSError as exc:
            self._release()
            raise ConfigError(f"cannot open the journal in {directory}: {exc}") from None
        except BaseException:
            self._release()
            raise
        self.fsync = fsync
        self.compact_bytes = compact_bytes
        self.repair = repair
        self._buffer = bytearray()
        self._pack = msgpack.Packer().pack
        self._compacted_size = 0
        self._dirty = False  # written since the last fsync
        self._last_sync = 0.0
        #: Why the journal cannot be written now (None: it can). The broker refuses new
        #: tasks while it is set.
        self.failure: str | None = None
        self.needs_snapshot = False  # what is on disk cannot be completed by appending
        self._failed_at = 0.0
        self.writes = self.syncs = self.compactions = self.failures = 0

    # -- replay ------------------------------------------------------------------------

    def replay(self) -> Replayed:
        """Read the whole log; cut a torn tail; return what is still live. Damage raises
        ConfigError (nothing changed), or is mended if ``repair`` was given."""
        out = Replayed()
        size = self._size = os.fstat(self._fd).st_size
        if size < len(HEADER) and os.pread(self._fd, size, 0) == HEADER[:size]:
            # Empty, or a crash while creating it: it holds nothing; write the header.
            os.ftruncate(self._fd, 0)
            self._write_all(self._fd, HEADER)
            os.fsync(self._fd)
            size = self._size = len(HEADER)
        with mmap.mmap(self._fd, size, prot=mmap.PROT_READ) as data:
            buf = memoryview(data)
            try:
                bad, why = self._read(data, buf, size, out)
                torn = bad is not None and bad >= len(HEADER) and not why.startswith(
                    "a record this") and _next_frame(data, buf, bad + 1, size) is None
            finally:
                buf.release()
        if bad is not None and torn:
            log.warning("journal %s: %s at byte %d, the last thing written (a write cut short "
                        "by a crash); cutting off its %d bytes", self.path, why, bad, size - bad)
            os.ftruncate(self._fd, bad)
            os.fsync(self._fd)
            self._size = bad
        elif bad is not None and self.repair:
            self._repair()
            return self.replay()
        elif bad is not None:
            raise ConfigError(
                f"journal {self.path} is damaged at byte {bad}: {why}, and it is not the "
                "end of the file (valid records follow, or the header is bad). The broker "
                "will not start on it and has changed nothing. To start from every valid "
                f"record it holds, run: zfalkon broker --journal {self.directory} "
                "--journal-repair (the damaged file is kept as journal.log.corrupt-TIME)")
        self._compacted_size = self._size
        return out

    def _read(self, data: mmap.mmap, buf: memoryview, size: int,
              out: Replayed) -> tuple[int | None, str]:
        """Apply every record to ``out``; return where and why reading stopped early."""
        if data[:len(MAGIC)] != MAGIC:
            if _looks_unframed(data[:2]):
                return 0, ("an unframed journal written by an older zfalkon (before format "
                           f"version {FORMAT_VERSION}); --journal-repair converts it")
            return 0, "not a zfalkon journal header"
        version = struct.unpack_from("<I", buf, len(MAGIC))[0]
        if version != FORMAT_VERSION:
            raise ConfigError(f"journal {self.path} has format version {version}; this "
                              f"zfalkon reads version {FORMAT_VERSION}. Use a matching zfalkon")
        pos, apply, unpackb = len(HEADER), self._apply, msgpack.unpackb
        while pos < size:
            end = _frame_end(buf, pos, size)
            if end is None:
                return pos, ("a record cut short" if size - pos < _FRAME.size or
                             _FRAME.unpack_from(buf, pos)[1] > size - pos - _FRAME.size
                             else "a record that fails its checksum")
            try:
                apply(unpackb(buf[pos + _FRAME.size:end], raw=False, strict_map_key=True),
                      out)
            except Exception as exc:
                return pos, f"a record this version cannot read ({exc})"[:200]
            out.records += 1
            pos = end
        return None, ""

    def _repair(self) -> None:
        """Keep the damaged log as journal.log.corrupt-TIME; replace it by every valid
        record found in it."""
        size = os.fstat(self._fd).st_size
        new_path = self.path + ".repair"
        kept = skipped = 0
        new_fd = _open_private(new_path, os.O_WRONLY | os.O_TRUNC)
        try:
            out = bytearray(HEADER)
            with mmap.mmap(self._fd, size, prot=mmap.PROT_READ) as data:
                buf = memoryview(data)
                try:
                    if data[:len(MAGIC)] != MAGIC and _looks_unframed(data[:2]):
                        records, skipped = self._unframed_records(data, size)
                    else:
                        records, skipped = self._salvage(data, buf, size)
                    for record in records:
                        out += record if isinstance(record, bytes) else self._frame(record)
                        kept += 1
                        if len(out) >= _REPAIR_CHUNK:
                            self._write_all(new_fd, out)
                            out.clear()
                finally:
                    buf.release()
            self._write_all(new_fd, out)
            os.fsync(new_fd)
        finally:
            os.close(new_fd)
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        n = 1
        while os.path.lexists(aside):
            aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{n}"
            n += 1
        try:
            os.link(self.path, aside)  # (journal.log is the old or the new file throughout)
        except OSError:
            shutil.copyfile(self.path, aside)
        os.replace(new_path, self.path)
        _fsync_directory(self.directory)
        os.close(self._fd)
        self._fd = _open_private(self.path, os.O_RDWR | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size
        log.warning("journal %s repaired: kept %d valid records, skipped %d bytes; the "
                    "damaged file is kept as %s", self.path, kept, skipped, aside)

    def _salvage(self, data: mmap.mmap, buf: memoryview,
                 size: int) -> tuple[list[bytes], int]:
        """Every valid, readable frame (as bytes) and how many bytes were skipped."""
        frames: list[bytes] = []
        skipped = 0
        pos = len(HEADER) if data[:len(HEADER)] == HEADER else 0
        while pos < size:
            end = _frame_end(buf, pos, size)
            if end is not None:
                try:
                    self._apply(msgpack.unpackb(buf[pos + _FRAME.size:end], raw=False,
                                                strict_map_key=True), Replayed())
                except Exception:
                    end = None
            if end is not None:
                frames.append(bytes(buf[pos:end]))
                pos = end
                continue
            nxt = _next_frame(data, buf, pos + 1, size)
            skipped += (size if nxt is None else nxt) - pos
            if nxt is None:
                break
            pos = nxt
        return frames, skipped

    def _unframed_records(self, data: mmap.mmap, size: int) -> tuple[list, int]:
        """The records of an unframed (older) journal up to the first unreadable one."""
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=0)
        unpacker.feed(data[:size])
        records: list = []
        good = 0
        try:
            for record in unpacker:
                self._apply(record, Replayed())
                records.append(record)
                good = unpacker.tell()
        except Exception:
            pass
        return records, size - good

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

    def _frame(self, record: tuple | list) -> bytes:
        data = self._pack(record)
        return _FRAME.pack(RECORD_MARK, len(data), zlib.crc32(data)) + data

    def _add(self, record: tuple) -> None:
        data = self._pack(record)
        buffer = self._buffer
        buffer += _FRAME.pack(RECORD_MARK, len(data), zlib.crc32(data))
        buffer += data

    def submit(self, ids: list[int], blobs: list[bytes]) -> None:
        data = self._pack((SUBMIT, ids, blobs))  # (_add inlined: the hot path)
        buffer = self._buffer
        buffer += _FRAME_PACK(RECORD_MARK, len(data), _crc32(data))
        buffer += data

    def done(self, ids: Iterable[int]) -> None:
        data = self._pack((DONE, list(ids)))
        buffer = self._buffer
        buffer += _FRAME_PACK(RECORD_MARK, len(data), _crc32(data))
        buffer += data

    def held(self, ids: list[int], blobs: list[bytes]) -> None:
        self._add((HELD, ids, blobs))

    def gone(self, key: int) -> None:
        self._add((GONE, key))

    def key(self, key: int, owner: str) -> None:
        self._add((KEY, key, owner))

    @staticmethod
    def _write_all(fd: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.ENOSPC, "write() wrote nothing")
            view = view[n:]

    def flush(self, now: float) -> None:
        """Write what this pass recorded; fsync as the policy says. While the journal
        has failed, keep it in memory (see :meth:`retry`)."""
        if self.failure is not None:
            if len(self._buffer) > MAX_BACKLOG_BYTES and not self.needs_snapshot:
                log.error("journal %s: more than %d MiB waiting to be written; dropping it "
                          "from memory: a snapshot of the broker's state will replace the log "
                          "once the disk takes it", self.path, MAX_BACKLOG_BYTES >> 20)
                self.needs_snapshot = True
            if self.needs_snapshot:  # (only a snapshot mends the log now: records are moot)
                self._buffer.clear()
            return
        if self._buffer and not self._write(now):
            return
        if self._dirty and (self.fsync == "always" or (
                self.fsync == "interval" and now - self._last_sync >= _INTERVAL_SECONDS)):
            self._sync(now)

    def _write(self, now: float) -> bool:
        """Write the buffer (what a partial write left stays in it); False on an error."""
        buffer = self._buffer
        try:
            while buffer:
                n = os.write(self._fd, buffer)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "write() wrote nothing")
                self._size += n
                self._dirty = True
                if n == len(buffer):
                    buffer.clear()
                else:
                    del buffer[:n]
        except OSError as exc:
            self._fail(exc, "write", now)
            return False
        self.writes += 1
        return True

    def _sync(self, now: float) -> bool:
        try:
            os.fsync(self._fd)
        except OSError as exc:  # the kernel may have dropped the pages: write them again
            self.needs_snapshot = True
            self._fail(exc, "fsync", now)
            return False
        self._dirty = False
        self._last_sync = now
        self.syncs += 1
        return True

    def _fail(self, exc: OSError, what: str, now: float) -> None:
        if self.failure is None:
            self.failures += 1
            self._failed_at = now
            self.failure = (f"the broker's journal cannot be written ({what}: "
                            f"{exc.strerror or exc}); new tasks are refused until it can be")
            log.error("JOURNAL UNAVAILABLE: %s %s failed: %s. The broker keeps running and "
                      "serving results, keeps the %d unwritten bytes in memory (at most %d "
                      "MiB), refuses new tasks, and tries again every second",
                      self.path, what, exc, len(self._buffer), MAX_BACKLOG_BYTES >> 20)

    def _recovered(self, now: float, how: str) -> None:
        if self.failure is not None:
            log.warning("journal %s is writable again after %.0f s (%s); accepting new tasks",
                        self.path, now - self._failed_at, how)
        self.failure = None
        self.needs_snapshot = False

    def retry(self, now: float) -> bool:
        """After a failure: write (and fsync) what is waiting. True if the journal works
        (again); False if it still fails, or if only a snapshot can mend it
        (:attr:`needs_snapshot`: the broker then calls :meth:`compact`)."""
        if self.failure is None:
            return True
        if self.needs_snapshot or not self._write(now) or not self._sync(now):
            return False
        self._recovered(now, f"{self.writes} writes")
        return True

    def wants_compaction(self) -> bool:
        return self.needs_snapshot or self._size > max(self.compact_bytes,
                                                       2 * self._compacted_size)

    @property
    def grown(self) -> bool:
        """Written to since the last compaction (or replay)."""
        return self._size != self._compacted_size

    def compact(self, live_tasks: Iterable[tuple[list[int], list[bytes]]],
                held: Iterable[tuple[list[int], list[bytes]]],
                owners: dict[int, str] | None = None, now: float = 0.0) -> bool:
        """Replace the log by a snapshot of what is live: key owners, unfinished tasks,
        held results (an empty snapshot is just the header). False if the disk refused
        it (the log is left as it was)."""
        new_path = self.path + ".new"
        try:
            fd = _open_private(new_path, os.O_WRONLY | os.O_TRUNC)
            try:
                out = bytearray(HEADER)
                size = 0
                for record in itertools.chain(
                        ((KEY, key, owner) for key, owner in (owners or {}).items()),
                        ((SUBMIT, ids, blobs) for ids, blobs in live_tasks),
                        ((HELD, ids, blobs) for ids, blobs in held)):
                    out += self._frame(record)
                    if len(out) >= _REPAIR_CHUNK:
                        self._write_all(fd, out)
                        size += len(out)
                        out.clear()
                self._write_all(fd, out)
                size += len(out)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(new_path, self.path)
            _fsync_directory(self.directory)
            new_fd = _open_private(self.path, os.O_RDWR | os.O_APPEND)
        except OSError as exc:
            try:
                os.unlink(new_path)
            except OSError:
                pass
            if self.failure is None:
                log.warning("journal %s: compaction failed (%s); trying again when the log "
                            "has doubled", self.path, exc)
                self._compacted_size = self._size
            return False
        os.close(self._fd)
        self._fd = new_fd
        self._size = self._compacted_size = size
        self._buffer.clear()  # (the snapshot holds it)
        self._dirty = False
        self.compactions += 1
        self._recovered(now, "snapshot written")
        log.info("journal compacted to %d bytes", size)
        return True

    @property
    def size(self) -> int:
        return self._size

    @property
    def backlog(self) -> int:
        """Bytes recorded and not yet written."""
        return len(self._buffer)

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)  # (releases the lock)
            self._lock_fd = -1

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            now = time.monotonic() + 1e9
            if self.failure is None:
                self.flush(now)
                if self._dirty:
                    self._sync(now)
            else:
                self.retry(now)
            if self.failure is not None:
                log.error("journal %s closed with %d bytes not written (%s)%s", self.path,
                          len(self._buffer), self.failure,
                          "; the log on disk misses more" if self.needs_snapshot else "")
        finally:
            self._release()


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
                "syncs": j.syncs, "compactions": j.compactions, "failures": j.failures,
                "unavailable": j.failure, "backlog_bytes": j.backlog}
