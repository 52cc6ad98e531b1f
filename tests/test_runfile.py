"""``zfalkon run`` and its task files (issue 12): every line is checked before anything is
submitted; bad lines are reported by number, never echoed whole; an error after
submission still writes every result received. The CLI runs as a real process."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import Future

import pytest

from conftest import broker_process, child_env, free_port, stop_process, wait_until, worker_process
from zfalkon import cli, runfile
from zfalkon.errors import BrokerUnavailable, ConfigError, TaskError
from zfalkon.payload import ShellResult
from zfalkon.runfile import (EXIT_BAD_TASKFILE, EXIT_STOPPED, MAX_LINE_BYTES,
                             MAX_REPORTED_LINES, check_task_file, iter_tasks, read_tasks,
                             run_tasks)

TIMEOUT = 120  # seconds any one CLI invocation may take
GOOD = b"".join(b"echo %d\n" % i for i in range(300))
BAD_NAME = b'{"command": "cat up", "inputs": {"../up": {"text": "x"}}}\n'
SAME_FILE = b'{"command": "cat a", "inputs": {"a": "/shared", "./a": {"text": "x"}}}\n'
BAD_JSON = b'{"command": "echo", "inputs": \n'


def zfalkon(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zfalkon", *args], input=stdin,
                          capture_output=True, timeout=TIMEOUT, env=child_env())


def nowhere() -> str:
    """A broker address nothing listens on: a run that submitted would fail there (after
    its 10 s connect timeout, status 2), so status 3 at once shows nothing was sent."""
    return f"tcp://127.0.0.1:{free_port()}"


# -- checking a task file --------------------------------------------------------------


def test_every_bad_line_is_reported_by_number_with_a_short_reason(monkeypatch):
    monkeypatch.setattr(runfile, "MAX_LINE_BYTES", 1000)
    text = (GOOD + BAD_NAME + b"x" * 5000 + b"\n" + BAD_JSON + b"caf\xe9\n" + SAME_FILE +
            b'{"command": ""}\n' + b'{"command": "x", "outputs": [1]}\n' + b'{"command": "x", "inputs": []}\n' +
            b'{"command": "x", "inputs": {"a": {"base64": "!!"}}}\n' + b"echo last\n")
    check = check_task_file(io.BytesIO(text))
    assert (check.tasks, check.bad) == (301, 9)
    reasons = dict(p.split(": ", 1) for p in check.problems)
    assert list(reasons) == [f"line {n}" for n in range(301, 310)]
    assert "relative path" in reasons["line 301"]
    assert reasons["line 302"] == "longer than 1000 bytes (MAX_LINE_BYTES)"
    assert reasons["line 303"].startswith("bad JSON")
    assert reasons["line 304"] == "not UTF-8 text (byte 0xe9 at column 4)"
    assert reasons["line 305"] == "inputs 'a' and './a' are the same file"
    assert "'command' must be a non-empty string" in reasons["line 306"]
    assert "'outputs' must be" in reasons["line 307"]
    assert "'inputs' must be an object" in reasons["line 308"]
    assert "bad base64" in reasons["line 309"]


def test_line_length_limit_is_exact_and_a_long_line_is_not_echoed(monkeypatch):
    monkeypatch.setattr(runfile, "MAX_LINE_BYTES", 100)
    ok = b"echo " + b"a" * 95
    text = ok + b"\n" + ok + b"\r\n" + ok + b"a\n" + b"b" * 10_000 + b"\n" + ok + b"a"
    check = check_task_file(io.BytesIO(text))
    assert check.tasks == 2
    assert [p.split(":")[0] for p in check.problems] == ["line 3", "line 4", "line 5"]
    assert all(len(p) < 100 for p in check.problems)
    with pytest.raises(ConfigError, match="task file line 3: longer than 100 bytes"):
        list(iter_tasks(io.BytesIO(text)))


def test_reasons_are_cut_short_and_only_the_first_bad_lines_are_listed():
    long_name = "n" * 10_000
    line = json.dumps({"command": "x", "inputs": {long_name: 5}}).encode() + b"\n"
    check = check_task_file(io.BytesIO(line * (MAX_REPORTED_LINES + 50)))
    assert check.bad == MAX_REPORTED_LINES + 50 and len(check.problems) == MAX_REPORTED_LINES
    assert all(len(p) < 250 for p in check.problems)
    report = check.report("t.txt")
    assert "... and 50 more bad lines" in report[-2]
    assert report[-1] == f"zfalkon run: t.txt: {MAX_REPORTED_LINES + 50} bad line(s) of " \
                         f"{MAX_REPORTED_LINES + 50} task lines; nothing submitted"


def test_binary_input_is_one_error_line():
    check = check_task_file(io.BytesIO(b"\x7fELF\x02\x01\x01\x00\n\xff\xfe\n" * 50))
    (line,) = check.report("a.out")
    assert line == ("zfalkon run: a.out is not a UTF-8 text task file: line 1: binary data "
                    "(a NUL byte at column 8) (and 99 more such lines); nothing submitted")


def test_iter_tasks_numbers_lines_as_the_file_does():
    text = b"# c\n\necho a\n" + json.dumps({"command": "cat a", "inputs": {
        "a": {"text": "hi"}}, "outputs": ["b"]}).encode() + b"\n"
    assert list(iter_tasks(io.BytesIO(text))) == [
        (3, "echo a", {}), (4, "cat a", {"inputs": {"a": b"hi"}, "outputs": ["b"]})]


# -- an error after submission ---------------------------------------------------------


class StubExecutor:
    """``shell`` returns futures completed by ``complete`` (no processes: the order of
    events is fixed)."""

    def __init__(self) -> None:
        self.futures: list[Future] = []

    def shell(self, command: str, **kwargs) -> Future:
        self.futures.append(Future())
        return self.futures[-1]


def test_an_error_after_submission_writes_every_result_received():
    ex = StubExecutor()
    out = io.StringIO()

    def tasks():
        for n in range(1, 6):
            yield n, f"echo {n}", {}
        ex.futures[0].set_result(ShellResult(0, "1\n", "", 0.1, False, "w/0", {}))
        ex.futures[1].set_exception(TaskError("StagingError", "no such input", "", "w/1"))
        ex.futures[2].set_exception(BrokerUnavailable("broker gone"))  # not a result
        ex.futures[3].set_result(ShellResult(3, "", "", 0.1, False, "w/0", {}))
        yield 6, "a bad line", {}
        raise ConfigError("task file line 7: changed since it was checked")

    summary = runfile.RunSummary()
    with pytest.raises(BrokerUnavailable, match="broker gone"):
        run_tasks(ex, tasks(), out, window=100, summary=summary)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["line"], r["exit_code"]) for r in records] == [(1, 0), (2, None), (4, 3)]
    assert records[1]["error"].endswith("no such input")
    assert (summary.total, summary.written, summary.failed) == (6, 3, 2)


def test_a_bad_line_met_after_submission_still_writes_what_was_received():
    ex = StubExecutor()
    out = io.StringIO()

    def tasks():
        yield 1, "echo 1", {}
        ex.futures[0].set_result(ShellResult(0, "1\n", "", 0.1, False, "w/0", {}))
        yield 2, "echo 2", {}  # its result never comes
        raise ConfigError("task file line 3: changed since it was checked")

    with pytest.raises(ConfigError, match="line 3"):
        run_tasks(ex, tasks(), out, window=100)
    assert [json.loads(line)["line"] for line in out.getvalue().splitlines()] == [1]


def test_the_cli_reports_a_stop_after_submission_and_keeps_the_results(
        cluster, tmp_path, monkeypatch, capsys):
    """In-process (to skip the check and so meet a bad line mid-run, as when the file
    changes between the check and the run), on the real cluster."""
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_bytes(GOOD + BAD_NAME)
    monkeypatch.setattr(runfile, "check_task_file",
                        lambda f: runfile.TaskFileCheck(tasks=301))
    out = tmp_path / "out.jsonl"
    status = cli.main(["run", "--broker", cluster.address, "-o", str(out), str(taskfile)])
    assert status == EXIT_STOPPED
    err = capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert "stopped after submitting 300 of 301 tasks: task file line 301: file name" in err
    assert f"the {len(records)} results received are written to {out}" in err
    assert all(r["exit_code"] == 0 and r["stdout"] == f"{r['line'] - 1}\n" for r in records)


# -- the command, as a real process ----------------------------------------------------


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_bad_lines_after_good_ones_submit_nothing(tmp_path, via):
    """300 good lines, then a 100 MB line, bad JSON, a bad input name, a non-UTF-8 line."""
    huge = b"echo " + b"x" * (100 * 1024 * 1024) + b"\n"
    text = GOOD + huge + BAD_JSON + BAD_NAME + b"caf\xe9\n" + SAME_FILE + b"echo last\n"
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_bytes(text)
    out = tmp_path / "out.jsonl"
    if via == "file":
        proc = zfalkon("run", "--broker", nowhere(), "-o", str(out), str(taskfile))
        source = str(taskfile)
    else:
        proc = zfalkon("run", "--broker", nowhere(), "-o", str(out), "-", stdin=text)
        source = "standard input"
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_BAD_TASKFILE, err
    assert err.splitlines() == [
        f"zfalkon run: {source} line 301: longer than {MAX_LINE_BYTES} bytes (MAX_LINE_BYTES)",
        f"zfalkon run: {source} line 302: bad JSON: Expecting value: line 1 column 30 "
        "(char 29)",
        f"zfalkon run: {source} line 303: file name '../up' must be a relative path inside "
        "the task's directory (no '..')",
        f"zfalkon run: {source} line 304: not UTF-8 text (byte 0xe9 at column 4)",
        f"zfalkon run: {source} line 305: inputs 'a' and './a' are the same file",
        f"zfalkon run: {source}: 5 bad line(s) of 306 task lines; nothing submitted"]
    assert not out.exists() and proc.stdout == b""


def test_bad_line_on_a_real_cluster_runs_nothing(cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    good = "".join(f"touch {marks}/{i}\n" for i in range(300))
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_bytes(good.encode() + BAD_NAME)
    out = tmp_path / "out.jsonl"
    done = cluster.status()["done"]
    proc = zfalkon("run", "--broker", cluster.address, "-o", str(out), str(taskfile))
    assert proc.returncode == EXIT_BAD_TASKFILE, proc.stderr
    assert b"line 301: file name '../up'" in proc.stderr and not out.exists()
    # The same file without its bad line runs in full; the broker counts exactly those.
    taskfile.write_text(good)
    proc = zfalkon("run", "--broker", cluster.address, "-o", str(out), str(taskfile))
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 300 and len(list(marks.iterdir())) == 300
    assert cluster.status()["done"] - done == 300


def test_binary_stdin_is_one_error_line_and_no_traceback():
    data = bytes(range(256)) * 64
    proc = zfalkon("run", "--broker", nowhere(), "-", stdin=data)
    assert proc.returncode == EXIT_BAD_TASKFILE
    (line,) = proc.stderr.decode().splitlines()
    assert line.startswith("zfalkon run: standard input is not a UTF-8 text task file: "
                           "line 1: binary data (a NUL byte at column 1)")


def test_good_stdin_still_runs(cluster):
    proc = zfalkon("run", "--broker", cluster.address, "-", stdin=GOOD)
    assert proc.returncode == 0, proc.stderr
    assert sorted(int(json.loads(r)["stdout"]) for r in proc.stdout.splitlines()) == \
        list(range(300))


def test_a_bad_timeout_is_refused_before_anything_runs():
    proc = zfalkon("run", "--broker", nowhere(), "--timeout", "0", "-", stdin=GOOD)
    assert proc.returncode == 2
    assert b"--timeout must be a positive number" in proc.stderr


# -- issue 14: results that survive, resume, retries, rescue files, task-line keys -------


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zfalkon", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=child_env())


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_lines_take_env_cwd_timeout_and_argv():
    line = json.dumps({"command": ["printf", "%s", "x"], "env": {"A": "1"}, "cwd": "/tmp",
                       "timeout": 2.5})
    ((n, command, options),) = read_tasks(["# c", line])
    assert (n, command) == (2, ["printf", "%s", "x"])
    assert options == {"env": {"A": "1"}, "cwd": "/tmp", "timeout": 2.5}


@pytest.mark.parametrize("spec, says", [
    ({"command": "x", "nope": 1, "zz": 2}, "unknown keys 'nope', 'zz' (valid keys: command, "
                                           "env, cwd, timeout, inputs, outputs)"),
    ({"cmd": "x"}, "unknown key 'cmd' (valid keys: command, env, cwd, timeout, inputs, "
                   "outputs)"),
    ({"command": []}, "'command' as a list must be a non-empty argv of strings"),
    ({"command": "x", "env": {"A": 1}}, "'env' must be an object of name: string value"),
    ({"command": "x", "cwd": 3}, "'cwd' must be a non-empty string"),
    ({"command": "x", "timeout": 0}, "'timeout' must be a positive number of seconds"),
    ({"command": "x", "cwd": "/tmp", "outputs": ["o"]}, "runs in its own directory: drop cwd"),
])
def test_bad_json_keys_are_named_with_the_line_and_the_valid_keys(spec, says):
    check = check_task_file(io.BytesIO(b"echo 1\n" + json.dumps(spec).encode() + b"\n"))
    assert check.bad == 1
    assert check.problems[0].startswith("line 2: ") and says in check.problems[0]


def test_env_cwd_timeout_and_argv_run_on_a_cluster(cluster, tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text(
        json.dumps({"command": ["sh", "-c", 'echo "$GREETING $(pwd)"'],
                    "env": {"GREETING": "hi"}, "cwd": str(tmp_path)}) + "\n" +
        json.dumps({"command": "sleep 5", "timeout": 0.5}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run("run", "--broker", cluster.address, "-o", str(out), str(taskfile))
    assert proc.returncode == 1, proc.stderr
    recs = {r["line"]: r for r in records(out)}
    assert recs[1]["stdout"] == f"hi {tmp_path}\n" and recs[1]["command"][0] == "sh"
    assert recs[2]["exit_code"] is None and "timeout" in recs[2]["error"]
    assert "line 1" not in proc.stderr and "line 2: " in proc.stderr


def test_output_is_never_overwritten_without_force(cluster, tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("echo new\n")
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    proc = run("run", "--broker", cluster.address, "-o", str(out), str(taskfile))
    assert proc.returncode == 2
    assert proc.stderr == (f"zfalkon run: {out} exists: --force overwrites it, --resume "
                           "continues the run it records\n")
    assert out.read_text() == "precious\n"
    proc = run("run", "--broker", cluster.address, "-o", str(out), "--force", str(taskfile))
    assert proc.returncode == 0, proc.stderr
    assert [r["stdout"] for r in records(out)] == ["new\n"]
    for bad, says in [(["--resume"], "--resume needs -o FILE"),
                      (["--resume", "--force", "-o", str(out)], "choose one"),
                      (["--retries", "-1"], "--retries must be 0 or more"),
                      (["--wait-workers", "0"], "--wait-workers must be a positive")]:
        proc = run("run", "--broker", cluster.address, *bad, str(taskfile))
        assert proc.returncode == 2 and says in proc.stderr, (bad, proc.stderr)


def test_retries_rerun_failures_and_the_rescue_file_holds_what_still_failed(cluster, tmp_path):
    counter = tmp_path / "count"
    flaky = f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; [ $n -ge 1 ]"
    always = json.dumps({"command": ["sh", "-c", "exit $CODE"], "env": {"CODE": "3"}})
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text(f"echo ok\n# a comment\n{always}\n{flaky}\nexit 4\n")
    out, rescue = tmp_path / "out.jsonl", tmp_path / "rescue.txt"
    proc = run("run", "--broker", cluster.address, "--retries", "2", "-o", str(out),
               "--failed-to", str(rescue), str(taskfile))
    assert proc.returncode == 1, proc.stderr
    recs = {r["line"]: r for r in records(out)}
    assert sorted(recs) == [1, 3, 4, 5]  # one record per task: its last attempt
    assert recs[1]["exit_code"] == 0 and "attempts" not in recs[1]
    assert (recs[3]["exit_code"], recs[3]["attempts"]) == (3, 3)
    assert (recs[4]["exit_code"], recs[4]["attempts"]) == (0, 2)
    assert counter.read_text() == "2\n"  # the flaky task ran twice, not three times
    assert (recs[5]["exit_code"], recs[5]["attempts"]) == (4, 3)
    assert "4 tasks, 2 failed (5 reruns)" in proc.stderr
    assert f"the 2 task lines that did not succeed are in {rescue}" in proc.stderr
    assert rescue.read_text() == f"{always}\nexit 4\n"  # the lines as they were
    # The rescue file is a task file; an existing one is not overwritten without --force.
    proc = run("run", "--broker", cluster.address, "-o", str(tmp_path / "again.jsonl"),
               "--failed-to", str(rescue), str(rescue))
    assert proc.returncode == 2 and f"{rescue} exists: --force overwrites it" in proc.stderr
    proc = run("run", "--broker", cluster.address, str(rescue))
    assert proc.returncode == 1
    assert sorted(r["exit_code"] for r in map(json.loads, proc.stdout.splitlines())) == [3, 4]


def test_sigkill_then_resume_reruns_no_finished_task(tmp_path):
    """The client is killed once results are written, the gated tasks waiting; the broker
    and worker go too (so nothing of the killed run survives it: an away client's tasks
    would run on). --resume on a new broker skips what the file records and runs the rest:
    a recorded task never runs again, a gated one runs once, and the file ends with one
    record per task. (A task that ran but whose result had not reached the client when it
    was killed, as a slot may hold a result while its next task runs, runs again: at
    least once.)"""
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("# twelve tasks\n" + "".join(
        f"sleep 0.05; echo x >> {marks}/{i}\n" if i <= 4 else
        f"while [ ! -e {gate} ]; do sleep 0.02; done; echo x >> {marks}/{i}\n"
        for i in range(2, 14)))
    out = tmp_path / "out.jsonl"
    with broker_process() as (_, address), worker_process(address, "--slots", "2"):
        proc = subprocess.Popen([sys.executable, "-m", "zfalkon", "run", "--broker", address,
                                 "-o", str(out), str(taskfile)], env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: out.exists() and out.read_text().count("\n") >= 1 and
                       all((marks / str(i)).exists() for i in (2, 3, 4)), 60, 0.02,
                       "results written")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            stop_process(proc)
    first = records(out)
    recorded = {r["line"] for r in first}
    assert recorded and recorded <= {2, 3, 4} and all(r["exit_code"] == 0 for r in first)
    with out.open("a") as f:
        f.write('{"line": 9, "command": "ech')  # a record cut short by the kill
    # Nothing runs without --resume or --force.
    assert run("run", "--broker", "tcp://127.0.0.1:1", "-o", str(out),
               str(taskfile)).returncode == 2
    gate.touch()
    with broker_process() as (_, address), worker_process(address, "--slots", "2"):
        proc = run("run", "--broker", address, "-o", str(out), "--resume", str(taskfile))
        assert proc.returncode == 0, proc.stderr
        assert (f"{12 - len(recorded)} tasks, 0 failed; {len(recorded)} done already "
                "(--resume)") in proc.stderr
        final = records(out)  # (the torn line was cut, not followed)
        assert sorted(r["line"] for r in final) == list(range(2, 14))
        assert all(r["exit_code"] == 0 for r in final)
        runs = {int(p.name): p.read_text().count("x") for p in marks.iterdir()}
        assert sorted(runs) == list(range(2, 14))
        assert all(runs[i] == 1 for i in recorded)  # no recorded task ran again
        assert all(runs[i] == 1 for i in range(5, 14))  # the gated ones: once
        assert all(runs[i] in (1, 2) for i in (2, 3, 4))
        proc = run("run", "--broker", address, "-o", str(out), "--resume", str(taskfile))
        assert proc.returncode == 0 and "0 tasks, 0 failed; 12 done already" in proc.stderr
        assert len(records(out)) == 12


def test_a_stopped_run_puts_what_did_not_run_in_the_rescue_file(tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("# c\necho 1\necho 2\n\necho 3\n")
    rescue = tmp_path / "rescue.txt"
    with broker_process() as (_, address):
        proc = run("run", "--broker", address, "--wait-workers", "0.5", "--failed-to",
                   str(rescue), str(taskfile))
    assert proc.returncode == EXIT_STOPPED, proc.stderr
    assert "3 tasks not run: 3 cancelled on the broker" in proc.stderr
    assert rescue.read_text() == "echo 1\necho 2\necho 3\n"
