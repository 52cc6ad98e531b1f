"""zfalkon.client: the Executor against the shared LocalCluster (2 workers x 1 slot)."""

from __future__ import annotations

import asyncio
import gc
import concurrent.futures as cf
import itertools
import os
import sys
import threading
import time

import pytest

import tasks
from conftest import FakeBroker, free_port, wait_until
from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import PROTOCOL_VERSION
from zfalkon import (
    BrokerUnavailable,
    ConfigError,
    Executor,
    ProtocolError,
    RemoteTraceback,
    SerializationError,
    ShellResult,
    TaskError,
    TaskFuture,
    TaskTimeout,
    VersionMismatch,
    WorkerCrashed,
    query_status,
)
from zfalkon.client import MAX_TASK_BYTES


def wait_for_two_slots(cluster) -> dict:
    """Both workers and both slots registered again (slots restart after a crash)."""
    def ready():
        status = query_status(cluster.address, timeout=5)
        ok = (status["slots"] == 2 and status["workers"] == 2
              and all(w["connected_slots"] == 1 for w in status["worker_list"]))
        return status if ok else None
    return wait_until(ready, 20, message="2 slots registered")


@pytest.fixture(autouse=True)
def drained(cluster):
    """After each test, wait until the broker holds no queued or running task, so that
    leftovers of one test (e.g. cancelled tasks a slot had prefetched) cannot delay the
    next one."""
    yield
    wait_until(lambda: (lambda s: s["queued"] == 0 and s["running"] == 0)(
        query_status(cluster.address, timeout=5)), 30, interval=0.05, message="cluster idle")


# -- results -----------------------------------------------------------------------------


def test_submit_returns_a_task_future(executor):
    f = executor.submit(tasks.add, 1, 2)
    assert isinstance(f, TaskFuture) and isinstance(f, cf.Future)
    assert f.task_id >> 40 == executor.key
    assert f.result(timeout=30) == 3
    assert f.done() and not f.cancelled() and f.exception() is None


def test_submit_by_reference_string_and_kwargs(executor):
    assert executor.submit("tasks:add", 2, 2).result(timeout=30) == 4
    assert executor.submit(tasks.echo_kwargs, a=1, b="x").result(timeout=30) == {"a": 1, "b": "x"}
    assert executor.submit(tasks.echo_args, 1, (2, 3), k=b"v").result(timeout=30) == [
        [1, (2, 3)], {"k": b"v"}]
    assert executor.submit(abs, -5).result(timeout=30) == 5


def test_mixed_workload_results_are_correct_and_complete(executor):
    n = 2000
    futures = {}
    for i in range(n):
        if i % 4 == 3:
            futures[i] = executor.shell(f"echo {i}")
        elif i % 4 == 2:
            futures[i] = executor.shell(["printf", "%s", str(i)])
        else:
            futures[i] = executor.submit(tasks.add, i, 1000)
    done, not_done = cf.wait(list(futures.values()), timeout=120)
    assert not not_done
    for i, f in futures.items():
        value = f.result()
        if i % 4 == 3:
            assert isinstance(value, ShellResult) and value.ok and value.stdout == f"{i}\n"
        elif i % 4 == 2:
            assert value.stdout == str(i)
        else:
            assert value == i + 1000
    workers = {f.result().worker for i, f in futures.items() if i % 4 >= 2}
    assert workers and all(w for w in workers)


def test_concurrent_submitters(executor):
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def submitter(k):
        try:
            futures = [executor.submit(tasks.add, k * 1000, i) for i in range(250)]
            results[k] = [f.result(timeout=60) for f in futures]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    for k in range(4):
        assert results[k] == [k * 1000 + i for i in range(250)]


# -- failures ----------------------------------------------------------------------------


