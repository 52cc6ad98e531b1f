"""zfalkon.journal: the log itself, and real brokers killed with -9 and restarted on it."""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib

import msgpack
import pytest
import zmq

import tasks
from conftest import (
    Raw,
    broker_process,
    child_env,
    read_ready_line,
    start_broker,
    stop_process,
    submit_markers,
    wait_until,
    worker_env,
    worker_process,
)
from zfalkon import Executor, LocalCluster, payload, query_status
from zfalkon import protocol as P
from zfalkon.errors import ConfigError
from zfalkon.journal import FRAME_SIZE, HEADER_SIZE, Journal, Replayed

KEY = 5
BASE = KEY << P.ID_SHIFT


def ids(*seqs: int) -> list[int]:
    return [BASE + s for s in seqs]


def blobs(n: int) -> list[bytes]:
    return [b"task-%d" % i for i in range(n)]


def secret_of(path) -> bytes:
    """The secret in a journal's header (docs/protocol.md, section 10)."""
    with open(path, "rb") as f:
        return f.read(HEADER_SIZE)[16:32]


def frame(record, secret: bytes) -> bytes:
    """One record as the journal with this secret frames it (docs/protocol.md, section
    10): the secret's first 8 bytes, the length, crc32(secret + payload), the payload."""
    data = msgpack.packb(record)
    return secret[:8] + struct.pack("<II", len(data), zlib.crc32(secret + data)) + data


def replayed(directory, **kw) -> Replayed:
    """What a broker starting on ``directory`` replays (the journal closed again)."""
    j = Journal(str(directory), **kw)
    try:
        return j.replay()
    finally:
        j.close()


# -- the log ---------------------------------------------------------------------------


def test_replay_keeps_unfinished_tasks_in_order_and_held_results(tmp_path):
    j = Journal(str(tmp_path))
    j.submit(ids(1, 2, 3, 4), blobs(4))
    j.submit(ids(5), [b"five"])
    j.done(ids(2))
    j.held(ids(3), [b"result-3"])
    j.submit(ids(1), [b"again"])  # a resubmission changes nothing
    j.flush(time.monotonic())
    j.close()
    got = replayed(tmp_path)
    assert list(got.tasks.items()) == [(BASE + 1, b"task-0"), (BASE + 4, b"task-3"),
                                       (BASE + 5, b"five")]
    assert got.held == {BASE + 3: b"result-3"}
    assert got.records == 5


def test_gone_client_forgets_its_tasks_and_results_only(tmp_path):
    other = (KEY + 1) << P.ID_SHIFT
    j = Journal(str(tmp_path))
    j.submit(ids(1, 2) + [other + 1], blobs(3))
    j.held(ids(2), [b"r"])
    j.gone(KEY)
    j.flush(time.monotonic())
    got = j.replay()
    assert list(got.tasks) == [other + 1] and got.held == {}


def test_nothing_is_written_before_flush_and_everything_after(tmp_path):
    j = Journal(str(tmp_path), fsync="never")
    j.submit(ids(1), [b"x"])
    assert os.path.getsize(j.path) == HEADER_SIZE  # a new file holds just its header
    j.flush(time.monotonic())
    assert os.path.getsize(j.path) == j.size > 0
    assert j.syncs == 0


@pytest.mark.parametrize("policy,syncs", [("always", 3), ("interval", 1), ("never", 0)])
def test_fsync_policy(tmp_path, policy, syncs):
    j = Journal(str(tmp_path), fsync=policy)
    now = time.monotonic() + 10
    for _ in range(3):  # three passes within one second
        j.submit(ids(1), [b"x"])
        j.flush(now)
    assert j.writes == 3 and j.syncs == syncs


