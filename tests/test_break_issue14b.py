"""Second break round on issue 14 ("Runs a person can steer"), aimed at the last fixes:
``cancel --queued-only``, cancel by name or number, ``run --workers N`` with a keeper,
``status --watch``, resume/rescue interplay, the no-worker warning. Real processes on
127.0.0.1, bounded waits on observable state, every process stopped by PID.

A probe that found a bug keeps the correct assertion and is ``xfail(strict=True)``."""

from __future__ import annotations

import re
import os
import signal
import time

import psutil
import pytest

from conftest import (Raw, broker_process, child_env, descendants, kill_tree, served_broker,
                      stop_process, wait_until)
from test_break_issue14 import _raw_run, _run_proc, querying
from test_cli import lines_in, start_in_pty, zfalkon

from zfalkon import Executor, query_status, security
from zfalkon import protocol as P


def _runs(address: str, keys: str | None = None) -> list[dict]:
    return query_status(address, timeout=5, keys=keys).get("runs", [])


# -- cancel: what a person may type as RUN -------------------------------------------------

@pytest.mark.parametrize("run", ["\u00b2", "arabic", "9" * 30, "0" * 5000 + "1"])
def test_cancel_refuses_odd_numbers_in_one_line(ctx, run):
    """A superscript digit (str.isdigit, not int), an Arabic-Indic digit (int() reads it
    as 3), a number beyond any key, 5000 digits: a one-line refusal, exit 2, nothing
    cancelled."""
    with broker_process() as (_, address):
        conn, key = _raw_run(ctx, address, "victim", n=2)
        try:
            wait_until(lambda: _runs(address), 10, 0.05, "the run listed")
            if run == "arabic":  # (the victim's own number in Arabic-Indic digits)
                run = "".join(chr(0x660 + int(c)) for c in str(key))
            proc = zfalkon("cancel", run, "--broker", address)
            assert proc.returncode == 2, proc.stderr[-400:]
            assert "Traceback" not in proc.stderr and len(proc.stderr) < 400, proc.stderr[-400:]
            assert [r["cancelled"] for r in _runs(address)] == [0]
        finally:
            conn.close()


def test_cancel_does_not_echo_a_long_name():
    with broker_process() as (_, address):
        proc = zfalkon("cancel", "x" * 20000, "--broker", address)
    assert proc.returncode == 2
    assert len(proc.stderr) < 400, len(proc.stderr)
    assert "no run named" in proc.stderr


def test_cancel_by_an_ambiguous_name_names_the_candidates_briefly(ctx):
    conns = []
    with broker_process() as (_, address):
        try:
            keys = [k for c, k in (_raw_run(ctx, address, "dup") for _ in range(40))
                    if not conns.append(c)]
            wait_until(lambda: len(_runs(address)) >= 40, 20, 0.1, "40 runs listed")
            proc = zfalkon("cancel", "dup", "--broker", address)
            assert proc.returncode == 2, proc.stdout
            assert "40 runs are named 'dup'" in proc.stderr and "cancel by number" in proc.stderr
            assert str(max(keys)) in proc.stderr  # (the newest named at least)
            assert len(proc.stderr) < 400, proc.stderr
            listed = proc.stderr.split("(runs ", 1)[1].split(")", 1)[0].split(", ")
            assert sum(x.isdigit() for x in listed) <= 10, listed
            assert all(r["cancelled"] == 0 for r in _runs(address))
        finally:
            for c in conns:
                c.close()


def test_cancel_a_run_that_ended_is_refused_clearly(tmp_path):
    with served_broker(slots=1) as (_, address, _worker):
        with Executor(address, run="gone") as ex:
            key = ex.key
            assert ex.shell("true").result(60).returncode == 0
        wait_until(lambda: not _runs(address), 10, 0.05, "the run forgotten after BYE")
        for run in (str(key), "gone"):
            proc = zfalkon("cancel", run, "--broker", address)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert f"no run {key}" in proc.stderr or "no run named 'gone'" in proc.stderr


