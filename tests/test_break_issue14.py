"""Break attempts on issue 14 (runs, cancel, resume, Ctrl-C, retries, poison tasks), as a
new user would try them from the README's "Use it" section: real processes on 127.0.0.1,
bounded waits on observable state, every process stopped by PID.

A probe that found a bug keeps the correct assertion and is ``xfail(strict=True)``."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil

from conftest import (Raw, broker_process, child_env, descendants, kill_tree, served_broker,
                      stop_process, wait_until)
from test_cli import Terminal, lines_in, zfalkon

from zfalkon import payload, query_status
from zfalkon import protocol as P


def _runs(address: str) -> dict:
    proc = zfalkon("runs", "--broker", address, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _by_name(address: str) -> dict:
    return {r["run"] or r["name"]: r for r in _runs(address)["runs"]}


def _raw_run(ctx, address: str, label: str, n: int = 1, command: str = "true") -> tuple:
    """A raw client (run ``label``) with ``n`` shell tasks queued: (connection, key)."""
    conn = Raw(ctx, address)
    key = conn.hello(info={"name": "raw", "run": label}).key
    ids = [(key << P.ID_SHIFT) + i for i in range(1, n + 1)]
    conn.send_msg(P.Submit(1, 0, ids, [payload.shell_task(command) for _ in ids]))
    return conn, key


def querying(pid: int) -> bool:
    """Whether ``zfalkon status --watch`` (process ``pid``) is inside a query: each query
    has a ZeroMQ context of its own, whose io and reaper threads live only until it returns
    (between queries the watch is one thread)."""
    return psutil.Process(pid).num_threads() > 1


def _run_proc(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zfalkon", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or child_env())


# -- cancel ------------------------------------------------------------------------------

def test_cancel_queued_only_lets_the_running_task_finish(tmp_path):
    """README: `zfalkon cancel RUN --queued-only` lets the tasks slots hold finish (the
    running one, and one prefetched in the slot's first window of 2)."""
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text(f"touch {tmp_path}/started; sleep 3; touch {tmp_path}/finished\n" +
                        "".join(f"touch {tmp_path}/q{i}\n" for i in range(2, 6)))
    out = tmp_path / "out.jsonl"
    with served_broker(slots=1) as (_, address, _worker):
        run = _run_proc("--broker", address, "--name", "qo", "-o", str(out), str(taskfile))
        try:
            wait_until(lambda: (tmp_path / "started").exists(), 60, 0.05, "task 1 running")
            proc = zfalkon("cancel", "qo", "--queued-only", "--broker", address)
            assert proc.returncode == 0, proc.stderr
            _, err = run.communicate(timeout=60)
            assert run.returncode == 4, err
            # the running task was let finish (its marker appears), the queued never ran
            wait_until(lambda: (tmp_path / "finished").exists(), 15, 0.1,
                       "the running task finished")
            assert not any((tmp_path / f"q{i}").exists() for i in range(3, 6))
        finally:
            stop_process(run)


def test_cancel_a_run_whose_name_is_digits(ctx):
    """README: RUN is "a number, or a name if only one run has it"; --name takes any LABEL."""
    with broker_process() as (_, address):
        conn, key = _raw_run(ctx, address, "424242", n=3)
        try:
            wait_until(lambda: "424242" in _by_name(address), 10, 0.1, "the run listed")
            proc = zfalkon("cancel", "424242", "--broker", address)
            assert proc.returncode == 0, proc.stderr
            assert f"cancelled run {key}" in proc.stdout
        finally:
            conn.close()


def test_runs_with_many_runs_and_cancel_by_an_ambiguous_name(ctx):
    conns = []
    with broker_process() as (_, address):
        try:
            old, old_key = _raw_run(ctx, address, "dup")
            conns.append(old)
            for i in range(68):
                conns.append(_raw_run(ctx, address, f"filler-{i}")[0])
            new, new_key = _raw_run(ctx, address, "dup")
            conns.append(new)
            info = wait_until(lambda: (lambda r: r if len(r["runs"]) + r["runs_omitted"]
                                       >= 70 else None)(_runs(address)), 15, 0.2,
                              "70 runs on the broker")
            assert len(info["runs"]) <= 64 and info["runs_omitted"] >= 6
            table = zfalkon("runs", "--broker", address)
            assert table.returncode == 0 and "more runs" in table.stdout
            proc = zfalkon("cancel", "dup", "--broker", address)
            assert proc.returncode == 2, proc.stdout  # two runs are named dup: refused
            assert "cancel by the number" in proc.stderr  # (the list is not complete)
            left = {r["id"]: r for r in _runs(address)["runs"]}
            assert left[new_key]["cancelled"] == 0  # (nothing cancelled by a guess)
        finally:
            for c in conns:
                c.close()


# -- stopping ----------------------------------------------------------------------------

def test_ctrl_c_mid_dispatch_with_no_worker_leaves_nothing_queued(tmp_path):
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("true\n" * 3000)
    out = tmp_path / "out.jsonl"
    with broker_process() as (_, address):
        with Terminal("run", "--broker", address, "-o", str(out), str(taskfile)) as term:
            wait_until(lambda: query_status(address, timeout=5)["queued"] > 0, 30, 0.01,
                       "tasks arriving")
            assert term.ctrl_c(30) == 130
        text = term.text()
        assert "interrupted (SIGINT)" in text and "Traceback" not in text
        assert "0 of 3000 tasks finished" in text and "3000 tasks not run" in text
        assert out.read_text() == ""
        wait_until(lambda: query_status(address, timeout=5)["queued"] == 0, 10, 0.1,
                   "nothing of the run queued")
        assert "tasks.txt" not in _by_name(address)


def test_sigkill_then_cancel_then_resume_reruns_no_finished_task(tmp_path):
    marks = tmp_path / "marks"
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("".join(f"echo {i} >> {marks}; sleep 0.4\n" for i in range(1, 13)))
    out = tmp_path / "out.jsonl"
    with served_broker(slots=1) as (_, address, _worker):
        run = _run_proc("--broker", address, "--name", "rk", "-o", str(out), str(taskfile))
        try:
            wait_until(lambda: len(lines_in(out)) >= 3, 60, 0.05, "3 results written")
            run.kill()
            run.wait(10)
        finally:
            stop_process(run)
        before = {r["line"] for r in lines_in(out) if r["exit_code"] == 0}
        proc = zfalkon("cancel", "rk", "--broker", address)
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: (lambda s: s["queued"] == s["running"] == s["prefetched"] == 0)(
            query_status(address, timeout=5)), 20, 0.1, "the old run gone")
        again = zfalkon("run", "--broker", address, "--name", "rk", "-o", str(out),
                        "--resume", str(taskfile))
        assert again.returncode == 0, again.stderr
        records = lines_in(out)
        last = {r["line"]: r for r in records}
        assert sorted(last) == list(range(1, 13))
        assert all(r["exit_code"] == 0 for r in last.values())
        counts = {i: 0 for i in range(1, 13)}
        for word in marks.read_text().split():
            counts[int(word)] += 1
        assert all(counts[i] == 1 for i in before), (before, counts)
        assert all(counts[i] >= 1 for i in counts)
        assert f"{len(before)} done already (--resume)" in again.stderr


