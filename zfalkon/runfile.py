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
import shlex
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

#: ``zfalkon run --help``'s description.
RUN_HELP = """Run every task of a task file and write one JSON line per task as it ends.

A task line is a shell command (run by /bin/sh -c), or a JSON object with "command" (a
string, or an argv list) and optionally "env", "cwd", "timeout", "inputs", "outputs".
Blank lines and lines starting with # are skipped. Every line is checked before
anything runs.

Stopping: the first Ctrl-C (or SIGTERM) cancels the tasks not started, writes every
result received and exits 130 (143); a second Ctrl-C exits at once. Run the same
command with --resume to run what is left. Exit status: 0 all tasks exited 0, 1 some
failed, 2 bad option or no broker, 3 bad task file, 4 stopped by an error."""

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


#: The keys a JSON task line may have.
TASK_KEYS = ("command", "env", "cwd", "timeout", "inputs", "outputs")


def parse_line(text: str) -> tuple[str | list[str], dict] | None:
    """``(command, options)`` for a task line, None for a blank or comment line
    (``command``: a string for ``/bin/sh -c``, or an argv list; ``options``: keyword
    arguments of ``Executor.shell`` among ``env``, ``cwd``, ``timeout``, ``inputs`` and
    ``outputs``, maybe empty). Raises :class:`BadLine` for anything ``Executor.shell``
    would refuse, and for a key not in :data:`TASK_KEYS`."""
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
    unknown = sorted(k for k in spec if k not in TASK_KEYS)
    if unknown:
        raise BadLine(f"unknown key{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(map(_short, unknown))} (valid keys: {', '.join(TASK_KEYS)})")
    command = spec.get("command")
    if isinstance(command, list):
        if not command or not all(isinstance(a, str) for a in command):
            raise BadLine("'command' as a list must be a non-empty argv of strings")
    elif not isinstance(command, str) or not command.strip():
        raise BadLine("'command' must be a non-empty string (run by /bin/sh -c) or a list "
                      "of strings (an argv)")
    options: dict = {}
    env, cwd, timeout = spec.get("env"), spec.get("cwd"), spec.get("timeout")
    if env is not None:
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise BadLine("'env' must be an object of name: string value")
        options["env"] = env
    if cwd is not None:
        if not isinstance(cwd, str) or not cwd:
            raise BadLine("'cwd' must be a non-empty string (a directory on the worker)")
        options["cwd"] = cwd
    if timeout is not None:
        if type(timeout) not in (int, float) or not timeout > 0:
            raise BadLine("'timeout' must be a positive number of seconds")
        options["timeout"] = timeout
    inputs, outputs = spec.get("inputs", {}), spec.get("outputs", [])
    if not isinstance(inputs, dict):
        raise BadLine("'inputs' must be an object of name: source")
    if not (isinstance(outputs, list) and all(isinstance(n, str) for n in outputs) or
            isinstance(outputs, dict) and all(isinstance(d, str) for d in outputs.values())):
        raise BadLine("'outputs' must be a list of names or an object of name: destination")
    staged = {name: _input(name, value) for name, value in inputs.items()}
    if staged or outputs:
        options.update(inputs=staged, outputs=outputs)
    try:
        shell_task(command, **options)  # Executor.shell's checks, now
    except SerializationError as exc:
        raise BadLine(str(exc)) from None
    return command, options


def command_key(command: str | list[str]) -> str:
    """A task's command as text: itself, or an argv list as JSON (the identity
    ``--resume`` compares, with the line number)."""
    return command if isinstance(command, str) else json.dumps(command)


def command_text(command: str | list[str]) -> str:
    """A command as a person reads it (an argv list quoted as a shell would)."""
    return command if isinstance(command, str) else shlex.join(command)


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


def read_tasks(lines: Iterable[str]) -> Iterator[tuple[int, str | list[str], dict]]:
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


