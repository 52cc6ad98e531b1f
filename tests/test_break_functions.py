"""Break attempts on "functions by digest" (commit d6513ab).

A function sent by value travels once per hop: the client's SUBMIT carries its pickle
once per session, the broker keeps it under the client's key, sends it once to each
slot, and the slot splices it into the first task of each task host. These tests attack
that path with real processes on 127.0.0.1 (a hostile client is an Executor that
submits hand-made blobs through ``_submit_blob``) and at the level of the broker's core.

Attacks that hold are ordinary tests; attacks that break keep the assertion of correct
behaviour and are marked ``xfail(strict=True)`` with what broke. Every process is
stopped by PID; every wait has a deadline.
"""

from __future__ import annotations

import os
import platform
import time

import cloudpickle
import psutil
import pytest
import zmq
from conftest import (
    Raw,
    broker_process,
    descendants,
    kill_tree,
    start_broker,
    start_worker,
    steady_rss,
    stop_process,
    wait_until,
    worker_process,
)

from zfalkon import Executor, TaskError, WorkerCrashed, payload, query_status
from zfalkon import protocol as P
from zfalkon.core import BrokerCore
from zfalkon.journal import Journal, JournalRecorder
from zfalkon.linkproxy import LinkProxy

MiB = 1024 * 1024


def _secret_fn(secret: str):
    def reveal() -> str:
        return secret
    return reveal


def _adder(k: int):
    return lambda x: x + k


def _env() -> list:
    return [platform.python_version(), cloudpickle.__version__, {}]


def by_digest_only(digest: bytes, *args) -> bytes:
    """A task by digest naming ``digest``, built by someone who has only the 16 bytes."""
    return payload.python_task(payload.Function("x:y", b"", digest, _env()), args, {},
                               stored=True)


def value_spec(fn) -> payload.Function:
    spec = payload.function_spec(fn, "value")
    assert isinstance(spec, payload.Function)
    return spec


def slots_up(address: str, n: int = 1) -> None:
    wait_until(lambda: query_status(address, timeout=5)["slots"] >= n, 30,
               message="worker slots registered")


# -- liveness: a task by digest wrapped with options ------------------------------------

def test_a_task_by_digest_wrapped_with_a_timeout_does_not_wedge_the_slot():
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        with Executor(address, functions="value") as honest, Executor(address) as hostile:
            f = _adder(1)
            assert honest.submit(f, 1).result(timeout=60) == 2  # the slot has f now
            spec = value_spec(f)
            blob = payload.with_options(payload.python_task(spec, (5,), {}, stored=True),
                                        {"timeout": 30.0})
            bad = hostile._submit_blob(blob)
            wait_until(lambda: bad.done() or query_status(address, timeout=5)["queued"] == 0
                       and query_status(address, timeout=5)["submitted"] >= 2, 10,
                       message="the hostile task handed to the slot first")
            good = honest.submit(abs, -7)
            assert good.result(timeout=10) == 7
            with pytest.raises(TaskError):
                bad.result(timeout=10)


def test_a_task_by_digest_wrapped_with_options_without_a_timeout_completes():
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        with Executor(address, functions="value") as honest, Executor(address) as hostile:
            f = _adder(2)
            spec = value_spec(f)
            blob = payload.with_options(payload.python_task(spec, (5,), {}, stored=True),
                                        {"capture": False})
            bad = hostile._submit_blob(blob)
            with pytest.raises(TaskError):
                bad.result(timeout=10)
            assert honest.submit(f, 1).result(timeout=20) == 3


# -- cross-tenant ----------------------------------------------------------------------

def test_a_client_cannot_call_another_clients_function_by_its_digest():
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        with Executor(address, functions="value") as b, Executor(address) as a:
            reveal = _secret_fn("B-SECRET-TOKEN")
            assert b.submit(reveal).result(timeout=60) == "B-SECRET-TOKEN"
            digest = value_spec(reveal).digest
            fut = a._submit_blob(by_digest_only(digest))
            try:
                got = fut.result(timeout=30)
            except TaskError as exc:
                assert "not sent to this worker" in str(exc)
            else:
                pytest.fail(f"client A ran client B's function by its digest: {got!r}")


