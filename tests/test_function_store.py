"""Functions by digest (issue 13: "a by-value function is sent once per worker"): the
client sends a function's pickle once per session, the broker keeps it under the client's
key (journaled) and sends it once to each slot, the slot once to each task host.

Unit tests drive the real :class:`BrokerCore`, :class:`ClientSession` and
:class:`SlotSession`; end-to-end tests count the bytes that cross real connections (a
LinkProxy between the client and the broker, another between the worker and the broker)
and restart a broker with a journal under tasks by digest. The state machine in
``tests/test_core.py`` checks the same rule under every loss and restart it models: every
task by digest reaches its slot with its function.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

from conftest import broker_process, wait_until, worker_process
from zfalkon import Executor, TaskError, payload
from zfalkon import protocol as P
from zfalkon.clientcore import ClientSession
from zfalkon.core import BrokerCore
from zfalkon.journal import Journal, JournalRecorder
from zfalkon.linkproxy import LinkProxy
from zfalkon.slotcore import SlotSession

MiB = 1024 * 1024


def fn(i: int, size: int = 50) -> payload.Function:
    blob = bytes([i % 256]) * size + i.to_bytes(4, "little")
    return payload.Function(f"f{i}", blob, payload.function_digest(blob))


def worker_slot(core: BrokerCore, w: bytes = b"w", s: bytes = b"s", window: int = 50) -> bytes:
    core.message(w, P.hello(P.ROLE_WORKER, {"worker_id": w.decode(), "slots": 1}), None, 0.0)
    core.message(s, P.hello(P.ROLE_SLOT, {"worker_id": w.decode(), "slot": 0}), None, 0.0)
    core.message(s, P.Results(1, 0, window, 0, [], []), None, 0.0)
    core.outbox.clear()
    return s


def a_client(core: BrokerCore, ident: bytes = b"c") -> ClientSession:
    core.message(ident, P.hello(P.ROLE_CLIENT, {"name": "t"}), None, 0.0)
    welcome = [m for _, m in core.outbox if type(m) is P.Welcome][-1]
    core.outbox.clear()
    session = ClientSession(welcome.key, "t", {}, {}, {})
    return session


def submit(core: BrokerCore, session: ClientSession, ident: bytes, f: payload.Function,
           n: int, first: int = 1) -> list[P.Submit]:
    """``n`` tasks by digest calling ``f``, through the client's session rules."""
    session.functions[f.digest] = f.blob  # type: ignore[index]
    ids = [(session.key << P.ID_SHIFT) + first + i for i in range(n)]
    blobs = [payload.python_task(f, (t,), {}, stored=True) for t in ids]
    session.blobs.update(zip(ids, blobs))  # type: ignore[attr-defined]
    frames = session.submit(ids, blobs)
    for msg in frames:
        core.message(ident, msg, None, 0.0)
    return frames


def tasks_to(core: BrokerCore, ident: bytes) -> list[P.Tasks]:
    out = [m for i, m in core.outbox if i == ident and type(m) is P.Tasks]
    core.outbox.clear()
    return out


def pairs(msg: P.Tasks | P.Submit | list[P.Submit]) -> dict[bytes, bytes]:
    """The functions a frame (or frames) carry, by digest (TASKS: by scoped digest)."""
    frames = msg if isinstance(msg, list) else [msg]
    return {d: f for m in frames for d, f in zip(m.functions[::2], m.functions[1::2])}


def scoped(session: ClientSession, f: payload.Function) -> bytes:
    return payload.scoped_digest(session.key, f.digest)


# -- the wire form ---------------------------------------------------------------------

def test_a_task_by_digest_names_its_function_and_becomes_a_task_by_value_again():
    f = fn(1, 300)
    blob = payload.python_task(f, (1, 2), {"k": 3}, stored=True)
    assert payload.stored_digest(blob) == f.digest
    assert payload.stored_digest(payload.python_task(f, (1, 2), {"k": 3})) is None
    assert payload.stored_digest(payload.python_task("builtins:abs", (1,), {})) is None
    assert payload.with_function(blob, f.blob) == payload.python_task(f, (1, 2), {"k": 3})
    encode = payload.task_encoder(f, 0, stored=True)
    assert encode((1, 2)) == payload.python_task(f, (1, 2), {}, stored=True)


# -- client session ----------------------------------------------------------------------