def test_exception_keeps_its_type_with_the_remote_traceback_as_cause(executor):
    f = executor.submit(tasks.boom, "it failed remotely")
    with pytest.raises(ValueError) as info:
        f.result(timeout=30)
    exc = info.value
    assert type(exc) is ValueError and exc.args == ("it failed remotely",)
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback" in cause.traceback
    assert "in boom" in cause.traceback
    assert "ValueError: it failed remotely" in cause.traceback
    assert cause.worker and "/" in cause.worker
    assert type(f.exception()) is ValueError


def test_exception_of_a_type_not_imported_here_is_a_task_error(executor):
    with pytest.raises(TaskError) as info:
        executor.submit("tasks:raise_from_module", "zfalkon_test_errmod").result(timeout=30)
    exc = info.value
    assert exc.remote_type == "zfalkon_test_errmod.ModuleOnlyError"
    assert "ModuleOnlyError" in exc.remote_traceback
    assert "zfalkon_test_errmod" not in sys.modules  # never imported on a worker's word


def test_unserializable_result(executor):
    with pytest.raises(TaskError) as info:
        executor.submit(tasks.returns_unserializable).result(timeout=30)
    assert info.value.remote_type == "SerializationError"


def test_import_error_on_worker(executor):
    with pytest.raises(ModuleNotFoundError, match="functions='value'") as info:
        executor.submit("no_such_module_zf:f").result(timeout=30)
    assert "no_such_module_zf" in str(info.value)


def test_nonzero_shell_exit_is_a_result(executor):
    f = executor.shell("echo partial; echo oops >&2; exit 3")
    r = f.result(timeout=30)
    assert isinstance(r, ShellResult)
    assert r.returncode == 3 and not r.ok
    assert r.stdout == "partial\n" and r.stderr == "oops\n"
    assert f.exception() is None


def test_shell_env_and_cwd(executor, tmp_path):
    r = executor.shell('echo "$ZF_X"; pwd', env={"ZF_X": "from-client"},
                       cwd=str(tmp_path)).result(timeout=30)
    assert r.stdout == f"from-client\n{tmp_path}\n"


def test_shell_timeout_raises_task_timeout(executor):
    start = time.monotonic()
    f = executor.shell("echo before; sleep 20", timeout=0.5)
    with pytest.raises(TaskTimeout) as info:
        f.result(timeout=30)
    assert time.monotonic() - start < 10
    exc = info.value
    assert isinstance(exc, TaskError) and isinstance(exc, TimeoutError)
    assert exc.timeout == 0.5 and exc.stdout == "before\n"
    assert exc.worker


def test_segfault_gives_worker_crashed_and_worker_keeps_serving(executor, cluster):
    f = executor.submit(tasks.segfault)
    with pytest.raises(WorkerCrashed) as info:
        f.result(timeout=30)
    assert "SIGSEGV" in info.value.remote_message
    assert info.value.remote_type == "WorkerCrashed"
    assert [executor.submit(tasks.add, i, i).result(timeout=30) for i in range(10)] == [
        2 * i for i in range(10)]
    wait_for_two_slots(cluster)


def test_hard_exit_gives_worker_crashed_and_worker_keeps_serving(executor, cluster):
    f = executor.submit(tasks.hard_exit, 3)
    with pytest.raises(WorkerCrashed) as info:
        f.result(timeout=30)
    assert "exited with status 3" in info.value.remote_message
    assert executor.submit(tasks.add, 1, 1).result(timeout=30) == 2
    status = wait_for_two_slots(cluster)
    assert status["slots"] == 2


def test_crash_amid_other_tasks_loses_none_of_them(executor, cluster):
    before = [executor.submit(tasks.add, i, 0) for i in range(300)]
    crash = executor.submit(tasks.hard_exit, 5)
    after = [executor.submit(tasks.add, i, 0) for i in range(300)]
    with pytest.raises(WorkerCrashed):
        crash.result(timeout=60)
    assert [f.result(timeout=60) for f in before] == list(range(300))
    assert [f.result(timeout=60) for f in after] == list(range(300))
    wait_for_two_slots(cluster)


