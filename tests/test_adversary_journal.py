"""Adversarial tests of the hardened journal (issue 12): damage it the ways a crash or a
hostile client's data can, then start a real broker process on it and check that it
refuses or recovers as docs/protocol.md section 10 says, and never truncates valid data.

The journal's records are framed under a secret drawn when the file is created (format
version 2): a client, which sends its blobs before it could know that secret, can craft
frames of version 1 (a fixed mark) or of version 2 under a secret of its own, never frames
of the journal its data is written to.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib

import msgpack
import pytest

from conftest import READY_PREFIX, child_env, stop_process, wait_until
from zfalkon import payload, query_status
from zfalkon import protocol as P
from zfalkon.errors import ConfigError
from zfalkon.journal import HEADER_SIZE, Journal

KEY, VICTIM = 7, 9


def tid(key: int, seq: int) -> int:
    return (key << P.ID_SHIFT) | seq


#: Version 1's fixed record mark and header (docs/protocol.md, section 10).
V1_MARK = b"\xc1\xfa\x1c\x0d"
V1_HEADER = b"\x89zfjournal\r\n" + struct.pack("<I", 1)


def v1_frame(record) -> bytes:
    """A record framed as version 1 does: anyone can make one."""
    data = msgpack.packb(record)
    return V1_MARK + struct.pack("<II", len(data), zlib.crc32(data)) + data


def v2_frame(record, secret: bytes) -> bytes:
    """A record framed as version 2 does with ``secret``."""
    data = msgpack.packb(record)
    return secret[:8] + struct.pack("<II", len(data), zlib.crc32(secret + data)) + data


def write_journal(directory, records: list) -> tuple[str, list[int]]:
    """A journal of exactly these records, written by the broker's own Journal; return its
    path and each record's offset."""
    j = Journal(str(directory), fsync="never")
    offsets = []
    try:
        for record in records:
            offsets.append(j.size)
            if record[0] == 5:
                j.key(record[1], record[2])
            else:
                j.submit(record[1], record[2])
            j.flush(time.monotonic())
    finally:
        j.close()
    return j.path, offsets


class Started:
    """A broker process on a journal directory: ``address`` if it started, else
    ``returncode`` and ``stderr``; ``seconds`` it took either way."""

    def __init__(self, directory, *extra: str, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zfalkon", "broker", "--listen", "tcp://127.0.0.1:0",
             "--journal", str(directory), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        started = time.monotonic()
        self.address = None
        self.returncode = None
        self.stderr = ""
        deadline = started + timeout
        import select
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(READY_PREFIX):
                    self.address = line[len(READY_PREFIX):].strip()
                    break
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                self.stderr = self.proc.stderr.read()
                break
        self.seconds = time.monotonic() - started

    def stop(self) -> None:
        stop_process(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> "Started":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def task(n: int) -> bytes:
    return payload.shell_task(f"echo {n}")


def legit_records() -> list:
    return [[5, KEY, ""], [1, [tid(KEY, 1), tid(KEY, 2)], [task(1), task(2)]],
            [5, VICTIM, ""], [1, [tid(VICTIM, 1)], [task(91)]]]


# -- crash shapes ------------------------------------------------------------------------


def test_zero_filled_tail_after_a_crash_is_cut_and_every_valid_record_kept(tmp_path):
    """A machine crash can leave the file extended with zeros (metadata written, data
    not): the broker cuts the zeros and replays every record before them."""
    directory = tmp_path / "j"
    path, _ = write_journal(directory, legit_records())
    valid = os.path.getsize(path)
    original = open(path, "rb").read()
    with open(path, "ab") as f:
        f.write(b"\0" * 65536)
    with Started(directory) as b:
        assert b.address, b.stderr
        assert query_status(b.address)["queued"] == 3
    assert open(path, "rb").read()[:valid] == original  # valid records never cut


def test_bad_header_is_refused_by_the_process_and_the_file_is_untouched(tmp_path):
    directory = tmp_path / "j"
    path, _ = write_journal(directory, legit_records())
    with open(path, "r+b") as f:
        f.write(b"\x00")
    before = open(path, "rb").read()
    with Started(directory) as b:
        assert b.address is None and b.returncode not in (None, 0)
        assert "--journal-repair" in b.stderr
    assert open(path, "rb").read() == before


def test_a_flipped_byte_mid_file_is_refused_and_the_file_is_untouched(tmp_path):
    directory = tmp_path / "j"
    path, offsets = write_journal(directory, legit_records())
    with open(path, "r+b") as f:
        f.seek(offsets[1] + 20)
        byte = f.read(1)
        f.seek(offsets[1] + 20)
        f.write(bytes([byte[0] ^ 0x55]))
    before = open(path, "rb").read()
    with Started(directory) as b:
        assert b.address is None and b.returncode not in (None, 0)
        assert f"byte {offsets[1]}" in b.stderr
    assert open(path, "rb").read() == before


def test_two_brokers_started_together_on_one_directory_one_wins(tmp_path):
    directory = tmp_path / "j"
    write_journal(directory, legit_records())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "zfalkon", "broker", "--listen", "tcp://127.0.0.1:0",
         "--journal", str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=child_env()) for _ in range(2)]
    try:
        wait_until(lambda: any(p.poll() is not None for p in procs), 30,
                   message="one broker refused")
        loser = [p for p in procs if p.poll() is not None]
        winner = [p for p in procs if p.poll() is None]
        assert len(loser) == 1 and len(winner) == 1
        assert loser[0].returncode != 0
        assert "in use by another broker" in loser[0].stderr.read()
        assert open(directory / "lock").read().strip() == str(winner[0].pid)
        line = winner[0].stdout.readline()
        assert line.startswith(READY_PREFIX)
        assert query_status(line[len(READY_PREFIX):].strip())["queued"] == 3
    finally:
        for p in procs:
            stop_process(p)
            p.stdout.close()
            p.stderr.close()


