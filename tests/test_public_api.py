"""The public surface: zfalkon.__all__ and the exception tree."""

from __future__ import annotations

import concurrent.futures as cf
import inspect

import pytest

import zfalkon
from zfalkon import errors
from zfalkon._version import __version__

EXPECTED = {
    "__version__", "Executor", "TaskFuture", "TaskOptions", "LocalCluster", "ShellResult", "query_status",
    "cancel_run",
    "ZfalkonError", "ConfigError", "SerializationError", "BrokerUnavailable", "ProtocolError",
    "VersionMismatch", "RemoteTraceback", "TaskError", "TaskTimeout", "WorkerCrashed", "WorkerLost",
}


def test_all_names_exist():
    assert len(zfalkon.__all__) == len(set(zfalkon.__all__))
    for name in zfalkon.__all__:
        assert hasattr(zfalkon, name), name


def test_all_is_the_documented_set():
    assert set(zfalkon.__all__) == EXPECTED


def test_star_import_matches_all():
    namespace: dict = {}
    exec("from zfalkon import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(zfalkon.__all__)


def test_exported_objects_are_the_implementations():
    from zfalkon import client, cluster, payload

    assert zfalkon.Executor is client.Executor
    assert zfalkon.TaskFuture is client.TaskFuture
    assert zfalkon.query_status is client.query_status
    assert zfalkon.cancel_run is client.cancel_run
    assert zfalkon.LocalCluster is cluster.LocalCluster
    assert zfalkon.ShellResult is payload.ShellResult
    for name in errors.__all__:
        assert getattr(zfalkon, name) is getattr(errors, name)


def test_public_classes_without_underscore_are_exported():
    public = {name for name, obj in vars(zfalkon).items()
              if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))}
    assert public <= set(zfalkon.__all__)


def test_version():
    assert zfalkon.__version__ == __version__
    parts = __version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)


def test_executor_is_a_concurrent_futures_executor():
    assert issubclass(zfalkon.Executor, cf.Executor)
    assert issubclass(zfalkon.TaskFuture, cf.Future)


EXCEPTIONS = [obj for obj in vars(errors).values()
              if inspect.isclass(obj) and issubclass(obj, BaseException)
              and obj.__module__ == errors.__name__]


def test_errors_all_lists_every_exception_class():
    assert {cls.__name__ for cls in EXCEPTIONS} == set(errors.__all__)


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_every_exception_derives_from_zfalkon_error(cls):
    assert issubclass(cls, errors.ZfalkonError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize("cls, base", [
    (errors.ConfigError, ValueError),
    (errors.SerializationError, TypeError),
    (errors.BrokerUnavailable, ConnectionError),
    (errors.ProtocolError, errors.ZfalkonError),
    (errors.VersionMismatch, errors.ProtocolError),
    (errors.TaskError, errors.ZfalkonError),
    (errors.TaskTimeout, errors.TaskError),
    (errors.TaskTimeout, TimeoutError),
    (errors.WorkerCrashed, errors.TaskError),
    (errors.WorkerLost, errors.TaskError),
])
def test_exception_tree(cls, base):
    assert issubclass(cls, base)


def test_worker_crashed_is_not_a_timeout():
    assert not issubclass(errors.WorkerCrashed, TimeoutError)
    assert not issubclass(errors.TaskError, TimeoutError)
