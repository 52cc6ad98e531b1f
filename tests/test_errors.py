"""zfalkon.errors: attributes, messages and pickling of the exceptions."""

from __future__ import annotations

import pickle

import pytest

from zfalkon.errors import (
    BrokerUnavailable,
    ConfigError,
    ProtocolError,
    SerializationError,
    TaskError,
    TaskTimeout,
    VersionMismatch,
    WorkerCrashed,
    WorkerLost,
)


def test_task_error_attributes():
    exc = TaskError("ValueError", "bad", "Traceback...", "w/0")
    assert str(exc) == "ValueError: bad"
    assert (exc.remote_type, exc.remote_message, exc.remote_traceback, exc.worker) == (
        "ValueError", "bad", "Traceback...", "w/0")
    assert TaskError("KeyError", "k").worker is None


def test_task_timeout_attributes():
    exc = TaskTimeout(2.5, "out", "err", "w/1")
    assert exc.timeout == 2.5 and exc.stdout == "out" and exc.stderr == "err"
    assert exc.remote_type == "TaskTimeout" and "2.5 s" in str(exc)
    assert exc.worker == "w/1"


def test_worker_crashed_attributes():
    exc = WorkerCrashed("killed by SIGSEGV", "w/0")
    assert exc.remote_type == "WorkerCrashed" and exc.remote_message == "killed by SIGSEGV"
    assert str(exc) == "WorkerCrashed: killed by SIGSEGV"


@pytest.mark.parametrize("exc", [
    TaskError("ValueError", "bad", "tb", "w"),
    TaskTimeout(1.0, "o", "e", "w"),
    WorkerCrashed("exited with status 3", "w"),
    WorkerLost("lost 3 times", "w/0", 3),
    ProtocolError("m", "malformed"),
    VersionMismatch("protocol 1 vs 2"),
    ConfigError("c"),
    SerializationError("s"),
    BrokerUnavailable("b"),
], ids=lambda e: type(e).__name__)
def test_pickle_round_trip(exc):
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    for attr in ("remote_type", "remote_message", "remote_traceback", "worker", "timeout",
                 "stdout", "stderr", "code"):
        assert getattr(copy, attr, None) == getattr(exc, attr, None), attr