def test_a_journal_path_that_cannot_be_opened_refuses_to_start(tmp_path):
    """(The tests run as root: a mode-0500 directory would not stop us; a journal.log that
    is a directory does.)"""
    directory = tmp_path / "j"
    os.makedirs(directory / "journal.log", mode=0o700)
    with Started(directory) as b:
        assert b.address is None and b.returncode not in (None, 0)
        assert "cannot open the journal" in b.stderr


# -- a client's data that looks like journal frames -------------------------------------


def forged_frame() -> bytes:
    """Whole frames a client can craft of a SUBMIT of a task under the VICTIM's key: as
    version 1 frames it, and as version 2 does under a secret of the client's own."""
    record = [1, [tid(VICTIM, 666)], [payload.shell_task("echo forged > /tmp/pwned")]]
    return v1_frame(record) + v2_frame(record, os.urandom(16))


def torn_record_with_embedded_frame(directory) -> tuple[str, int]:
    """Legit records, then the attacker's SUBMIT whose blob embeds a valid frame, cut
    short after the embedded frame (the machine crashed mid-write)."""
    evil_blob = b"x" * 100 + forged_frame() + b"y" * 4096
    records = legit_records() + [[1, [tid(KEY, 3)], [evil_blob]]]
    path, offsets = write_journal(directory, records)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2048)  # the tail of the last record is lost
    return path, offsets[-1]


def test_a_torn_record_whose_blob_embeds_a_frame_is_still_a_torn_tail(tmp_path):
    directory = tmp_path / "j"
    path, last = torn_record_with_embedded_frame(directory)
    with Started(directory) as b:
        assert b.address, f"refused to start: {b.stderr[-400:]}"
        assert query_status(b.address)["queued"] == 3
    assert os.path.getsize(path) == last


def test_journal_repair_does_not_replay_frames_embedded_in_a_clients_blob(tmp_path):
    directory = tmp_path / "j"
    path, _ = torn_record_with_embedded_frame(directory)
    with Started(directory, "--journal-repair") as b:
        assert b.address, b.stderr
        queued = query_status(b.address)["queued"]
    got = Journal(str(directory))
    try:
        tasks = got.replay().tasks
    finally:
        got.close()
    assert tid(VICTIM, 666) not in tasks
    assert queued == 3


