"""``zfalkon run``: run a task file (one shell command per line) and write JSON lines.

The task-list format of Swift and Falkon: each non-blank line is a shell command run
through ``/bin/sh -c``; lines starting with ``#`` are comments. Tasks stream: at most
``window`` are in flight, so a file of millions of lines runs in bounded memory.
"""

from __future__ import annotations

import json
import queue
import sys
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

from tqdm import tqdm

from zfalkon.client import Executor
from zfalkon.errors import TaskError, TaskTimeout
from zfalkon.payload import ShellResult

#: Most tasks ``zfalkon run`` keeps in flight.
RUN_WINDOW = 10_000
_SHOWN_FAILURES = 10


def read_tasks(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, command)`` for each task line, skipping blanks and comments."""
    for number, line in enumerate(lines, 1):
        command = line.strip()
        if command and not command.startswith("#"):
            yield number, command


@dataclass
class RunSummary:
    """What ``run_tasks`` did: counts and the first few failures."""

    total: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def record(line: int, command: str, future) -> dict:
    """The JSON record of one finished task."""
    rec: dict = {"line": line, "command": command}
    try:
        result: ShellResult = future.result()
    except TaskTimeout as exc:
        rec.update(exit_code=None, stdout=exc.stdout, stderr=exc.stderr, duration=None,
                   worker=exc.worker, error=str(exc))
    except TaskError as exc:
        rec.update(exit_code=None, stdout="", stderr="", duration=None, worker=exc.worker,
                   error=str(exc))
    else:
        rec.update(exit_code=result.returncode, stdout=result.stdout, stderr=result.stderr,
                   duration=round(result.duration, 6), worker=result.worker)
        if result.truncated:
            rec["truncated"] = True
    return rec


def run_tasks(executor: Executor, tasks: Iterable[tuple[int, str]], out: IO[str], *,
              timeout: float | None = None, total: int | None = None,
              progress: bool = False, window: int = RUN_WINDOW) -> RunSummary:
    """Run ``tasks`` on ``executor``; write one JSON line per task to ``out`` as it ends."""
    summary = RunSummary()
    finished: queue.SimpleQueue = queue.SimpleQueue()
    in_flight = 0
    bar = tqdm(total=total, unit="task", disable=not progress, file=sys.stderr)

    def take_one() -> None:
        line, command, future = finished.get()
        rec = record(line, command, future)
        out.write(json.dumps(rec) + "\n")
        if rec["exit_code"] != 0:
            summary.failed += 1
            if len(summary.failures) < _SHOWN_FAILURES:
                summary.failures.append(rec)
        bar.update(1)

    try:
        for line, command in tasks:
            future = executor.shell(command, timeout=timeout)
            future.add_done_callback(lambda f, l=line, c=command: finished.put((l, c, f)))
            summary.total += 1
            in_flight += 1
            while in_flight >= window or not finished.empty():
                take_one()
                in_flight -= 1
        while in_flight:
            take_one()
            in_flight -= 1
    finally:
        bar.close()
        out.flush()
    return summary


def describe_failures(summary: RunSummary) -> str:
    """A short human summary of a run, for stderr."""
    lines = [f"zfalkon run: {summary.total} tasks, {summary.failed} failed"]
    for rec in summary.failures:
        why = rec.get("error") or f"exit status {rec['exit_code']}"
        lines.append(f"  line {rec['line']}: {why}: {rec['command'][:120]}")
    if summary.failed > len(summary.failures):
        lines.append(f"  ... and {summary.failed - len(summary.failures)} more")
    return "\n".join(lines)
