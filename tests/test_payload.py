"""zfalkon.payload: callable references, task blobs, result blobs."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

import msgpack
import pytest

import tasks
from zfalkon import payload
from zfalkon.errors import SerializationError, TaskError, TaskTimeout, WorkerCrashed
from zfalkon.payload import ShellResult

# -- callable_ref ------------------------------------------------------------------------


@pytest.mark.parametrize("fn, ref", [
    (tasks.add, "tasks:add"),
    (tasks.boom, "tasks:boom"),
    (abs, "builtins:abs"),
    (len, "builtins:len"),
    (os.getpid, "posix:getpid"),
    (tasks.Holder.static, "tasks:Holder.static"),
    (tasks.Holder.klass, "tasks:Holder.klass"),
    (tasks.Holder.method, "tasks:Holder.method"),  # an unbound function: importable by name
    ("tasks:add", "tasks:add"),
    ("os.path:join", "os.path:join"),
    ("pkg.mod:Cls.method", "pkg.mod:Cls.method"),
])
def test_callable_ref_accepts(fn, ref):
    assert payload.callable_ref(fn) == ref


def _local_fn():
    def inner():
        return 1
    return inner


class _Callable:
    def __call__(self):
        return 1


@pytest.mark.parametrize("fn, words", [
    (lambda: 1, "lambda"),
    (tasks.lambda_task, "lambda"),
    (_local_fn(), "nested"),
    (tasks.make_nested(), "nested"),
    (tasks.Holder().method, "bound method"),
    (functools.partial(tasks.add, 1), "module-level"),
    ([].append, "module-level"),
    (_Callable(), "module-level"),
    ("tasks.add", "module:qualname"),
    ("tasks:", "module:qualname"),
    (":add", "module:qualname"),
    ("", "module:qualname"),
], ids=["lambda", "module-lambda", "nested", "nested-in-tasks", "bound-method", "partial",
        "builtin-bound-method", "callable-instance", "no-colon", "no-qualname", "no-module",
        "empty"])
def test_callable_ref_refuses(fn, words):
    with pytest.raises(SerializationError) as info:
        payload.callable_ref(fn)
    assert words in str(info.value)
    assert isinstance(info.value, TypeError)


def test_callable_ref_refuses_main_functions():
    def fake():
        return 1

    fake.__module__ = "__main__"
    fake.__qualname__ = "fake"
    with pytest.raises(SerializationError, match="__main__"):
        payload.callable_ref(fake)


# -- python_task -------------------------------------------------------------------------


def test_python_task_layout():
    assert payload.unpack(payload.python_task("tasks:add", (1, 2), {})) == [
        payload.TASK_PYTHON, "tasks:add", [1, 2]]
    assert payload.unpack(payload.python_task("tasks:echo_kwargs", (), {"a": b"x"})) == [
        payload.TASK_PYTHON, "tasks:echo_kwargs", [], {"a": b"x"}]


def test_python_task_carries_msgpack_types():
    args = (None, True, -5, 2**63, 1.5, "s", b"\x00b", [1, [2]], {"k": {"n": None}}, {1: "int key"})
    task = payload.unpack(payload.python_task("m:f", args, {}))
    assert task[2] == [None, True, -5, 2**63, 1.5, "s", b"\x00b", [1, [2]], {"k": {"n": None}},
                       {1: "int key"}]


def test_python_task_carries_typed_values():
    args = ((1, (2,)), {1, 2}, 2**64, -(2**63) - 1, 1j)
    task = payload.unpack(payload.python_task("m:f", args, {}))
    assert task[2] == list(args) and type(task[2][0]) is tuple and type(task[2][1]) is set


@pytest.mark.parametrize("bad", [object(), pathlib.Path("/"), [1, object()], {"k": object()}],
                         ids=["object", "path", "nested-object", "nested-in-dict"])
def test_python_task_refuses_unserializable_args(bad):
    with pytest.raises(SerializationError, match="m:f") as info:
        payload.python_task("m:f", (bad,), {})
    assert "pickle=True" in str(info.value)
    with pytest.raises(SerializationError):
        payload.python_task("m:f", (), {"x": bad})


def test_python_task_pickles_only_when_allowed():
    blob = payload.python_task("m:f", (pathlib.Path("/x"),), {}, payload.FLAG_PICKLE)
    with pytest.raises(ValueError, match="pickle"):
        payload.unpack(blob)
    assert payload.unpack(blob, allow_pickle=True)[2] == [pathlib.Path("/x")]


# -- shell_task --------------------------------------------------------------------------


def test_shell_task_string_and_argv():
    assert payload.unpack(payload.shell_task("echo hi")) == [
        payload.TASK_SHELL, "echo hi", None, None, None]
    assert payload.unpack(payload.shell_task(("ls", "-l"), {"A": "1"}, "/tmp", 2.5)) == [
        payload.TASK_SHELL, ["ls", "-l"], {"A": "1"}, "/tmp", 2.5]
    assert payload.unpack(payload.shell_task(["true"], timeout=3))[4] == 3


@pytest.mark.parametrize("kwargs", [
    {"command": []},
    {"command": ["ls", 1]},
    {"command": ["ls", b"-l"]},
    {"command": ["ls", None]},
    {"command": "ls", "env": {"A": 1}},
    {"command": "ls", "env": {1: "a"}},
    {"command": "ls", "env": {"A": b"bytes"}},
    {"command": "ls", "timeout": 0},
    {"command": "ls", "timeout": -1},
    {"command": "ls", "timeout": float("nan")},
], ids=["empty-argv", "int-arg", "bytes-arg", "none-arg", "env-int-value", "env-int-key",
        "env-bytes-value", "zero-timeout", "negative-timeout", "nan-timeout"])
def test_shell_task_validation(kwargs):
    with pytest.raises(SerializationError):
        payload.shell_task(**kwargs)


def test_shell_task_path_cwd_is_sent_as_text():
    task = payload.unpack(payload.shell_task("ls", cwd=pathlib.Path("/tmp")))
    assert task[3] == "/tmp"


@pytest.mark.parametrize("kwargs", [
    {"command": "ls", "cwd": 5},
    {"command": "ls", "timeout": "5"},
], ids=["int-cwd", "str-timeout"])
def test_shell_task_bad_cwd_or_timeout_type_is_serialization_error(kwargs):
    """Every invalid shell-task argument must raise SerializationError, not a bare
    TypeError from msgpack or from comparing a str with 0."""
    with pytest.raises(SerializationError):
        payload.shell_task(**kwargs)


# -- result_value ------------------------------------------------------------------------

def _blob(*fields):
    return msgpack.packb(fields)


@pytest.mark.parametrize("value", [None, 0, "text", b"bytes", [1, 2], {"a": [None]}])
def test_result_value_value(value):
    assert payload.result_value(_blob(payload.RESULT_VALUE, value)) == value


def test_result_value_shell():
    r = payload.result_value(_blob(payload.RESULT_SHELL, 3, b"out\n", b"err\xff", 0.25, True), "w/0")
    assert r == ShellResult(3, "out\n", "err\ufffd", 0.25, True, "w/0")
    assert not r.ok
    ok = payload.result_value(_blob(payload.RESULT_SHELL, 0, b"", b"", 0.0, False))
    assert ok.ok and ok.worker is None and ok.truncated is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.returncode = 1  # type: ignore[misc]


def test_result_value_error():
    blob = payload.error_result("ValueError", "bad", "Traceback ...\nValueError: bad\n")
    with pytest.raises(TaskError) as info:
        payload.result_value(blob, "w/1")
    exc = info.value
    assert type(exc) is TaskError
    assert exc.remote_type == "ValueError"
    assert exc.remote_message == "bad"
    assert exc.remote_traceback.endswith("ValueError: bad\n")
    assert exc.worker == "w/1"
    assert str(exc) == "ValueError: bad"


def test_result_value_timeout():
    with pytest.raises(TaskTimeout) as info:
        payload.result_value(_blob(payload.RESULT_TIMEOUT, 1.5, b"partial", b"e", 1.6), "w")
    exc = info.value
    assert isinstance(exc, TimeoutError) and isinstance(exc, TaskError)
    assert exc.timeout == 1.5 and exc.stdout == "partial" and exc.stderr == "e"
    assert exc.worker == "w"
    assert "1.5 s" in str(exc)


def test_result_value_crashed():
    with pytest.raises(WorkerCrashed) as info:
        payload.result_value(payload.crashed_result("killed by SIGSEGV"), "w/0")
    assert info.value.remote_message == "killed by SIGSEGV"
    assert info.value.remote_type == "WorkerCrashed"
    assert info.value.worker == "w/0"


def test_result_value_unknown_kind():
    with pytest.raises(TaskError) as info:
        payload.result_value(_blob(9, "x"))
    assert info.value.remote_type == "ProtocolError"
    assert "9" in info.value.remote_message


def test_unpack_refuses_unknown_extension_types_and_unallowed_pickles():
    with pytest.raises(ValueError, match="extension type 99"):
        payload.unpack(msgpack.packb([0, msgpack.ExtType(99, b"x")]))
    with pytest.raises(ValueError, match="pickle"):
        payload.unpack(msgpack.packb([0, msgpack.ExtType(20, b"x")]))


def test_unpack_allows_non_string_map_keys():
    assert payload.unpack(msgpack.packb({1: 2, b"k": 3})) == {1: 2, b"k": 3}


def test_lost_result_raises_worker_lost_with_worker_and_attempts():
    from zfalkon.errors import WorkerLost

    with pytest.raises(WorkerLost) as info:
        payload.result_value(payload.lost_result("host-1/0", 3))
    assert info.value.worker == "host-1/0" and info.value.attempts == 3
    assert "lost 3 times" in str(info.value)


@pytest.mark.parametrize("flags", [0, payload.FLAG_PICKLE])
@pytest.mark.parametrize("args", [(1,), ((1, 2), {3}), (), ("s", b"b", [None])])
def test_task_encoder_makes_the_blobs_python_task_makes(flags, args):
    def local(x=0, *rest):
        return x

    for fn in ("builtins:abs", payload.function_spec(local)):
        assert payload.task_encoder(fn, flags)(args) == payload.python_task(fn, args, {}, flags)
    with pytest.raises(SerializationError, match="builtins:abs"):
        payload.task_encoder("builtins:abs")((object(),))