def fake_headers(mark: bytes, size: int) -> bytes:
    """``size`` bytes of back-to-back frame headers starting with ``mark``, each claiming
    a 1 MiB payload (with a wrong checksum)."""
    header = mark + struct.pack("<II", 1 << 20, 0)
    return header * (size // len(header))


def test_a_torn_tail_full_of_fake_frame_headers_starts_quickly(tmp_path):
    directory = tmp_path / "j"
    evil_blob = fake_headers(V1_MARK, 3 << 19) + fake_headers(os.urandom(8), 3 << 19)
    records = legit_records() + [[1, [tid(KEY, 3)], [evil_blob]]]
    path, offsets = write_journal(directory, records)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)  # torn in its last bytes
    with Started(directory, timeout=20) as b:
        print(f"\nADVERSARY torn tail with 3 MiB of fake frame headers: broker "
              f"{'started' if b.address else 'not started'} after {b.seconds:.1f} s")
        assert b.address, "not started within 20 s"
        assert b.seconds < 10
        assert query_status(b.address)["queued"] == 3
    assert os.path.getsize(path) == offsets[-1]


# -- the secret itself: damaged, or guessed; the resync bound -----------------------------


def secret_of(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_SIZE)[16:32]


def replay(directory, **kw):
    """What a broker starting on ``directory`` replays (the journal closed again)."""
    j = Journal(str(directory), **kw)
    try:
        return j.replay()
    finally:
        j.close()


def test_a_damaged_secret_is_a_bad_header_refused_never_cut(tmp_path):
    """No frame checks out under a damaged secret: taking the first one for a torn tail
    would cut every record. The header's own checksum makes it a bad header instead;
    and --journal-repair, which can verify no record, refuses to replace the file."""
    directory = tmp_path / "j"
    path, _ = write_journal(directory, legit_records())
    with open(path, "r+b") as f:
        f.seek(20)  # inside the secret
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0x01]))
    before = open(path, "rb").read()
    with pytest.raises(ConfigError, match=r"damaged at byte 0: a header that fails its "
                                          r"checksum.*--journal-repair"):
        replay(directory)
    with pytest.raises(ConfigError, match="no record it can verify.*changed nothing"):
        replay(directory, repair=True)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(directory)) == ["journal.log", "lock"]


def test_each_journal_file_has_its_own_secret(tmp_path):
    """Fresh from os.urandom for every file: new journals, compactions, conversions."""
    a, _ = write_journal(tmp_path / "a", legit_records())
    b, _ = write_journal(tmp_path / "b", legit_records())
    assert secret_of(a) != secret_of(b)
    j = Journal(str(tmp_path / "a"))
    try:
        got = j.replay()
        j.compact([(list(got.tasks), list(got.tasks.values()))], [], got.owners)
    finally:
        j.close()
    assert secret_of(a) not in (secret_of(b), b"")
    with Started(tmp_path / "a") as started:
        assert started.address and query_status(started.address)["queued"] == 3


def test_a_frame_under_a_guessed_secret_after_damage_is_not_kept_by_repair(tmp_path):
    """Damage in the middle, then a whole frame under a secret that is not the file's
    (what a client can craft at best): repair keeps the file's records, not that one."""
    directory = tmp_path / "j"
    path, offsets = write_journal(directory, legit_records())
    forged = [1, [tid(VICTIM, 666)], [b"forged"]]
    with open(path, "r+b") as f:
        f.seek(offsets[1] + 20)
        f.write(b"\xff\xfe")
        f.seek(0, os.SEEK_END)
        f.write(v2_frame(forged, os.urandom(16)) + v1_frame(forged))
    with pytest.raises(ConfigError, match=f"damaged at byte {offsets[1]}"):
        replay(directory)
    got = replay(directory, repair=True)
    assert list(got.tasks) == [tid(VICTIM, 1)] and got.owners == {KEY: "", VICTIM: ""}


def test_the_scan_after_a_bad_frame_is_linear_even_for_the_files_own_mark(tmp_path):
    """Damage can leave the file's own mark before claimed lengths it never wrote (a
    client cannot: it does not know the mark). 3 MiB of such headers, each claiming 1 MiB,
    after a torn record: each byte is checksummed once at most (a candidate with another
    mark inside its claimed span is not checked), so the tail is cut at once."""
    directory = tmp_path / "j"
    path, offsets = write_journal(directory, legit_records())
    whole = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(fake_headers(secret_of(path)[:8], 3 << 20))
    started = time.monotonic()
    got = replay(directory)
    seconds = time.monotonic() - started
    print(f"\nADVERSARY 3 MiB of fake headers with the file's own mark: replayed in "
          f"{seconds:.2f} s")
    assert len(got.tasks) == 3 and os.path.getsize(path) == whole
    assert seconds < 5  # (minutes if every candidate were checksummed over 1 MiB)


