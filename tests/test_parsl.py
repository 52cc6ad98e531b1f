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


# -- bash apps as zfalkon shell tasks ------------------------------------------------------


@parsl.bash_app
def _bash(command, stdout=None, stderr=None, outputs=(), walltime=None,
          parsl_resource_specification={}):
    return command


@parsl.bash_app
def _bash_bad_format(stdout=None):
    return "echo {}".format(*())  # IndexError: Parsl's AppBadFormatting


def _shell_calls(dfk, monkeypatch):
    """Count the zfalkon shell tasks the executor submits."""
    client = dfk.executors["zfalkon_local"].executor
    calls = []
    real = client.shell

    def shell(command, **kwargs):
        calls.append(command)
        return real(command, **kwargs)

    monkeypatch.setattr(client, "shell", shell)
    return calls


def test_bash_app_runs_as_a_shell_task(dfk, tmp_path, monkeypatch):
    calls = _shell_calls(dfk, monkeypatch)
    out = tmp_path / "out"
    # A zfalkon shell task is its own session leader (Parsl's Popen would be in the slot's)
    cmd = 'read -r _ _ _ _ _ sid _ < /proc/$$/stat; [ "$sid" = "$$" ] && echo leader; true'
    assert _bash(cmd, stdout=str(out)).result(timeout=60) == 0
    assert out.read_text() == "leader\n"
    assert len(calls) == 1 and calls[0][:2] == ["/bin/bash", "-c"]


def test_bash_app_process_group_is_killed(dfk, tmp_path, monkeypatch):
    from parsl.app.errors import AppTimeout

    calls = _shell_calls(dfk, monkeypatch)
    # Each command leaves a background child that would touch a file 2 s later. (Its PID
    # says nothing here: a worker may run its tasks in a PID namespace of its own.)
    late = [tmp_path / "late1", tmp_path / "late2", tmp_path / "late3"]
    # past its walltime, the command is killed with its process group
    timed_out = _bash(f"(sleep 2; touch {late[0]}) & sleep 300", walltime=1)
    # ... likewise past the resource specification's walltime
    timed_out2 = _bash(f"(sleep 2; touch {late[1]}) & sleep 300",
                       parsl_resource_specification={"walltime": 1})
    # a command that exits leaves no background process behind either
    exits = _bash(f"(sleep 2; touch {late[2]}) & true")
    assert exits.result(timeout=60) == 0
    with pytest.raises(AppTimeout, match="exceeded walltime: 1 seconds"):
        timed_out.result(timeout=60)
    with pytest.raises(AppTimeout):
        timed_out2.result(timeout=60)
    # An absence, shown by time: a surviving child touches its file 2 s after its command
    # started (before its result came); none may have 3 s after the results. (Waiting for
    # the children to be gone instead would pass, wrongly, if they could not be seen.)
    time.sleep(3)
    assert not any(p.exists() for p in late)
    assert len(calls) == 3


def test_bash_app_std_files(dfk, tmp_path):
    out, err = tmp_path / "new" / "dir" / "o.txt", tmp_path / "e.txt"
    cmd = "echo to-out; echo to-err >&2"
    assert _bash(cmd, stdout=str(out), stderr=str(err)).result(timeout=60) == 0
    assert out.read_text() == "to-out\n"  # its directory made, as Parsl does
    header = f"--> executable follows <--\n{cmd}\n--> end executable <--\n"
    assert err.read_text() == header + "to-err\n"
    # a str appends (Parsl's default mode, a+), a (path, "w") tuple truncates
    assert _bash(cmd, stdout=str(out), stderr=str(err)).result(timeout=60) == 0
    assert out.read_text() == "to-out\n" * 2
    assert err.read_text() == (header + "to-err\n") * 2
    assert _bash(cmd, stdout=(str(out), "w"), stderr=(str(err), "w")).result(timeout=60) == 0
    assert out.read_text() == "to-out\n"
    assert err.read_text() == header + "to-err\n"
    # both streams to one file, as Parsl's two opens of it
    both = tmp_path / "both.txt"
    assert _bash("echo a; echo b >&2", stdout=str(both), stderr=str(both)).result(timeout=60) == 0
    assert both.read_text() == "--> executable follows <--\necho a; echo b >&2\n" \
        "--> end executable <--\na\nb\n"


def test_bash_app_failures(dfk, tmp_path, monkeypatch):
    from parsl.app.errors import AppBadFormatting, BadStdStreamFile, BashExitFailure, MissingOutputs
    from parsl.data_provider.files import File

    calls = _shell_calls(dfk, monkeypatch)
    for cmd, code in (("exit 7", 7), ("catdogcat", 127), ("/dev/null", 126),
                      ("$((5/0))", 1), ("kill -9 $$", -9)):
        with pytest.raises(BashExitFailure) as info:
            _bash(cmd, stderr=str(tmp_path / "err")).result(timeout=60)
        assert info.value.exitcode == code, cmd
        assert info.value.app_name == "_bash"
    assert "catdogcat: command not found" in (tmp_path / "err").read_text()
    # a stdout or stderr file that cannot be opened (a directory under a regular file)
    (tmp_path / "file").write_text("")
    for kw in ("stdout", "stderr"):
        with pytest.raises(BadStdStreamFile, match="file/sub/x"):
            _bash("true", **{kw: str(tmp_path / "file" / "sub" / "x")}).result(timeout=60)
    # outputs= checked after a zero exit, on the worker
    made, absent = File(str(tmp_path / "made")), File(str(tmp_path / "absent"))
    with pytest.raises(MissingOutputs) as missing:
        _bash(f"touch {made.filepath}", outputs=[made, absent]).result(timeout=60)
    assert [f.filepath for f in missing.value.outputs] == [absent.filepath]
    assert _bash(f"touch {absent.filepath}", outputs=[made, absent]).result(timeout=60) == 0
    with pytest.raises(BashExitFailure) as info:
        _bash("exit 3", outputs=[made]).result(timeout=60)
    assert info.value.exitcode == 3
    with pytest.raises(BashExitFailure) as info:  # the wrapper waits: bash's 128+N
        _bash("kill -9 $$", outputs=[made]).result(timeout=60)
    assert info.value.exitcode == 128 + 9
    assert len(calls) == 11
    # a body that raises runs the Python way: the worker raises Parsl's error for it
    with pytest.raises(AppBadFormatting):
        _bash_bad_format().result(timeout=60)
    assert len(calls) == 11


def test_bash_apps_option():
    from zfalkon.errors import ConfigError
    from zfalkon.parsl import ZfalkonExecutor

    assert ZfalkonExecutor().bash_apps == "shell"
    assert ZfalkonExecutor(bash_apps="python").bash_apps == "python"
    with pytest.raises(ConfigError):
        ZfalkonExecutor(bash_apps="sh")