def test_a_forged_pickle_under_another_functions_digest_is_refused():
    """SUBMIT functions with B's digest and A's pickle: refused as malformed (the broker
    hashes every pickle it stores); B's tasks still run B's code."""
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        a = Executor(address)
        with Executor(address, functions="value") as b:
            good = _secret_fn("B")
            evil = value_spec(_secret_fn("PWNED"))
            digest = value_spec(good).digest
            # A forges the pair in its own session: the frame carrying it is refused.
            a._stored[digest] = evil.blob
            fut = a._submit_blob(by_digest_only(digest))
            assert b.submit(good).result(timeout=60) == "B"
            assert [b.submit(good).result(timeout=60) for _ in range(3)] == ["B"] * 3
            # (A's frame is refused each time it is sent: A wedges only itself.)
            assert not fut.done() or fut.exception(0) is not None
            # A truncated or extended digest does not name B's function either.
            for d in (digest[:15], digest + b"\0"):
                bad = payload.python_task(payload.Function("x:y", b"", d, _env()), (),
                                          {}, stored=True)
                assert payload.stored_digest(bad) is None
        a.shutdown(wait=False, cancel_futures=True)


def test_a_planted_pickle_does_not_run_for_another_client_after_a_broker_restart():
    good = _secret_fn("B")
    digest = value_spec(good).digest
    evil = value_spec(_secret_fn("PWNED-BY-A"))
    forged = payload.Function(evil.name, evil.blob, digest, evil.env)  # B's digest
    proc, address = start_broker()
    port = address.rsplit(":", 1)[1]
    try:
        with worker_process(address, "--slots", "1"):
            slots_up(address)
            with Executor(address) as a:
                key = a.key
                with pytest.raises(ValueError, match="digest it claims"):
                    a._submit_blob(payload.python_task(forged, (), {})).result(timeout=60)
            os.kill(proc.pid, 9)
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
            proc, again = start_broker(f"tcp://127.0.0.1:{port}")
            ctx = zmq.Context()
            try:  # (keys start again at 1: take those before A's)
                for _ in range(key - 1):
                    raw = Raw(ctx, again)
                    raw.hello()
                    raw.close()
            finally:
                ctx.term()
            with Executor(again, functions="value") as b:
                assert b.key == key  # (A's key again: a new broker cannot know)
                slots_up(again)
                assert b.submit(good).result(timeout=60) == "B"
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# -- memory ------------------------------------------------------------------------------

