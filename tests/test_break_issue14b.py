"""Second break round on issue 14 ("Runs a person can steer"), aimed at the last fixes:
``cancel --queued-only``, cancel by name or number, ``run --workers N`` with a keeper,
``status --watch``, resume/rescue interplay, the no-worker warning. Real processes on
127.0.0.1, bounded waits on observable state, every process stopped by PID.

A probe that found a bug keeps the correct assertion and is ``xfail(strict=True)``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import (Raw, broker_process, child_env, descendants, kill_tree, served_broker,
                      stop_process, wait_until, worker_process)
from test_cli import lines_in, start_in_pty, zfalkon

from zfalkon import Executor, payload, query_status, security
from zfalkon import protocol as P


def _runs(address: str, keys: str | None = None) -> list[dict]:
    return query_status(address, timeout=5, keys=keys).get("runs", [])


def _raw_run(ctx, address: str, label: str, n: int = 1, command: str = "true") -> tuple:
    """A raw client (run ``label``) with ``n`` shell tasks queued: (connection, key)."""
    conn = Raw(ctx, address)
    key = conn.hello(info={"name": "raw", "run": label}).key
    ids = [(key << P.ID_SHIFT) + i for i in range(1, n + 1)]
    conn.send_msg(P.Submit(1, 0, ids, [payload.shell_task(command) for _ in ids]))
    return conn, key


def _run_proc(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zfalkon", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or child_env())


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