def test_the_session_carries_a_function_in_the_first_frame_calling_it_and_again_on_resend():
    core = BrokerCore(0.0)
    session = a_client(core)
    f, g = fn(1), fn(2)
    first = submit(core, session, b"c", f, 3)
    # its own frame ahead of the tasks' (pickles beside a full frame would not fit)
    assert [len(m.ids) for m in first] == [0, 3] and first[1].functions == []
    assert pairs(first) == {f.digest: f.blob}
    second = submit(core, session, b"c", f, 2, first=10)
    assert len(second) == 1 and pairs(second) == {}
    session.functions[g.digest] = g.blob  # type: ignore[index]
    third = submit(core, session, b"c", g, 1, first=20)
    assert pairs(third) == {g.digest: g.blob}
    # The broker lacks frames 1-5 (a replaced connection): each goes again as first sent.
    session.out.clear()
    session._resend_after(0)
    resent = [m for m in session.out if type(m) is P.Submit]
    assert [pairs(m) for m in resent] == [{f.digest: f.blob}, {}, {}, {g.digest: g.blob}, {}]
    # Frames made and not sent give their functions to the next ones.
    session.functions[fn(3).digest] = fn(3).blob  # type: ignore[index]
    blob = payload.python_task(fn(3), (1,), {}, stored=True)
    made = session.submit([(session.key << P.ID_SHIFT) + 30], [blob])
    assert pairs(made) == {fn(3).digest: fn(3).blob}
    session.unsubmit(len(made))
    assert pairs(session.submit([(session.key << P.ID_SHIFT) + 30], [blob])) \
        == {fn(3).digest: fn(3).blob}
    # Registering again (the broker may have forgotten us): every function is carried again.
    session.hello(0.0)
    assert fn(1).digest not in session.carried_by


# -- broker core ---------------------------------------------------------------------------

def test_the_broker_sends_a_function_once_per_slot_and_again_with_a_resent_frame():
    core = BrokerCore(0.0)
    s1 = worker_slot(core, b"w1", b"s1", window=3)
    s2 = worker_slot(core, b"w2", b"s2", window=3)
    session = a_client(core)
    f = fn(1)
    submit(core, session, b"c", f, 12)
    core.dispatch(0.0)
    frames = [(i, m) for i, m in core.outbox if type(m) is P.Tasks]
    core.outbox.clear()
    out = {}
    for ident in (s1, s2):
        mine = [m for i, m in frames if i == ident]
        assert mine and pairs(mine[0]) == {scoped(session, f): f.blob}, \
            "each slot gets it with its first"
        out[ident] = mine[0]
    # A slot that missed its first frame gets it again whole, its function included.
    core.message(s1, P.Resend(0), None, 10.0)
    resent = tasks_to(core, s1)
    assert resent and pairs(resent[0]) == {scoped(session, f): f.blob}
    # Both slots finish; their next frames carry no function.
    for ident, frame in out.items():
        core.message(ident, P.Results(2, frame.seq, 3, 0, frame.ids, [b"r"] * len(frame.ids)),
                     None, 0.0)
    core.dispatch(0.0)
    later = [m for _, m in core.outbox if type(m) is P.Tasks and m.ids]
    assert later and all(m.functions == [] for m in later)


def test_a_function_whose_pickle_is_not_its_digest_is_refused_and_its_frame_not_taken():
    core = BrokerCore(0.0)
    worker_slot(core)
    session = a_client(core)
    f = fn(1)
    ids = [(session.key << P.ID_SHIFT) + 1]
    blobs = [payload.python_task(f, (1,), {}, stored=True)]
    core.message(b"c", P.Submit(1, 0, ids, blobs, [], b"", [f.digest, b"not its pickle"]),
                 None, 0.0)
    errors = [m for _, m in core.outbox if type(m) is P.Error]
    assert errors and errors[0].code == "malformed"
    assert not core.live and core.storing == 0
    core.outbox.clear()
    core.message(b"c", P.Submit(1, 0, ids, blobs, [], b"", [f.digest]), None, 0.0)  # odd
    assert [m.code for _, m in core.outbox if type(m) is P.Error] == ["malformed"]
    assert not core.live


def test_a_client_past_its_function_limits_is_told_limit_and_its_frame_waits(monkeypatch):
    monkeypatch.setattr(payload, "MAX_CLIENT_FUNCTIONS", 2)
    core = BrokerCore(0.0)
    session = a_client(core)
    for i in range(2):
        session.functions[fn(i).digest] = fn(i).blob  # type: ignore[index]
        submit(core, session, b"c", fn(i), 1, first=1 + i)
    core.outbox.clear()
    submit(core, session, b"c", fn(5), 1, first=10)
    assert [m.code for _, m in core.outbox if type(m) is P.Error] == ["limit"]
    assert len(core.live) == 2 and len(core.clients[session.key].functions) == 2


