"""The ``zfalkon`` command, run as a real process: run, status, bench, errors."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from conftest import child_env, free_port

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