# -- version 1 journals (before the secret): read and rewritten, or refused --------------


def write_v1_journal(directory, records: list, tail: bytes = b"") -> tuple[str, list[int]]:
    """A version-1 journal of these records (then ``tail``), as zfalkon wrote before
    format version 2; return its path and each record's offset."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, "journal.log")
    data, offsets = bytearray(V1_HEADER), []
    for record in records:
        offsets.append(len(data))
        data += v1_frame(record)
    with open(path, "wb") as f:
        f.write(data + tail)
    os.chmod(path, 0o600)
    return path, offsets


def test_a_version_1_journal_is_replayed_and_rewritten_as_version_2(tmp_path, caplog):
    directory = tmp_path / "j"
    path, _ = write_v1_journal(directory, legit_records())
    torn = v1_frame([1, [tid(KEY, 3)], [b"z" * 500]])[:300]  # and a torn tail
    with open(path, "ab") as f:
        f.write(torn)
    j = Journal(str(directory))
    try:
        got = j.replay()
        assert got.records == 4 and len(got.tasks) == 3
        assert got.owners == {KEY: "", VICTIM: ""}
        j.submit([tid(KEY, 4)], [b"after"])  # appends are version 2
        j.flush(time.monotonic())
    finally:
        j.close()
    assert "cutting off" in caplog.text and "rewritten as version 2" in caplog.text
    data = open(path, "rb").read()
    assert data[12:16] == struct.pack("<I", 2) and data[HEADER_SIZE:HEADER_SIZE + 8] == (
        secret_of(path)[:8])
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with Started(directory) as b:
        assert b.address, b.stderr
        assert query_status(b.address)["queued"] == 4


def test_a_torn_version_1_record_embedding_a_frame_is_refused_and_repair_drops_it(tmp_path):
    """Version 1 cannot tell a client's frame from a record: a v1 tail with a frame after
    the bad one is refused (never cut), with the reason; --journal-repair keeps the
    records before the damage and nothing after it (all of it stays in the kept file)."""
    directory = tmp_path / "j"
    evil = v1_frame([1, [tid(KEY, 3)], [b"x" * 100 + forged_frame() + b"y" * 4096]])
    path, offsets = write_v1_journal(directory, legit_records(), evil[:-2048])
    before = open(path, "rb").read()
    with Started(directory) as b:
        assert b.address is None and b.returncode not in (None, 0)
        assert "version-1 journal" in b.stderr and "--journal-repair" in b.stderr
    assert open(path, "rb").read() == before
    with Started(directory, "--journal-repair") as b:
        assert b.address, b.stderr
        assert query_status(b.address)["queued"] == 3
    aside = [n for n in os.listdir(directory) if n.startswith("journal.log.corrupt-")]
    assert len(aside) == 1 and open(directory / aside[0], "rb").read() == before
    assert tid(VICTIM, 666) not in replay(directory).tasks


def test_a_torn_version_1_tail_full_of_fake_headers_is_decided_quickly(tmp_path):
    """The linear scan holds in version 1 too (where a client can write the mark): a
    fake header with another mark inside its claimed span counts as a possible frame, so
    the tail is refused at once (not cut: it cannot be told from damage)."""
    directory = tmp_path / "j"
    evil = v1_frame([1, [tid(KEY, 3)], [fake_headers(V1_MARK, 3 << 20)]])
    path, _ = write_v1_journal(directory, legit_records(), evil[:-5])
    before = open(path, "rb").read()
    started = time.monotonic()
    with pytest.raises(ConfigError, match="version-1 journal"):
        replay(directory)
    assert time.monotonic() - started < 5
    assert open(path, "rb").read() == before


def test_a_journal_of_a_later_version_is_refused(tmp_path):
    directory = tmp_path / "j"
    path, _ = write_journal(directory, legit_records())
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(struct.pack("<I", 3))
    before = open(path, "rb").read()
    with pytest.raises(ConfigError, match="format version 3; this zfalkon reads versions "
                                          "1 and 2. Use a matching zfalkon"):
        replay(directory, repair=True)
    assert open(path, "rb").read() == before