# -- submit-time errors ------------------------------------------------------------------


def test_lambda_is_refused_immediately_by_reference(cluster):
    with Executor(cluster.address, functions="reference") as ex:
        with pytest.raises(SerializationError, match="lambda"):
            ex.submit(lambda: 1)
        with pytest.raises(SerializationError):
            ex.map(lambda x: x, [1, 2])
        with pytest.raises(SerializationError):
            ex.submit(tasks.Holder().method)


def test_unserializable_arguments_are_refused(executor):
    with pytest.raises(SerializationError):
        executor.submit(tasks.identity, object())
    with pytest.raises(SerializationError):
        executor.submit(tasks.identity, x=[1, object()])
    with pytest.raises(SerializationError):
        executor.shell(["echo", 1])
    # the executor still works afterwards
    assert executor.submit(tasks.identity, 7).result(timeout=30) == 7


def test_oversized_task_is_refused(executor):
    with pytest.raises(SerializationError, match="exceeds"):
        executor.submit(tasks.identity, b"x" * (MAX_TASK_BYTES + 1))


def test_no_address(monkeypatch):
    monkeypatch.delenv("ZFALKON_BROKER", raising=False)
    with pytest.raises(ConfigError, match="ZFALKON_BROKER"):
        Executor()


@pytest.mark.parametrize("address", ["127.0.0.1:7450", "tcp://127.0.0.1:0", "tcp://h:99999",
                                     "http://127.0.0.1:80"])
def test_bad_address(address):
    with pytest.raises(ConfigError):
        Executor(address, connect_timeout=1)


def test_address_from_environment(monkeypatch, cluster):
    monkeypatch.setenv("ZFALKON_BROKER", cluster.address)
    ex = Executor()
    try:
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
    finally:
        ex.shutdown()


