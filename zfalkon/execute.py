"""Run one task blob and encode its result: Python callables and shell commands.

Used by the slot process (:mod:`zfalkon.slot`); only file staging (S3) touches the
network.
"""

from __future__ import annotations

import collections
import importlib
import os
import pickle
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import msgpack

from zfalkon import payload, values
from zfalkon.constants import OUTPUT_CAP_BYTES
from zfalkon.staging import Stager, StagingError

_packb = msgpack.packb
_unpackb = msgpack.unpackb
_TASK_VALUES = values.decoder(allow_pickle=True)
_READ_SIZE = 65536
_FUNCTIONS_CACHED = 64  # functions sent by value kept loaded, by digest
_SH = "/bin/sh"


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _version_skew(theirs: dict) -> str:
    """``"; numpy 2.1 on the client, 1.26 here; ..."`` for the packages whose versions
    differ between the client (``theirs``) and this worker."""
    import importlib.metadata as metadata

    notes = []
    for package, version in list(theirs.items())[:32]:
        try:
            ours = metadata.version(str(package))
        except (metadata.PackageNotFoundError, ValueError):
            ours = "not installed"
        if ours != version:
            notes.append(f"{_short(package)} {_short(version)} on the client, {ours} here")
    return "; " + "; ".join(notes) if notes else ""


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "..."


def exception_result(exc: BaseException, flags: int = 0) -> bytes:
    """Encode a task's exception: its type's name, message and traceback, its arguments
    when they can be sent as typed values (so the client can raise it as its own type),
    and, when the client accepts pickles, the exception itself."""
    tb = exc.__traceback__
    text = "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb else None))
    fields: list = [payload.RESULT_ERROR, _type_name(exc), str(exc), text]
    try:
        values.pack(exc.args)
        fields.append(list(exc.args))
    except Exception:
        return payload.error_result(*fields[1:])
    if flags & payload.FLAG_PICKLE:
        try:
            return values.pack(fields + [exc], True)
        except Exception:
            pass
    return values.pack(fields)


def resolve(ref: str) -> Callable[..., Any]:
    """Import ``module:qualname`` and return the object it names."""
    module_name, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return obj


#: What :meth:`Runner.run` returns for a task by digest whose function it has not loaded
#: (not a result: its host asks the slot to send the task again with the function).
FUNCTION_NEEDED = b"\xc1function-needed"


