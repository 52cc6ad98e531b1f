"""Parsl on zfalkon, a fast slice: a few of Parsl's own tests (called as functions, under one
DataFlowKernel loaded with tests/parsl_config.py) and the executor's own behaviour. The
full suite runs with ``tox -e parsl`` (bench/RESULTS.md, "Parsl's own suite")."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

parsl = pytest.importorskip("parsl")

from parsl.executors.errors import InvalidResourceSpecification  # noqa: E402
from parsl.tests.test_bash_apps import test_basic as pt_bash_basic  # noqa: E402
from parsl.tests.test_bash_apps import test_error_codes as pt_bash_codes  # noqa: E402
from parsl.tests.test_error_handling import test_python_walltime as pt_walltime  # noqa: E402
from parsl.tests.test_python_apps import test_basic as pt_basic  # noqa: E402
from parsl.tests.test_python_apps import test_dependencies as pt_deps  # noqa: E402
from parsl.tests.test_python_apps import test_fail as pt_fail  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _fresh_config():
    spec = importlib.util.spec_from_file_location("zfalkon_parsl_config",
                                                  os.path.join(HERE, "parsl_config.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fresh_config()


@pytest.fixture(scope="module")
def dfk(tmp_path_factory):
    config = _fresh_config()
    config.run_dir = str(tmp_path_factory.mktemp("parsl") / "runinfo")
    dfk = parsl.load(config)
    executor = dfk.executors["zfalkon_local"]
    yield dfk
    broker = executor._broker_proc
    dfk.cleanup()
    # shutdown() stopped the broker it started, by PID
    assert executor._broker_proc is None and broker is not None and broker.poll() is not None


# -- Parsl's own tests ---------------------------------------------------------------------


def test_parsl_python_apps(dfk, caplog):
    pt_basic.test_simple()
    for n in (-1, 2, 3):
        pt_basic.test_imports(n)
    pt_basic.test_parallel_for(13)
    caplog.set_level("DEBUG")
    pt_deps.test_diamond_dag(caplog)


def test_parsl_failures(dfk):
    pt_fail.test_no_deps()
    pt_fail.test_fail_sequence_first()
    pt_fail.test_fail_sequence_middle()


def test_parsl_walltime(dfk):
    pt_walltime.test_python_walltime()
    pt_walltime.test_python_longer_walltime_at_invocation()
    pt_walltime.test_python_walltime_wrapped_names()


def test_parsl_bash_apps(dfk, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pt_bash_basic.test_command_format_1(tmp_path / "a")
    pt_bash_basic.test_parallel_for(tmp_path / "b", n=3)

    def with_std_files(app):
        return app(stdout=str(tmp_path / "std.out"), stderr=str(tmp_path / "std.err"))

    for app in pt_bash_codes.exit_codes:
        pt_bash_codes.test_failing_bash_app(with_std_files, app)


# -- the executor's own behaviour --------------------------------------------------------


@parsl.python_app
def _raise(exc):
    raise exc


@parsl.python_app
def _echo(value, parsl_resource_specification={}):
    return value


@parsl.python_app
def _spin(seconds, parsl_resource_specification={}):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


def test_exceptions_keep_their_type(dfk):
    with pytest.raises(KeyError):
        _raise(KeyError("k")).result()
    with pytest.raises(ZeroDivisionError):
        _raise(ZeroDivisionError()).result()


def test_arbitrary_objects_both_ways(dfk):
    from fractions import Fraction

    from parsl.data_provider.files import File

    # no typed zfalkon encoding for these: they travel by pickle, both ways
    assert _echo(Fraction(1, 3)).result() == Fraction(1, 3)
    assert _echo(File("/tmp/x.txt")).result().filepath == "/tmp/x.txt"
    assert _echo((1, {2}, b"3")).result() == (1, {2}, b"3")


def test_resource_specification(dfk):
    from parsl.app.errors import AppTimeout

    with pytest.raises(AppTimeout):
        _spin(30, parsl_resource_specification={"walltime": 0.5}).result(timeout=20)
    assert _spin(0.1, parsl_resource_specification={"walltime": 10}).result() == 0.1
    with pytest.raises(InvalidResourceSpecification):
        _echo(1, parsl_resource_specification={"cores": 2}).result()


def test_block_is_a_zfalkon_worker(dfk):
    executor = dfk.executors["zfalkon_local"]
    status = executor.executor.status()
    assert status["slots"] >= 1
    assert executor.outstanding() == 0
    assert executor.provider.resources, "the provider launched no block"
    command = executor._get_launch_command("7")
    assert " worker --broker " + executor.broker_address in command