def test_a_slot_is_told_to_forget_the_oldest_functions_no_task_it_holds_calls():
    core = BrokerCore(0.0)
    core.max_slot_functions = 2
    slot = worker_slot(core, window=100)
    session = a_client(core)
    for i in range(2):
        submit(core, session, b"c", fn(i), 1, first=1 + i)
        core.dispatch(0.0)
        frame = tasks_to(core, slot)[0]
        core.message(slot, P.Results(2 + i, frame.seq, 100, 0, [], []), None, 0.0)  # (ready)
        assert pairs(frame) == {scoped(session, fn(i)): fn(i).blob} and frame.forget == []
    # A third function: the slot holds tasks calling both it has, so it waits.
    submit(core, session, b"c", fn(2), 1, first=10)
    core.dispatch(0.0)
    assert tasks_to(core, slot) == [] and core.queue.count == 1
    # The slot returns its tasks: the oldest is forgotten, the third goes.
    held = list(core.peers[slot].inflight)  # type: ignore[union-attr]
    core.message(slot, P.Results(4, 2, 100, 0, held, [b"r"] * len(held)), None, 0.0)
    core.dispatch(0.0)
    frame = tasks_to(core, slot)[0]
    assert frame.forget == [scoped(session, fn(0))]
    assert pairs(frame) == {scoped(session, fn(2)): fn(2).blob}
    slot_session = SlotSession()
    slot_session.functions = {scoped(session, fn(i)): b"x" for i in range(2)}
    slot_session.receive(P.Tasks(1, 0, [], [], [], [], [], frame.forget), 0.0)
    assert list(slot_session.functions) == [scoped(session, fn(1))]


def test_a_slot_holds_at_most_its_function_bytes_beyond_one_function():
    core = BrokerCore(0.0)
    core.max_slot_function_bytes = 150
    slot = worker_slot(core, window=100)
    session = a_client(core)
    for i in range(3):
        submit(core, session, b"c", fn(i, 100), 1, first=1 + i)
    core.dispatch(0.0)
    frames = tasks_to(core, slot)
    assert [len(m.ids) for m in frames] == [1] and len(pairs(frames[0])) == 1
    assert core.queue.count == 2  # (put back at the head: they wait for room)
    for n in (2, 3):  # each result makes room for the next function (the old forgotten)
        held = list(core.peers[slot].inflight)  # type: ignore[union-attr]
        core.message(slot, P.Results(n, n - 1, 100, 0, held, [b"r"] * len(held)), None, 0.0)
        core.dispatch(0.0)
        frames = tasks_to(core, slot)
        assert [len(m.ids) for m in frames] == [1] and len(pairs(frames[0])) == 1
        assert len(frames[0].forget) == 1
        assert core.peers[slot].function_bytes <= 150  # type: ignore[union-attr]


def test_a_forgotten_client_takes_its_functions_with_it():
    core = BrokerCore(0.0)
    session = a_client(core)
    submit(core, session, b"c", fn(1), 1)
    assert core.storing == 1
    record = core.clients[session.key]
    core._forget(record)
    assert core.storing == 0 and not record.functions


def test_an_away_client_past_the_away_function_bound_registers_again_and_resends_them():
    core = BrokerCore(0.0)
    core.max_away_function_bytes = 0
    slot = worker_slot(core, window=10)
    session = a_client(core)
    f = fn(1, 500)
    submit(core, session, b"c", f, 1)
    core.dispatch(0.0)
    frame = tasks_to(core, slot)[0]
    core.message(slot, P.Results(2, frame.seq, 10, 0, frame.ids, [b"r"]), None, 0.0)
    core.outbox.clear()
    core.tick(10.0)  # silent: away, nothing queued or running: its functions go
    assert core.storing == 0 and core.function_bytes == 0
    assert session.key in core.clients  # (its result is still held for it)
    # Back: its next frame is refused (hello-required), it registers again with its key,
    # gets its result, and its next tasks carry the function again.
    submit(core, session, b"c", f, 1, first=5)
    answers = [m for _, m in core.outbox]
    core.outbox.clear()
    for m in answers:
        session.receive(m, 10.0)
    for m in session.out:
        core.message(b"c", m, None, 10.0)
    session.out.clear()
    answers = [m for _, m in core.outbox]
    core.outbox.clear()
    assert any(type(m) is P.Welcome for m in answers)
    delivered = [m for m in answers if type(m) is P.Deliver]
    assert delivered and delivered[0].ids == frame.ids
    for m in answers:
        session.receive(m, 10.0)
    for m in session.out:  # (the pending task resubmitted, its function carried again)
        core.message(b"c", m, None, 10.0)
    assert core.clients[session.key].functions == {f.digest: f.blob}


