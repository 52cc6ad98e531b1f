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
from zfalkon.journal import Journal

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