def iter_tasks(f: BinaryIO) -> Iterator[tuple[int, str | list[str], dict]]:
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

    total: int = 0  #: tasks submitted (reruns not counted)
    failed: int = 0  #: tasks whose last attempt failed
    failures: list[dict] = field(default_factory=list)
    written: int = 0  #: records written
    retried: int = 0  #: reruns (--retries)
    skipped: int = 0  #: tasks left out as done already (--resume)
    failed_lines: set[int] = field(default_factory=set)  #: line numbers of the failures
    last_line: int = 0  #: the line number of the last task submitted
    #: After a stop: line numbers of the tasks submitted that have no record, and how
    #: many of them a slot had (running, or done with the result not received yet).
    unfinished_lines: set[int] = field(default_factory=set)
    running_at_stop: int = 0
    killed_running: bool = False  #: whether those were cancelled too (cancel(force=True))
    stopped: "Stop | None" = None  #: why the run stopped early, if it did

    @property
    def ok(self) -> bool:
        return self.failed == 0


class Stop:
    """An event that stops :func:`run_tasks`, put in its event queue (by a signal handler:
    ``SimpleQueue.put`` is safe there, or by a :class:`~zfalkon.watch.WorkerWatch`)."""

    def __init__(self, reason: str, signum: int | None = None) -> None:
        self.reason = reason
        self.signum = signum


class Stopped(Exception):
    """:func:`run_tasks` stopped early on a :class:`Stop` (results received are written)."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.reason)
        self.stop = stop


class Notice(str):
    """An event that only prints a line on stderr (a warning), above the progress bar."""


def record(line: int, command: str | list[str], future, attempts: int = 1) -> dict:
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
    if attempts > 1:
        rec["attempts"] = attempts
    return rec


def _received(future: Future) -> bool:
    """Whether a done future holds a task's result (a value or the task's own error), not
    the client's failure (a broken connection, a cancel)."""
    return not future.cancelled() and (future.exception() is None or
                                       isinstance(future.exception(), TaskError))


def _put_done(finished: queue.SimpleQueue, task: tuple[int, dict], command: str | list[str],
              future: Future) -> None:
    """Done-callback of a task future: queue ``((line, options), command, future)`` for
    the writer."""
    finished.put((task, command, future))