# -- retries, rescue files ---------------------------------------------------------------

def test_retries_rerun_a_flaky_command_and_the_rescue_file_keeps_the_hopeless(tmp_path):
    flaky = [f"if [ -e {tmp_path}/f{i} ]; then echo ok; else touch {tmp_path}/f{i}; "
             f"exit 3; fi" for i in range(3)]
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("# a comment\n" + "\n".join(flaky) + "\nexit 5\necho fine\n")
    out, rescue = tmp_path / "out.jsonl", tmp_path / "rescue.txt"
    with served_broker(slots=1) as (_, address, _worker):
        proc = zfalkon("run", "--broker", address, "--retries", "2", "-o", str(out),
                       "--failed-to", str(rescue), str(taskfile))
    assert proc.returncode == 1, proc.stderr
    last = {r["line"]: r for r in lines_in(out)}
    assert len(lines_in(out)) == 5  # only the last attempt of each task is written
    for line in (2, 3, 4):
        assert last[line]["exit_code"] == 0 and last[line]["attempts"] == 2
    assert last[5]["exit_code"] == 5 and last[5]["attempts"] == 3
    assert last[6]["exit_code"] == 0 and "attempts" not in last[6]
    assert rescue.read_text() == "exit 5\n"
    assert "(5 reruns)" in proc.stderr


# -- poison tasks ------------------------------------------------------------------------

#: A shell task that SIGKILLs its own worker agent (found by ancestry: the process whose
#: command line is `... zfalkon ... worker ...`), as a task of the worker's user can
#: without a sandbox, then hangs on.
KILL_MY_AGENT = (
    "p=$PPID; while [ \"$p\" -gt 1 ]; do "
    "c=$(tr '\\0' ' ' < /proc/$p/cmdline); "
    "case \"$c\" in *'zfalkon '*' worker '*) echo $p >> {log}; kill -9 $p; break;; esac; "
    "p=$(awk '{{print $4}}' /proc/$p/stat); done; sleep 30")


def test_a_poison_task_under_zfalkon_run_workers_2(tmp_path):
    log = tmp_path / "agents"
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text(KILL_MY_AGENT.format(log=log) + "\n" +
                        "".join(f"sleep 0.5; echo {i}\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    env = child_env() | {"ZFALKON_SANDBOX": "none"}  # a machine without namespaces
    run = _run_proc("--workers", "2", "-o", str(out), "--worker-warning", "60",
                    str(taskfile), env=env)
    kids: list[int] = []
    try:
        wait_until(lambda: (kids.extend(descendants(run.pid)) or True) and
                   len(lines_in(out)) >= 1, 60, 0.1, "tasks running")
        try:
            run.wait(30)  # (the 10 good tasks take ~3 s on one slot)
        except subprocess.TimeoutExpired:
            pass
        records = {r["line"]: r for r in lines_in(out)}
        assert sorted(records) == list(range(1, 12)), sorted(records)
        assert "quarantined" in (records[1]["error"] or "")
        assert all(records[i]["exit_code"] == 0 for i in range(2, 12))
        assert run.returncode == 1
    finally:
        kids.extend(descendants(run.pid))
        stop_process(run, timeout=30)
        kill_tree(kids)


# -- status --watch ----------------------------------------------------------------------

def test_status_watch_survives_its_broker_going_away_and_exits_cleanly_on_ctrl_c():
    with broker_process() as (broker, address):
        with Terminal("status", "--watch", "--interval", "0.3", "--timeout", "2",
                      "--broker", address) as term:
            wait_until(lambda: term.text().count("Ctrl-C to stop") >= 2, 30, 0.05,
                       "two views drawn")
            stop_process(broker)
            wait_until(lambda: "zfalkon status:" in term.text(), 30, 0.1,
                       "the broker's absence reported")
            wait_until(lambda: querying(term.proc.pid), 10, 0.01,
                       "the watch inside its next query")
            assert term.ctrl_c(15) == 0
        text = term.text()
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
