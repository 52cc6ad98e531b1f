"""Cancellation and RUNNING state (issue 13) on real broker and worker processes.

The rule under test (docs/protocol.md, section 6): ``TaskFuture.cancel()`` returns True
only for a task that then never runs; once a slot has a task, ``running()`` becomes true
and ``cancel()`` returns False, and the task's result comes as usual. Executions are
counted by their side effect: each task leaves a file named after it.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import threading

import pytest

import tasks
from conftest import wait_until
from zfalkon import Executor, query_status


def settle(address: str) -> None:
    """Wait until the broker holds nothing queued or running (every marker is written)."""
    wait_until(lambda: (lambda s: s["queued"] == 0 and s["running"] == 0)(
        query_status(address)), 60, message="broker idle")


def test_a_thousand_cancels_during_a_busy_run(cluster, tmp_path):
    """1,000 short tasks on 2 slots; each is cancelled while the run goes on, in random
    order: every cancel that returned True is a task that never ran, every other one
    completes with its value."""
    marks = str(tmp_path)
    rng = random.Random(13)
    with Executor(cluster.address) as ex:
        futures = [ex.submit(tasks.mark_then_sleep, marks, i, 0.002) for i in range(1000)]
        order = list(range(1000))
        rng.shuffle(order)
        answers = {i: futures[i].cancel() for i in order}
        for i, fut in enumerate(futures):
            if answers[i]:
                assert fut.cancelled()
                with pytest.raises(cf.CancelledError):
                    fut.result(timeout=1)
            else:
                assert fut.result(timeout=60) == i
    settle(cluster.address)
    ran = {int(name) for name in os.listdir(marks)}
    cancelled = {i for i, yes in answers.items() if yes}
    assert cancelled and len(cancelled) < 1000, "the race was not exercised"
    assert not cancelled & ran, f"cancel() said True but these ran: {sorted(cancelled & ran)[:10]}"
    assert ran == set(range(1000)) - cancelled


def test_cancel_from_another_thread_while_results_arrive(cluster, tmp_path):
    marks = str(tmp_path)
    with Executor(cluster.address) as ex:
        futures = [ex.submit(tasks.mark_then_sleep, marks, i, 0.001) for i in range(400)]
        answers: dict[int, bool] = {}

        def canceller() -> None:
            for i in range(399, -1, -2):
                answers[i] = futures[i].cancel()

        thread = threading.Thread(target=canceller)
        thread.start()
        values = [f.result(timeout=60) for i, f in enumerate(futures) if i % 2 == 0]
        thread.join(60)
        assert values == list(range(0, 400, 2))
    settle(cluster.address)
    ran = {int(name) for name in os.listdir(marks)}
    assert not {i for i, yes in answers.items() if yes} & ran


def test_running_becomes_true_once_a_slot_has_the_task(cluster, tmp_path):
    with Executor(cluster.address) as ex:
        fut = ex.submit(tasks.mark_then_sleep, str(tmp_path), 0, 3.0)
        assert not fut.done()
        wait_until(fut.running, 10, message="running()")
        assert fut.cancel() is False  # a slot has it: it runs to the end
        assert fut.result(timeout=30) == 0
        assert not fut.running() and not fut.cancelled()
    assert os.listdir(tmp_path) == ["0"]


def test_cancel_of_a_done_or_cancelled_future(executor):
    fut = executor.submit(tasks.add, 1, 2)
    assert fut.result(timeout=30) == 3
    assert fut.cancel() is False


def test_shutdown_cancel_futures_cancels_what_no_slot_has_and_lets_the_rest_finish(
        cluster, tmp_path):
    marks = str(tmp_path)
    ex = Executor(cluster.address)
    futures = [ex.submit(tasks.mark_then_sleep, marks, i, 0.02) for i in range(200)]
    wait_until(lambda: any(f.running() or f.done() for f in futures), 20, message="a start")
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    cancelled = {i for i, f in enumerate(futures) if f.cancelled()}
    finished = {i for i, f in enumerate(futures) if not f.cancelled()}
    assert cancelled and finished
    assert all(futures[i].result() == i for i in finished)
    settle(cluster.address)
    ran = {int(name) for name in os.listdir(marks)}
    assert ran == finished


def test_cancel_all_cancels_queued_tasks_and_kills_running_ones(cluster, tmp_path):
    marks = str(tmp_path)
    with Executor(cluster.address) as ex:
        futures = [ex.submit(tasks.mark_then_sleep, marks, i, 60) for i in range(6)]
        wait_until(lambda: len(os.listdir(marks)) >= 2, 20, message="two tasks running")
        assert ex.cancel_all() == 6
        done, not_done = cf.wait(futures, 20)
        assert not not_done, "cancel_all left tasks running"
        assert all(f.cancelled() for f in futures)
    settle(cluster.address)
    assert len(os.listdir(marks)) == 2  # the queued ones never ran