def test_a_torn_last_record_is_cut_off(tmp_path):
    j = Journal(str(tmp_path))
    j.submit(ids(1, 2), blobs(2))
    j.flush(time.monotonic())
    j.close()
    whole = os.path.getsize(j.path)
    record = frame((1, ids(3), [b"y" * 100]), secret_of(j.path))
    with open(j.path, "ab") as f:
        f.write(record[: len(record) // 2])  # a machine crash in the middle of a write
    j2 = Journal(str(tmp_path))
    got = j2.replay()
    assert list(got.tasks) == ids(1, 2)
    assert os.path.getsize(j.path) == whole  # cut back to the last whole record
    j2.submit(ids(4), [b"z"])  # and appending works after the cut
    j2.flush(time.monotonic())
    j2.close()
    assert list(replayed(tmp_path).tasks) == ids(1, 2, 4)


def test_a_whole_record_this_version_cannot_read_is_refused_even_last(tmp_path):
    j = Journal(str(tmp_path))
    j.submit(ids(1), [b"x"])
    j.flush(time.monotonic())
    j.close()
    with open(j.path, "ab") as f:
        f.write(frame((99, [1]), secret_of(j.path)))  # a kind no version writes (checksum fine)
    before = open(j.path, "rb").read()
    with pytest.raises(ConfigError, match=r"cannot read.*--journal-repair"):
        replayed(tmp_path)
    assert open(j.path, "rb").read() == before


def test_compaction_keeps_only_what_is_live(tmp_path):
    j = Journal(str(tmp_path), compact_bytes=1000)
    for i in range(50):
        j.submit(ids(i), [b"x" * 100])
        j.done(ids(i))
    j.submit(ids(100), [b"live"])
    j.flush(time.monotonic())
    assert j.wants_compaction()
    j.compact([(ids(100), [b"live"])], [(ids(7), [b"held"])])
    assert j.size - HEADER_SIZE < 100 and not j.wants_compaction()
    j.submit(ids(101), [b"new"])  # appends go to the compacted file
    j.flush(time.monotonic())
    j.close()
    got = replayed(tmp_path)
    assert got.tasks == {BASE + 100: b"live", BASE + 101: b"new"}
    assert got.held == {BASE + 7: b"held"}


def test_compaction_with_nothing_live_keeps_only_key_owners(tmp_path):
    j = Journal(str(tmp_path))
    j.key(KEY, "client:alice")
    j.submit(ids(1), [b"x" * 1000])
    j.done(ids(1))
    j.flush(time.monotonic())
    assert j.grown
    j.compact((), (), {KEY: "client:alice"})
    assert not j.grown and 0 < j.size - HEADER_SIZE < 50
    j.close()
    got = replayed(tmp_path)
    assert got.tasks == {} and got.owners == {KEY: "client:alice"}
    j = Journal(str(tmp_path))
    j.compact((), (), {})
    assert j.size == HEADER_SIZE == os.path.getsize(j.path)
    j.close()


def test_gone_forgets_the_key_owner_and_key_records_survive_compaction(tmp_path):
    j = Journal(str(tmp_path), compact_bytes=0)
    j.key(KEY, "client:a")
    j.key(KEY + 1, "client:b")
    j.gone(KEY)
    j.flush(time.monotonic())
    got = j.replay()
    assert got.owners == {KEY + 1: "client:b"}
    j.compact([(ids(1), [b"t"])], [], got.owners)
    j.close()
    assert replayed(tmp_path).owners == {KEY + 1: "client:b"}


def test_bad_policy_and_unusable_directory_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--fsync"):
        Journal(str(tmp_path), fsync="sometimes")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot open the journal"):
        Journal(str(blocker / "sub"))


# -- damage: torn tails are cut, anything else refused (or repaired) --------------------


def three_records(tmp_path) -> tuple[str, list[int]]:
    """A closed journal of three SUBMIT records; return its path and each record's offset."""
    j = Journal(str(tmp_path))
    for i in (1, 2, 3):
        j.submit(ids(i), [b"blob-%d" % i * 20])
    j.flush(time.monotonic())
    j.close()
    data = open(j.path, "rb").read()
    offsets, pos = [], HEADER_SIZE
    while pos < len(data):
        offsets.append(pos)
        pos += FRAME_SIZE + struct.unpack_from("<I", data, pos + 8)[0]
    assert len(offsets) == 3 and pos == len(data)
    return j.path, offsets


def flip(path: str, offset: int) -> bytes:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return open(path, "rb").read()


@pytest.mark.parametrize("where", ["header", "first record", "middle record"])
def test_damage_before_valid_records_refuses_to_start_and_changes_nothing(tmp_path, where):
    path, offsets = three_records(tmp_path)
    bad = {"header": 0, "first record": offsets[0], "middle record": offsets[1]}[where]
    damaged = flip(path, bad + (0 if where == "header" else 20))  # (20: in the msgpack)
    with pytest.raises(ConfigError) as err:
        replayed(tmp_path)
    text = str(err.value)
    assert path in text and f"byte {bad}" in text and "--journal-repair" in text
    assert open(path, "rb").read() == damaged  # not truncated, not rewritten
    assert sorted(os.listdir(tmp_path)) == ["journal.log", "lock"]  # nothing set aside


def test_a_damaged_last_record_is_a_torn_tail_and_cut_with_a_warning(tmp_path, caplog):
    path, offsets = three_records(tmp_path)
    flip(path, offsets[2] + 20)  # the last record fails its checksum: nothing valid after
    got = replayed(tmp_path)
    assert list(got.tasks) == ids(1, 2)
    assert os.path.getsize(path) == offsets[2]
    assert f"at byte {offsets[2]}" in caplog.text and "cutting off" in caplog.text


@pytest.mark.parametrize("where", ["header", "middle record"])
def test_repair_keeps_every_valid_record_and_the_damaged_file(tmp_path, caplog, where):
    path, offsets = three_records(tmp_path)
    damaged = flip(path, 3 if where == "header" else offsets[1] + 20)
    got = replayed(tmp_path, repair=True)
    assert list(got.tasks) == (ids(1, 2, 3) if where == "header" else ids(1, 3))
    aside = [n for n in os.listdir(tmp_path) if n.startswith("journal.log.corrupt-")]
    assert len(aside) == 1 and open(tmp_path / aside[0], "rb").read() == damaged
    assert "repaired" in caplog.text and "skipped" in caplog.text
    assert list(replayed(tmp_path).tasks) == list(got.tasks)  # a sound journal now


def test_an_unframed_journal_of_an_older_version_is_refused_then_converted(tmp_path):
    old = msgpack.packb((5, KEY, "client:a")) + msgpack.packb((1, ids(1, 2), blobs(2)))
    (tmp_path / "journal.log").write_bytes(old)
    with pytest.raises(ConfigError, match="unframed journal written by an older zfalkon"):
        replayed(tmp_path)
    assert (tmp_path / "journal.log").read_bytes() == old
    got = replayed(tmp_path, repair=True)
    assert list(got.tasks) == ids(1, 2) and got.owners == {KEY: "client:a"}


def test_a_header_cut_short_by_a_crash_while_creating_is_written_again(tmp_path):
    j = Journal(str(tmp_path))
    j.close()
    header = open(j.path, "rb").read()
    for cut in (5, 20, HEADER_SIZE - 1):
        with open(j.path, "wb") as f:
            f.write(header[:cut])
        assert replayed(tmp_path).records == 0
        fresh = open(j.path, "rb").read()
        assert len(fresh) == HEADER_SIZE and fresh[:16] == header[:16]
        assert secret_of(j.path) != header[16:32]  # a new secret


def test_records_before_replay_on_an_existing_journal_are_refused(tmp_path):
    """An existing log's format is known once it is replayed (a version-1 log is then
    rewritten): frames written before that could be another format's."""
    j = Journal(str(tmp_path))
    j.close()
    (tmp_path / "journal.log").write_bytes(b"\x89zfjournal\r\n\x01\x00\x00\x00")  # v1
    j = Journal(str(tmp_path))
    try:
        j.submit(ids(1), [b"x"])
        with pytest.raises(RuntimeError, match="replay"):
            j.flush(time.monotonic())
        j._buffer.clear()
    finally:
        j.close()


# -- ownership: one broker per directory, private files ----------------------------------


def test_a_second_journal_on_the_directory_is_refused_naming_the_holder(tmp_path):
    first = Journal(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by another broker "
                                              rf"\(pid {os.getpid()}\)"):
            Journal(str(tmp_path))
    finally:
        first.close()
    Journal(str(tmp_path)).close()  # free again once the first is closed


def test_files_are_0600_in_a_0700_directory_whatever_the_umask(tmp_path, caplog):
    loose = tmp_path / "loose"
    old = os.umask(0)
    try:
        loose.mkdir(0o755)
        (loose / "journal.log").write_bytes(b"")
        os.chmod(loose / "journal.log", 0o644)
        j = Journal(str(loose))
        j.compact([(ids(1), [b"x"])], [])
        j.close()
        fresh = Journal(str(tmp_path / "fresh" / "j"))
        fresh.close()
    finally:
        os.umask(old)
    for d in (loose, tmp_path / "fresh" / "j"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        for name in os.listdir(d):
            assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    assert "was mode 0755" in caplog.text and "was mode 0644" in caplog.text


# -- disk errors: nothing lost, nothing twice -------------------------------------------


class FullDisk:
    """os.write in zfalkon.journal: takes ``room`` more bytes, then fails with ENOSPC."""

    def __init__(self, monkeypatch, room: int) -> None:
        self.room = room
        self._write = os.write
        monkeypatch.setattr("zfalkon.journal.os.write", self.write)

    def write(self, fd: int, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), self.room)
        self.room -= n
        return self._write(fd, bytes(data[:n]))


def test_a_full_disk_keeps_the_backlog_and_writes_it_once_when_space_returns(
        tmp_path, monkeypatch, caplog):
    j = Journal(str(tmp_path))
    disk = FullDisk(monkeypatch, room=50)  # the first record is cut short on disk
    j.submit(ids(1), [b"a" * 100])
    j.flush(1.0)
    assert j.failure and "No space left" in j.failure and j.backlog > 0
    j.submit(ids(2), [b"b" * 100])  # later passes keep recording, in memory
    j.flush(2.0)
    assert not j.retry(3.0) and j.failure
    assert caplog.text.count("JOURNAL UNAVAILABLE") == 1  # once per state change
    disk.room = 10 ** 6
    assert j.retry(4.0) and j.failure is None and j.backlog == 0
    assert "writable again" in caplog.text
    j.close()
    got = replayed(tmp_path)
    assert got.tasks == {BASE + 1: b"a" * 100, BASE + 2: b"b" * 100} and got.records == 2


def test_a_backlog_past_its_bound_is_mended_by_a_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr("zfalkon.journal.MAX_BACKLOG_BYTES", 1000)
    j = Journal(str(tmp_path))
    disk = FullDisk(monkeypatch, room=0)
    for i in range(20):
        j.submit(ids(i), [b"x" * 100])
        j.flush(float(i))
    assert j.needs_snapshot and j.backlog < 1000
    disk.room = 10 ** 6
    assert not j.retry(30.0)  # appending cannot mend it: records were dropped
    assert j.compact([(ids(*range(20)), [b"x" * 100] * 20)], [], {}, 31.0)
    assert j.failure is None and not j.needs_snapshot
    j.close()
    assert list(replayed(tmp_path).tasks) == ids(*range(20))


def test_the_core_refuses_submits_while_told_and_takes_the_resent_frame_after():
    from zfalkon.core import BrokerCore

    core = BrokerCore(0.0)
    key = 0
    core.message(b"c", P.hello(P.ROLE_CLIENT, {"name": "c"}), None, 0.0)
    key = core.outbox[-1][1].key
    tid = key << P.ID_SHIFT | 1
    core.outbox.clear()
    core.submits_refused = "the journal is full"
    for t in (1.0, 1.5):  # the client's frame, then the same frame sent again
        core.message(b"c", P.Submit(1, 0, [tid], [b"t"]), None, t)
    errors = [m for _, m in core.outbox if isinstance(m, P.Error)]
    assert [(e.code, e.message) for e in errors] == [("journal-unavailable",
                                                      "the journal is full")]  # once a while
    assert "journal-unavailable" in P.ERROR_CODES
    assert core.clients[key].rx.last == 0 and core.submitted == 0 and not core.live
    core.submits_refused = None
    core.message(b"c", P.Submit(1, 0, [tid], [b"t"]), None, 2.0)
    assert core.clients[key].rx.last == 1 and core.submitted == 1 and core.live == {tid}


# -- real brokers, killed and restarted -------------------------------------------------


def kill9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()


def collect(conn: Raw, want: set[int],
            timeout: float) -> tuple[dict[int, int], bool, tuple[int, bytes]]:
    """Read DELIVERs until every id in ``want`` came; return counts, whether a WELCOME
    came too, and the last DELIVER's seq and token (what the client acknowledges)."""
    seen: dict[int, int] = {}
    welcomed = False
    last = 0
    token = b""
    deadline = time.monotonic() + timeout
    while not (welcomed and want <= set(seen)) and time.monotonic() < deadline:
        if not conn.sock.poll(200):
            continue
        msg = P.decode(conn.sock.recv())
        if isinstance(msg, P.Deliver):
            assert msg.seq == last + 1  # the new session's stream, in order
            last, token = msg.seq, msg.token
            for tid, blob in zip(msg.ids, msg.blobs):
                assert payload.unpack(blob)[0] == 2  # a shell result
                seen[tid] = seen.get(tid, 0) + 1
        welcomed |= isinstance(msg, P.Welcome)
    return seen, welcomed, (last, token)


def test_acknowledged_tasks_survive_kill_9_without_any_resubmission(tmp_path):
    """The client submits and never resubmits: the journal alone brings the tasks back,
    runs them while the client is away, holds the results across another kill -9, and
    delivers them when the client returns with its key."""
    journal, marker = str(tmp_path / "journal"), tmp_path / "ran.txt"
    ctx = zmq.Context()
    broker, address = start_broker("tcp://127.0.0.1:0", "--journal", journal)
    try:
        conn = Raw(ctx, address)
        want = submit_markers(conn, marker, 20)
        key = P.client_key(want[0])
        wait_until(lambda: query_status(address)["submitted"] == 20, 10, message="accepted")
        conn.close()  # gone without BYE: away, not gone
        kill9(broker)
        broker, again = start_broker(address, "--journal", journal)
        assert again == address
        status = query_status(address)
        assert status["queued"] == 20 and status["away_clients"] == 1
        with worker_process(address, "--slots", "2"):
            wait_until(lambda: query_status(address)["unacknowledged_results"] == 20, 30,
                       message="results held for the absent client")
        kill9(broker)  # the held results are in the journal too
        broker, _ = start_broker(address, "--journal", journal)
        status = query_status(address)
        assert status["unacknowledged_results"] == 20 and status["away_clients"] == 1
        back = Raw(ctx, address)
        back.send_msg(P.hello(P.ROLE_CLIENT, {"name": "back", "key": key}))
        seen, welcomed, last = collect(back, set(want), 10)
        assert welcomed and seen == dict.fromkeys(want, 1)
        assert sorted(map(int, marker.read_text().split())) == want  # each ran once
        # Results stay the broker's until the client acknowledges them.
        assert query_status(address)["unacknowledged_results"] == 20
        back.send_msg(P.Ack(*last))
        wait_until(lambda: query_status(address)["unacknowledged_results"] == 0, 5,
                   message="results acknowledged")
        back.close()
        # Everything is delivered: the journal shrinks to the key owner at the next tick.
        wait_until(lambda: query_status(address)["journal"]["bytes"] < HEADER_SIZE + 50, 5,
                   message="journal compacted")
    finally:
        stop_process(broker)
        ctx.destroy(linger=0)


def test_a_client_that_said_bye_is_forgotten_across_restarts(tmp_path):
    journal, marker = str(tmp_path / "journal"), tmp_path / "ran.txt"
    ctx = zmq.Context()
    broker, address = start_broker("tcp://127.0.0.1:0", "--journal", journal)
    try:
        conn = Raw(ctx, address)
        submit_markers(conn, marker)
        conn.send_msg(P.Bye("done"))
        wait_until(lambda: query_status(address)["clients"] == 0, 5, message="client left")
        kill9(broker)
        broker, _ = start_broker(address, "--journal", journal)
        assert query_status(address)["queued"] == 0
        conn.close()
    finally:
        stop_process(broker)
        ctx.destroy(linger=0)
    assert not marker.exists()


def test_kill_9_mid_run_with_journal_every_result_once_workers_untouched(tmp_path):
    n = 3000
    with LocalCluster(workers=2, env=worker_env(),
                      broker_args=["--journal", str(tmp_path)]) as cluster, \
            Executor(cluster.address) as ex:
        agents = [p.pid for p in cluster.worker_procs]
        results = ex.map(tasks.sleep_then, range(n), [0.001] * n)
        first = [next(results) for _ in range(300)]
        cluster.restart_broker(kill=True)
        rest = list(results)
        assert first + rest == list(range(n))  # each exactly once, in order
        status = cluster.status()
        # The new broker had the tasks from its journal: what the client sent again
        # was recognised, not queued twice.
        assert status["duplicate_submits"] > 0
        assert [p.pid for p in cluster.worker_procs] == agents
        assert all(p.poll() is None for p in cluster.worker_procs)


def test_tasks_finished_while_the_broker_was_away_run_again_after_restart(tmp_path):
    """One slot, 0.6 s tasks: kill -9 the broker while the slot works through the two it
    holds; restart. The slot registers again in a new session and drops what it held (its
    results from the old session are not taken: a result is accepted only from the slot
    holding the task), so the restarted broker runs those two tasks again from its
    journal; the client still gets every result exactly once."""
    runs, ended = tmp_path / "runs.txt", tmp_path / "ended.txt"
    with LocalCluster(workers=1, env=worker_env(),
                      broker_args=["--journal", str(tmp_path / "j")]) as cluster, \
            Executor(cluster.address) as ex:
        futures = [ex.shell(f"echo {i} >> {runs}; sleep 0.6; echo {i} >> {ended}")
                   for i in range(5)]
        wait_until(lambda: runs.exists() and runs.read_text().split() == ["0"], 10,
                   message="first task started")
        cluster.broker.kill()
        wait_until(lambda: runs.read_text().split() == ["0", "1"], 10,
                   message="second (prefetched) task started with the broker down")
        wait_until(lambda: ended.exists() and ended.read_text().split() == ["0", "1"], 10,
                   message="... and finished")
        cluster.restart_broker(kill=True)
        assert [f.result(timeout=30).returncode for f in futures] == [0] * 5
        status = cluster.status()
        assert status["done"] == 5 and status["queued"] == status["running"] == 0
    # 0 and 1 ran before the restart, then every task once more, in order
    assert runs.read_text().split() == ["0", "1"] + [str(i) for i in range(5)]
    assert ended.read_text().split() == ["0", "1"] + [str(i) for i in range(5)]


def test_a_client_away_too_long_is_forgotten(tmp_path):
    """In-process broker (never bound), its core driven with a clock the test passes in:
    an away client's tasks and results go after CLIENT_HOLD_SECONDS, and the journal
    records it."""
    from zfalkon.broker import Broker
    from zfalkon.constants import CLIENT_HOLD_SECONDS

    j = Journal(str(tmp_path))
    j.submit(ids(1, 2), blobs(2))
    j.held(ids(3), [b"r"])
    j.flush(time.monotonic())
    j.close()
    broker = Broker("tcp://127.0.0.1:0", Journal(str(tmp_path)))
    core = broker.core
    try:
        now = time.monotonic()
        assert core.hold_seconds == CLIENT_HOLD_SECONDS  # with a journal
        status = core.status(now)
        assert core.clients.keys() == {KEY} and status["queued"] == 2
        assert status["away_clients"] == 1 and status["unacknowledged_results"] == 1
        core.tick(now + 1)  # not away long enough yet
        status = core.status(now + 1)
        assert status["away_clients"] == 1 and status["unacknowledged_results"] == 1
        assert KEY in core.clients and KEY not in core.gone
        later = now + CLIENT_HOLD_SECONDS + 1
        core.tick(later)
        status = core.status(later)
        assert status["away_clients"] == 0 and status["unacknowledged_results"] == 0
        assert not core.clients and KEY in core.gone
        # Its queued tasks are skipped: a slot asking for work gets none of them.
        core.message(b"worker", P.hello(P.ROLE_WORKER, {"worker_id": "w1", "slots": 1,
                                                        "name": "w1"}), None, later)
        core.message(b"slot", P.hello(P.ROLE_SLOT, {"worker_id": "w1", "slot": 0}), None,
                     later)
        core.message(b"slot", P.Results(1, 0, 10, 0, [], []), None, later)
        core.dispatch(later)
        assert not [m for _, m in core.outbox if isinstance(m, P.Tasks)]
        assert core.status(later)["queued"] == 0 and core.running == 0
    finally:
        broker.close()
    got = replayed(tmp_path)
    assert got.tasks == {} and got.held == {}


# -- real brokers: a second one refused, a full disk survived ----------------------------


def test_a_second_broker_on_the_journal_directory_refuses_to_start(tmp_path):
    journal = str(tmp_path / "j")
    with broker_process("--journal", journal) as (first, address):
        second = subprocess.run(
            [sys.executable, "-m", "zfalkon", "broker", "--listen", "tcp://127.0.0.1:0",
             "--journal", journal], capture_output=True, text=True, env=child_env(),
            timeout=60)
        assert second.returncode == 2
        assert f"{journal} is in use by another broker (pid {first.pid})" in second.stderr
        assert query_status(address)["journal"]["unavailable"] is None  # first one unharmed


def test_a_corrupt_journal_stops_the_broker_until_repaired(tmp_path):
    path, offsets = three_records(tmp_path)
    damaged = flip(path, offsets[0] + 20)
    argv = [sys.executable, "-m", "zfalkon", "broker", "--listen", "tcp://127.0.0.1:0",
            "--journal", str(tmp_path)]
    refused = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=60)
    assert refused.returncode == 2
    assert f"{path} is damaged at byte {offsets[0]}" in refused.stderr
    assert "--journal-repair" in refused.stderr and open(path, "rb").read() == damaged
    with broker_process("--journal", str(tmp_path), "--journal-repair") as (_, address):
        assert query_status(address)["queued"] == 2  # records 2 and 3


def test_a_full_disk_refuses_new_tasks_keeps_the_broker_up_and_loses_nothing(
        tmp_path, caplog):
    """The broker runs with RLIMIT_FSIZE low (soft limit; SIGXFSZ ignored: writes past it
    fail with EFBIG, as on a full disk). Tasks fill the journal: the broker stays up and
    refuses further SUBMITs; the Executor warns once and keeps them. The test then raises
    the running broker's limit (prlimit): the backlog is written, the refused frames are
    sent again by the client's stream, and every task runs exactly once."""
    journal, marker = str(tmp_path / "j"), tmp_path / "ran.txt"
    limit = 16 * 1024

    def low_fsize() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    proc = subprocess.Popen(
        [sys.executable, "-m", "zfalkon", "broker", "--listen", "tcp://127.0.0.1:0",
         "--journal", journal], stdout=subprocess.PIPE, text=True, env=child_env(),
        preexec_fn=low_fsize)
    pad = "x" * 3000

    def journal_status() -> dict:
        return query_status(address)["journal"]

    try:
        address = read_ready_line(proc)
        with Executor(address) as ex:
            with caplog.at_level(logging.INFO, logger="zfalkon.client"):
                first = [ex.shell(f"echo {i} >> {marker} # {pad}") for i in range(10)]
                wait_until(lambda: journal_status()["unavailable"], 20,
                           message="journal write failed")
                assert "File too large" in journal_status()["unavailable"]
                accepted = query_status(address)["submitted"]
                later = [ex.shell(f"echo {i} >> {marker} # {pad}") for i in range(10, 20)]
                wait_until(lambda: "refuses new tasks" in caplog.text, 20,
                           message="the client told of the refusal")
                assert proc.poll() is None  # still up
                assert query_status(address)["submitted"] == accepted  # nothing more taken
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                                 (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                wait_until(lambda: journal_status()["unavailable"] is None, 20,
                           message="journal written again")
                wait_until(lambda: query_status(address)["submitted"] == 20, 20,
                           message="the refused tasks sent again and accepted")
                with worker_process(address, "--slots", "2"):
                    assert [f.result(timeout=60).returncode for f in first + later] == [0] * 20
            assert caplog.text.count("refuses new tasks") == 1  # warned once
        status = query_status(address)
        assert status["done"] == 20 and status["duplicate_submits"] == 0
        assert status["journal"]["failures"] == 1 and proc.poll() is None
    finally:
        stop_process(proc)
        proc.stdout.close()
    assert sorted(map(int, marker.read_text().split())) == list(range(20))  # each once