def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_sessions_that_vanish_do_not_leave_their_functions_in_the_broker():
    blob = os.urandom(16 * MiB)
    digest = payload.function_digest(blob)
    with broker_process() as (proc, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        ctx = zmq.Context()
        probe = Raw(ctx, address)
        try:
            probe.hello()
            probe.sync()
            before = steady_rss(proc)  # (the broker settled after registering)
            for _ in range(8):
                raw = Raw(ctx, address)
                key = raw.hello().key
                tid = (key << P.ID_SHIFT) + 1
                raw.send_msg(P.Submit(1, 0, [tid], [by_digest_only(digest)], [], b"",
                                      [digest, blob]))
                for _ in range(50):  # (its task done: the slot failed to load the bytes)
                    if any(type(m) is P.Deliver for m in raw.sync()):
                        break
                    time.sleep(0.1)  # (poll interval: the condition is its DELIVER)
                else:
                    raise AssertionError("no result")
                raw.close()  # (no BYE: a client that vanished, holding no live task)
            probe.sync()
            peak = _rss(proc.pid) - before
            # Once the broker sees them away (silent QUIET_SECONDS), their functions go
            # (past MAX_AWAY_FUNCTION_BYTES of them): the growth falls under the bound.
            deadline = time.monotonic() + 30
            while (grown := _rss(proc.pid) - before) >= 50 * MiB and \
                    time.monotonic() < deadline:
                probe.sync()
                time.sleep(0.2)  # (poll interval: the condition is the RSS above)
        finally:
            probe.close()
            ctx.term()
    print(f"broker RSS grew {peak / MiB:.0f} MiB after 8 vanished sessions, tasks done; "
          f"{grown / MiB:.0f} MiB once they were seen away")
    assert grown < 50 * MiB, f"broker RSS grew {grown / MiB:.0f} MiB"


def _core_slot(core: BrokerCore, window: int) -> bytes:
    core.message(b"w", P.hello(P.ROLE_WORKER, {"worker_id": "w", "slots": 2}), None, 0.0)
    for i, s in enumerate((b"s0", b"s1")):
        core.message(s, P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": i}), None, 0.0)
    core.message(b"s0", P.Results(1, 0, window, 0, [], []), None, 0.0)
    core.outbox.clear()
    return b"s0"


def _core_client(core: BrokerCore, ident: bytes) -> int:
    core.message(ident, P.hello(P.ROLE_CLIENT, {"name": ident.decode()}), None, 0.0)
    key = [m for _, m in core.outbox if type(m) is P.Welcome][-1].key
    core.outbox.clear()
    return key


def test_a_slot_is_never_made_to_hold_more_functions_than_its_bound():
    core = BrokerCore(0.0)
    core.max_slot_function_bytes = 2500
    slot = _core_slot(core, window=64)
    for c in range(8):
        ident = f"c{c}".encode()
        key = _core_client(core, ident)
        body = bytes([c]) * 1000
        d = payload.function_digest(body)
        core.message(ident, P.Submit(1, 0, [(key << P.ID_SHIFT) + 1], [by_digest_only(d)],
                                     [], b"", [d, body]), None, 0.0)
    core.dispatch(0.0)
    frames = [m for i, m in core.outbox if i == slot and type(m) is P.Tasks]
    held: dict[bytes, int] = {}
    for m in frames:
        for d in m.forget:
            held.pop(d, None)
        held.update((d, len(b)) for d, b in zip(m.functions[::2], m.functions[1::2]))
    assert sum(held.values()) <= core.max_slot_function_bytes + 1000, \
        f"{len(frames)} frames; the slot holds {sum(held.values())} bytes of functions"


def test_a_frame_refused_past_the_count_limit_costs_one_hash_pass_at_most():
    """A client at MAX_CLIENT_FUNCTIONS sends frames of 4 new 16 MiB pickles: each is
    refused (limit), after hashing them (~64 MiB of BLAKE2b a frame: proportional to the
    bytes received, no amplification). Figures printed."""
    core = BrokerCore(0.0)
    key = _core_client(core, b"c")
    tiny = [bytes([i % 256, i // 256]) * 4 for i in range(payload.MAX_CLIENT_FUNCTIONS)]
    pairs: list[bytes] = []
    for b in tiny:
        pairs += (payload.function_digest(b), b)
    base = key << P.ID_SHIFT
    core.message(b"c", P.Submit(1, 0, [base + 1], [by_digest_only(pairs[0])], [], b"",
                                pairs), None, 0.0)
    assert len(core.clients[key].functions) == payload.MAX_CLIENT_FUNCTIONS
    big = [os.urandom(16 * MiB - 64) for _ in range(4)]
    extra: list[bytes] = []
    for b in big:
        extra += (payload.function_digest(b), b)
    core.outbox.clear()
    t0 = time.perf_counter()
    for i in range(5):
        core.message(b"c", P.Submit(2, 0, [base + 2], [by_digest_only(extra[0])], [], b"",
                                    extra), None, float(i * 3))
    per_frame = (time.perf_counter() - t0) / 5
    errors = [m for _, m in core.outbox if type(m) is P.Error]
    assert errors and all(e.code == "limit" for e in errors)
    assert len(core.clients[key].functions) == payload.MAX_CLIENT_FUNCTIONS
    print(f"{per_frame * 1000:.0f} ms of broker CPU per refused 64 MiB frame")
    assert per_frame < 1.0


def test_functions_carried_beside_a_big_task_do_not_push_a_frame_past_the_limit():
    rng = [os.urandom(15 * MiB) for _ in range(4)]
    fns = [_closure_len(data) for data in rng]
    big = b"x" * (90 * MiB)
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        ex = Executor(address, functions="value")
        try:
            first = ex.submit(abs, -1)  # (in flight: what follows waits in the outbox)
            with ex._lock:  # (the I/O thread busy: they leave in one frame)
                futures = [ex.submit(f, 1) for f in fns] + [ex.submit(len, big)]
            assert first.result(timeout=60) == 1
            results = [f.result(timeout=12) for f in futures]
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
    assert results == [rng[i][1] for i in range(4)] + [90 * MiB]


def _closure_len(data: bytes):
    def pick(i: int) -> int:
        return data[i]
    return pick


# -- liveness of an honest client -------------------------------------------------------

def test_300_distinct_functions_redefined_in_a_loop_all_complete():
    """One Executor: 300 closures (past MAX_CLIENT_FUNCTIONS = 256: the rest go by value),
    each submitted and mapped (with and without options), interleaved, on 2 slots whose
    hosts keep 64 functions: every future completes with its own function's result."""
    with broker_process() as (_, address), worker_process(address, "--slots", "2"):
        slots_up(address, 2)
        with Executor(address, functions="value") as ex:
            deadline = time.monotonic() + 90
            futures = []
            for k in range(300):
                g = _adder(k * 10)
                futures.append((k * 10 + 1, ex.submit(g, 1)))
                if k % 37 == 0:
                    assert list(ex.map(g, range(3), timeout=60)) == [k * 10 + i
                                                                     for i in range(3)]
                    assert list(ex.options(timeout=30).map(g, range(3), timeout=60)) == \
                        [k * 10 + i for i in range(3)]
            for want, fut in futures:
                assert fut.result(timeout=max(1, deadline - time.monotonic())) == want
            assert len(ex._stored) == payload.MAX_CLIENT_FUNCTIONS
            # The first functions again (long since out of every host's cache).
            assert [ex.submit(_adder(k * 10), 2).result(timeout=30) for k in range(5)] == \
                [k * 10 + 2 for k in range(5)]


def test_a_notebook_cell_redefined_and_run_again_runs_its_new_body():
    """A notebook: the same name in __main__ redefined with a new body each run; each
    run's tasks call that run's body (a new pickle, a new digest)."""
    import types
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        with Executor(address, functions="value") as ex:
            for run in range(40):
                ns = types.ModuleType("__main__").__dict__
                source = f"def cell(x):\n    return x * {run} + {run % 3}\n"
                exec(compile(source, "<cell>", "exec"), ns)  # noqa: S102  (a notebook cell)
                cell = ns["cell"]
                cell.__module__ = "__main__"
                got = list(ex.map(cell, range(4), timeout=30))
                assert got == [x * run + run % 3 for x in range(4)], run


# -- correctness across faults ----------------------------------------------------------

def _touch(data: bytes):
    def touch(i: int) -> int:
        if i % 50 == 49:
            time.sleep(0.05)  # (the task body: every 50th task takes 50 ms)
        return data[i % len(data)] + i
    return touch


def test_tasks_by_digest_finish_across_a_broker_kill_without_a_journal():
    """Broker kill -9 (no journal) while tasks by digest are queued and running: the client
    registers again, submits its pending tasks again with their functions; all finish."""
    data = os.urandom(256 * 1024)
    touch = _touch(data)
    proc, address = start_broker()
    port = address.rsplit(":", 1)[1]
    try:
        with worker_process(address, "--slots", "2"):
            ex = Executor(address, functions="value")
            try:
                futures = [ex.submit(touch, i) for i in range(400)]
                wait_until(lambda: sum(f.done() for f in futures) >= 20, 60,
                           message="some tasks done")
                os.kill(proc.pid, 9)
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
                proc, _ = start_broker(f"tcp://127.0.0.1:{port}")
                results = [f.result(timeout=90) for f in futures]
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    assert results == [data[i] + i for i in range(400)]


def test_tasks_by_digest_finish_when_the_worker_is_killed_and_another_comes():
    data = os.urandom(64 * 1024)
    touch = _touch(data)
    with broker_process() as (_, address), Executor(address, functions="value") as ex:
        with worker_process(address, "--slots", "2") as w:
            slots_up(address, 2)
            futures = [ex.submit(touch, i) for i in range(300)]
            wait_until(lambda: sum(f.done() for f in futures) >= 10, 60,
                       message="some tasks done")
            kill_tree([w.pid] + descendants(w.pid))
        with worker_process(address, "--slots", "2"):
            results = [f.result(timeout=90) for f in futures]
    assert results == [data[i] + i for i in range(300)]


def _crash_on(k: int):
    def f(i: int) -> int:
        if i == k:
            os._exit(3)
        return i * 2
    return f


def test_a_host_killed_mid_run_the_other_tasks_by_digest_complete():
    """A task by digest kills its own task host: it fails alone (WorkerCrashed); the tasks
    behind it in the host's pipeline run again in a fresh host that never had the
    function (the slot sends it again)."""
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        with Executor(address, functions="value") as ex:
            f = _crash_on(30)
            assert ex.submit(f, 1).result(timeout=60) == 2
            futures = [ex.submit(f, i) for i in range(200)]
            for i, fut in enumerate(futures):
                if i == 30:
                    with pytest.raises(TaskError):
                        fut.result(timeout=60)
                else:
                    assert fut.result(timeout=60) == i * 2


def test_tasks_by_digest_finish_across_client_link_freezes_and_resets():
    data = os.urandom(128 * 1024)
    touch = _touch(data)
    with broker_process() as (_, address), worker_process(address, "--slots", "2"):
        slots_up(address, 2)
        with LinkProxy(address) as proxy:
            ex = Executor(proxy.address, functions="value")
            try:
                futures = [ex.submit(touch, i) for i in range(100)]
                proxy.reset()  # (the frames carrying the function may die with it)
                more = [ex.submit(_touch(data[::-1]), i) for i in range(100)]
                proxy.freeze()
                time.sleep(1.0)  # (the scenario: the client's link frozen for a second)
                proxy.thaw()
                proxy.reset()
                results = [f.result(timeout=90) for f in futures + more]
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
    rev = data[::-1]
    assert results == [data[i] + i for i in range(100)] + [rev[i] + i for i in range(100)]


def test_a_slot_process_killed_its_tasks_by_digest_run_elsewhere():
    data = os.urandom(64 * 1024)
    touch = _touch(data)
    with broker_process() as (_, address), worker_process(address, "--slots", "2") as w:
        slots_up(address, 2)
        with Executor(address, functions="value") as ex:
            futures = [ex.submit(touch, i) for i in range(300)]
            wait_until(lambda: sum(f.done() for f in futures) >= 10, 60,
                       message="some tasks done")
            kids = psutil.Process(w.pid).children()
            assert kids
            os.kill(kids[0].pid, 9)  # one slot (and, orphaned, its hosts)
            wait_until(lambda: all(f.done() for f in futures), 90,
                       message="every future done")
    crashed = [i for i, f in enumerate(futures) if f.exception() is not None]
    # (the task the killed slot was running fails as crashed; every other one runs)
    assert len(crashed) <= 1 and all(
        isinstance(futures[i].exception(), WorkerCrashed) for i in crashed), crashed
    assert [f.result() for i, f in enumerate(futures) if i not in crashed] == \
        [data[i] + i for i in range(300) if i not in crashed]


# -- core: stealing, journals ---------------------------------------------------------

def test_tasks_taken_back_go_to_a_slot_that_never_had_their_function_with_it():
    core = BrokerCore(0.0)
    core.message(b"w", P.hello(P.ROLE_WORKER, {"worker_id": "w", "slots": 2}), None, 0.0)
    for i, s in enumerate((b"s0", b"s1")):
        core.message(s, P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": i}), None, 0.0)
    core.message(b"s0", P.Results(1, 0, 10, 0, [], []), None, 0.0)
    core.outbox.clear()
    key = _core_client(core, b"c")
    body = b"f" * 300
    d = payload.function_digest(body)
    ids = [(key << P.ID_SHIFT) + i for i in range(1, 6)]
    core.message(b"c", P.Submit(1, 0, ids, [by_digest_only(d, i) for i in ids], [], b"",
                                [d, body]), None, 0.0)
    core.dispatch(0.0)
    first = [m for i, m in core.outbox if i == b"s0" and type(m) is P.Tasks]
    assert first and dict(zip(first[0].functions[::2], first[0].functions[1::2])) == {payload.scoped_digest(key, d): body}
    core.outbox.clear()
    # s0 is stuck behind its first task; s1 asks for work; the broker steals from s0.
    core.message(b"s1", P.Results(1, 0, 10, 0, [], []), None, 5.0)
    core.tick(5.0)
    core.dispatch(5.0)
    to_s1 = [m for i, m in core.outbox if i == b"s1" and type(m) is P.Tasks]
    assert to_s1, "nothing stolen"
    got = [t for m in to_s1 for t in m.ids]
    sent = {a: b for m in to_s1 for a, b in zip(m.functions[::2], m.functions[1::2])}
    assert got and sent == {payload.scoped_digest(key, d): body}


def test_a_gone_clients_functions_do_not_come_back_after_replay_or_compaction(tmp_path):
    journal = Journal(str(tmp_path), "never")
    core = BrokerCore(0.0, recorder=JournalRecorder(journal))
    core.restore(journal.replay(), 0.0)
    key = _core_client(core, b"c")
    body = b"g" * 500
    d = payload.function_digest(body)
    tid = (key << P.ID_SHIFT) + 1
    core.message(b"c", P.Submit(1, 0, [tid], [by_digest_only(d)], [], b"", [d, body]),
                 None, 0.0)
    core.message(b"c", P.Bye("done"), None, 0.0)  # forgotten: GONE
    journal.flush(0.0)
    assert journal.compact(core.unfinished(), core.held(), core.key_owner, 0.0,
                           core.functions())
    journal.close()
    journal = Journal(str(tmp_path), "never")
    got = journal.replay()
    journal.close()
    assert not any(got.functions.values())
    assert not got.tasks


def test_tasks_by_digest_survive_a_restart_after_the_journal_was_truncated(tmp_path):
    data = os.urandom(32 * 1024)
    touch = _touch(data)
    jdir = str(tmp_path / "j")
    log = os.path.join(jdir, "journal.log")
    proc, address = start_broker("tcp://127.0.0.1:0", "--journal", jdir)
    port = address.rsplit(":", 1)[1]
    worker = None
    try:
        with LinkProxy(address) as proxy:
            ex = Executor(proxy.address, functions="value")
            try:
                worker = start_worker(address, "--slots", "1")
                assert list(ex.map(touch, range(20), timeout=60)) == \
                    [data[i] + i for i in range(20)]
                marker = data[:4096]  # (in the function's pickle, journaled with it)

                def journaled() -> bool:
                    with open(log, "rb") as f:
                        return marker in f.read()
                # The client acknowledges its last results (an Executor does every 8
                # DELIVERs, and with its next frame): nothing is live; the journal is
                # compacted to its key owners.
                with ex._lock:
                    ex._session.ack()
                    ex._send_session()
                wait_until(lambda: query_status(address, timeout=5)["journal"]["compactions"],
                           30, message="journal compacted")
                assert journaled(), "the snapshot kept the function"
                kill_tree([worker.pid] + descendants(worker.pid))
                worker = None
                futures = [ex.submit(touch, i) for i in range(40)]
                wait_until(lambda: query_status(address, timeout=5)["queued"] >= 40, 30)
                proxy.freeze()  # (the client is away while the broker restarts)
                os.kill(proc.pid, 9)
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
                proc, _ = start_broker(f"tcp://127.0.0.1:{port}", "--journal", jdir)
                worker = start_worker(address, "--slots", "1")
                wait_until(lambda: query_status(address, timeout=5)["queued"] == 0, 30,
                           message="the replayed tasks dispatched")
                wait_until(lambda: query_status(address, timeout=5)["done"] >= 40, 30,
                           message="the replayed tasks run before their client is back")
                proxy.thaw()
                wait_until(lambda: all(f.done() for f in futures), 60,
                           message="every future done")
                failed = [f.exception() for f in futures if f.exception() is not None]
                assert not failed, f"{len(failed)} of 40 failed: {failed[0]}"
                assert [f.result() for f in futures] == [data[i] + i for i in range(40)]
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
    finally:
        if worker is not None:
            kill_tree([worker.pid] + descendants(worker.pid))
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def test_tasks_by_unknown_digests_fail_alone_and_the_slot_keeps_serving():
    """A hostile client floods tasks by digest naming functions nobody stored, interleaved
    with an honest client's work: each fails with a clear error, quickly; the honest tasks
    all complete."""
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        with Executor(address, functions="value") as honest, Executor(address) as hostile:
            g = _adder(5)
            bad, good = [], []
            for i in range(300):
                bad.append(hostile._submit_blob(by_digest_only(os.urandom(16), i)))
                if i % 3 == 0:
                    good.append((i + 5, honest.submit(g, i)))
            for want, fut in good:
                assert fut.result(timeout=60) == want
            for fut in bad:
                with pytest.raises(TaskError, match="FunctionUnavailable|not sent"):
                    fut.result(timeout=60)


def test_rejoining_under_one_key_never_stores_past_the_clients_bound():
    """One client registers again under its key 400 times, each session carrying a new
    function (and the old ones again): the broker keeps at most MAX_CLIENT_FUNCTIONS of
    them, answers ERROR limit past that, and counts each digest once."""
    core = BrokerCore(0.0)
    key = _core_client(core, b"c")
    base = key << P.ID_SHIFT
    limits = 0
    old: list[bytes] = []
    for i in range(400):
        core.tick(float(i * 3))  # (HELLOS_PER_TICK per routing id)
        core.message(b"c", P.hello(P.ROLE_CLIENT, {"name": "c", "key": key}), None,
                     float(i * 3))
        assert [m for _, m in core.outbox if type(m) is P.Welcome][-1].key == key
        core.outbox.clear()
        body = i.to_bytes(4, "little") * 64
        d = payload.function_digest(body)
        pairs = old[-8:] + [d, body]
        core.message(b"c", P.Submit(1, 0, [base + i + 1], [by_digest_only(d)], [], b"",
                                    pairs), None, float(i * 3))
        limits += sum(1 for _, m in core.outbox if type(m) is P.Error and m.code == "limit")
        core.outbox.clear()
        old += [d, body]
    record = core.clients[key]
    assert len(record.functions) == payload.MAX_CLIENT_FUNCTIONS
    assert record.function_bytes == sum(map(len, record.functions.values()))
    assert limits == 400 - payload.MAX_CLIENT_FUNCTIONS


def test_a_restart_does_not_journal_again_the_functions_it_replayed(tmp_path):
    def start() -> tuple[Journal, BrokerCore]:
        journal = Journal(str(tmp_path), "never")
        core = BrokerCore(0.0, recorder=JournalRecorder(journal))
        core.restore(journal.replay(), 0.0)
        return journal, core
    journal, core = start()
    key = _core_client(core, b"c")
    body = os.urandom(MiB)
    d = payload.function_digest(body)
    core.message(b"c", P.Submit(1, 0, [(key << P.ID_SHIFT) + 1], [by_digest_only(d)], [],
                                b"", [d, body]), None, 0.0)
    journal.flush(0.0)
    journal.close()
    sizes = []
    for _ in range(3):
        journal, core = start()
        journal.flush(0.0)
        journal.close()
        sizes.append(os.path.getsize(os.path.join(str(tmp_path), "journal.log")))
    assert sizes[-1] - sizes[0] < MiB // 2, f"journal sizes after each restart: {sizes}"


def test_a_function_over_the_stored_limit_travels_in_every_task_and_works():
    data = os.urandom(payload.MAX_STORED_FUNCTION_BYTES + 1024)
    pick = _closure_len(data)
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        slots_up(address)
        with Executor(address, functions="value") as ex:
            assert [ex.submit(pick, i).result(timeout=60) for i in (1, 2)] == \
                [data[1], data[2]]
            assert list(ex.map(pick, range(3), timeout=60)) == [data[i] for i in range(3)]
            assert not ex._stored  # (by value: never by digest)
