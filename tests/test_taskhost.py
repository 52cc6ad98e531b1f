"""zfalkon.taskhost: the slot's pipes to a task host, both ends, without a broker.

A real host loop (:func:`zfalkon.taskhost.serve` with a real Runner) runs in a forked child
and the slot's :class:`~zfalkon.taskhost.Host` drives it, as a slot does: results come back
in the order the tasks were sent, each once, with its failed flag, whatever the batches;
a task by digest whose function the host lacks is sent back unrun; a result over the
limit becomes an error; results done before a long task do not wait for it. Then a fake
host writes what an honest one never would (a confused or hostile task can write to the
host's pipe): the slot's side raises HostDied (the slot then kills that host) and never
takes more than its frame bound.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import signal
import struct
import time
from typing import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zfalkon import core, payload
from zfalkon import taskhost as T
from zfalkon.errors import TaskError
from zfalkon.taskhost import Answered, Host, HostDied


@contextlib.contextmanager
def host_process(result_limit: int | None = None, held: list[str] = []) -> Iterator[Host]:
    """A host loop in a forked child, and the slot's handle on it (key 1). The child is
    SIGKILLed and reaped by PID afterwards."""
    task_r, task_w = os.pipe()
    result_r, result_w = os.pipe()
    counter = memoryview(mmap.mmap(-1, 8)).cast("q")
    pid = os.fork()
    if pid == 0:  # the host
        code = 0
        try:
            os.close(task_w)
            os.close(result_r)
            from zfalkon.execute import Runner
            if result_limit is not None:
                T.MAX_RESULT_BYTES = result_limit
            runner = Runner()
            runner.stager.new_held.extend(held)  # (as if its tasks had cached these)
            T.serve(task_r, result_w, runner, counter)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(task_r)
    os.close(result_w)
    host = Host(pid, 1, task_w, result_r, counter)
    try:
        yield host
    finally:
        host.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def collect(host: Host, n: int, timeout: float = 20.0) -> Answered:
    """Receive until ``n`` results (and tasks sent back) are in, or fail after ``timeout``."""
    got = Answered()
    deadline = time.monotonic() + timeout
    while len(got.ids) + len(host.needed) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got.ids)} of {n} results within {timeout} s"
        select.select([host.result_r], [], [], min(left, 0.5))
        more = host.receive()
        got.ids += more.ids
        got.results += more.results
        got.failed += more.failed
        got.seconds += more.seconds
    return got


def task(i: int) -> bytes:
    """A task whose result names it: ``i + 1``, or an error for every seventh."""
    if i % 7 == 3:
        return payload.python_task("builtins:int", ("not a number",), {})
    return payload.python_task("operator:add", (i, 1), {})


# -- an honest host -----------------------------------------------------------------------


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_results_come_back_in_order_each_once_whatever_the_batches(batches):
    with host_process() as host:
        tid = 0
        for size in batches:
            host.send([(tid + k + 1, task(tid + k)) for k in range(size)])
            tid += size
        got = collect(host, tid)
        assert got.ids == list(range(1, tid + 1))
        assert not host.inflight and host.inflight_bytes == 0
        assert got.failed == [i % 7 == 3 for i in range(tid)]
        for i, (result, failed) in enumerate(zip(got.results, got.failed)):
            if not failed:
                assert payload.result_value(result) == i + 1
        assert got.seconds >= 0.0
        assert host.running() == tid  # (its word on the task it started last)


def test_a_task_by_digest_the_host_lacks_is_sent_back_unrun_between_others():
    fn = payload.function_spec(lambda x: x * 2, "value")
    assert isinstance(fn, payload.Function)
    stored = payload.python_task(fn, (5,), {}, stored=True)
    with host_process() as host:
        host.send([(1, task(1)), (2, stored), (3, task(2))])
        got = collect(host, 3)
        assert got.ids == [1, 3] and host.needed == [(2, stored)]
        host.needed = []
        host.send([(2, payload.with_function(stored, fn.blob)), (4, stored)])
        got = collect(host, 2)  # (loaded with the first: the second by digest runs too)
        assert got.ids == [2, 4] and [payload.result_value(r) for r in got.results] == [10, 10]


def test_a_result_over_the_limit_becomes_an_error_the_others_stand():
    with host_process(result_limit=1000) as host:
        host.send([(1, payload.python_task("builtins:bytes", (10,), {})),
                   (2, payload.python_task("builtins:bytes", (5000,), {})),
                   (3, payload.python_task("builtins:bytes", (20,), {}))])
        got = collect(host, 3)
        assert got.ids == [1, 2, 3] and got.failed == [False, True, False]
        assert payload.result_value(got.results[0]) == bytes(10)
        with pytest.raises(TaskError, match="over the 1000 byte limit"):
            payload.result_value(got.results[1])


def test_results_done_before_a_long_task_do_not_wait_for_it():
    with host_process() as host:
        host.send([(1, task(1)), (2, task(2)),
                   (3, payload.python_task("time:sleep", (30,), {}))])
        started = time.monotonic()
        got = collect(host, 2, timeout=10)
        assert got.ids == [1, 2] and host.running() == 3
        assert time.monotonic() - started < 10


def test_a_big_task_goes_through_the_pipe_in_pieces():
    blob = payload.python_task("builtins:len", (b"x" * (3 << 20),), {})
    with host_process() as host:
        host.send([(1, blob)])
        got = collect(host, 1)
        assert payload.result_value(got.results[0]) == 3 << 20


# -- a confused or hostile host -------------------------------------------------------------


class FakeHost:
    """The slot's handle on a "host" that is only a pipe the test writes to, with
    ``sent`` tasks (ids 1..sent) in flight."""

    def __init__(self, sent: int = 3) -> None:
        self.task_r, task_w = os.pipe()
        result_r, self.w = os.pipe()
        counter = memoryview(mmap.mmap(-1, 8)).cast("q")
        self.host = Host(os.getpid(), 1, task_w, result_r, counter)
        self.host.inflight.extend((i, b"t") for i in range(1, sent + 1))

    def write(self, data: bytes) -> None:
        os.write(self.w, data)

    def end(self) -> None:
        os.close(self.w)
        self.w = -1

    def __enter__(self) -> "FakeHost":
        return self

    def __exit__(self, *exc: object) -> None:
        self.host.close()
        os.close(self.task_r)
        if self.w >= 0:
            os.close(self.w)


def raw(head: object, body: bytes = b"") -> bytes:
    """A frame of results with ``head`` (any msgpack) and ``body``."""
    packed = msgpack.packb(head)
    return struct.pack("<II", len(packed), len(body)) + packed + body


def frame(results: list[bytes], *rest: object) -> bytes:
    """A well-formed frame: ``results``, then failed, need, held and seconds."""
    return raw([[len(r) for r in results], *rest], b"".join(results))


HOSTILE = {
    "not msgpack": struct.pack("<II", 4, 0) + b"\xc1\xc1\xc1\xc1",
    "four fields": raw([[1], [False], [], []], b"r"),
    "sizes not ints": raw([[b"r"], [False], [], [], 0.0], b"r"),
    "a negative size": raw([[-1, 2], [False, False], [], [], 0.0], b"r"),
    "sizes past the body": raw([[2], [False], [], [], 0.0], b"r"),
    "sizes short of the body": raw([[1], [False], [], [], 0.0], b"rr"),
    "flags not bools": raw([[1], [0], [], [], 0.0], b"r"),
    "fewer flags": frame([b"r", b"s"], [False], [], [], 0.0),
    "more results than tasks": frame([b"r"] * 4, [False] * 4, [], [], 0.0),
    "need not ints": frame([b"r"], [False], ["0"], [], 0.0),
    "held not strings": frame([b"r"], [False], [], [1], 0.0),
    "seconds not a float": frame([b"r"], [False], [], [], 1),
    "seconds not a number": frame([b"r"], [False], [], [], float("nan")),
    "seconds infinite": frame([b"r"], [False], [], [], float("inf")),
    "seconds negative": frame([b"r"], [False], [], [], -1.0),
    "a list too long to build": raw([[0] * (T._MAX_HEAD_ITEMS + 1), [], [], [], 0.0]),
    "a head past the bound": struct.pack("<II", T._MAX_HEAD + 1, 0),
    "a body past the bound": struct.pack("<II", 10, T._MAX_BODY + 1),
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_a_frame_an_honest_host_never_writes_is_a_dead_host(what):
    with FakeHost() as fake:
        fake.write(HOSTILE[what])
        with pytest.raises(HostDied):
            fake.host.receive()


def test_a_result_over_the_limit_from_the_host_is_a_dead_host(monkeypatch):
    monkeypatch.setattr(T, "MAX_RESULT_BYTES", 100)
    with FakeHost() as fake:
        fake.write(frame([b"r" * 101], [False], [], [], 0.0))
        with pytest.raises(HostDied):
            fake.host.receive()


def test_a_frame_past_the_bound_is_refused_from_its_header_alone():
    """The slot refuses it before buffering the rest (a 4-byte header claiming 4 GiB)."""
    with FakeHost() as fake:
        fake.write(struct.pack("<II", 20, 2**32 - 1) + b"x" * 1000)
        with pytest.raises(HostDied):
            fake.host.receive()


def test_partial_frames_wait_and_the_end_of_the_pipe_is_a_dead_host():
    with FakeHost() as fake:
        host = fake.host
        whole = frame([b"a", b"b"], [False, True], [], ["s3://k"], 0.5)
        fake.write(whole[:11])
        assert host.receive().ids == []  # (a partial frame: nothing yet)
        fake.write(whole[11:])
        got = host.receive()
        assert (got.ids, got.results, got.failed, got.seconds) == \
            ([1, 2], [b"a", b"b"], [False, True], 0.5)
        assert host.held == ["s3://k"] and [t for t, _ in host.inflight] == [3]
        fake.end()
        with pytest.raises(HostDied):
            host.receive()


def test_data_keys_a_host_reports_are_bounded_before_the_slot_passes_them_on():
    """A task can write to its host's pipe: what it claims its machine caches reaches the
    broker's data-aware dispatch (only a hint), at most _HELD_PER_FRAME keys a frame and
    _HELD_KEPT in all, none longer than the broker keeps."""
    with FakeHost(sent=1000) as fake:
        keys = [f"s3://b/{i}" for i in range(1000)] + ["s3://" + "k" * 600]
        fake.write(frame([b"r"], [False], [], keys[-1:] + keys, 0.0))
        assert fake.host.receive().ids == [1]
        assert fake.host.held == keys[:T._HELD_PER_FRAME - 1]
        for _ in range(3 * T._HELD_KEPT // T._HELD_PER_FRAME):
            fake.write(frame([], [], [], keys[:T._HELD_PER_FRAME], 0.0))
            fake.host.receive()
        assert len(fake.host.held) <= T._HELD_KEPT + T._HELD_PER_FRAME
        assert core.MAX_DATA_KEY_CHARS == T._HELD_KEY_CHARS


def test_results_before_a_bad_frame_are_returned_then_the_host_is_dead():
    with FakeHost() as fake:
        fake.write(frame([b"a"], [False], [], [], 0.1) + HOSTILE["not msgpack"])
        assert fake.host.receive().ids == [1]
        with pytest.raises(HostDied):
            fake.host.receive()


def test_a_host_reports_its_data_keys_within_its_heads_bound():
    """Keys of up to 512 bytes, 64 a frame: 200 keys of 500 three-byte characters would
    pass a bound in characters, and 64 of them would break the head's (the slot would take
    the host for dead)."""
    wide, narrow = ["\u20ac" * 500] * 200, [f"s3://b/{i:0490d}" for i in range(100)]
    with host_process(held=wide + narrow) as host:
        for tid in range(1, 6):  # (a frame each: 64 keys each, the wide ones left out)
            host.send([(tid, task(tid))])
            assert collect(host, 1).ids == [tid]
        assert host.held == narrow
