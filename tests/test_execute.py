"""zfalkon.execute: the Runner, in this process (no network)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest

from conftest import alive, wait_until
from zfalkon import payload
from zfalkon.errors import TaskError, TaskTimeout
from zfalkon.execute import Runner, resolve
from zfalkon.payload import ShellResult


@pytest.fixture
def runner():
    return Runner()


def run_py(runner, ref, *args, **kwargs):
    blob, failed = runner.run(payload.python_task(ref, args, kwargs))
    return blob, failed


def run_sh(runner, command, env=None, cwd=None, timeout=None):
    return runner.run(payload.shell_task(command, env, cwd, timeout))


def task_error(blob) -> TaskError:
    """The error a failed task's result blob reports, as the worker encoded it."""
    fields = payload.unpack(blob)
    assert fields[0] == payload.RESULT_ERROR, fields
    return TaskError(*fields[1:4])


# -- python tasks ------------------------------------------------------------------------


def test_python_value(runner):
    blob, failed = run_py(runner, "tasks:add", 2, 3)
    assert failed is False
    assert payload.result_value(blob) == 5


def test_python_kwargs_and_builtin(runner):
    blob, failed = run_py(runner, "tasks:echo_kwargs", a=1, b=[b"x", None])
    assert not failed and payload.result_value(blob) == {"a": 1, "b": [b"x", None]}
    blob, failed = run_py(runner, "builtins:max", 3, 9, 4)
    assert not failed and payload.result_value(blob) == 9


def test_python_static_and_class_methods(runner):
    blob, _ = run_py(runner, "tasks:Holder.static", 4)
    assert payload.result_value(blob) == ("static", 4)
    blob, _ = run_py(runner, "tasks:Holder.klass", 5)
    assert payload.result_value(blob) == ["Holder", 5]


def test_python_exception(runner):
    blob, failed = run_py(runner, "tasks:boom", "the message")
    assert failed is True
    exc = task_error(blob)
    assert exc.remote_type == "ValueError"
    assert exc.remote_message == "the message"
    tb = exc.remote_traceback
    assert tb.startswith("Traceback (most recent call last):")
    assert "tasks.py" in tb and "in boom" in tb
    assert tb.rstrip().endswith("ValueError: the message")


def test_python_exception_type_is_qualified_outside_builtins(runner):
    blob, failed = run_py(runner, "tasks:raise_custom", "custom")
    exc = task_error(blob)
    assert failed and exc.remote_type == "tasks.CustomError"
    assert exc.remote_message == "custom"


def test_python_system_exit_is_a_task_error(runner):
    blob, failed = run_py(runner, "tasks:raise_system_exit")
    exc = task_error(blob)
    assert failed and exc.remote_type == "SystemExit" and exc.remote_message == "7"


def test_python_wrong_arguments(runner):
    blob, failed = run_py(runner, "tasks:add", 1)
    exc = task_error(blob)
    assert failed and exc.remote_type == "TypeError"
    assert "b" in exc.remote_message


@pytest.mark.parametrize("ref, remote_type, words", [
    ("no_such_module_zf:f", "ModuleNotFoundError", "no_such_module_zf"),
    ("tasks:no_such_function", "AttributeError", "no_such_function"),
    ("tasks:Holder.no_such", "AttributeError", "no_such"),
    ("tasks:not_callable", "TypeError", "not callable"),
])
def test_python_import_errors(runner, ref, remote_type, words):
    blob, failed = run_py(runner, ref)
    exc = task_error(blob)
    assert failed
    assert exc.remote_type == remote_type
    assert words in exc.remote_message
    assert exc.remote_traceback


def test_failed_import_is_not_cached(runner):
    blob, failed = run_py(runner, "tasks:no_such_function")
    assert failed
    blob, failed = run_py(runner, "tasks:add", 1, 1)
    assert not failed and payload.result_value(blob) == 2


def test_python_unserializable_result(runner):
    blob, failed = run_py(runner, "tasks:returns_unserializable")
    exc = task_error(blob)
    assert failed and exc.remote_type == "SerializationError"
    assert "tasks:returns_unserializable" in exc.remote_message
    assert "object" in exc.remote_message