def test_with_keys_a_run_of_another_identity_cannot_be_cancelled(tmp_path):
    """R20: CANCEL_RUN only from the run's CURVE identity; by number or by name."""
    d = str(tmp_path / "keys")
    security.init_keys(d)
    alice, bob = (security.new_key(d, n, "client") for n in ("alice", "bob"))
    with broker_process("--keys", d) as (_, address):
        with Executor(address, keys=alice, run="alices") as ex:
            futures = [ex.shell("true") for _ in range(3)]  # (no worker: they stay queued)
            wait_until(lambda: [r["queued"] for r in _runs(address, alice)] == [3], 20, 0.05,
                       "alice's run queued")
            for run in (str(ex.key), "alices"):
                proc = zfalkon("cancel", run, "--broker", address, "--keys", bob)
                assert proc.returncode == 2 and "another key" in proc.stderr, proc.stderr
            assert [(r["queued"], r["cancelled"]) for r in _runs(address, alice)] == [(3, 0)]
            assert not any(f.done() for f in futures)
            proc = zfalkon("cancel", "alices", "--broker", address, "--keys", alice)
            assert proc.returncode == 0, proc.stderr
            assert "3 queued tasks removed" in proc.stdout


# -- cancel --queued-only ------------------------------------------------------------------

def test_queued_only_writes_the_running_tasks_result_and_leaves_nothing_queued(tmp_path):
    """README: --queued-only lets the running ones finish, "their results are written"."""
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text(f"touch {tmp_path}/started; sleep 2; echo ran\n" +
                        "".join(f"touch {tmp_path}/q{i}\n" for i in range(2, 30)))
    out = tmp_path / "out.jsonl"
    with served_broker(slots=1) as (_, address, _worker):
        run = _run_proc("--broker", address, "--name", "qo2", "-o", str(out), str(taskfile))
        try:
            wait_until(lambda: (tmp_path / "started").exists(), 60, 0.05, "task 1 running")
            proc = zfalkon("cancel", "qo2", "--queued-only", "--broker", address)
            assert proc.returncode == 0, proc.stderr
            # (the slot's first window is 2: task 2 may be prefetched, and runs on)
            assert re.search(r"\b2[78] queued tasks removed", proc.stdout), proc.stdout
            _, err = run.communicate(timeout=60)
            assert run.returncode == 4, err
        finally:
            stop_process(run)
        records = {r["line"]: r for r in lines_in(out)}
        assert records[1]["exit_code"] == 0 and "ran" in records[1]["stdout"], records
        ran = {i for i in range(2, 30) if (tmp_path / f"q{i}").exists()}
        assert ran <= {2} and set(records) == {1} | ran, (ran, records)
        s = query_status(address, timeout=5)
        assert s["queued"] == s["running"] == s["prefetched"] == 0, s


def test_queued_only_mid_stream_reports_every_task_that_ran(tmp_path):
    """A race: --queued-only while a slot goes from one short task to the next. Every
    task that ran (its mark in the file) must have its result written, and none of those
    go to the rescue file as not run (a resume would run it twice)."""
    marks = tmp_path / "marks"
    taskfile = tmp_path / "tasks.txt"
    n = 400
    taskfile.write_text("".join(f"echo {i} >> {marks}; sleep 0.02\n" for i in range(1, n + 1)))
    lost = []
    with served_broker(slots=2) as (_, address, _worker):
        for attempt in range(4):  # (bounded: the race need not show every time)
            if lost:
                break
            out, rescue = tmp_path / f"out{attempt}.jsonl", tmp_path / f"rescue{attempt}"
            marks.write_text("")
            run = _run_proc("--broker", address, "--name", f"race{attempt}", "-o", str(out),
                            "--failed-to", str(rescue), str(taskfile))
            try:
                wait_until(lambda: len(lines_in(out)) >= 20 + 15 * attempt, 60, 0.005,
                           "results arriving")
                proc = zfalkon("cancel", f"race{attempt}", "--queued-only", "--broker",
                               address)
                assert proc.returncode == 0, proc.stderr
                _, err = run.communicate(timeout=60)
                assert run.returncode == 4, err
            finally:
                stop_process(run)
            wait_until(lambda: (lambda s: s["running"] == s["prefetched"] == 0)(
                query_status(address, timeout=5)), 20, 0.05, "the slots idle")
            ran = {int(w) for w in marks.read_text().split()}
            written = {r["line"] for r in lines_in(out)}
            rescued = rescue.read_text().splitlines() if rescue.exists() else []
            rerun = {int(c.split()[1]) for c in rescued} & ran
            lost += [(attempt, sorted(ran - written), sorted(rerun))] if ran - written else []
    assert not lost, f"tasks that ran but were reported not run: {lost}"


