"""The broker's journal: an append-only log of accepted tasks and finished results.

``zfalkon broker --journal DIR`` keeps one file, ``DIR/journal.log``, written by the
broker's loop in one ``write()`` per pass (group commit). The file starts with a header
(:data:`MAGIC`, :data:`FORMAT_VERSION`, a random 16-byte *secret* made for this file, and
a CRC-32 of those); then come records, each one framed as ``mark, length, check``
(:data:`_FRAME`): the secret's first 8 bytes, the payload's length, and
``crc32(secret + payload)``; then ``length`` bytes of msgpack:

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

**Why a secret.** Records carry client data (task blobs, results), so a client can put
bytes that look like a frame inside its blob. It cannot make them a frame *of this file*:
the secret is drawn (``os.urandom``) for every file the journal writes (a new log, each
compaction, repair or version-1 conversion), is in no message the broker sends, and never
leaves the file (mode 0600). So a frame embedded in a blob is never taken for a record,
whether the broker is looking for records after a bad one (torn tail or damage?) or
salvaging them (``--journal-repair``). The scan for the next frame is linear in the
file's size: a candidate counts only if no other mark starts inside it, so no byte is
checksummed twice. A header whose own checksum fails (its secret may be damaged) is
refused, never taken for a torn tail at its first record.

**Damage.** A *torn tail* (the last record cut short by a machine crash, or failing its
checksum with no valid record after it) is cut off with a warning. Anything else (a bad
record with valid records after it, a bad header, an unframed journal of an older
version) makes :meth:`Journal.replay` raise :class:`~zfalkon.errors.ConfigError` naming
the file and byte offset, and change nothing. With ``repair`` (``--journal-repair``) the
damaged file is kept as ``journal.log.corrupt-TIMESTAMP`` and replaced by one holding
every valid record found (scanning forward for the next frame of this file after damage).

**Version 1** (framed with a fixed mark ``c1 fa 1c 0d`` and a plain CRC-32, no secret) is
still read, then converted: rewritten, record for record, as version 2 before the broker
starts. A client can forge a version-1 frame, so for such a file a bad frame followed by
something frame-like is refused (never cut), and ``--journal-repair`` keeps only the
records before the damage (everything is kept in the ``corrupt`` file).

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
FUNCTION = 6  # (key, digest, pickle): a function a client's tasks by digest call
FSYNC_POLICIES = ("always", "interval", "never")
#: A log smaller than this is never compacted (except by truncation when nothing is live).
COMPACT_BYTES = 256 * 1024 * 1024
#: Unwritten journal bytes kept in memory while the disk refuses them; past this they
#: are dropped, and a snapshot of the broker's state replaces the log once it can.
MAX_BACKLOG_BYTES = 64 * 1024 * 1024
#: The file's first bytes; then FORMAT_VERSION as a little-endian uint32.
MAGIC = b"\x89zfjournal\r\n"
FORMAT_VERSION = 2
SECRET_BYTES = 16
#: MAGIC, FORMAT_VERSION, the file's secret, zlib.crc32 of the 32 bytes before it.
_HEADER = struct.Struct("<12sI16sI")
HEADER_SIZE = _HEADER.size
#: The secret's first MARK_BYTES start every frame.
MARK_BYTES = 8
_FRAME = struct.Struct("<8sII")  # mark, payload length, zlib.crc32(secret + payload)
FRAME_SIZE = _FRAME.size
_crc32 = zlib.crc32
#: Version 1 (read, then converted): MAGIC and 1, then frames of a fixed mark (0xc1 is a
#: byte msgpack never uses), the payload's length and its plain zlib.crc32.
V1_HEADER = MAGIC + struct.pack("<I", 1)
V1_RECORD_MARK = b"\xc1\xfa\x1c\x0d"
_FILE_MODE, _DIR_MODE = 0o600, 0o700
_INTERVAL_SECONDS = 1.0
_REPAIR_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Format:
    """How one journal file frames its records: its header, the mark starting each
    frame, the CRC-32 start value (crc32 of the secret: a record's check is
    ``crc32(secret + payload)``), and the frame's layout."""

    version: int
    header: bytes
    mark: bytes
    seed: int
    frame: struct.Struct

    @classmethod
    def new(cls, secret: bytes | None = None) -> "_Format":
        """Version 2 with ``secret`` (default: a fresh random one)."""
        if secret is None:
            secret = os.urandom(SECRET_BYTES)
        head = MAGIC + struct.pack("<I", FORMAT_VERSION) + secret
        return cls(FORMAT_VERSION, head + struct.pack("<I", zlib.crc32(head)),
                   secret[:MARK_BYTES], zlib.crc32(secret), _FRAME)


