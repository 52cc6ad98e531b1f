"""Task options (``Executor.options``: time limits, captured output) and forced
cancellation of running tasks, with real processes: one worker, one slot, an output cap of
1000 bytes."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import time

import pytest

import tasks
from conftest import alive, wait_until, worker_env, written_pid
from zfalkon import ConfigError, Executor, LocalCluster, TaskOptions, TaskTimeout

CAP = 1000


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=1, slots_per_worker=1, env=worker_env(),
                      worker_args=["--output-cap", str(CAP)]) as c:
        yield c


@pytest.fixture
def ex(cluster):
    ex = Executor(cluster.address, connect_timeout=30)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True, timeout=30)


def _pid(path) -> int:
    """The PID of the process that wrote its PID (and PID namespace) in ``path``."""
    return written_pid(str(path))


def _serving(ex: Executor) -> None:
    """The slot keeps serving: Python and shell tasks succeed."""
    assert ex.submit(tasks.add, 2, 3).result(timeout=30) == 5
    assert ex.shell("echo ok").result(timeout=30).stdout == "ok\n"


# -- time limits ---------------------------------------------------------------------------


def test_a_python_task_past_its_time_limit_is_killed(ex, tmp_path):
    path = tmp_path / "pid"
    start = time.monotonic()
    fut = ex.options(timeout=1).submit(tasks.pid_then_sleep, str(path), 60)
    pid = _pid(path)
    with pytest.raises(TaskTimeout) as err:
        fut.result(timeout=30)
    assert time.monotonic() - start < 6, "the time limit was not enforced"
    assert err.value.timeout == 1
    assert "timeout of 1 s and was killed" in str(err.value)
    wait_until(lambda: not alive(pid), 5, message=f"the task's process {pid} is gone")
    _serving(ex)


def test_a_task_within_its_time_limit_returns_and_others_are_not_limited(ex):
    assert ex.options(timeout=30).submit(tasks.sleep_then, 7, 0.2).result(timeout=30) == 7
    assert ex.submit(tasks.sleep_then, 8, 1.5).result(timeout=30) == 8  # (no limit left over)
    limited = ex.options(timeout=20)
    assert list(limited.map(tasks.square, range(10))) == [x * x for x in range(10)]


def test_tasks_queued_behind_a_timed_out_task_still_run(ex, tmp_path):
    slow = ex.options(timeout=1).submit(tasks.pid_then_sleep, str(tmp_path / "pid"), 60)
    after = [ex.submit(tasks.square, i) for i in range(5)]
    with pytest.raises(TaskTimeout):
        slow.result(timeout=30)
    assert [f.result(timeout=30) for f in after] == [i * i for i in range(5)]


# -- captured output -----------------------------------------------------------------------


def test_captured_output_is_on_the_future(ex):
    fut = ex.options(capture_output=True).submit(tasks.noisy, 2)
    assert fut.result(timeout=30) == 2  # the function's own value
    assert "outout\n" in fut.stdout and "fd1\n" in fut.stdout
    assert "errerr\n" in fut.stderr and "fd2\n" in fut.stderr
    assert "err" not in fut.stdout and "out" not in fut.stderr
    assert fut.output_truncated is False
    plain = ex.submit(tasks.noisy, 1)
    assert plain.result(timeout=30) == 1
    assert plain.stdout is None and plain.stderr is None


def test_captured_output_of_a_failed_task(ex):
    fut = ex.options(capture_output=True).submit(tasks.noisy, 1, fail=True)
    with pytest.raises(ValueError, match="noisy failed"):
        fut.result(timeout=30)
    assert "out\n" in fut.stdout and "err\n" in fut.stderr


def test_captured_output_is_cut_at_the_output_cap(ex):
    fut = ex.options(capture_output=True).submit(tasks.noisy, 2000)
    assert fut.result(timeout=30) == 2000
    assert len(fut.stdout) == CAP and fut.stdout.startswith("outout")
    assert len(fut.stderr) == CAP
    assert fut.output_truncated is True
    # (the next captured task starts empty)
    small = ex.options(capture_output=True).submit(tasks.noisy, 1)
    assert small.result(timeout=30) == 1 and small.stdout == "out\nfd1\n"


def test_map_with_captured_output_yields_the_values(ex):
    view = ex.options(capture_output=True)
    assert list(view.map(tasks.noisy, [1, 2, 3])) == [1, 2, 3]


# -- forced cancellation -------------------------------------------------------------------


def test_force_cancel_kills_a_running_python_task(ex, tmp_path):
    path = tmp_path / "pid"
    fut = ex.submit(tasks.pid_then_sleep, str(path), 60)
    pid = _pid(path)
    start = time.monotonic()
    assert fut.cancel() is False  # (running: a plain cancel does not stop it)
    assert fut.cancel(force=True) is True
    assert time.monotonic() - start < 10
    assert fut.cancelled() and fut.done()
    with pytest.raises(cf.CancelledError):
        fut.result(timeout=1)
    wait_until(lambda: not alive(pid), 5, message=f"the task's process {pid} is gone")
    _serving(ex)


def test_force_cancel_kills_a_running_shell_command_and_its_group(ex, tmp_path):
    path = tmp_path / "pid"
    fut = ex.shell(f"sleep 60 & echo $! $(stat -Lc %i /proc/self/ns/pid) > {path}; wait")
    pid = _pid(path)  # the sleep: in the command's process group, not the host's
    assert ex.cancel_running(fut) is True
    assert fut.cancelled()
    wait_until(lambda: not alive(pid), 5, message=f"the command's process {pid} is gone")
    _serving(ex)


def test_tasks_queued_behind_a_killed_task_run_again(ex, tmp_path):
    path = tmp_path / "pid"
    slow = ex.submit(tasks.pid_then_sleep, str(path), 60)
    after = [ex.submit(tasks.square, i) for i in range(5)]
    _pid(path)
    assert slow.cancel(force=True) is True
    assert [f.result(timeout=30) for f in after] == [i * i for i in range(5)]


def test_force_cancel_of_a_queued_or_finished_task(ex, tmp_path):
    path = tmp_path / "pid"
    slow = ex.submit(tasks.pid_then_sleep, str(path), 60)
    queued = ex.submit(tasks.square, 3)
    _pid(path)
    assert queued.cancel(force=True) is True  # (queued here, in the slot or the host)
    assert queued.cancelled()
    assert slow.cancel(force=True) is True
    done = ex.submit(tasks.square, 4)
    assert done.result(timeout=30) == 16
    assert done.cancel(force=True) is False and done.result() == 16


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"timeout": 0}, {"timeout": -1}, {"timeout": "5"}, {"timeout": math.nan},
    {"timeout": math.inf}, {"timeout": True}, {"capture_output": "yes"},
    {"capture_output": 1},
])
def test_bad_options_are_refused(ex, bad):
    with pytest.raises(ConfigError):
        ex.options(**bad)


def test_unknown_options_are_refused(ex):
    with pytest.raises(TypeError):
        ex.options(time_limit=5)


def test_options_view_is_immutable(ex):
    view = ex.options(timeout=5)
    assert isinstance(view, TaskOptions)
    assert view.timeout == 5.0 and view.capture_output is False and view.executor is ex
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.timeout = 1  # type: ignore[misc]
    assert ex.options().timeout is None