# -- resume, rescue file, retries ------------------------------------------------------------

def test_resume_with_failed_to_updates_the_rescue_file(tmp_path):
    """The same command with --resume instead of --force (README), --failed-to included:
    the rescue file must say what still did not succeed, or be refused before anything
    runs; never refused after the run (--force cannot go with --resume)."""
    marks = tmp_path / "marks"
    flag = tmp_path / "fixed"
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text(f"echo 1 >> {marks}\n"
                        f"echo 2 >> {marks}; test -e {flag}\n"
                        f"echo 3 >> {marks}; exit 7\n")
    out, rescue = tmp_path / "out.jsonl", tmp_path / "rescue.txt"
    with served_broker(slots=1) as (_, address, _worker):
        first = zfalkon("run", "--broker", address, "-o", str(out), "--retries", "1",
                        "--failed-to", str(rescue), str(taskfile))
        assert first.returncode == 1, first.stderr
        assert rescue.read_text().splitlines() == [f"echo 2 >> {marks}; test -e {flag}",
                                                   f"echo 3 >> {marks}; exit 7"]
        flag.touch()
        before = marks.read_text().split()
        again = zfalkon("run", "--broker", address, "-o", str(out), "--resume", "--retries",
                        "1", "--failed-to", str(rescue), str(taskfile))
    ran_again = marks.read_text().split()[len(before):]
    if again.returncode == 2 and not ran_again:  # (refused up front: acceptable)
        return
    assert again.returncode == 1, again.stderr
    assert "1" not in ran_again  # (done already)
    assert rescue.read_text().splitlines() == [f"echo 3 >> {marks}; exit 7"], again.stderr
    taskfile.write_text(taskfile.read_text().replace("exit 7", "true"))
    with served_broker(slots=1) as (_, address, _worker):
        last = zfalkon("run", "--broker", address, "-o", str(out), "--resume",
                       "--failed-to", str(rescue), str(taskfile))
    assert last.returncode == 0, last.stderr
    assert not rescue.exists() or rescue.read_text() == ""  # (nothing left to rescue)


def test_sigkill_mid_run_cancel_resume_runs_every_task_once(tmp_path):
    """kill -9 of zfalkon run, then the README's recipe (cancel NAME, then --resume with
    --retries and --failed-to): every line succeeds once, none that finished runs again."""
    marks = tmp_path / "marks"
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("".join(f"echo {i} >> {marks}; sleep 0.2\n" for i in range(1, 21)))
    out, rescue = tmp_path / "out.jsonl", tmp_path / "rescue.txt"
    with served_broker(slots=2) as (_, address, _worker):
        run = _run_proc("--broker", address, "--name", "k9", "-o", str(out), "--retries", "2",
                        "--failed-to", str(rescue), str(taskfile))
        try:
            wait_until(lambda: len(lines_in(out)) >= 5, 60, 0.02, "5 results written")
            run.kill()
            run.wait(10)
        finally:
            stop_process(run)
        assert not rescue.exists()
        proc = zfalkon("cancel", "k9", "--broker", address)
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: (lambda s: s["queued"] == s["running"] == s["prefetched"] == 0)(
            query_status(address, timeout=5)), 20, 0.05, "the old run gone")
        done_before = {r["line"] for r in lines_in(out) if r["exit_code"] == 0}
        again = zfalkon("run", "--broker", address, "--name", "k9", "-o", str(out),
                        "--resume", "--retries", "2", "--failed-to", str(rescue),
                        str(taskfile))
    assert again.returncode == 0, again.stderr
    assert not rescue.exists()  # (nothing failed: no rescue file)
    last = {r["line"]: r for r in lines_in(out)}
    assert sorted(last) == list(range(1, 21)) and all(r["exit_code"] == 0
                                                      for r in last.values())
    counts: dict[int, int] = {}
    for w in marks.read_text().split():
        counts[int(w)] = counts.get(int(w), 0) + 1
    assert all(counts[i] == 1 for i in done_before), counts
    assert all(counts.get(i, 0) >= 1 for i in range(1, 21))