def test_functions_survive_a_broker_restart_and_a_compaction(tmp_path):
    journal = Journal(str(tmp_path), "never")
    core = BrokerCore(0.0, recorder=JournalRecorder(journal))
    core.restore(journal.replay(), 0.0)
    session = a_client(core)
    f = fn(1, 500)
    submit(core, session, b"c", f, 5)
    journal.flush(0.0)
    journal.close()
    for compact in (False, True):
        journal = Journal(str(tmp_path), "never")
        core = BrokerCore(0.0, recorder=JournalRecorder(journal))
        core.restore(journal.replay(), 0.0)
        if compact:
            assert journal.compact(core.unfinished(), core.held(), core.key_owner, 0.0,
                                   core.functions())
            journal.close()
            journal = Journal(str(tmp_path), "never")
            core = BrokerCore(0.0, recorder=JournalRecorder(journal))
            core.restore(journal.replay(), 0.0)
        slot = worker_slot(core, window=10)
        core.dispatch(0.0)
        frame = tasks_to(core, slot)[0]
        assert len(frame.ids) == 5 and pairs(frame) == {scoped(session, f): f.blob}
        journal.close()
    # (a replay does not journal its functions again: the log does not grow by them)
    assert os.path.getsize(tmp_path / "journal.log") < 2 * len(f.blob) + 4096


# -- end to end ----------------------------------------------------------------------------

def _closure(data: bytes):
    def touch(i: int) -> int:
        return data[i % len(data)] + i
    return touch


def test_a_big_closure_crosses_each_link_once_per_slot_not_once_per_task():
    """A 1 MiB closure mapped over 300 tasks: ~1 MiB from the client, ~1 MiB to each
    slot (was 300 MiB each way)."""
    data = random.Random(1).randbytes(MiB)
    with broker_process() as (_, address):
        with LinkProxy(address) as wproxy, LinkProxy(address) as cproxy:
            with worker_process(wproxy.address, "--slots", "2"):
                with Executor(cproxy.address) as ex:
                    touch = _closure(data)
                    assert ex.submit(touch, 1).result(timeout=60) == data[1] + 1
                    out = list(ex.map(touch, range(300), timeout=120))
                    assert out == [data[i % MiB] + i for i in range(300)]
                    # by submit too, from several threads
                    futures = []
                    threads = [threading.Thread(target=lambda: futures.extend(
                        ex.submit(touch, i) for i in range(50))) for _ in range(3)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join(60)
                    assert sorted(f.result(timeout=60) for f in futures) == \
                        sorted(data[i] + i for i in list(range(50)) * 3)
            up, down = cproxy.bytes_up, wproxy.bytes_down
    assert up < 3 * MiB, f"{up} bytes from the client for 451 tasks calling a 1 MiB closure"
    assert down < 4 * MiB, f"{down} bytes to the worker's 2 slots"


def test_tasks_by_digest_finish_across_a_broker_restart_with_a_journal(tmp_path):
    data = random.Random(2).randbytes(64 * 1024)
    journal = str(tmp_path / "j")
    touch = _closure(data)
    with broker_process("--journal", journal) as (proc, address):
        port = address.rsplit(":", 1)[1]
        ex = Executor(address)
        try:
            futures = [ex.submit(touch, i) for i in range(200)]  # no worker yet: queued
            wait_until(lambda: ex.status()["queued"] >= 200, 30)
            os.kill(proc.pid, 9)  # (by PID)
            proc.wait(10)
            with broker_process("--journal", journal, "--listen", f"tcp://127.0.0.1:{port}"
                                ) as (_, again):
                with worker_process(again):
                    results = [f.result(timeout=120) for f in futures]
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
    assert results == [data[i] + i for i in range(200)]


def _many(k: int):
    return lambda x: x * 1000 + k


def test_a_host_that_dropped_a_function_sends_its_task_back_and_gets_it_with_the_function():
    """The slot counts on its host having what it sent it (up to 48 functions); the host
    keeps the 64 it used last. 60 functions sent inline (with options) push some of the
    first 40 out of the host's cache: their next tasks by digest come back from the host
    unrun and go again with the function."""
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        with Executor(address) as ex:
            first = [_many(k) for k in range(40)]
            assert [ex.submit(f, 1).result(timeout=60) for f in first] == \
                [1000 + k for k in range(40)]
            inline = ex.options(capture_output=True)
            for k in range(60):
                inline.submit(_many(100 + k), 2).result(timeout=60)
            assert [ex.submit(f, 3).result(timeout=60) for f in first] == \
                [3000 + k for k in range(40)]


def test_a_task_by_digest_whose_function_the_broker_never_had_fails_with_a_clear_error():
    """A hostile or broken client: tasks by digest without their function fail alone; the
    slot goes on with the other tasks."""
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        with Executor(address) as ex:
            f = payload.function_spec(_many(7), "value")
            blob = payload.python_task(f, (1,), {}, stored=True)
            fut = ex._submit_blob(blob)  # (its function never registered: not in a frame)
            with pytest.raises(TaskError, match="not sent to this worker"):
                fut.result(timeout=60)
            assert ex.submit(_many(8), 1).result(timeout=60) == 1008