_V1 = _Format(1, V1_HEADER, V1_RECORD_MARK, 0, struct.Struct("<4sII"))


def _parse_header(head: bytes) -> tuple[_Format | None, str]:
    """The format a file's first bytes declare, or None and what is wrong with them.
    Another version than 1 or 2 raises ValueError (the message to show)."""
    if head[:len(MAGIC)] != MAGIC:
        if _looks_unframed(head[:2]):
            return None, ("an unframed journal written by an older zfalkon (before format "
                          "version 1); --journal-repair converts it")
        return None, "not a zfalkon journal header"
    if len(head) < len(V1_HEADER):
        return None, "a header cut short"
    version = struct.unpack_from("<I", head, len(MAGIC))[0]
    if version == 1:
        return _V1, ""
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version}; this zfalkon reads versions 1 and "
                         f"{FORMAT_VERSION}. Use a matching zfalkon")
    if len(head) < HEADER_SIZE:
        return None, "a header cut short"
    _, _, secret, check = _HEADER.unpack_from(head)
    if zlib.crc32(head[:HEADER_SIZE - 4]) != check:
        return None, ("a header that fails its checksum (it holds the secret every record "
                      "is checked with)")
    return _Format.new(secret), ""


def _torn_header(head: bytes) -> bool:
    """``head`` (shorter than a header) is what a crash while creating a journal leaves:
    the start of a header, so the file holds no record."""
    if len(head) >= HEADER_SIZE:
        return False
    if head[:len(MAGIC)] != MAGIC[:len(head)]:
        return False
    return len(head) < len(V1_HEADER) or struct.unpack_from(
        "<I", head, len(MAGIC))[0] == FORMAT_VERSION


@dataclass
class Replayed:
    """What a journal held: unfinished tasks in submission order, and held results."""

    tasks: dict[int, bytes] = field(default_factory=dict)
    held: dict[int, bytes] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)  # client key -> owner
    #: client key -> {digest: pickle}: the functions its tasks by digest call
    functions: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
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


def _frame_end(buf: memoryview, pos: int, size: int, fmt: _Format) -> int | None:
    """The end of a whole, valid frame of ``fmt`` at ``pos`` (None: there is none)."""
    frame = fmt.frame
    if pos + frame.size > size:
        return None
    mark, length, crc = frame.unpack_from(buf, pos)
    end = pos + frame.size + length
    if mark != fmt.mark or end > size or _crc32(buf[pos + frame.size:end], fmt.seed) != crc:
        return None
    return end


