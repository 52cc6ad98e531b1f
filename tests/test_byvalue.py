"""Python work as scientists write it (issue 13), end to end on real broker and worker
processes: functions by value, typed values, exceptions that keep their type."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tasks
from conftest import child_env
from zfalkon import Executor, RemoteTraceback, SerializationError, TaskError, payload

np = pytest.importorskip("numpy")

SCRIPT = '''
import importlib, json, pathlib, sys
from zfalkon import Executor
import helper

class ScriptError(Exception):
    pass

def square(x):
    return x * x

def fails(x):
    raise ScriptError(f"bad {x}", x)

offset = 10
with Executor(sys.argv[1]) as ex:
    out = {}
    out["main"] = ex.submit(square, 7).result(timeout=60)
    out["map"] = list(ex.map(square, range(5), timeout=60))
    out["lambda"] = ex.submit(lambda x: x + offset, 1).result(timeout=60)
    def make(k):
        return lambda x: x * k
    out["closure"] = ex.submit(make(3), 5).result(timeout=60)
    out["module"] = ex.submit(helper.answer).result(timeout=60)
    pathlib.Path(helper.__file__).write_text("def answer():\\n    return 'edited'\\n")
    importlib.reload(helper)
    out["edited"] = ex.submit(helper.answer).result(timeout=60)
    try:
        ex.submit(fails, 4).result(timeout=60)
    except ScriptError as exc:
        out["error"] = [type(exc).__name__, list(exc.args), type(exc.__cause__).__name__]
    print(json.dumps(out))
'''


def test_a_scripts_own_functions_run_from_another_directory(cluster, tmp_path):
    """__main__ functions, lambdas, closures and a module beside the script (edited between
    two submits), run as a subprocess whose directory no worker has on its path."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "script.py").write_text(SCRIPT)
    (project / "helper.py").write_text("def answer():\n    return 'original'\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(project), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(project / "script.py"), cluster.address],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "main": 49, "map": [0, 1, 4, 9, 16], "lambda": 11, "closure": 15,
        "module": "original", "edited": "edited",
        "error": ["ScriptError", ["bad 4", 4], "RemoteTraceback"],
    }


def test_functions_reference_policy_still_refuses_what_workers_cannot_import(cluster):
    with Executor(cluster.address, functions="reference") as ex:
        with pytest.raises(SerializationError, match="lambda"):
            ex.submit(lambda: 1)
        assert ex.submit(abs, -3).result(timeout=30) == 3


def test_value_policy_sends_even_importable_functions_by_value(cluster):
    assert isinstance(payload.function_spec(tasks.add, "value"), payload.Function)
    assert payload.function_spec(abs, "auto") == "builtins:abs"
    assert payload.function_spec(os.path.join, "auto") == "posixpath:join"
    with Executor(cluster.address, functions="value") as ex:
        assert ex.submit(abs, -3).result(timeout=30) == 3


def test_unknown_function_policy_is_a_config_error(cluster):
    from zfalkon import ConfigError

    with pytest.raises(ConfigError, match="functions"):
        Executor(cluster.address, functions="bogus")


@pytest.mark.parametrize("value", [
    (1, (2, 3)), {1, 2}, frozenset({"a"}), 2**100, -(2**100), 1 + 2j,
    [(1, 2), {"k": (3,)}],
], ids=["tuple", "set", "frozenset", "bigint", "negative-bigint", "complex", "nested"])
def test_typed_values_round_trip_through_a_worker(executor, value):
    got = executor.submit(tasks.identity, value).result(timeout=30)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("mib", [1, 100])
def test_numpy_arrays_round_trip_with_dtype_and_shape(executor, mib):
    n = mib * 2**20 // 8
    array = np.arange(n, dtype=np.float64).reshape(-1, 1024)
    got = executor.submit(tasks.identity, array).result(timeout=120)
    assert got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array)
    got[0, 0] = -1  # a writable array of its own
    small = executor.submit(np.sum, np.arange(10, dtype=np.int32)).result(timeout=30)
    assert small == 45 and type(small) is np.int64


def test_builtin_exception_keeps_its_type_and_arguments(executor):
    with pytest.raises(KeyError) as info:
        executor.submit(tasks.raise_key_error, "missing").result(timeout=30)
    assert info.value.args == ("missing",)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_key_error" in info.value.__cause__.traceback


def test_user_exception_of_an_imported_module_keeps_its_type(executor):
    with pytest.raises(tasks.CustomError, match="custom"):
        executor.submit(tasks.raise_custom, "custom").result(timeout=30)


def test_results_without_typed_encoding_need_pickle_on_both_sides(cluster):
    import pathlib

    with Executor(cluster.address) as ex:
        with pytest.raises(TaskError) as info:
            ex.submit(tasks.make_path, "/x").result(timeout=30)
        assert info.value.remote_type == "SerializationError"
        assert "pickle=True" in info.value.remote_message
    with Executor(cluster.address, pickle=True) as ex:
        assert ex.submit(tasks.make_path, "/x").result(timeout=30) == pathlib.Path("/x")
        assert ex.submit(tasks.identity, pathlib.Path("/y")).result(timeout=30) == (
            pathlib.Path("/y"))


def test_a_function_that_cannot_be_pickled_is_refused_at_submit(executor):
    import threading

    lock = threading.Lock()
    with pytest.raises(SerializationError, match="pickled"):
        executor.submit(lambda: lock)


def test_a_function_needing_a_module_the_worker_lacks_names_the_module(cluster, tmp_path):
    """A by-value function closing over an object whose class lives in a module only the
    client has: unpickling fails on the worker with an error naming that module and both
    sides' versions."""
    (tmp_path / "zf_client_only_mod.py").write_text(
        "class Thing:\n    def __init__(self, v):\n        self.v = v\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import zf_client_only_mod

        thing = zf_client_only_mod.Thing(41)
        namespace: dict = {"__name__": "__main__", "thing": thing}
        exec("def uses_it():\n    return thing.v + 1\n", namespace)
        with Executor(cluster.address) as ex:
            with pytest.raises(ModuleNotFoundError) as info:
                ex.submit(namespace["uses_it"]).result(timeout=30)
        text = str(info.value)
        assert "zf_client_only_mod" in text and "cannot be loaded on this worker" in text
        assert "client: Python" in text and "worker: Python" in text
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("zf_client_only_mod", None)


def test_a_function_that_cannot_be_loaded_names_the_packages_whose_versions_differ():
    """Environment skew (issue 13): the error names each package the function refers to
    whose version differs on the worker, with both versions."""
    from zfalkon.execute import Runner

    spec = payload.function_spec(lambda: np.zeros(1), "value")
    assert spec.env[2] == {"numpy": np.__version__}
    import dataclasses

    broken = dataclasses.replace(spec, blob=spec.blob[:-5],
                                 digest=payload.function_digest(spec.blob[:-5]),
                                 env=[spec.env[0], spec.env[1], {"numpy": "0.0.1"}])
    blob, failed = Runner().run(payload.python_task(broken, (), {}))
    fields = payload.unpack(blob)
    assert failed and fields[0] == payload.RESULT_ERROR
    assert f"numpy 0.0.1 on the client, {np.__version__} here" in fields[2]
    assert "cannot be loaded on this worker" in fields[2]