# -- run --workers N: a task that kills its agent's process group ------------------------

KILL_MY_AGENT_GROUP = (
    "p=$PPID; while [ \"$p\" -gt 1 ]; do "
    "c=$(tr '\\0' ' ' < /proc/$p/cmdline); "
    "case \"$c\" in *'zfalkon '*' worker '*) echo $p >> {log}; "
    "kill -9 -$(awk '{{print $5}}' /proc/$p/stat); break;; esac; "
    "p=$(awk '{{print $4}}' /proc/$p/stat); done; sleep 30")


def test_run_workers_poison_killing_its_agents_group_leaves_no_process(tmp_path):
    log = tmp_path / "agents"
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text(KILL_MY_AGENT_GROUP.format(log=log) + "\n" +
                        "".join(f"sleep 0.3; echo {i}\n" for i in range(8)))
    out = tmp_path / "out.jsonl"
    env = child_env() | {"ZFALKON_SANDBOX": "none"}  # (a machine without namespaces)
    run = _run_proc("--workers", "2", "-o", str(out), "--worker-warning", "60",
                    str(taskfile), env=env)
    seen: set[int] = set()
    try:
        for _ in range(1200):  # (bounded: 60 s of 0.05 s looks)
            seen.update(descendants(run.pid))
            if run.poll() is not None:
                break
            time.sleep(0.05)  # (poll interval: the condition is run's exit)
        assert run.poll() is not None, "zfalkon run did not finish"
        _, err = run.communicate(timeout=10)
        records = {r["line"]: r for r in lines_in(out)}
        assert sorted(records) == list(range(1, 10)), (sorted(records), err[-2000:])
        assert "quarantined" in (records[1]["error"] or "") and "WorkerCrashed" in (
            records[1]["error"] or ""), records[1]
        assert all(records[i]["exit_code"] == 0 for i in range(2, 10))
        assert run.returncode == 1
        assert "starting another" in err  # (the keeper replaced the killed agents)
        assert len(log.read_text().split()) >= 1
        left = []
        for pid in seen:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append((pid, " ".join(p.cmdline())[:80]))
            except psutil.NoSuchProcess:
                pass
        assert not left, left
    finally:
        stop_process(run, timeout=30)
        kill_tree(list(seen))


# -- status --watch --------------------------------------------------------------------------

def _views(output: list[bytes]) -> int:
    return b"".join(output).count(b"Ctrl-C to stop")


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_watch_stopped_inside_a_query_to_a_frozen_broker_exits_promptly(how):
    """The broker SIGSTOPped: the watch's query hangs until --timeout; a stop then must end
    the watch within about that, exit 0, no traceback, the cursor on a fresh line."""
    with broker_process() as (broker, address):
        proc, master, output = start_in_pty("status", "--watch", "--interval", "0.2",
                                            "--timeout", "2", "--broker", address)
        try:
            wait_until(lambda: _views(output) >= 2, 30, 0.05, "two views drawn")
            os.kill(broker.pid, signal.SIGSTOP)
            wait_until(lambda: psutil.Process(broker.pid).status() == psutil.STATUS_STOPPED,
                       10, 0.01, "the broker stopped")
            # the scenario: a query under way, unanswered (one begun after the broker stopped)
            wait_until(lambda: not querying(proc.pid), 10, 0.005, "the watch between queries")
            wait_until(lambda: querying(proc.pid), 10, 0.005, "the watch inside its next query")
            start = time.monotonic()
            if how == "sigterm":
                os.kill(proc.pid, signal.SIGTERM)
            else:
                os.write(master, b"\x03")
            code = proc.wait(30)
            took = time.monotonic() - start
        finally:
            os.kill(broker.pid, signal.SIGCONT)
            stop_process(proc)
            os.close(master)
        text = b"".join(output).decode(errors="replace")
        assert code == 0, (code, text[-500:])
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
        assert took < 6, took
        assert text.endswith("\n"), text[-80:]