def _next_frame(data: mmap.mmap, buf: memoryview, pos: int, size: int,
                fmt: _Format) -> tuple[int, int] | None:
    """The first valid frame at or after ``pos``: its start and end (None: there is none).

    Linear in the bytes scanned: a candidate (an occurrence of the mark) is checksummed
    only if the next occurrence starts at or after its claimed end, so the checksummed
    spans never overlap. A real frame of version 2 holds no other mark (its payload is
    client data, which cannot hold the file's secret), so the rule loses none. In version
    1 a client can write the mark, so a candidate with another mark inside it may be real:
    it is returned with end -1 (the caller then refuses the file rather than cut it)."""
    mark, head = fmt.mark, fmt.frame.size
    at = data.find(mark, pos)
    while at >= 0:
        after = data.find(mark, at + 1)
        if at + head <= size:
            end = at + head + fmt.frame.unpack_from(buf, at)[1]
            if end <= (size if after < 0 else after):
                if _frame_end(buf, at, size, fmt) is not None:
                    return at, end
            elif end <= size and fmt is _V1:
                return at, -1
        at = after
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
        #: How this file frames records (None: not known until :meth:`replay`; what is
        #: recorded until then is framed under a throwaway secret, and flush refuses it).
        self._format: _Format | None = None
        self._use(_Format.new())
        self._format = None
        try:
            _private_directory(directory)
            self._lock_fd = _lock(directory)
            self._fd = _open_private(self.path, os.O_RDWR | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size
            if self._size == 0:
                self._new_header()
            else:
                try:
                    fmt = _parse_header(os.pread(self._fd, HEADER_SIZE, 0))[0]
                except ValueError:
                    fmt = None
                if fmt is not None and fmt.version == FORMAT_VERSION:
                    self._use(fmt)
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

    def _use(self, fmt: _Format) -> None:
        """Frame what is recorded from now on as ``fmt`` (the file's format)."""
        self._format = fmt
        self._mark, self._seed, self._frame_pack = fmt.mark, fmt.seed, fmt.frame.pack

    def _new_header(self) -> None:
        """Make the (empty) file a new journal: a header with a fresh secret."""
        fmt = _Format.new()
        os.ftruncate(self._fd, 0)
        self._write_all(self._fd, fmt.header)
        os.fsync(self._fd)
        self._size = len(fmt.header)
        self._use(fmt)

    # -- replay ------------------------------------------------------------------------

    def replay(self) -> Replayed:
        """Read the whole log; cut a torn tail; return what is still live. Damage raises
        ConfigError (nothing changed), or is mended if ``repair`` was given. A version-1
        log is rewritten as version 2."""
        out = Replayed()
        size = self._size = os.fstat(self._fd).st_size
        if _torn_header(os.pread(self._fd, HEADER_SIZE, 0)):
            # Empty, or a crash while creating it: it holds nothing; write a header.
            self._new_header()
            size = self._size
        with mmap.mmap(self._fd, size, prot=mmap.PROT_READ) as data:
            buf = memoryview(data)
            try:
                fmt, bad, why = self._read(data, buf, size, out)
                torn = (fmt is not None and bad is not None and bad >= len(fmt.header) and
                        not why.startswith("a record this") and
                        _next_frame(data, buf, bad + 1, size, fmt) is None)
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
            v1 = (" (a version-1 journal, whose records carry no secret: the repair keeps "
                  "the records before the damage)" if fmt is _V1 else "")
            raise ConfigError(
                f"journal {self.path} is damaged at byte {bad}: {why}, and it is not the "
                "end of the file (valid records follow, or the header is bad). The broker "
                "will not start on it and has changed nothing. To start from every valid "
                f"record it holds, run: zfalkon broker --journal {self.directory} "
                "--journal-repair (the damaged file is kept as journal.log.corrupt-TIME)"
                + v1)
        assert fmt is not None
        if fmt is _V1:
            self._convert()
        else:
            self._use(fmt)
        self._compacted_size = self._size
        return out

    def _read(self, data: mmap.mmap, buf: memoryview, size: int,
              out: Replayed) -> tuple[_Format | None, int | None, str]:
        """Apply every record to ``out``; return the file's format (None: a bad header),
        and where and why reading stopped early."""
        try:
            fmt, why = _parse_header(data[:HEADER_SIZE])
        except ValueError as exc:
            raise ConfigError(f"journal {self.path} has {exc}") from None
        if fmt is None:
            return None, 0, why
        pos, apply, unpackb, head = len(fmt.header), self._apply, msgpack.unpackb, fmt.frame.size
        while pos < size:
            end = _frame_end(buf, pos, size, fmt)
            if end is None:
                return fmt, pos, ("a record cut short" if size - pos < head or
                                  fmt.frame.unpack_from(buf, pos)[1] > size - pos - head
                                  else "a record that fails its checksum")
            try:
                apply(unpackb(buf[pos + head:end], raw=False, strict_map_key=True), out)
            except Exception as exc:
                return fmt, pos, f"a record this version cannot read ({exc})"[:200]
            out.records += 1
            pos = end
        return fmt, None, ""

    def _convert(self) -> None:
        """Rewrite a sound version-1 log as version 2, record for record (if the disk
        refuses, go on in version 1: the next compaction converts it)."""
        size = os.fstat(self._fd).st_size
        try:
            with mmap.mmap(self._fd, size, prot=mmap.PROT_READ) as data:
                buf = memoryview(data)
                try:
                    written = self._replace(_Format.new(), self._payloads(buf, size, _V1))
                finally:
                    buf.release()
        except OSError as exc:
            log.warning("journal %s is in format version 1 and could not be rewritten as "
                        "version %d (%s); appending to it in version 1 until it is compacted",
                        self.path, FORMAT_VERSION, exc)
            self._use(_V1)
            return
        log.warning("journal %s was in format version 1; rewritten as version %d (%d bytes)",
                    self.path, FORMAT_VERSION, written)

    def _replace(self, fmt: _Format, payloads: Iterable) -> int:
        """Write ``payloads`` framed in ``fmt`` (a fresh secret: every file has its own) to
        a new file, put it in the log's place (it and the directory fsynced) and append to
        it from now on; return its size. Raises OSError, the log left as it was."""
        new_path = self.path + ".new"
        try:
            size = self._write_new(new_path, fmt, payloads)
            os.replace(new_path, self.path)
            _fsync_directory(self.directory)
            new_fd = _open_private(self.path, os.O_RDWR | os.O_APPEND)
        except OSError:
            try:
                os.unlink(new_path)
            except OSError:
                pass
            raise
        os.close(self._fd)
        self._fd = new_fd
        self._size = size
        self._use(fmt)
        return size

    @staticmethod
    def _payloads(buf: memoryview, size: int, fmt: _Format) -> Iterable[memoryview]:
        """The payload of every frame of a sound log (read it first)."""
        pos, head = len(fmt.header), fmt.frame.size
        while pos < size:
            end = pos + head + fmt.frame.unpack_from(buf, pos)[1]
            yield buf[pos + head:end]
            pos = end

    def _write_new(self, path: str, fmt: _Format, payloads: Iterable) -> int:
        """Write a journal of ``payloads`` framed as ``fmt`` to ``path`` and fsync it;
        return its size."""
        fd = _open_private(path, os.O_WRONLY | os.O_TRUNC)
        try:
            out = bytearray(fmt.header)
            size, pack, mark, seed = 0, fmt.frame.pack, fmt.mark, fmt.seed
            for data in payloads:
                out += pack(mark, len(data), _crc32(data, seed))
                out += data
                if len(out) >= _REPAIR_CHUNK:
                    self._write_all(fd, out)
                    size += len(out)
                    out.clear()
            self._write_all(fd, out)
            size += len(out)
            os.fsync(fd)
        finally:
            os.close(fd)
        return size

    def _repair(self) -> None:
        """Keep the damaged log as journal.log.corrupt-TIME; replace it by every valid
        record found in it."""
        size = os.fstat(self._fd).st_size
        new_path = self.path + ".repair"
        kept, skipped = [0], [0, 0]  # (skipped[1]: the header was bad)
        fmt = _Format.new()
        with mmap.mmap(self._fd, size, prot=mmap.PROT_READ) as data:
            buf = memoryview(data)
            try:
                if data[:len(MAGIC)] != MAGIC and _looks_unframed(data[:2]):
                    records: Iterable = self._unframed_records(data, size, kept, skipped)
                else:
                    records = self._salvage(data, buf, size, kept, skipped)
                self._write_new(new_path, fmt, records)
            finally:
                buf.release()
        if not kept[0] and skipped[1] and size > HEADER_SIZE:
            os.unlink(new_path)
            raise ConfigError(
                f"journal {self.path}: --journal-repair found no record it can verify in "
                f"its {size} bytes (the header, which holds the secret every record is "
                "checked with, is damaged or not a zfalkon journal's). It has changed "
                "nothing. Move the file away to start with an empty journal")
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
        self._use(fmt)
        log.warning("journal %s repaired: kept %d valid records, skipped %d bytes; the "
                    "damaged file is kept as %s", self.path, kept[0], skipped[0], aside)

    def _salvage(self, data: mmap.mmap, buf: memoryview, size: int, kept: list[int],
                 skipped: list[int]) -> Iterable[memoryview]:
        """Every valid, readable frame's payload (counted in ``kept``; the bytes passed
        over are counted in ``skipped``). After damage, only frames of this file's secret
        count; in version 1 (no secret) nothing after the first damage is kept. With a
        bad header, the secret is taken from where a version-2 header keeps it."""
        try:
            fmt = _parse_header(data[:HEADER_SIZE])[0]
        except ValueError:
            fmt = None
        if fmt is None:  # a damaged header: its secret is the only one to check with
            if size < HEADER_SIZE:
                skipped[0] += size
                return
            skipped[1] = 1
            version = struct.unpack_from("<I", buf, len(MAGIC))[0]
            fmt = _V1 if version == 1 else _Format.new(bytes(buf[16:16 + SECRET_BYTES]))
            skipped[0] += len(fmt.header)
        pos, head = len(fmt.header), fmt.frame.size
        while pos < size:
            if fmt is _V1:
                end = _frame_end(buf, pos, size, fmt)
                if end is None:
                    log.warning("journal %s: format version 1 has no secret, so a record "
                                "after damage cannot be told from a client's data that "
                                "looks like one: keeping only the %d records before byte "
                                "%d", self.path, kept[0], pos)
                    break
                at = pos
            else:  # (the next frame: at pos if one is there; linear, see _next_frame)
                found = _next_frame(data, buf, pos, size, fmt)
                if found is None:
                    break
                at, end = found
                skipped[0] += at - pos
            try:
                self._apply(msgpack.unpackb(buf[at + head:end], raw=False,
                                            strict_map_key=True), Replayed())
            except Exception:  # a frame of this file that this version cannot read
                skipped[0] += end - at
            else:
                kept[0] += 1
                yield buf[at + head:end]
            pos = end
        skipped[0] += size - pos

    def _unframed_records(self, data: mmap.mmap, size: int, kept: list[int],
                          skipped: list[int]) -> Iterable[bytes]:
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
        skipped[0] += size - good
        kept[0] += len(records)
        pack = self._pack
        return [pack(record) for record in records]

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
            out.functions.pop(key, None)
            for table in (tasks, held):
                for tid in [t for t in table if t >> ID_SHIFT == key]:
                    del table[tid]
        elif kind == KEY:
            out.owners[record[1]] = record[2]
        elif kind == FUNCTION:
            out.functions.setdefault(record[1], {})[record[2]] = record[3]
        else:
            raise ValueError(f"unknown journal record kind {kind!r}")

    # -- writing -----------------------------------------------------------------------

    def _add(self, record: tuple) -> None:
        data = self._pack(record)
        buffer = self._buffer
        buffer += self._frame_pack(self._mark, len(data), _crc32(data, self._seed))
        buffer += data

    def submit(self, ids: list[int], blobs: list[bytes]) -> None:
        data = self._pack((SUBMIT, ids, blobs))  # (_add inlined: the hot path)
        buffer = self._buffer
        buffer += self._frame_pack(self._mark, len(data), _crc32(data, self._seed))
        buffer += data

    def done(self, ids: Iterable[int]) -> None:
        data = self._pack((DONE, list(ids)))
        buffer = self._buffer
        buffer += self._frame_pack(self._mark, len(data), _crc32(data, self._seed))
        buffer += data

    def held(self, ids: list[int], blobs: list[bytes]) -> None:
        self._add((HELD, ids, blobs))

    def gone(self, key: int) -> None:
        self._add((GONE, key))

    def key(self, key: int, owner: str) -> None:
        self._add((KEY, key, owner))

    def function(self, key: int, digest: bytes, blob: bytes) -> None:
        self._add((FUNCTION, key, digest, blob))

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
        if self._buffer:
            if self._format is None:  # (its frames would not be the file's)
                raise RuntimeError(f"journal {self.path}: replay() it before writing to it")
            if not self._write(now):
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
                owners: dict[int, str] | None = None, now: float = 0.0,
                functions: Iterable[tuple[int, bytes, bytes]] = ()) -> bool:
        """Replace the log by a snapshot of what is live: key owners, the functions of
        tasks by digest (``(key, digest, pickle)``), unfinished tasks, held results (an
        empty snapshot is just the header). False if the disk refused it (the log is
        left as it was)."""
        pack = self._pack
        try:
            size = self._replace(_Format.new(), (pack(record) for record in itertools.chain(
                ((KEY, key, owner) for key, owner in (owners or {}).items()),
                ((FUNCTION, *function) for function in functions),
                ((SUBMIT, ids, blobs) for ids, blobs in live_tasks),
                ((HELD, ids, blobs) for ids, blobs in held))))
        except OSError as exc:
            if self.failure is None:
                log.warning("journal %s: compaction failed (%s); trying again when the log "
                            "has doubled", self.path, exc)
                self._compacted_size = self._size
            return False
        self._compacted_size = size
        self._buffer.clear()  # (the snapshot holds it: framed with the old secret)
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

    def function(self, key: int, digest: bytes, blob: bytes) -> None:
        self.journal.function(key, digest, blob)

    def stats(self) -> dict:
        j = self.journal
        return {"path": j.path, "bytes": j.size, "fsync": j.fsync, "writes": j.writes,
                "syncs": j.syncs, "compactions": j.compactions, "failures": j.failures,
                "unavailable": j.failure, "backlog_bytes": j.backlog}