def run_tasks(executor: Executor, tasks: Iterable[tuple[int, str | list[str], dict]],
              out: IO[str], *, timeout: float | None = None, total: int | None = None,
              progress: bool = False, window: int = RUN_WINDOW,
              summary: RunSummary | None = None, retries: int = 0,
              events: queue.SimpleQueue | None = None) -> RunSummary:
    """Run ``tasks`` on ``executor``; write one JSON line per task to ``out`` as it ends,
    flushed at once (a killed run leaves every result it received).

    ``retries``: run a task that fails (non-zero exit, timeout, error) again, up to this
    many times; only its last attempt is written (with ``attempts``). ``events``: the
    queue results arrive on, shared with whoever may stop the run: a :class:`Stop` put
    there raises :class:`Stopped` (after cancelling what is in flight: the tasks no slot
    has, and with an executor that can, the running ones), a :class:`Notice` is printed.
    On any error (a bad line, a broken connection: raised), every result already received
    is written first."""
    summary = summary if summary is not None else RunSummary()
    finished: queue.SimpleQueue = events if events is not None else queue.SimpleQueue()
    flying: dict[Future, int] = {}  # in-flight future -> its line
    attempts: dict[int, int] = {}  # line -> attempts so far, for lines rerun
    bar = tqdm(total=total, unit="task", disable=not progress, file=sys.stderr)

    def submit(line: int, command: str | list[str], options: dict) -> None:
        future = executor.shell(command, **{"timeout": timeout, **options})
        flying[future] = line
        future.add_done_callback(functools.partial(_put_done, finished,
                                                   (line, options), command))

    def write(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")
        out.flush()  # one line per finished task, on disk as it ends
        summary.written += 1
        if rec["exit_code"] != 0:
            summary.failed += 1
            summary.failed_lines.add(rec["line"])
            if len(summary.failures) < _SHOWN_FAILURES:
                summary.failures.append(rec)
        bar.update(1)

    def handle(item: object) -> bool:
        """Handle one event; True if a task is finished (written)."""
        if isinstance(item, Stop):
            raise Stopped(item)
        if isinstance(item, Notice):
            bar.write(str(item), file=sys.stderr)
            return False
        assert isinstance(item, tuple)
        task, command, future = item
        line, options = task
        flying.pop(future, None)
        tries = attempts.get(line, 1)
        if future.cancelled():  # (not by us: the run was cancelled on the broker; its
            cancelled_lines.add(line)  # other tasks end cancelled too, or, if they were
            return False  # let run (--queued-only), with their results: written)
        rec = record(line, command, future, tries)  # raises the client's own error
        if rec["exit_code"] != 0 and tries <= retries:
            attempts[line] = tries + 1
            summary.retried += 1
            submit(line, command, options)
            return False
        attempts.pop(line, None)
        write(rec)
        return True

    cancelled_lines: set[int] = set()  # tasks the broker cancelled (zfalkon cancel)
    try:
        for line, command, options in tasks:
            if cancelled_lines:
                break  # (no more of a cancelled run)
            submit(line, command, options)
            summary.total += 1
            summary.last_line = line
            while len(flying) >= window or not finished.empty():
                handle(finished.get())
        while flying:
            handle(finished.get())
        if cancelled_lines:
            raise Stopped(Stop("the run was cancelled on the broker (zfalkon cancel)"))
    except BaseException as exc:
        if isinstance(exc, Stopped):
            summary.stopped = exc.stop
            summary.running_at_stop = sum(1 for f in flying if f.running())
            summary.killed_running = _cancel_running(executor, flying)
        while not finished.empty():  # results received before the error
            item = finished.get()
            if isinstance(item, tuple) and _received(item[2]):
                (line, _), command, future = item
                flying.pop(future, None)
                write(record(line, command, future, attempts.get(line, 1)))
        summary.unfinished_lines = set(flying.values()) | cancelled_lines
        raise
    finally:
        bar.close()
        out.flush()
    return summary


def _cancel_running(executor: Executor, flying: dict[Future, int]) -> bool:
    """Cancel the run's tasks, running ones too (``Executor.cancel_all``: they are killed
    on their workers); whether any was asked."""
    return executor.cancel_all() > 0


def read_done(path: str) -> set[tuple[int, str]]:
    """``(line, command)`` of every record with exit code 0 in a results file (what
    ``--resume`` skips). A last line cut short (a killed run) is removed from the file;
    another line that is not a JSON record is a ConfigError naming it."""
    done: set[tuple[int, str]] = set()
    with open(path, "rb+") as f:
        good = 0
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):  # torn by a kill mid-write: cut it
                f.truncate(good)
                break
            try:
                rec = json.loads(raw)
                line, command, code = rec["line"], rec["command"], rec["exit_code"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path} line {number} is not a zfalkon run record: "
                                  f"--resume needs the results file of an earlier run of "
                                  f"this task file") from None
            if code == 0:
                done.add((line, command_key(command)))
            good += len(raw)
    return done


def skip_done(tasks: Iterable[tuple[int, str | list[str], dict]], done: set[tuple[int, str]],
              summary: RunSummary) -> Iterator[tuple[int, str | list[str], dict]]:
    """The tasks not in ``done`` (by line number and command text); counts the rest."""
    for task in tasks:
        if (task[0], command_key(task[1])) in done:
            summary.skipped += 1
        else:
            yield task


def write_rescue(source: BinaryIO, out: IO[bytes], summary: RunSummary,
                 done: set[tuple[int, str]]) -> int:
    """Write the task lines of ``source`` that did not succeed (failed, or after a stop
    not run) to ``out``, as they are; return how many. Lines ``done`` are left out."""
    stopped = summary.stopped is not None
    source.seek(0)
    n = 0
    for number, raw in _raw_lines(source):
        if number in summary.failed_lines or stopped and (
                number in summary.unfinished_lines or number > summary.last_line):
            task = parse_line(_decode(raw))
            if raw is None or task is None or (number, command_key(task[0])) in done:
                continue
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
            n += 1
    return n


def describe_failures(summary: RunSummary) -> str:
    """A short human summary of a run, for stderr."""
    lines = [f"zfalkon run: {summary.total} tasks, {summary.failed} failed"
             + (f" ({summary.retried} reruns)" if summary.retried else "")
             + (f"; {summary.skipped} done already (--resume)" if summary.skipped else "")]
    for rec in summary.failures:
        why = rec.get("error") or f"exit status {rec['exit_code']}"
        lines.append(f"  line {rec['line']}: {why}: {command_text(rec['command'])[:120]}")
    if summary.failed > len(summary.failures):
        lines.append(f"  ... and {summary.failed - len(summary.failures)} more")
    return "\n".join(lines)