def test_resolve():
    import tasks

    assert resolve("tasks:add") is tasks.add
    assert resolve("os.path:join") is os.path.join
    with pytest.raises(TypeError):
        resolve("tasks:not_callable")


@pytest.mark.parametrize("blob, remote_type", [
    (msgpack.packb([7, "x"]), "ProtocolError"),
    (b"\xc1", None),
    (msgpack.packb([payload.TASK_PYTHON]), None),
    (msgpack.packb([payload.TASK_SHELL, "true"]), None),
], ids=["unknown-kind", "bad-msgpack", "python-no-ref", "shell-too-short"])
def test_bad_task_blobs_become_error_results(runner, blob, remote_type):
    result, failed = runner.run(blob)
    exc = task_error(result)
    assert failed
    if remote_type:
        assert exc.remote_type == remote_type


# -- shell tasks -------------------------------------------------------------------------


def shell(runner, *args, **kwargs) -> ShellResult:
    blob, failed = run_sh(runner, *args, **kwargs)
    result = payload.result_value(blob)
    assert isinstance(result, ShellResult)
    assert failed is (result.returncode != 0)
    return result


def test_shell_output_and_returncode(runner):
    r = shell(runner, "echo out; echo err >&2; exit 4")
    assert r.returncode == 4 and not r.ok
    assert r.stdout == "out\n" and r.stderr == "err\n"
    assert r.truncated is False
    assert 0 <= r.duration < 5


def test_shell_success(runner):
    r = shell(runner, "printf 'a\\nb'")
    assert r.ok and r.returncode == 0 and r.stdout == "a\nb" and r.stderr == ""


def test_shell_argv_is_not_interpreted(runner):
    r = shell(runner, ["echo", "$HOME", "a b", ";", "exit 3"])
    assert r.ok and r.stdout == "$HOME a b ; exit 3\n"


def test_shell_argv_uses_path(runner):
    r = shell(runner, ["sh", "-c", "exit 7"])
    assert r.returncode == 7


def test_shell_env_is_added(runner):
    r = shell(runner, 'echo "$ZF_TEST_VAR:$ZF_OTHER"; command -v sh >/dev/null && echo path-ok',
              env={"ZF_TEST_VAR": "value with spaces", "ZF_OTHER": ""})
    assert r.stdout == "value with spaces:\npath-ok\n"
    assert "ZF_TEST_VAR" not in os.environ


def test_shell_cwd(runner, tmp_path):
    before = os.getcwd()
    (tmp_path / "marker.txt").write_text("m")
    r = shell(runner, "pwd; ls", cwd=str(tmp_path))
    assert r.stdout.splitlines() == [str(tmp_path), "marker.txt"]
    assert os.getcwd() == before


def test_shell_nonexistent_cwd(runner, tmp_path):
    before = os.getcwd()
    blob, failed = run_sh(runner, "pwd", cwd=str(tmp_path / "missing"))
    exc = task_error(blob)
    assert failed and exc.remote_type == "FileNotFoundError"
    assert "missing" in exc.remote_message
    assert os.getcwd() == before


def test_shell_nonexistent_executable(runner):
    blob, failed = run_sh(runner, ["zf-no-such-program-xyz", "arg"])
    exc = task_error(blob)
    assert failed and exc.remote_type == "FileNotFoundError"


def test_shell_not_found_through_sh(runner):
    r = shell(runner, "zf-no-such-program-xyz")
    assert r.returncode == 127 and "not found" in r.stderr


def test_shell_killed_by_signal(runner):
    r = shell(runner, "kill -TERM $$")
    assert r.returncode == -signal.SIGTERM


def test_shell_stdin_is_dev_null(runner):
    start = time.monotonic()
    r = shell(runner, "cat; echo done")
    assert r.stdout == "done\n"
    assert time.monotonic() - start < 5


def test_shell_undecodable_output_is_replaced(runner):
    r = shell(runner, "printf 'a\\377b'")
    assert r.stdout == "a\ufffdb"


def test_shell_timeout_keeps_partial_output(runner):
    start = time.monotonic()
    blob, failed = run_sh(runner, "echo started; echo warn >&2; sleep 20; echo never",
                          timeout=0.5)
    elapsed = time.monotonic() - start
    assert failed
    with pytest.raises(TaskTimeout) as info:
        payload.result_value(blob)
    exc = info.value
    assert exc.timeout == 0.5
    assert exc.stdout == "started\n" and exc.stderr == "warn\n"
    assert 0.45 <= elapsed < 3


