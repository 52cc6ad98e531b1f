"""Task and result blobs: the user-level data inside SUBMIT, TASKS, RESULTS and DELIVER.

The broker forwards blobs without decoding them. Each blob is a msgpack array:

=========================  ==============================================================
task, Python callable      ``[0, "module:qualname", args]``, or ``[..., kwargs]`` if any
task, shell command        ``[1, command (str: through /bin/sh; list: argv), env, cwd,
                           timeout]``, plus ``[inputs, outputs]`` when it stages files
                           (see :mod:`zfalkon.staging`)
result, value              ``[0, value]``
result, exception          ``[1, remote_type, message, traceback]``
result, shell              ``[2, returncode, stdout, stderr, seconds, truncated]``, plus
                           ``{name: bytes}`` of inline outputs when there are any
result, shell timeout      ``[3, timeout, stdout, stderr, seconds]``
result, process died       ``[4, message]``
result, workers lost       ``[5, worker, attempts, message]``
=========================  ==============================================================

Arguments and return values are msgpack types: None, bool, int, float, str, bytes, list,
dict (and msgpack's own Timestamp). Tuples arrive as lists. Nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Mapping, Sequence

import msgpack

from zfalkon.errors import SerializationError, TaskError, TaskTimeout, WorkerCrashed, WorkerLost

TASK_PYTHON = 0
TASK_SHELL = 1

RESULT_VALUE = 0
RESULT_ERROR = 1
RESULT_SHELL = 2
RESULT_TIMEOUT = 3
RESULT_CRASHED = 4
RESULT_LOST = 5

_packb = msgpack.packb


@dataclasses.dataclass(frozen=True)
class ShellResult:
    """What a shell task did.

    Attributes:
        returncode: exit status; negative ``-N`` if it was killed by signal N.
        stdout: standard output, decoded as UTF-8 (undecodable bytes replaced).
        stderr: standard error, likewise.
        duration: wall-clock seconds from start to exit, measured on the worker.
        truncated: True if stdout or stderr was cut at the worker's output cap.
        worker: the worker that ran it.
        files: the task's inline outputs, by name (``outputs=[...]``).
    """

    returncode: int
    stdout: str
    stderr: str
    duration: float
    truncated: bool = False
    worker: str | None = None
    files: Mapping[str, bytes] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True if the command exited with status 0."""
        return self.returncode == 0


def unpack(blob: bytes) -> Any:
    """Decode a blob of user data (maps may have any keys; extension types refused)."""
    return msgpack.unpackb(blob, strict_map_key=False, ext_hook=_refuse_ext)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed in zfalkon data")


def callable_ref(fn: Callable[..., Any] | str) -> str:
    """Return the ``module:qualname`` reference a worker uses to import ``fn``.

    Raises :class:`SerializationError` for callables a worker cannot import by name:
    lambdas, nested functions, bound methods, ``functools.partial``, and anything
    defined in ``__main__``.
    """
    if isinstance(fn, str):
        module, sep, qualname = fn.partition(":")
        if not (module and sep and qualname):
            raise SerializationError(f"callable reference {fn!r} is not 'module:qualname'")
        return fn
    fn_module = getattr(fn, "__module__", None)
    fn_qualname = getattr(fn, "__qualname__", None)
    if not isinstance(fn_module, str) or not isinstance(fn_qualname, str):
        raise SerializationError(
            f"{fn!r} has no module and qualified name; zfalkon sends callables by "
            "reference (module:qualname), so pass a module-level function"
        )
    module, qualname = fn_module, fn_qualname
    if "<" in qualname:
        raise SerializationError(
            f"{module}.{qualname} is a lambda or nested function; zfalkon sends callables "
            "by reference (module:qualname): define it at module level"
        )
    if module == "__main__":
        raise SerializationError(
            f"{qualname} is defined in __main__, which workers cannot import; move it "
            "to a module on the workers' import path"
        )
    if inspect.ismethod(fn) and not isinstance(fn.__self__, type):
        raise SerializationError(
            f"{module}.{qualname} is a bound method; workers import callables by name, "
            "so pass a module-level function, staticmethod or classmethod"
        )
    return f"{module}:{qualname}"


def python_task(ref: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
    """Encode a call of ``ref`` with msgpack-serializable arguments."""
    try:
        if kwargs:
            return _packb((TASK_PYTHON, ref, args, kwargs))
        return _packb((TASK_PYTHON, ref, args))
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"arguments of {ref} cannot be sent with msgpack: {exc}") from None


def shell_task(
    command: str | Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    inputs: Mapping[str, bytes | str] | None = None,
    outputs: Sequence[str] | Mapping[str, str] | None = None,
) -> bytes:
    """Encode a shell task: a string runs through ``/bin/sh -c``, a list is an argv.

    ``inputs`` and ``outputs``: files staged in and out (see :mod:`zfalkon.staging`); the
    task then runs in a fresh directory of its own, so ``cwd`` must be None.
    """
    if isinstance(command, str):
        cmd: str | list[str] = command
    else:
        cmd = list(command)
        if not cmd or not all(isinstance(a, str) for a in cmd):
            raise SerializationError("a shell argv must be a non-empty list of strings")
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise SerializationError("shell task env must map str to str")
    if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0):
        raise SerializationError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if cwd is not None:
        if not isinstance(cwd, (str, os.PathLike)):
            raise SerializationError(f"cwd must be a path, got {type(cwd).__name__}")
        cwd = os.fspath(cwd)
        if not isinstance(cwd, str):
            raise SerializationError("cwd must be a text path")
    if inputs or outputs:
        from zfalkon import staging

        if cwd is not None:
            raise SerializationError("a task that stages files runs in its own directory: "
                                     "drop cwd")
        files = [staging.encode_inputs(inputs or {}), staging.encode_outputs(outputs or [])]
        return _packb((TASK_SHELL, cmd, dict(env) if env else None, None, timeout, files))
    return _packb((TASK_SHELL, cmd, dict(env) if env else None, cwd, timeout))


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def result_value(blob: bytes, worker: str | None = None) -> Any:
    """Decode a result blob: return the value, or raise the task's error."""
    result = unpack(blob)
    kind = result[0]
    if kind == RESULT_VALUE:
        return result[1]
    if kind == RESULT_SHELL:
        _, code, out, err, seconds, truncated, *files = result
        return ShellResult(code, _text(out), _text(err), seconds, truncated, worker,
                           files[0] if files else {})
    if kind == RESULT_ERROR:
        raise TaskError(result[1], result[2], result[3], worker)
    if kind == RESULT_TIMEOUT:
        raise TaskTimeout(result[1], _text(result[2]), _text(result[3]), worker)
    if kind == RESULT_CRASHED:
        raise WorkerCrashed(result[1], worker)
    if kind == RESULT_LOST:
        raise WorkerLost(result[3], result[1], result[2])
    raise TaskError("ProtocolError", f"unknown result kind {kind!r}", "", worker)


def error_result(remote_type: str, message: str, traceback_text: str = "") -> bytes:
    """Encode a failed task's result."""
    return _packb((RESULT_ERROR, remote_type, message, traceback_text))


def lost_result(worker: str, attempts: int) -> bytes:
    """Encode the result of a task given up after ``attempts`` lost workers."""
    return _packb((RESULT_LOST, worker, attempts,
                   f"the task's worker was lost {attempts} times (last: {worker}); "
                   "not retried again"))


def crashed_result(message: str) -> bytes:
    """Encode the result of a task whose process died."""
    return _packb((RESULT_CRASHED, message))
