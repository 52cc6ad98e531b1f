"""zfalkon.journal: the log itself, and real brokers killed with -9 and restarted on it."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest
import zmq

import tasks
from conftest import (
    Raw,
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
from zfalkon.journal import Journal

KEY = 5
BASE = KEY << P.ID_SHIFT


def ids(*seqs: int) -> list[int]:
    return [BASE + s for s in seqs]


def blobs(n: int) -> list[bytes]:
    return [b"task-%d" % i for i in range(n)]


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
    got = Journal(str(tmp_path)).replay()
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
    assert os.path.getsize(j.path) == 0
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
    record = msgpack.packb((1, ids(3), [b"y" * 100]))
    with open(j.path, "ab") as f:
        f.write(record[: len(record) // 2])  # a machine crash in the middle of a write
    j2 = Journal(str(tmp_path))
    got = j2.replay()
    assert list(got.tasks) == ids(1, 2)
    assert os.path.getsize(j.path) == whole  # cut back to the last whole record
    j2.submit(ids(4), [b"z"])  # and appending works after the cut
    j2.flush(time.monotonic())
    assert list(Journal(str(tmp_path)).replay().tasks) == ids(1, 2, 4)


def test_a_corrupt_record_ends_the_replay(tmp_path):
    j = Journal(str(tmp_path))
    j.submit(ids(1), [b"x"])
    j.flush(time.monotonic())
    with open(j.path, "ab") as f:
        f.write(msgpack.packb((99, [1])))  # a record kind no version writes
    assert list(Journal(str(tmp_path)).replay().tasks) == ids(1)


def test_compaction_keeps_only_what_is_live(tmp_path):
    j = Journal(str(tmp_path), compact_bytes=1000)
    for i in range(50):
        j.submit(ids(i), [b"x" * 100])
        j.done(ids(i))
    j.submit(ids(100), [b"live"])
    j.flush(time.monotonic())
    assert j.wants_compaction()
    j.compact([(ids(100), [b"live"])], [(ids(7), [b"held"])])
    assert j.size < 100 and not j.wants_compaction()
    j.submit(ids(101), [b"new"])  # appends go to the compacted file
    j.flush(time.monotonic())
    got = Journal(str(tmp_path)).replay()
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
    assert not j.grown and 0 < j.size < 50
    got = Journal(str(tmp_path)).replay()
    assert got.tasks == {} and got.owners == {KEY: "client:alice"}
    j.compact((), (), {})
    assert j.size == 0 == os.path.getsize(j.path)


def test_gone_forgets_the_key_owner_and_key_records_survive_compaction(tmp_path):
    j = Journal(str(tmp_path), compact_bytes=0)
    j.key(KEY, "client:a")
    j.key(KEY + 1, "client:b")
    j.gone(KEY)
    j.flush(time.monotonic())
    got = j.replay()
    assert got.owners == {KEY + 1: "client:b"}
    j.compact([(ids(1), [b"t"])], [], got.owners)
    assert Journal(str(tmp_path)).replay().owners == {KEY + 1: "client:b"}


def test_bad_policy_and_unusable_directory_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--fsync"):
        Journal(str(tmp_path), fsync="sometimes")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot open the journal"):
        Journal(str(blocker / "sub"))


# -- real brokers, killed and restarted -------------------------------------------------


def kill9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()


def collect(conn: Raw, want: set[int], timeout: float) -> tuple[dict[int, int], bool, int]:
    """Read DELIVERs until every id in ``want`` came; return counts, whether a WELCOME
    came too, and the last DELIVER seq (what the client acknowledges)."""
    seen: dict[int, int] = {}
    welcomed = False
    last = 0
    deadline = time.monotonic() + timeout
    while not (welcomed and want <= set(seen)) and time.monotonic() < deadline:
        if not conn.sock.poll(200):
            continue
        msg = P.decode(conn.sock.recv())
        if isinstance(msg, P.Deliver):
            assert msg.seq == last + 1  # the new session's stream, in order
            last = msg.seq
            for tid, blob in zip(msg.ids, msg.blobs):
                assert payload.unpack(blob)[0] == 2  # a shell result
                seen[tid] = seen.get(tid, 0) + 1
        welcomed |= isinstance(msg, P.Welcome)
    return seen, welcomed, last


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
        back.send_msg(P.Ack(last))
        wait_until(lambda: query_status(address)["unacknowledged_results"] == 0, 5,
                   message="results acknowledged")
        back.close()
        # Everything is delivered: the journal shrinks to the key owner at the next tick.
        wait_until(lambda: query_status(address)["journal"]["bytes"] < 50, 5,
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
        wait_until(lambda: query_status(address)["clients"] == 1, 5, message="client left")
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
    got = Journal(str(tmp_path)).replay()
    assert got.tasks == {} and got.held == {}
