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

Every line is checked before any task is submitted (:func:`check_task_file`): at most
``MAX_LINE_BYTES``, UTF-8 without NUL bytes, valid JSON where it starts with ``{``, and
file names and values ``Executor.shell`` accepts. A file with a bad line runs nothing.
Standard input is first copied to a temporary file (:func:`spool`), so memory stays
bounded and the run starts once it is closed.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import queue
import shutil
import sys
import tempfile
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, BinaryIO, Iterable, Iterator

from tqdm import tqdm

from zfalkon.client import Executor
from zfalkon.errors import ConfigError, SerializationError, TaskError, TaskTimeout
from zfalkon.payload import ShellResult, shell_task

#: Most tasks ``zfalkon run`` keeps in flight.
RUN_WINDOW = 10_000
#: Longest task-file line, in bytes without its newline. A JSON line carries its inline
#: inputs (base64, each at most ``INLINE_FILE_BYTES`` before encoding): room for several.
#: A longer line is a bad line; it is skipped over, never held in memory whole.
MAX_LINE_BYTES = 8 * 1024 * 1024
#: Bad lines ``zfalkon run`` lists; the rest are counted.
MAX_REPORTED_LINES = 100
#: Exit status of ``zfalkon run`` when the task file has a bad line (nothing submitted).
EXIT_BAD_TASKFILE = 3
#: Exit status of ``zfalkon run`` stopped by an error after it submitted tasks (the
#: results received until then are written).
EXIT_STOPPED = 4
_SHOWN_FAILURES = 10
_REASON_CHARS = 160  # a reason is cut here: a bad line is never echoed back whole


class BadLine(ValueError):
    """Why one task-file line cannot run (short: never the whole line)."""


def parse_line(text: str) -> tuple[str, dict] | None:
    """``(command, staging)`` for a task line, None for a blank or comment line
    (``staging``: the ``inputs`` and ``outputs`` keyword arguments of ``Executor.shell``,
    maybe empty). Raises :class:`BadLine` for anything ``Executor.shell`` would refuse."""
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    if "\0" in text:
        raise BadLine("a NUL byte (binary data?)")
    if not text.startswith("{"):
        return text, {}
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise BadLine(f"bad JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise BadLine("a line starting with '{' must be one JSON object")
    command, inputs, outputs = spec.get("command"), spec.get("inputs", {}), \
        spec.get("outputs", [])
    if not isinstance(command, str) or not command.strip():
        raise BadLine("'command' must be a non-empty string")
    if not isinstance(inputs, dict):
        raise BadLine("'inputs' must be an object of name: source")
    if not (isinstance(outputs, list) and all(isinstance(n, str) for n in outputs) or
            isinstance(outputs, dict) and all(isinstance(d, str) for d in outputs.values())):
        raise BadLine("'outputs' must be a list of names or an object of name: destination")
    staged = {name: _input(name, value) for name, value in inputs.items()}
    try:
        shell_task(command, inputs=staged, outputs=outputs)  # Executor.shell's checks, now
    except SerializationError as exc:
        raise BadLine(str(exc)) from None
    return command, {"inputs": staged, "outputs": outputs}


def _input(name: str, value: object) -> bytes | str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"].encode()
    if isinstance(value, dict) and isinstance(value.get("base64"), str):
        try:
            return base64.b64decode(value["base64"], validate=True)
        except binascii.Error as exc:
            raise BadLine(f"input {_short(name)}: bad base64: {exc}") from None
    raise BadLine(f"input {_short(name)}: give a string, {{\"text\": ...}} or "
                  f"{{\"base64\": ...}}, not {_short(value)}")


def _short(value: object, chars: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[:chars] + "..."


def read_tasks(lines: Iterable[str]) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(line_number, command, staging)`` for each task line; a bad line raises
    ConfigError naming it."""
    for number, line in enumerate(lines, 1):
        try:
            task = parse_line(line)
        except BadLine as exc:
            raise ConfigError(f"task file line {number}: {_reason(exc)}") from None
        if task is not None:
            yield number, *task


def _reason(exc: BadLine) -> str:
    text = str(exc)
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def _raw_lines(f: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """``(number, line)`` for each line of ``f``; ``line`` is None for a line longer than
    MAX_LINE_BYTES, read past in pieces rather than held."""
    limit = MAX_LINE_BYTES
    number = 0
    while chunk := f.readline(limit + 2):  # room for "\r\n"
        number += 1
        if len(chunk.rstrip(b"\r\n")) <= limit:
            yield number, chunk
            continue
        while chunk and not chunk.endswith(b"\n"):
            chunk = f.readline(1 << 20)
        yield number, None


def _decode(raw: bytes | None) -> str:
    if raw is None:
        raise BadLine(f"longer than {MAX_LINE_BYTES} bytes (MAX_LINE_BYTES)")
    if b"\0" in raw:
        raise _NotText(f"binary data (a NUL byte at column {raw.index(0) + 1})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _NotText(f"not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                       f"{exc.start + 1})") from None


class _NotText(BadLine):
    """A line that is not UTF-8 text: the file is probably not a task file."""


def iter_tasks(f: BinaryIO) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(line_number, command, staging)`` for each task line of a binary file; a
    bad line raises ConfigError (run :func:`check_task_file` first)."""
    for number, raw in _raw_lines(f):
        try:
            task = parse_line(_decode(raw))
        except BadLine as exc:
            raise ConfigError(f"task file line {number}: {_reason(exc)}") from None
        if task is not None:
            yield number, *task


@dataclass
class TaskFileCheck:
    """What :func:`check_task_file` found."""

    tasks: int = 0  #: good task lines
    bad: int = 0  #: bad lines
    problems: list[str] = field(default_factory=list)  #: the first bad lines, as "line N: why"
    not_text: int = 0  #: bad lines that are not UTF-8 text (listed once)

    def report(self, source: str) -> list[str]:
        """The lines ``zfalkon run`` prints on stderr for a task file with bad lines."""
        if self.bad == self.not_text:  # binary, or another encoding: one line says it
            more = f" (and {self.not_text - 1} more such lines)" if self.not_text > 1 else ""
            return [f"zfalkon run: {source} is not a UTF-8 text task file: "
                    f"{self.problems[0]}{more}; nothing submitted"]
        lines = [f"zfalkon run: {source} {p}" for p in self.problems]
        if self.bad > len(self.problems):
            lines.append(f"zfalkon run: ... and {self.bad - len(self.problems)} more bad lines")
        lines.append(f"zfalkon run: {source}: {self.bad} bad line(s) of "
                     f"{self.tasks + self.bad} task lines; nothing submitted")
        return lines


def check_task_file(f: BinaryIO) -> TaskFileCheck:
    """Check every line of ``f`` (read once, in bounded memory) before anything runs."""
    check = TaskFileCheck()
    for number, raw in _raw_lines(f):
        try:
            if parse_line(_decode(raw)) is not None:
                check.tasks += 1
            continue
        except _NotText as exc:
            check.not_text += 1
            if check.not_text > 1:
                check.bad += 1
                continue
            reason = _reason(exc)
        except BadLine as exc:
            reason = _reason(exc)
        check.bad += 1
        if len(check.problems) < MAX_REPORTED_LINES:
            check.problems.append(f"line {number}: {reason}")
    return check


def spool(stream: BinaryIO) -> BinaryIO:
    """A temporary file holding all of ``stream`` (standard input), at its start."""
    tmp = tempfile.TemporaryFile(prefix="zfalkon-run-")
    try:
        shutil.copyfileobj(stream, tmp, 1 << 20)
        tmp.seek(0)
    except BaseException:
        tmp.close()
        raise
    return tmp


@dataclass
class RunSummary:
    """What ``run_tasks`` did: counts and the first few failures."""

    total: int = 0  #: tasks submitted
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    written: int = 0  #: records written

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


def _received(future: Future) -> bool:
    """Whether a done future holds a task's result (a value or the task's own error), not
    the client's failure (a broken connection, a cancel)."""
    return not future.cancelled() and (future.exception() is None or
                                       isinstance(future.exception(), TaskError))


def _put_done(finished: queue.SimpleQueue, line: int, command: str, future: Future) -> None:
    """Done-callback of a task future: queue ``(line, command, future)`` for the writer."""
    finished.put((line, command, future))


def run_tasks(executor: Executor, tasks: Iterable[tuple[int, str, dict]], out: IO[str], *,
              timeout: float | None = None, total: int | None = None,
              progress: bool = False, window: int = RUN_WINDOW,
              summary: RunSummary | None = None) -> RunSummary:
    """Run ``tasks`` on ``executor``; write one JSON line per task to ``out`` as it ends.

    ``out`` is flushed whenever the writer waits. On an error (a bad line, a broken
    connection: raised), every result already received is written first."""
    summary = summary if summary is not None else RunSummary()
    finished: queue.SimpleQueue = queue.SimpleQueue()
    in_flight = 0
    bar = tqdm(total=total, unit="task", disable=not progress, file=sys.stderr)

    def write(line: int, command: str, future: Future) -> None:
        rec = record(line, command, future)
        out.write(json.dumps(rec) + "\n")
        summary.written += 1
        if rec["exit_code"] != 0:
            summary.failed += 1
            if len(summary.failures) < _SHOWN_FAILURES:
                summary.failures.append(rec)
        bar.update(1)

    def take_one() -> None:
        if finished.empty():
            out.flush()  # about to wait: what was received is in the file meanwhile
        write(*finished.get())  # raises the client's own error (BrokerUnavailable, ...)

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
    except BaseException:
        while not finished.empty():  # results received before the error
            line, command, future = finished.get()
            if _received(future):
                write(line, command, future)
        raise
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