class Runner:
    """Executes task blobs; keeps imported callables cached by reference, and callables
    sent by value cached by digest (so a million calls load a function once)."""

    def __init__(self, output_cap: int = OUTPUT_CAP_BYTES,
                 stager: Stager | None = None) -> None:
        self.output_cap = output_cap
        self.stager = stager or Stager(None)
        #: Where the running shell command's PID (its process group) is written while it
        #: runs, for the slot to kill it (a task host's shared cell; None: nowhere).
        self.child_cell: memoryview | None = None
        self._capture_files: tuple[int, int] | None = None
        self._callables: dict[str, Callable[..., Any]] = {}
        self._by_value: collections.OrderedDict[bytes, Callable[..., Any]] = (
            collections.OrderedDict())

    def run(self, blob: bytes) -> tuple[bytes, bool]:
        """Run one task; return ``(result_blob, failed)``. Never raises for task errors."""
        flags = 0
        try:
            # (A worker runs what an authorized client sends: its pickles add no power.)
            task = _unpackb(blob, strict_map_key=False, ext_hook=_TASK_VALUES)
        except Exception as exc:  # (sent as a TaskError: no arguments)
            return payload.error_result(_type_name(exc), f"the task cannot be decoded: "
                                        f"{_short(exc)}"), True
        try:
            kind = task[0] if type(task) is list else None
            if kind == payload.TASK_PYTHON and 3 <= len(task) <= 5:
                if len(task) > 4:
                    flags = task[4]
                return self._run_python(task[1], self._reference(task[1]), task[2],
                                        task[3] if len(task) > 3 else None, flags)
            if kind == payload.TASK_FUNCTION and len(task) == 7:
                _, digest, fn_blob, env, args, kwargs, flags = task
                if fn_blob is None:  # by digest: loaded before, or the slot sends it
                    fn = self._by_value.get(digest)
                    if fn is None:
                        return FUNCTION_NEEDED, True
                    self._by_value.move_to_end(digest)
                else:
                    fn = self._function(digest, fn_blob, env)
                return self._run_python(getattr(fn, "__qualname__", "the function"), fn,
                                        args, kwargs, flags)
            if kind == payload.TASK_SHELL and 5 <= len(task) <= 6:
                return self._run_shell(task)
            if (kind == payload.TASK_OPTIONS and len(task) == 3 and type(task[1]) is dict
                    and type(task[2]) is bytes and task[2][1:2] != b"\x03"):
                if payload.stored_digest(task[2]) is not None:
                    return payload.error_result("ProtocolError", "a task by digest cannot be "
                                                "wrapped with options"), True
                if task[1].get("capture"):
                    return self._run_captured(task[2])
                return self.run(task[2])  # (the time limit is the slot's to enforce)
            return payload.error_result("ProtocolError", "a malformed task (kind "
                                        f"{_short(kind)}, {_short(len(task))} fields)"), True
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the task's own failure, including SystemExit
            return exception_result(exc, flags), True

    def _run_captured(self, blob: bytes) -> tuple[bytes, bool]:
        """Run a task with its stdout and stderr (``sys.stdout``/``sys.stderr`` and fds
        1 and 2, so its subprocesses' too) going to temporary files; return its result
        wrapped with what it wrote (each capped at the output cap)."""
        if self._capture_files is None:
            files = []
            for _ in range(2):
                f = tempfile.TemporaryFile(prefix="zfalkon-output-")
                files.append(os.dup(f.fileno()))
                f.close()
            self._capture_files = (files[0], files[1])
        out_fd, err_fd = self._capture_files
        for fd in (out_fd, err_fd):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        old_out, old_err = sys.stdout, sys.stderr
        for stream in (old_out, old_err):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        saved = (os.dup(1), os.dup(2))
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        # (line-buffered, as on a terminal: what the task prints and what it writes to the
        # fds stay in order)
        new_out = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                       buffering=1)
        new_err = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                       buffering=1)
        sys.stdout, sys.stderr = new_out, new_err
        try:
            result, failed = self.run(blob)
        finally:
            for stream in (new_out, new_err):
                try:
                    stream.flush()
                except Exception:
                    pass
            sys.stdout, sys.stderr = old_out, old_err
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        cap = self.output_cap
        captured, truncated = [], False
        for fd in (out_fd, err_fd):
            size = os.fstat(fd).st_size
            truncated = truncated or size > cap
            captured.append(os.pread(fd, min(size, cap), 0) if size else b"")
        return _packb((payload.RESULT_OUTPUT, result, captured[0], captured[1], truncated)
                      ), failed

    def _reference(self, ref: str) -> Callable[..., Any]:
        fn = self._callables.get(ref)
        if fn is None:
            try:
                fn = self._callables[ref] = resolve(ref)
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(
                    f"{ref} cannot be imported on this worker ({exc}): install its module "
                    "there, or send the function by value (Executor(functions='value'))",
                    name=exc.name) from None
        return fn

    def _function(self, digest: bytes, blob: bytes, env: list) -> Callable[..., Any]:
        cache = self._by_value
        fn = cache.get(digest)
        if fn is not None:
            cache.move_to_end(digest)
            return fn
        if type(digest) is not bytes or payload.function_digest(blob) != digest:
            raise ValueError("the function sent by value does not have the digest it "
                             "claims (a task made by hand?)")
        try:
            import cloudpickle  # noqa: F401  (the functions it pickled refer to it)

            fn = pickle.loads(blob)
        except Exception as exc:
            import platform

            theirs = f"Python {env[0]}, cloudpickle {env[1]}" if len(env) > 1 else "?"
            try:
                import cloudpickle as cp
                ours = f"Python {platform.python_version()}, cloudpickle {cp.__version__}"
            except ImportError:
                ours = f"Python {platform.python_version()}, no cloudpickle"
            missing = (f"; module {exc.name!r} is not installed on this worker"
                       if isinstance(exc, ModuleNotFoundError) else "")
            skew = _version_skew(env[2] if len(env) > 2 and isinstance(env[2], dict) else {})
            raise type(exc)(f"the function sent by value cannot be loaded on this worker: "
                            f"{exc}{missing} (client: {theirs}; worker: {ours}{skew})"
                            ) from None
        if not callable(fn):
            raise TypeError("the function sent by value is not callable")
        cache[digest] = fn
        if len(cache) > _FUNCTIONS_CACHED:
            cache.popitem(last=False)
        return fn

    def _run_python(self, name: str, fn: Callable[..., Any], args: list,
                    kwargs: dict | None, flags: int) -> tuple[bytes, bool]:
        value = fn(*args, **kwargs) if kwargs else fn(*args)
        try:
            return values.pack([payload.RESULT_VALUE, value], flags & payload.FLAG_PICKLE == 1
                               ), False
        except (TypeError, ValueError, OverflowError) as exc:
            return payload.error_result(
                "SerializationError",
                f"the result of {name} ({type(value).__name__}) cannot be sent: {exc}",
            ), True

    def _run_shell(self, task: list) -> tuple[bytes, bool]:
        _, command, env, cwd, timeout, *files = task
        argv = [_SH, "-c", command] if isinstance(command, str) else command
        if not files:
            return run_command(argv, env, cwd, timeout, self.output_cap, self.child_cell)
        inputs, outputs = files[0]
        workdir = self.stager.workdir()
        try:
            try:
                self.stager.stage_in(inputs, workdir)
            except StagingError as exc:
                return payload.error_result("StagingError", str(exc)), True
            blob, failed = run_command(argv, env, workdir, timeout, self.output_cap,
                                       self.child_cell)
            if failed or not outputs:
                return blob, failed  # a failed command's outputs are not collected
            try:
                collected = self.stager.stage_out(outputs, workdir)
            except StagingError as exc:
                return payload.error_result("StagingError", str(exc)), True
            if not collected:
                return blob, failed
            return _packb((*payload.unpack(blob), collected)), failed
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def run_command(
    argv: list[str],
    env: dict[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    cap: int,
    child_cell: memoryview | None = None,
) -> tuple[bytes, bool]:
    """Spawn ``argv`` in its own session and process group, capture output, return a
    result blob.

    The child gets ``/dev/null`` as stdin. When it exits (or runs past ``timeout``), its
    whole process group is killed, so background processes it left cannot linger.
    ``child_cell``: its PID is written there while it runs (0 after).
    """
    full_env = {**os.environ, **env} if env else os.environ
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    start = time.monotonic()
    old_cwd = None
    try:
        if cwd is not None:  # the slot is single-threaded: chdir around the spawn is safe
            old_cwd = os.getcwd()
            os.chdir(cwd)
        pid = os.posix_spawnp(argv[0], argv, full_env, file_actions=actions, setsid=True)
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        if old_cwd is not None:
            os.chdir(old_cwd)
        os.close(out_w)
        os.close(err_w)
    if child_cell is not None:
        child_cell[0] = pid
    try:
        status, out, err, truncated, timed_out = _supervise(pid, out_r, err_r, start, timeout, cap)
    finally:
        if child_cell is not None:
            child_cell[0] = 0
        os.close(out_r)
        os.close(err_r)
    seconds = time.monotonic() - start
    if timed_out:
        return _packb((payload.RESULT_TIMEOUT, timeout, bytes(out), bytes(err), seconds)), True
    code = os.waitstatus_to_exitcode(status)
    return _packb((payload.RESULT_SHELL, code, bytes(out), bytes(err), seconds, truncated)), code != 0


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3
        return None


def _supervise(pid, out_r, err_r, start, timeout, cap):
    """Read both pipes until the child exits (or times out); reap it; kill its group."""
    buffers = {out_r: bytearray(), err_r: bytearray()}
    truncated = timed_out = False
    status = None
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    pidfd = _pidfd(pid)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    deadline = None if timeout is None else start + timeout
    open_fds = len(buffers)
    try:
        while open_fds:
            if status is not None:
                wait_ms = 1000  # leader gone and its group killed: EOF follows promptly
            elif deadline is not None:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
            else:
                wait_ms = -1
            if pidfd is None and status is None:
                wait_ms = 50 if wait_ms < 0 else min(wait_ms, 50)
            events = poller.poll(wait_ms)
            if status is None and pidfd is None:
                done_pid, st = os.waitpid(pid, os.WNOHANG)
                if done_pid:
                    status = st
                    _kill_group(pid)
            if not events:
                if status is not None:
                    break  # something else holds the pipes open; stop reading
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    _kill_group(pid)
                    status = os.waitpid(pid, 0)[1]
                continue
            for fd, _ in events:
                if fd == pidfd:
                    poller.unregister(pidfd)
                    if status is None:
                        status = os.waitpid(pid, 0)[1]
                        _kill_group(pid)
                    continue
                chunk = os.read(fd, _READ_SIZE)
                if not chunk:
                    poller.unregister(fd)
                    open_fds -= 1
                    continue
                buf = buffers[fd]
                room = cap - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > room:
                    truncated = True
        if status is None:
            status = os.waitpid(pid, 0)[1]
            _kill_group(pid)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return status, buffers[out_r], buffers[err_r], truncated, timed_out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