def test_watch_follows_a_broker_killed_and_restarted_on_its_port():
    from conftest import free_port, start_broker

    port = free_port()
    broker, address = start_broker(f"tcp://127.0.0.1:{port}")
    proc, master, output = start_in_pty("status", "--watch", "--interval", "0.2",
                                        "--timeout", "1", "--broker", address)
    try:
        wait_until(lambda: _views(output) >= 2, 30, 0.05, "two views drawn")
        broker.kill()
        broker.wait(10)
        broker.stdout.close()
        wait_until(lambda: b"zfalkon status:" in b"".join(output), 30, 0.05,
                   "the absence shown")
        broker, _ = start_broker(f"tcp://127.0.0.1:{port}")
        mark = len(b"".join(output))
        wait_until(lambda: b"queued 0  running 0" in b"".join(output)[mark:], 30, 0.05,
                   "the restarted broker shown")
        os.write(master, b"\x03")
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)
        os.close(master)
        stop_process(broker)
        if broker.stdout:
            broker.stdout.close()
    assert b"Traceback" not in b"".join(output)


def test_watch_of_a_broker_with_many_runs_is_bounded(ctx):
    conns = []
    with broker_process() as (_, address):
        try:
            for i in range(90):
                conns.append(_raw_run(ctx, address, f"r{i}-" + "n" * 200)[0])
            wait_until(lambda: len(_runs(address)) >= 64, 30, 0.1, "runs listed")
            proc, master, output = start_in_pty("status", "--watch", "--interval", "0.3",
                                                "--broker", address)
            try:
                wait_until(lambda: _views(output) >= 3, 30, 0.05, "three views drawn")
                os.kill(proc.pid, signal.SIGTERM)
                assert proc.wait(15) == 0
            finally:
                stop_process(proc)
                os.close(master)
        finally:
            for c in conns:
                c.close()
    text = b"".join(output).decode(errors="replace")
    view = text.split("\x1b[H\x1b[2J")[2]  # (one whole view)
    assert "more runs" in view and "Traceback" not in text
    assert len(view.splitlines()) <= 80 and max(map(len, view.splitlines())) <= 140


# -- the no-worker warning with observers only -------------------------------------------------

def test_wait_workers_with_only_observers_connected(tmp_path):
    """status --watch and zfalkon runs are observers, not workers: the warning and the
    --wait-workers error come on time."""
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("echo a\n")
    with broker_process() as (_, address):
        watch, master, _output = start_in_pty("status", "--watch", "--interval", "0.1",
                                              "--broker", address)
        try:
            start = time.monotonic()
            proc = zfalkon("run", "--broker", address, "--worker-warning", "0.5",
                           "--wait-workers", "2", str(taskfile))
            took = time.monotonic() - start
        finally:
            stop_process(watch)
            os.close(master)
    assert proc.returncode == 4, proc.stderr
    assert "it has 0 workers" in proc.stderr and "warning: the broker at" in proc.stderr
    assert 2 <= took < 15, took


@pytest.mark.parametrize("slots", [0])
def test_wait_workers_with_a_worker_that_has_no_slot(ctx, tmp_path, slots):
    """A worker agent registered with no slot connected (its slots died, or never came)
    runs nothing: --wait-workers must still stop the run."""
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("echo a\n")
    with broker_process() as (_, address):
        w = Raw(ctx, address)
        try:
            w.hello(P.ROLE_WORKER, {"worker_id": "empty", "slots": 1, "name": "empty"})
            assert query_status(address, timeout=5)["workers"] == 1
            run = _run_proc("--broker", address, "--worker-warning", "0.5",
                            "--wait-workers", "2", str(taskfile))
            try:
                deadline = time.monotonic() + 6  # (its lease lapses at 6 s: too late)
                while run.poll() is None and time.monotonic() < deadline:
                    w.sock.poll(200)  # (the raw worker answers nothing: no slot ever)
                    while w.sock.poll(0):
                        w.sock.recv()
                code = run.poll()
            finally:
                stop_process(run)
        finally:
            w.close()
    assert code == 4, "zfalkon run --wait-workers 2 still waiting after 6 s"