def test_no_broker_raises_broker_unavailable():
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        Executor(address, connect_timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 2.0
    assert address in str(info.value)
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(BrokerUnavailable):
        query_status(address, timeout=0.3)


def test_broker_refusing_the_version_raises_version_mismatch():
    message = (f"protocol version mismatch: peer speaks zfalkon protocol {PROTOCOL_VERSION} "
               f"(package {__version__!r}), this side speaks protocol 7 (package 7.0.0)")
    with FakeBroker(P.Error("version", message)) as fake:
        with pytest.raises(VersionMismatch) as info:
            Executor(fake.address, connect_timeout=5)
    assert info.value.code == "version"
    assert "protocol 7" in str(info.value) and f"protocol {PROTOCOL_VERSION}" in str(info.value)


def test_broker_welcoming_with_another_protocol_raises_version_mismatch():
    with FakeBroker(P.Welcome(PROTOCOL_VERSION + 5, "6.0.0", 1, 2.0)) as fake:
        with pytest.raises(VersionMismatch) as info:
            Executor(fake.address, connect_timeout=5)
        with pytest.raises(VersionMismatch):
            query_status(fake.address, timeout=5)
    assert f"protocol {PROTOCOL_VERSION + 5}" in str(info.value)
    assert "6.0.0" in str(info.value)


def test_broker_refusing_a_client_raises_protocol_error():
    with FakeBroker(P.Error("bad-hello", "go away")) as fake:
        with pytest.raises(ProtocolError) as info:
            Executor(fake.address, connect_timeout=5)
    assert info.value.code == "bad-hello" and "go away" in str(info.value)


def test_map_ordering_with_many_elements(executor):
    n = 5000
    out = list(executor.map(tasks.square, range(n), chunksize=100, buffersize=1000))
    assert out == [i * i for i in range(n)]


def test_map_multiple_iterables_and_empty_input(executor):
    assert list(executor.map(tasks.add, range(100), range(100, 200))) == [
        a + b for a, b in zip(range(100), range(100, 200))]
    assert list(executor.map(tasks.add, range(10), range(3))) == [0, 2, 4]
    assert list(executor.map(tasks.add, [], [])) == []


def test_map_ordering_with_uneven_durations(executor):
    seconds = [0.05 if i % 7 == 0 else 0.0 for i in range(60)]
    assert list(executor.map(tasks.sleep_then, range(60), seconds, chunksize=4,
                             buffersize=16)) == list(range(60))


class CountingInput:
    """A generator-backed input that counts how many items were pulled."""

    def __init__(self, n: int) -> None:
        self.pulled = 0
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            self.pulled += 1
            yield i


def test_map_is_lazy(executor):
    source = CountingInput(100_000)
    buffersize, chunksize = 100, 10
    it = executor.map(tasks.identity, source, buffersize=buffersize, chunksize=chunksize)
    assert source.pulled <= buffersize
    got = [next(it) for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]
    assert source.pulled <= buffersize + chunksize
    for _ in range(200):
        next(it)
    assert source.pulled <= 205 + buffersize + chunksize
    it.close()


def test_map_of_a_million_closed_early(executor):
    source = CountingInput(10**6)
    start = time.monotonic()
    it = executor.map(tasks.identity, source, buffersize=1000)
    first = list(itertools.islice(it, 10))
    it.close()
    elapsed = time.monotonic() - start
    assert first == list(range(10))
    assert source.pulled <= 1000 + 1024
    assert elapsed < 10
    # later work is not stuck behind the abandoned map
    start = time.monotonic()
    assert executor.submit(tasks.add, 2, 2).result(timeout=30) == 4
    assert list(executor.map(tasks.square, range(5))) == [0, 1, 4, 9, 16]
    assert time.monotonic() - start < 10


def test_map_raises_first_failure_in_order(executor):
    xs = list(range(40))
    bad = [x if x in (12, 30) else -1 for x in xs]  # elements 12 and 30 fail
    it = executor.map(tasks.fail_on, xs, bad, chunksize=5, buffersize=20)
    got = []
    with pytest.raises(ValueError, match="^bad element 12$"):
        for value in it:
            got.append(value)
    assert got == list(range(12))
    with pytest.raises(StopIteration):
        next(it)  # the map is over after its failure
    assert executor.submit(tasks.add, 1, 2).result(timeout=30) == 3


def test_map_failure_of_a_later_task_arriving_first(executor):
    """Element 1 fails fast while element 0 is slow: element 0's value comes first."""
    it = executor.map(tasks.sleep_then, [0, "x"], [0.3, "not-a-number"])
    assert next(it) == 0
    with pytest.raises(TypeError):
        next(it)


def test_map_timeout(executor):
    start = time.monotonic()
    it = executor.map(tasks.sleep_then, range(4), [0.6] * 4, timeout=0.3, chunksize=1)
    with pytest.raises(cf.TimeoutError):
        list(it)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 1.5
    assert executor.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_map_rejects_bad_sizes(executor):
    with pytest.raises(ConfigError):
        executor.map(tasks.identity, [1], chunksize=0)
    with pytest.raises(ConfigError):
        executor.map(tasks.identity, [1], buffersize=0)


# -- futures interoperability ------------------------------------------------------------


def test_as_completed(executor):
    futures = [executor.submit(tasks.sleep_then, i, 0.01 * (i % 3)) for i in range(40)]
    seen = [f.result() for f in cf.as_completed(futures, timeout=60)]
    assert sorted(seen) == list(range(40))


def test_wait(executor):
    fast = executor.submit(tasks.add, 1, 1)
    slow = executor.submit(tasks.sleep_then, "slow", 1.0)
    done, not_done = cf.wait([fast, slow], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert fast in done
    done, not_done = cf.wait([fast, slow], timeout=30, return_when=cf.ALL_COMPLETED)
    assert not not_done and slow.result() == "slow"
    failing = executor.submit(tasks.boom)
    done, _ = cf.wait([failing, executor.submit(tasks.sleep_then, 1, 0.5)], timeout=30,
                      return_when=cf.FIRST_EXCEPTION)
    assert failing in done


def test_asyncio_wrap_future(executor):
    async def main():
        futures = [asyncio.wrap_future(executor.submit(tasks.add, i, i)) for i in range(20)]
        values = await asyncio.wait_for(asyncio.gather(*futures), 30)
        with pytest.raises(ValueError):
            await asyncio.wait_for(asyncio.wrap_future(executor.submit(tasks.boom)), 30)
        shell = await asyncio.wait_for(asyncio.wrap_future(executor.shell("echo aio")), 30)
        return values, shell

    values, shell = asyncio.run(main())
    assert values == [2 * i for i in range(20)]
    assert shell.stdout == "aio\n"


@pytest.mark.parametrize("wait", ["result", "exception"])
def test_result_and_exception_timeout(executor, wait):
    """The timeout bounds the whole wait (a double wait would take >= 1.0 s)."""
    f = executor.submit(tasks.sleep_then, "late", 1.5)
    start = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        getattr(f, wait)(timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.45 <= elapsed < 0.95, f"{wait}(timeout=0.5) took {elapsed:.2f} s"
    assert f.result(timeout=30) == "late"


def test_cancel_a_queued_future(executor):
    blockers = [executor.submit(tasks.sleep_then, i, 0.5) for i in range(4)]
    queued = executor.submit(tasks.add, 1, 1)
    assert queued.cancel()
    assert queued.cancelled()
    with pytest.raises(cf.CancelledError):
        queued.result(timeout=1)
    assert [b.result(timeout=30) for b in blockers] == [0, 1, 2, 3]
    assert queued.cancelled()
    done = executor.submit(tasks.add, 2, 2)
    assert done.result(timeout=30) == 4
    assert not done.cancel()


def test_status_from_executor(executor):
    status = executor.status()
    assert status["slots"] == 2 and status["workers"] == 2
    assert status["clients"] + status["away_clients"] >= 1  # (itself; not the query)


# -- shutdown ----------------------------------------------------------------------------


def test_shutdown_wait_waits_for_all_results(cluster):
    ex = Executor(cluster.address)
    futures = [ex.submit(tasks.sleep_then, i, 0.02) for i in range(30)]
    futures.append(ex.shell("sleep 0.2; echo last"))
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures[:-1]] == list(range(30))
    assert futures[-1].result(timeout=0).stdout == "last\n"


def test_context_manager_waits(cluster):
    with Executor(cluster.address) as ex:
        futures = [ex.submit(tasks.sleep_then, i, 0.01) for i in range(10)]
    assert [f.result(timeout=0) for f in futures] == list(range(10))


def test_shutdown_cancel_futures(cluster):
    ex = Executor(cluster.address)
    futures = [ex.submit(tasks.sleep_then, i, 0.05) for i in range(60)]
    wait_until(futures[0].done, 30, message="the first task finished")  # the run is under way
    start = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - start < 5
    assert all(f.done() for f in futures)
    cancelled = [f for f in futures if f.cancelled()]
    finished = [f for f in futures if not f.cancelled()]
    assert len(cancelled) >= 30
    assert futures[0] in finished
    for f in finished:
        assert f.result(timeout=0) == futures.index(f)
    # the cancelled tasks do not linger on the broker, and those that were already running
    # have finished (their results came back, or were dropped) ...
    def idle() -> bool:
        status = query_status(cluster.address)
        return status["queued"] == 0 and status["running"] == 0
    wait_until(idle, 10, message="broker queue drained")
    # ... without changing the cancelled futures
    assert all(f.cancelled() for f in cancelled)
    for f in cancelled:
        with pytest.raises(cf.CancelledError):
            f.result(timeout=0)


def test_submit_after_shutdown_raises(cluster):
    ex = Executor(cluster.address)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(tasks.add, 1, 2)
    with pytest.raises(RuntimeError):
        ex.shell("true")
    with pytest.raises(RuntimeError):
        ex.map(tasks.identity, [1])


def test_shutdown_without_wait_returns_immediately(cluster):
    ex = Executor(cluster.address)
    f = ex.submit(tasks.sleep_then, "x", 2.0)
    start = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - start < 1.0  # it did not wait for the 2 s task
    assert f.result(timeout=30) == "x"


def test_shutdown_twice_is_harmless(cluster):
    ex = Executor(cluster.address)
    assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
    ex.shutdown()
    ex.shutdown()  # e.g. an explicit shutdown inside a `with Executor(...)` block


def test_executor_leaves_no_thread_or_fds(cluster):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    with Executor(cluster.address) as ex:  # warm up zmq's shared resources
        ex.submit(tasks.add, 1, 1).result(timeout=30)
    threads_before = threading.active_count()
    fds_before = fds()
    for _ in range(5):
        ex = Executor(cluster.address)
        ex.submit(tasks.add, 1, 1).result(timeout=30)
        ex.shutdown()
    wait_until(lambda: threading.active_count() <= threads_before, 5, message="threads ended")
    assert fds() <= fds_before


# -- session rules: callbacks, abandoned maps, leaving early -----------------------------


def test_a_done_callback_that_waits_on_another_future_does_not_deadlock(executor):
    """Callbacks run with no lock held: one may wait for another task's result."""
    later = executor.submit(tasks.sleep_then, "later", 0.2)
    first = executor.submit(tasks.add, 1, 1)
    seen: list = []
    first.add_done_callback(lambda f: seen.append((f.result(), later.result(timeout=20))))
    assert first.result(timeout=20) == 2
    wait_until(lambda: seen, 25, message="the callback finished")
    assert seen == [(2, "later")]


def test_an_abandoned_map_iterator_cancels_its_tasks(executor, cluster):
    before = query_status(cluster.address)["done"]
    it = executor.map(tasks.sleep_then, range(400), [0.02] * 400, buffersize=400)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    del it  # abandoned: nothing refers to it any more
    gc.collect()
    status = wait_until(lambda: (lambda s: s if s["queued"] == 0 and s["running"] == 0
                                 else None)(query_status(cluster.address)), 30,
                        message="the broker idle")
    ran = status["done"] - before
    assert ran < 100, f"{ran} of 400 tasks ran after their map was abandoned"


def test_leaving_with_by_an_exception_cancels_and_does_not_wait(cluster):
    start = time.monotonic()
    with pytest.raises(KeyError):
        with Executor(cluster.address) as ex:
            futures = [ex.submit(tasks.sleep_then, i, 1.0) for i in range(20)]
            raise KeyError("the caller's own error")
    assert time.monotonic() - start < 1.0  # not 10 s of queued work
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures) >= 15


def test_shutdown_with_a_timeout_cancels_what_is_left(cluster):
    ex = Executor(cluster.address)
    futures = [ex.submit(tasks.sleep_then, i, 1.0) for i in range(20)]
    start = time.monotonic()
    ex.shutdown(timeout=0.3)
    assert time.monotonic() - start < 2.0
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures) >= 15
    with pytest.raises(RuntimeError):
        ex.submit(tasks.add, 1, 1)


def test_a_cancelled_future_counts_as_done_for_wait_and_as_completed(cluster):
    with Executor(cluster.address) as ex:
        blockers = [ex.submit(tasks.sleep_then, i, 1.0) for i in range(6)]
        queued = ex.submit(tasks.add, 1, 1)
        assert queued.cancel()
        done, not_done = cf.wait([queued], timeout=5)
        assert done == {queued} and not not_done
        assert list(cf.as_completed([queued], timeout=5)) == [queued]
        for f in blockers:
            f.result(timeout=30)