def test_shell_timeout_kills_the_whole_group(runner):
    blob, _ = run_sh(runner, "sleep 30 & echo $!; sleep 30", timeout=0.3)
    with pytest.raises(TaskTimeout) as info:
        payload.result_value(blob)
    pid = int(info.value.stdout.strip())
    try:
        wait_until(lambda: not alive(pid), 5, message="background sleep killed")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_shell_timeout_with_continuous_output(runner):
    start = time.monotonic()
    blob, failed = run_sh(runner, "yes", timeout=0.5)
    assert failed
    with pytest.raises(TaskTimeout) as info:
        payload.result_value(blob)
    assert time.monotonic() - start < 5
    assert info.value.stdout.startswith("y\ny\n")


def test_shell_background_child_does_not_hang(runner):
    start = time.monotonic()
    r = shell(runner, "sleep 30 & echo $!")
    assert time.monotonic() - start < 5
    assert r.ok
    pid = int(r.stdout.strip())
    try:
        wait_until(lambda: not alive(pid), 5, message="background sleep killed")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_shell_escaped_child_holding_pipe_does_not_hang(runner, tmp_path):
    """A child in its own session survives the group kill and keeps stdout open: the
    runner must still return (after its grace read), not wait for the child."""
    ready = tmp_path / "ready"
    start = time.monotonic()
    # the task ends once the child has printed its PID (it touches `ready` after that)
    r = shell(runner, f"setsid sh -c 'echo $$; touch {ready}; exec sleep 30' & "
                      f"while [ ! -e {ready} ]; do sleep 0.01; done", timeout=20)
    elapsed = time.monotonic() - start
    pid = int(r.stdout.strip())
    try:
        assert alive(pid), "the escaped child should have survived (test precondition)"
        assert r.ok
        assert elapsed < 5
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_shell_output_cap_truncates():
    runner = Runner(output_cap=1000)
    r = shell(runner, "head -c 5000 /dev/zero | tr '\\0' a; head -c 3000 /dev/zero | tr '\\0' b >&2")
    assert r.truncated is True
    assert r.stdout == "a" * 1000
    assert r.stderr == "b" * 1000


def test_shell_output_at_cap_is_not_truncated():
    runner = Runner(output_cap=1000)
    r = shell(runner, "head -c 1000 /dev/zero | tr '\\0' a")
    assert r.truncated is False and len(r.stdout) == 1000


def test_shell_large_output_on_both_pipes(runner):
    """More than a pipe buffer on stdout and stderr at once must not deadlock."""
    start = time.monotonic()
    r = shell(runner, "head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2; echo x")
    assert r.ok and not r.truncated
    assert len(r.stdout) == 300002 and len(r.stderr) == 200000
    assert time.monotonic() - start < 10


def test_shell_default_cap_truncates_big_output(runner):
    r = shell(runner, "head -c 3000000 /dev/zero")
    assert r.truncated is True and len(r.stdout) == runner.output_cap
    assert r.ok


_FD_LEAK_PROBE = """
import os, sys
from zfalkon import payload
from zfalkon.execute import Runner

runner, missing = Runner(), sys.argv[1]
def count():
    return len(os.listdir("/proc/self/fd"))

runner.run(payload.shell_task("true", None, None, None))  # warm up
before = count()
for _ in range(20):
    runner.run(payload.shell_task("echo x; echo y >&2", None, None, None))
    runner.run(payload.shell_task("true", None, missing, None))
    runner.run(payload.shell_task(["zf-no-such-program-xyz"], None, None, None))
    runner.run(payload.shell_task("sleep 5", None, None, 0.01))
print(before, count())
"""


def test_runner_does_not_leak_file_descriptors(tmp_path):
    """In a fresh interpreter: in pytest's, threads left by earlier tests open and close
    descriptors of their own (29 against 23 once, in a full run)."""
    out = subprocess.run([sys.executable, "-c", _FD_LEAK_PROBE, str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split())
    assert after == before
