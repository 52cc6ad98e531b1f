"""``zfalkon run``: run a task file (one shell command per line) and write JSON lines.

The task-list format of Swift and Falkon: each non-blank line is a shell command run
through ``/bin/sh -c``; lines starting with ``#`` are comments. A line starting with ``{``
is a JSON object that can also stage files (see :mod:`zfalkon.staging`)::

    {"command": "sort in.txt > out.txt", "inputs": {"in.txt": "s3://bucket/key"},
     "outputs": {"out.txt": "s3://bucket/sorted"}}

Input values: ``"s3://..."``, a shared path, ``{"text": "..."}`` or ``{"base64": "..."}``
(inline). Outputs: a list of names (returned inline, base64, in the record's ``files``) or
a map of name to ``""`` or ``"s3://..."``. Tasks stream: at most ``window`` are in flight,
so a file of millions of lines runs in bounded memory.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import queue
import sys
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

from tqdm import tqdm

from zfalkon.client import Executor
from zfalkon.errors import ConfigError, TaskError, TaskTimeout
from zfalkon.payload import ShellResult

#: Most tasks ``zfalkon run`` keeps in flight.
RUN_WINDOW = 10_000
_SHOWN_FAILURES = 10


def read_tasks(lines: Iterable[str]) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(line_number, command, staging)`` for each task line (``staging``: the
    ``inputs`` and ``outputs`` keyword arguments of ``Executor.shell``, maybe empty)."""
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not text.startswith("{"):
            yield number, text, {}
            continue
        try:
            spec = json.loads(text)
            command = spec["command"]
            inputs = {name: _input(value) for name, value in spec.get("inputs", {}).items()}
            outputs = spec.get("outputs", [])
            if not isinstance(command, str) or not isinstance(outputs, (list, dict)):
                raise TypeError("command must be a string, outputs a list or an object")
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise ConfigError(f"task file line {number}: {type(exc).__name__}: {exc}") from None
        yield number, command, {"inputs": inputs, "outputs": outputs}


def _input(value: object) -> bytes | str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "text" in value:
        return str(value["text"]).encode()
    if isinstance(value, dict) and "base64" in value:
        return base64.b64decode(value["base64"], validate=True)
    raise TypeError(f"an input is a string or {{'text'|'base64': ...}}, not {value!r}")


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
        if result.files:
            rec["files"] = {n: base64.b64encode(d).decode() for n, d in result.files.items()}
    return rec


def _put_done(finished: queue.SimpleQueue, line: int, command: str, future: Future) -> None:
    """Done-callback of a task future: queue ``(line, command, future)`` for the writer."""
    finished.put((line, command, future))


def run_tasks(executor: Executor, tasks: Iterable[tuple[int, str, dict]], out: IO[str], *,
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
        for line, command, files in tasks:
            future = executor.shell(command, timeout=timeout, **files)
            future.add_done_callback(functools.partial(_put_done, finished, line, command))
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
