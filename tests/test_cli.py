"""The ``zfalkon`` command, run as a real process: run, status, bench, errors."""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from conftest import (alive, broker_process, child_env, free_port, outer_pid, served_broker,
                      stop_process, wait_until, worker_process)

from zfalkon import Executor, cli, query_status, watch
from zfalkon.errors import ConfigError
from zfalkon.runfile import RunSummary, describe_failures, read_tasks

TIMEOUT = 120  # seconds any one CLI invocation may take


def zfalkon(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zfalkon", *args], input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT, env=child_env())


def test_read_tasks_skips_blanks_and_comments():
    lines = ["echo a\n", "\n", "  # a comment\n", "  echo b  \n", "#x\n"]
    assert list(read_tasks(lines)) == [(1, "echo a", {}), (4, "echo b", {})]


def test_read_tasks_json_lines_stage_files():
    line = json.dumps({"command": "cat a b > c", "inputs": {
        "a": {"text": "hi"}, "b": {"base64": "AAE="}, "s": "s3://bkt/k", "p": "/shared/x"},
        "outputs": {"c": ""}})
    ((n, command, files),) = read_tasks([line])
    assert (n, command) == (1, "cat a b > c")
    assert files == {"inputs": {"a": b"hi", "b": b"\x00\x01", "s": "s3://bkt/k",
                                "p": "/shared/x"}, "outputs": {"c": ""}}


@pytest.mark.parametrize("line", ['{"command": 5}', '{"nope": 1}', '{bad json',
                                  '{"command": "x", "inputs": {"a": {"base64": "!!"}}}',
                                  '{"command": "x", "inputs": {"a": 3}}'])
def test_read_tasks_bad_json_lines_name_the_line(line):
    with pytest.raises(ConfigError, match="task file line 2"):
        list(read_tasks(["echo ok", line]))


def test_run_task_file_with_inline_files(tmp_path, cluster):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text(json.dumps({"command": "rev in.txt > out.txt",
                                    "inputs": {"in.txt": {"text": "abc\n"}},
                                    "outputs": ["out.txt"]}) + "\n")
    proc = zfalkon("run", "--broker", cluster.address, str(taskfile))
    assert proc.returncode == 0, proc.stderr
    (rec,) = map(json.loads, proc.stdout.splitlines())
    assert base64.b64decode(rec["files"]["out.txt"]) == b"cba\n"


def test_describe_failures_lists_the_first_ones_and_counts_the_rest():
    summary = RunSummary(total=30, failed=12, failures=[
        {"line": i, "command": f"exit {i}", "exit_code": i, "error": None} for i in range(10)])
    text = describe_failures(summary)
    assert "30 tasks, 12 failed" in text
    assert "line 3: exit status 3: exit 3" in text
    assert "and 2 more" in text


def test_run_writes_one_json_line_per_task_and_fails_if_any_task_fails(tmp_path, cluster):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("# sweep\necho one\n\nexit 3\necho err >&2\nsleep 5\n")
    out = tmp_path / "results.jsonl"
    proc = zfalkon("run", "--broker", cluster.address, "--timeout", "1", "-o", str(out),
                   str(taskfile))
    assert proc.returncode == 1, proc.stderr
    records = {r["line"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == [2, 4, 5, 6]
    assert records[2]["exit_code"] == 0 and records[2]["stdout"] == "one\n"
    assert records[2]["command"] == "echo one" and records[2]["worker"]
    assert records[2]["duration"] >= 0
    assert records[4]["exit_code"] == 3
    assert records[5]["stderr"] == "err\n"
    assert records[6]["exit_code"] is None and "timeout" in records[6]["error"]
    assert "4 tasks, 2 failed" in proc.stderr
    assert "line 4: exit status 3" in proc.stderr


def test_run_exits_zero_when_every_task_succeeds_reading_stdin(cluster):
    commands = "".join(f"echo {i}\n" for i in range(200))
    proc = zfalkon("run", "--broker", cluster.address, "-", stdin=commands)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(int(r["stdout"]) for r in records) == list(range(200))
    assert all(r["exit_code"] == 0 for r in records)


def test_run_on_its_own_local_cluster(tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("true\necho hi\n")
    proc = zfalkon("run", "--workers", "1", str(taskfile))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2


def test_run_missing_task_file_is_a_clear_error(tmp_path):
    proc = zfalkon("run", "--workers", "1", str(tmp_path / "nope.txt"))
    assert proc.returncode == 2
    assert "cannot read task file" in proc.stderr


def test_status_json_and_table(cluster):
    proc = zfalkon("status", "--broker", cluster.address, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["workers"] == 2 and info["slots"] == 2
    table = zfalkon("status", "--broker", cluster.address)
    assert table.returncode == 0
    assert "workers 2  slots 2" in table.stdout


def test_status_without_a_broker_says_so():
    proc = zfalkon("status", "--broker", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert proc.returncode == 2
    assert "no answer from a zfalkon broker" in proc.stderr


@pytest.mark.parametrize("kind, extra", [("noop", []), ("shell", []),
                                         ("sleep", ["--task-seconds", "0.01"])])
def test_bench_json_reports_what_it_ran(cluster, kind, extra):
    proc = zfalkon("bench", "--broker", cluster.address, "--kind", kind, "--tasks", "300",
                   "--repeat", "2", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["tasks"] == 300 and figures["kind"] == kind
    assert figures["slots"] == 2 and figures["errors"] == 0
    assert figures["wall_seconds"] > 0
    assert figures["tasks_per_second"] == pytest.approx(300 / figures["wall_seconds"], rel=0.01)
    assert len(figures["runs_tasks_per_second"]) == 2
    if kind == "sleep":
        assert 0 < figures["efficiency"] <= 1.0


def test_bench_table_on_its_own_local_cluster():
    proc = zfalkon("bench", "--workers", "1", "--tasks", "1000")
    assert proc.returncode == 0, proc.stderr
    assert "tasks per second" in proc.stdout
    assert "workers / slots        1 / 1" in proc.stdout


def test_bench_refuses_sleep_without_a_duration(cluster):
    proc = zfalkon("bench", "--broker", cluster.address, "--kind", "sleep", "--tasks", "5")
    assert proc.returncode == 2
    assert "--task-seconds" in proc.stderr


def test_worker_refuses_zero_slots():
    proc = zfalkon("worker", "--broker", "tcp://127.0.0.1:1", "--slots", "0")
    assert proc.returncode == 2
    assert "at least one slot" in proc.stderr


def test_version_flag():
    proc = zfalkon("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("zfalkon ")


# -- issue 14: stopping a run, never silent, errors a person can act on ------------------


def start_in_pty(*args: str) -> tuple[subprocess.Popen, int, list[bytes]]:
    """``zfalkon ARGS`` with a pseudo-terminal as its controlling terminal (stdin, stdout,
    stderr): Ctrl-C is a 0x03 written to the master. Returns the process, the master fd
    and the list its output is read into (by a thread, until the process closes it)."""
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # (after setsid: start_new_session)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "zfalkon", *args], stdin=slave,
                            stdout=slave, stderr=slave, env=child_env(),
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    output: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            output.append(data)

    threading.Thread(target=read, daemon=True).start()
    return proc, master, output


class Terminal:
    """``zfalkon ARGS`` in a pseudo-terminal (:func:`start_in_pty`), as a context manager
    that stops the process by PID and closes the terminal on the way out."""

    def __init__(self, *args: str) -> None:
        self.proc, self.master, self.output = start_in_pty(*args)

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        os.close(self.master)

    def text(self) -> str:
        """What it has written so far."""
        return b"".join(self.output).decode(errors="replace")

    def ctrl_c(self, timeout: float) -> int:
        """Press Ctrl-C (0x03 through the terminal); its exit status within ``timeout``."""
        os.write(self.master, b"\x03")
        return self.proc.wait(timeout)


def lines_in(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def queued(address: str) -> int:
    return query_status(address, timeout=5)["queued"]


def test_ctrl_c_with_no_worker_cancels_everything_and_exits_130(tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("".join(f"echo {i}\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    with broker_process() as (_, address):
        with Terminal("run", "--broker", address, "-o", str(out), str(taskfile)) as term:
            wait_until(lambda: queued(address) == 10, 30, 0.05, "10 tasks queued")
            assert term.ctrl_c(30) == 130
        text = term.text()
        assert "interrupted (SIGINT)" in text
        assert "0 of 10 tasks finished" in text
        assert "10 tasks not run: 10 cancelled on the broker" in text
        assert "--resume" in text and "Traceback" not in text
        assert out.read_text() == ""
        wait_until(lambda: queued(address) == 0, 10, 0.05, "nothing of the run queued")


def test_ctrl_c_with_workers_keeps_what_finished_and_cancels_the_rest(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("".join(f"touch {marks}/{i}\n" for i in range(1, 4)) +
                        "".join(f"touch {marks}/{i}; sleep 60\n" for i in range(4, 21)))
    out = tmp_path / "out.jsonl"
    with broker_process() as (_, address), worker_process(address, "--slots", "1"):
        with Terminal("run", "--broker", address, "-o", str(out), str(taskfile)) as term:
            # Tasks done (their lines flushed), the fourth running, the rest queued. (A slot
            # may hold a result back while its next task runs: 1 to 3 lines.)
            wait_until(lambda: len(lines_in(out)) >= 1 and (marks / "4").exists(), 60, 0.05,
                       "a result written and task 4 running")
            assert term.ctrl_c(30) == 130
        text = term.text()
        records = lines_in(out)
        assert {r["line"] for r in records} <= {1, 2, 3} and len(records) >= 1
        assert all(r["exit_code"] == 0 for r in records)
        n = len(records)
        assert f"{n} of 20 tasks finished" in text and f"{20 - n} tasks not run" in text
        wait_until(lambda: queued(address) == 0, 10, 0.05, "nothing of the run queued")


def test_sigterm_stops_a_run_with_143(tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("echo a\necho b\n")
    with broker_process() as (_, address):
        proc = subprocess.Popen([sys.executable, "-m", "zfalkon", "run", "--broker", address,
                                 str(taskfile)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            wait_until(lambda: queued(address) == 2, 30, 0.05, "2 tasks queued")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            stop_process(proc)
        assert proc.returncode == 143, err
        assert "interrupted (SIGTERM)" in err and "2 tasks not run" in err
        wait_until(lambda: queued(address) == 0, 10, 0.05, "nothing of the run queued")


def read_line_with(proc: subprocess.Popen, text: str, timeout: float) -> tuple[str, float]:
    """The first stderr line of ``proc`` holding ``text``, and when it came."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 0.1)[0]:
            line = proc.stderr.readline()
            if text in line:
                return line, time.monotonic()
            if not line:
                break
    raise AssertionError(f"no line with {text!r} on stderr")


def test_no_worker_warning_comes_once_after_its_delay_then_the_run_completes(tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("echo a\necho b\necho c\n")
    with broker_process() as (_, address):
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "zfalkon", "run", "--broker", address,
                                 "--worker-warning", "1", str(taskfile)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=child_env())
        try:
            line, when = read_line_with(proc, "warning", 30)
            assert 1.0 <= when - start < 15, when - start
            assert f"the broker at {address} has had no worker" in line
            assert "it has 0 workers" in line and "3 tasks queued" in line
            with worker_process(address):
                out, err = proc.communicate(timeout=60)
        finally:
            stop_process(proc)
        assert proc.returncode == 0, err
        assert len(out.splitlines()) == 3 and "warning" not in err  # (once)


def test_wait_workers_turns_the_warning_into_an_error(tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("echo a\necho b\n")
    out = tmp_path / "out.jsonl"
    with broker_process() as (_, address):
        start = time.monotonic()
        proc = zfalkon("run", "--broker", address, "--worker-warning", "0.5",
                       "--wait-workers", "1.5", "-o", str(out), str(taskfile))
        assert time.monotonic() - start >= 1.5
        assert proc.returncode == 4, proc.stderr
        assert "warning: the broker at" in proc.stderr
        assert (f"stopped: no worker registered with the broker at {address} within 1.5 s "
                "(--wait-workers); it has 0 workers") in proc.stderr
        assert "2 tasks not run" in proc.stderr
        wait_until(lambda: queued(address) == 0, 10, 0.05, "nothing of the run queued")


def test_bench_waits_for_a_worker_warns_then_fails(tmp_path):
    with broker_process() as (_, address):
        proc = zfalkon("bench", "--broker", address, "--tasks", "10", "--worker-warning",
                       "0.3", "--wait-workers", "1")
    assert proc.returncode == 2
    warning, error = proc.stderr.splitlines()
    assert warning.startswith(f"zfalkon bench: warning: the broker at {address} has had "
                              "no worker")
    assert error == (f"zfalkon bench: no worker registered with the broker at {address} "
                     "within 1 s (--wait-workers); it has 0 workers")


def test_bench_refuses_zero_workers():
    proc = zfalkon("bench", "--workers", "0")
    assert proc.returncode == 2
    assert "--workers must be at least 1" in proc.stderr


def test_an_executor_warns_when_its_tasks_wait_for_no_worker(monkeypatch, caplog):
    monkeypatch.setattr(watch, "NO_WORKER_WARNING_SECONDS", 0.5)
    with broker_process() as (_, address):
        with caplog.at_level(logging.WARNING, logger="zfalkon.client"):
            with Executor(address) as ex:
                fut = ex.shell("true")
                wait_until(lambda: any("has had no worker" in r.getMessage()
                                       for r in caplog.records), 20, 0.05, "warning")
                with worker_process(address):
                    assert fut.result(timeout=60).returncode == 0
        warnings = [r.getMessage() for r in caplog.records if "no worker" in r.getMessage()]
        assert len(warnings) == 1 and f"the broker at {address}" in warnings[0]


def test_an_executor_left_by_ctrl_c_leaves_nothing_queued():
    with broker_process() as (_, address):
        with pytest.raises(KeyboardInterrupt):
            with Executor(address) as ex:
                futures = [ex.shell("true") for _ in range(20)]
                results = ex.map(abs, range(30))
                wait_until(lambda: queued(address) == 50, 30, 0.05, "50 tasks queued")
                raise KeyboardInterrupt  # as Ctrl-C in result() would
        assert all(f.cancelled() for f in futures)
        del results
        wait_until(lambda: queued(address) == 0, 10, 0.05, "nothing of the session queued")


def test_connection_refused_is_told_apart_from_a_key_refusal(tmp_path):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    proc = zfalkon("status", "--broker", nobody, "--timeout", "0.5")
    assert proc.returncode == 2
    assert f"nothing listens at {nobody} (connection refused)" in proc.stderr
    keys = tmp_path / "keys"
    assert zfalkon("keys", "init", str(keys)).returncode == 0
    other = tmp_path / "other"
    assert zfalkon("keys", "init", str(other)).returncode == 0
    assert zfalkon("keys", "new", "mallory", "--role", "client", "--dir", str(other)
                   ).returncode == 0
    with broker_process("--keys", str(keys)) as (_, address):
        proc = zfalkon("status", "--broker", address, "--timeout", "1")
        assert proc.returncode == 2
        assert (f"the broker at {address} refused a client without keys: it uses CurveZMQ; "
                "pass --keys BUNDLE") in proc.stderr
        assert "keys=" not in proc.stderr
        proc = zfalkon("status", "--broker", address, "--timeout", "1", "--keys",
                       str(other / "issued" / "mallory"))
        assert proc.returncode == 2
        assert f"refused the key 'mallory' of {other / 'issued' / 'mallory'}" in proc.stderr
        assert "(--keys)" in proc.stderr


def test_no_broker_address_names_the_flag(monkeypatch):
    env = {k: v for k, v in child_env().items() if k != "ZFALKON_BROKER"}
    proc = subprocess.run([sys.executable, "-m", "zfalkon", "status"], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 2
    assert proc.stderr == ("zfalkon status: no broker address: pass --broker tcp://HOST:PORT "
                           "or set $ZFALKON_BROKER\n")


def no_aws_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in child_env().items() if not k.startswith("AWS_")}
    return {**env, "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.mark.parametrize("extra, says", [
    ([], "zfalkon ec2: no AWS region: pass --region REGION or set $AWS_REGION"),
    (["--region", "eu-west-1"], "zfalkon ec2: no AWS credentials: set $AWS_ACCESS_KEY_ID"),
])
def test_ec2_without_region_or_credentials_is_one_line(tmp_path, extra, says):
    for command in (["status", "--pool", "p"], ["up", "--pool", "p", "--broker",
                                                 "tcp://127.0.0.1:1", "--ami", "ami-1"]):
        proc = subprocess.run([sys.executable, "-m", "zfalkon", "ec2", *command, *extra],
                              capture_output=True, text=True, timeout=TIMEOUT,
                              env=no_aws_env(tmp_path))
        assert proc.returncode == 2
        (line,) = proc.stderr.splitlines()
        assert line.startswith(says)


def test_every_option_has_help_and_states_its_default():
    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for p in parsers(cli.build_parser()):
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            assert action.help, (p.prog, action.option_strings)
            if action.default not in (None, False, [], "", argparse.SUPPRESS) or \
                    action.default == 0 and action.default is not False:
                assert "default" in formatter._get_help_string(action), \
                    (p.prog, action.option_strings)
    text = zfalkon("run", "--help").stdout
    assert "--retries N" in text and "(default: 0)" in text and "--resume" in text


# -- runs, cancel, status (issue 14) -----------------------------------------------------

def _runs(address: str) -> dict:
    proc = zfalkon("runs", "--broker", address, "--json")
    assert proc.returncode == 0, proc.stderr
    return {r["run"] or r["name"]: r for r in json.loads(proc.stdout)["runs"]}


def _nothing_left(address: str) -> bool:
    s = query_status(address, timeout=5)
    return s["queued"] == s["running"] == s["prefetched"] == 0


def _sleepers(tmp_path, n: int) -> tuple:
    """A task file of ``n`` long tasks, each writing its shell's PID and PID namespace
    (it then execs sleep, so the PID is the task's process) into ``pids/LINE``."""
    pids = tmp_path / "pids"
    pids.mkdir()
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("".join(
        f"echo $$ $(stat -Lc %i /proc/self/ns/pid) > {pids}/{i}.tmp; "
        f"mv {pids}/{i}.tmp {pids}/{i}; exec sleep 120\n" for i in range(1, n + 1)))
    return taskfile, pids


def _started(pids) -> int:
    """How many of the tasks started (wrote their PID)."""
    return sum(1 for p in pids.iterdir() if not p.name.endswith(".tmp"))


def _started_pids(pids) -> list[int]:
    """The PIDs here (outside a task host's sandbox) of the tasks that started."""
    found = [outer_pid(tuple(map(int, p.read_text().split())))  # type: ignore[arg-type]
             for p in pids.iterdir() if not p.name.endswith(".tmp")]
    return [pid for pid in found if pid]


def test_runs_lists_a_live_run_and_cancel_removes_its_queued_and_kills_its_running(tmp_path):
    taskfile, pids = _sleepers(tmp_path, 12)
    out = tmp_path / "out.jsonl"
    with served_broker(slots=2) as (_, address, _worker):
        run = subprocess.Popen([sys.executable, "-m", "zfalkon", "run", "--broker", address,
                                "--name", "nightly", "-o", str(out), str(taskfile)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=child_env())
        try:
            wait_until(lambda: _started(pids) == 2, 60, 0.1, "two tasks running")
            entry = wait_until(lambda: (lambda r: r if r.get("running") == 2 else None)(
                _runs(address).get("nightly", {})), 30, 0.2, "the run listed as running")
            assert entry["state"] == "connected" and entry["submitted"] == 12
            started = _started_pids(pids)
            assert len(started) == 2 and all(alive(p) for p in started)
            assert entry["queued"] + entry["prefetched"] == 10 and entry["done"] == 0
            table = zfalkon("runs", "--broker", address)
            assert table.returncode == 0 and "nightly" in table.stdout
            assert "QUEUED" in table.stdout and "PREFETCH" in table.stdout
            refused = zfalkon("cancel", "nope", "--broker", address)
            assert refused.returncode == 2 and "no run named 'nope'" in refused.stderr
            proc = zfalkon("cancel", "nightly", "--broker", address)
            assert proc.returncode == 0, proc.stderr
            assert f"cancelled run {entry['id']} (nightly)" in proc.stdout
            assert "running or prefetched tasks being killed" in proc.stdout
            wait_until(lambda: _nothing_left(address), 20, 0.1,
                       "nothing of the run queued, running or prefetched")
            _, err = run.communicate(timeout=60)
        finally:
            stop_process(run)
        assert run.returncode == 4, err
        assert "the run was cancelled on the broker" in err and "Traceback" not in err
        wait_until(lambda: not any(alive(p) for p in started), 20, 0.1,
                   "the running tasks' processes killed")
        assert _started(pids) == 2  # (no other task of the run ever started)
        assert _nothing_left(address)
        again = zfalkon("cancel", str(entry["id"]), "--broker", address)
        assert again.returncode == 2 and "no run" in again.stderr  # (its client left)


def test_an_abandoned_run_is_cancelled_after_the_hold_time(tmp_path):
    taskfile, pids = _sleepers(tmp_path, 8)
    with served_broker("--hold-seconds", "4", slots=2) as (_, address, _worker):
        run = subprocess.Popen([sys.executable, "-m", "zfalkon", "run", "--broker", address,
                                "--name", "orphan", str(taskfile)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=child_env())
        try:
            wait_until(lambda: _started(pids) == 2, 60, 0.1, "two tasks running")
            wait_until(lambda: "orphan" in _runs(address), 30, 0.2, "the run listed")
            run.kill()  # SIGKILL: no BYE, it never comes back
            run.wait(10)
            killed_at = time.monotonic()
            entry = wait_until(lambda: (lambda r: r if r.get("state") == "away" else None)(
                _runs(address).get("orphan", {})), 10, 0.2, "the run away")
            assert entry["running"] == 2  # (held for its client: its tasks run on)
            started = _started_pids(pids)
            assert len(started) == 2 and all(alive(p) for p in started)
            wait_until(lambda: "orphan" not in _runs(address), 20, 0.2, "the run dropped")
            assert time.monotonic() - killed_at >= 3.0  # (not before the hold time)
            wait_until(lambda: _nothing_left(address), 10, 0.1, "nothing left of the run")
            wait_until(lambda: not any(alive(p) for p in started), 20, 0.1,
                       "its running tasks killed")
            assert _started(pids) == 2
        finally:
            stop_process(run)


def test_status_reads_right_and_does_not_count_itself():
    with broker_process() as (_, address):
        proc = zfalkon("status", "--broker", address)
        assert proc.returncode == 0, proc.stderr
        assert "clients 0 (+0 away)" in proc.stdout
        assert "running 0  prefetched 0" in proc.stdout
        assert "tasks/s (" in proc.stdout  # (its window stated)
        info = json.loads(zfalkon("status", "--broker", address, "--json").stdout)
        assert info["clients"] == 0 and "rate_window_seconds" in info
        with Executor(address, run="mine"):
            info = query_status(address)
            assert info["clients"] == 1  # the executor, not the query


def test_status_watch_redraws_until_ctrl_c_and_exits_cleanly():
    with broker_process() as (_, address):
        with Terminal("status", "--watch", "--interval", "0.3", "--broker", address) as term:
            wait_until(lambda: term.text().count("Ctrl-C to stop") >= 2, 30, 0.05,
                       "two views drawn")
            assert term.ctrl_c(15) == 0
        text = term.text()
        assert "queued 0  running 0  prefetched 0" in text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
