"""Task and result blobs: the user-level data inside SUBMIT, TASKS, RESULTS and DELIVER.

The broker forwards blobs without decoding them. Each blob is a msgpack array whose values
use :mod:`zfalkon.values`' extension types (tuples, sets, big ints, numpy arrays, ...):

=========================  ==============================================================
task, Python callable      ``[0, "module:qualname", args]``, or ``[..., kwargs]`` if any,
by reference               or ``[..., kwargs, flags]`` if it has flags
task, Python callable      ``[2, digest, function, env, args, kwargs, flags]``: a
by value                   cloudpickle of the function, its BLAKE2b-128 digest (a worker
                           loads each digest once), the client's ``[python, cloudpickle,
                           {package: version}]`` versions. ``function`` is nil in a task
                           *by digest*: its pickle travels once per hop instead, beside
                           the tasks (SUBMIT and TASKS ``functions``; see
                           :func:`stored_digest`)
task with options          ``[3, options, task]``: ``task`` is one of the Python task
                           blobs above (msgpack bytes), ``options`` a small map
                           (``timeout``: seconds, ``capture``: true); the slot reads the
                           first two fields only (:func:`task_options`)
task, shell command        ``[1, command (str: through /bin/sh; list: argv), env, cwd,
                           timeout]``, plus ``[inputs, outputs]`` when it stages files
                           (see :mod:`zfalkon.staging`)
result, value              ``[0, value]``
result, exception          ``[1, remote_type, message, traceback]``, plus ``args`` (the
                           exception's arguments, when they can be sent), plus a pickle
                           of the exception when the client allows pickles
result, shell              ``[2, returncode, stdout, stderr, seconds, truncated]``, plus
                           ``{name: bytes}`` of inline outputs when there are any
result, shell timeout      ``[3, timeout, stdout, stderr, seconds]``
result, process died       ``[4, message]``
result, workers lost       ``[5, worker, attempts, message]``
result, cancelled          ``[6]``: cancelled by the client before any slot had it, or
                           forced (its process killed)
result, with output        ``[7, result, stdout, stderr, truncated]``: ``result`` is the
                           task's own result blob (bytes), the rest its captured output
=========================  ==============================================================

``flags``: :data:`FLAG_PICKLE`: the client accepts pickled results (so the worker may
pickle what has no typed encoding). Which functions travel by value is
:func:`function_spec`'s policy.
"""

from __future__ import annotations

import builtins
from concurrent.futures import CancelledError
import dataclasses
import hashlib
import inspect
import os
import platform
import sys
import sysconfig
import threading
from typing import Any, Callable, Mapping, Sequence

import msgpack

from zfalkon import values
from zfalkon.errors import (
    ConfigError,
    RemoteTraceback,
    SerializationError,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
    WorkerLost,
)

TASK_PYTHON = 0
TASK_SHELL = 1
TASK_FUNCTION = 2  # a Python callable sent by value
TASK_OPTIONS = 3  # a Python task wrapped with its options (timeout, capture)

FLAG_PICKLE = 1  # the client accepts pickled results
#: How a task by digest begins: ``[2, <bin8 of 16 bytes>`` (the digest), then nil at
#: STORED_NIL_AT where a task by value has the function's pickle.
_BY_VALUE_HEAD = b"\x97\x02\xc4\x10"
_STORED_NIL_AT = len(_BY_VALUE_HEAD) + 16
#: The largest function pickle sent by digest (bigger ones travel in every task), and
#: how many bytes and functions a client may have stored at the broker under its key.
MAX_STORED_FUNCTION_BYTES = 16 * 1024 * 1024
MAX_CLIENT_FUNCTION_BYTES = 64 * 1024 * 1024
MAX_CLIENT_FUNCTIONS = 256
FUNCTION_POLICIES = ("auto", "reference", "value")

RESULT_VALUE = 0
RESULT_ERROR = 1
RESULT_SHELL = 2
RESULT_TIMEOUT = 3
RESULT_CRASHED = 4
RESULT_LOST = 5
RESULT_CANCELLED = 6
RESULT_OUTPUT = 7

_packb = msgpack.packb
_unpackb = msgpack.unpackb


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


def unpack(blob: bytes, allow_pickle: bool = False) -> Any:
    """Decode a blob (maps may have any keys; pickles only if ``allow_pickle``)."""
    return values.unpack(blob, allow_pickle)


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


@dataclasses.dataclass(frozen=True)
class Function:
    """A callable sent by value: its cloudpickle, that pickle's digest, and the client's
    ``[python version, cloudpickle version, {installed package: version}]`` for the
    packages it refers to (a worker that cannot load it names what differs)."""

    name: str
    blob: bytes
    digest: bytes
    env: list = dataclasses.field(default_factory=list)


_distributions: Mapping[str, list[str]] | None = None  # top-level module -> distributions
# How recently submitted callables travel (a callable is pickled when first submitted:
# redefine or reload it to send a new version, as with Dask).
_specs: dict[tuple[Any, str], "str | Function"] = {}
_SPECS_MAX = 256
_pickle_lock = threading.Lock()  # (cloudpickle's by-value registry is process-wide)


def function_spec(fn: Callable[..., Any] | str, policy: str = "auto") -> "str | Function":
    """How ``fn`` travels: a ``module:qualname`` reference, or a :class:`Function` by value.

    ``policy``: ``"reference"`` (importable names only, as before), ``"value"`` (always a
    cloudpickle), or ``"auto"``: by reference when ``fn`` lives in the standard library,
    an installed package or zfalkon; by value when it is a lambda, a closure, a method or
    partial, or comes from ``__main__``, a notebook or the user's own modules (a file
    beside the script), so that workers need not have it and edits take effect.
    """
    if isinstance(fn, str):
        return callable_ref(fn)
    try:
        return _specs[fn, policy]
    except (KeyError, TypeError):  # (TypeError: unhashable, e.g. a method of a dict)
        pass
    if policy not in FUNCTION_POLICIES:
        raise ConfigError(f"functions must be one of {', '.join(FUNCTION_POLICIES)}, "
                          f"not {policy!r}")
    spec: str | Function
    if policy == "reference" or (policy == "auto" and _installed_by_name(fn)):
        spec = callable_ref(fn)
    elif not callable(fn):
        raise SerializationError(f"{fn!r} is not callable")
    else:
        spec = _by_value(fn)
    try:
        if len(_specs) >= _SPECS_MAX:
            del _specs[next(iter(_specs))]
        _specs[fn, policy] = spec
    except (TypeError, KeyError, StopIteration, RuntimeError):
        pass  # (unhashable, or another thread changed the cache meanwhile)
    return spec


def _installed_by_name(fn: Any) -> bool:
    """True if ``fn`` is importable by its name from an installed module."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return False
    if module == "__main__" or (inspect.ismethod(fn) and not isinstance(fn.__self__, type)):
        return False
    top = sys.modules.get(module.partition(".")[0])
    if top is None or not _is_installed(top):
        return False
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj is fn or (inspect.ismethod(fn) and obj == fn)


def _install_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    try:
        import site
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except (AttributeError, ImportError):
        pass
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


_ROOTS: tuple[str, ...] | None = None


def _is_installed(module: Any) -> bool:
    global _ROOTS
    if module.__name__ == "zfalkon":
        return True
    path = getattr(module, "__file__", None)
    if path is None:
        return module.__name__ in sys.builtin_module_names or module.__name__ == "builtins"
    if _ROOTS is None:
        _ROOTS = _install_roots()
    return os.path.realpath(path).startswith(_ROOTS)


def _by_value(fn: Any) -> Function:
    import cloudpickle

    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    top = sys.modules.get(module.partition(".")[0]) if isinstance(module, str) else None
    with _pickle_lock:
        register = (top is not None and top.__name__ != "__main__" and not _is_installed(top)
                    and top.__name__ not in cloudpickle.list_registry_pickle_by_value())
        if register:
            cloudpickle.register_pickle_by_value(top)
        try:
            blob = cloudpickle.dumps(fn, protocol=5)
        except Exception as exc:
            raise SerializationError(f"{name} cannot be pickled by value: {exc}") from None
        finally:
            if register:
                cloudpickle.unregister_pickle_by_value(top)
    env = [platform.python_version(), cloudpickle.__version__, _package_versions(fn)]
    return Function(f"{module}:{name}", blob, function_digest(blob),
                    env)


def _package_versions(fn: Any) -> dict[str, str]:
    """The installed packages ``fn`` refers to (through its globals, closure, defaults and
    nested code), with their versions: what a worker must have alike to load it."""
    global _distributions
    tops: set[str] = set()
    seen: set[int] = set()

    def note(value: Any) -> None:
        module = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(module, str):
            tops.add(module.partition(".")[0])

    def walk(obj: Any, depth: int = 0) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        target = getattr(obj, "func", obj)  # (functools.partial)
        target = getattr(target, "__func__", target)  # (a bound method)
        code = getattr(target, "__code__", None)
        if code is None:
            note(target)
            return
        globs = getattr(target, "__globals__", {})
        codes = [code]
        while codes:
            c = codes.pop()
            for name in c.co_names:
                if name in globs:
                    value = globs[name]
                    note(value)
                    if inspect.isfunction(value):
                        walk(value, depth + 1)
            codes.extend(k for k in c.co_consts if inspect.iscode(k))
        for cell in getattr(target, "__closure__", None) or ():
            try:
                note(cell.cell_contents)
            except ValueError:  # (an empty cell)
                pass
        for value in getattr(target, "__defaults__", None) or ():
            note(value)

    walk(fn)
    tops -= set(sys.stdlib_module_names) | {"builtins", "__main__", "zfalkon", "cloudpickle"}
    if not tops:
        return {}
    import importlib.metadata as metadata

    if _distributions is None:
        _distributions = metadata.packages_distributions()
    versions: dict[str, str] = {}
    for top in sorted(tops):
        for dist in _distributions.get(top, [])[:1]:
            try:
                versions[top] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    return versions


def function_digest(blob: bytes) -> bytes:
    """The digest naming a function's pickle (BLAKE2b-128)."""
    return hashlib.blake2b(blob, digest_size=16).digest()


def stored_digest(blob: bytes) -> bytes | None:
    """The digest of the function a task *by digest* calls (its pickle not in the blob,
    but sent once per hop beside the tasks), or None for any other task."""
    if blob.startswith(_BY_VALUE_HEAD) and blob[_STORED_NIL_AT:_STORED_NIL_AT + 1] == b"\xc0":
        return blob[4:_STORED_NIL_AT]
    return None


def scoped_digest(key: int, digest: bytes) -> bytes:
    """A function's digest under the client key whose tasks call it: what a slot keeps
    it by (a client's task may call only the functions its own client stored)."""
    return key.to_bytes(8, "little") + digest


def with_function(blob: bytes, function: bytes) -> bytes:
    """A task by digest (:func:`stored_digest`) made a task by value: ``function`` (its
    pickle) put in place."""
    return b"".join((blob[:_STORED_NIL_AT], _packb(function), blob[_STORED_NIL_AT + 1:]))


def python_task(fn: "str | Function", args: Sequence[Any], kwargs: Mapping[str, Any],
                flags: int = 0, stored: bool = False) -> bytes:
    """Encode a call of ``fn`` (a reference or a :class:`Function`) with its arguments.

    Arguments are typed values (:mod:`zfalkon.values`); with :data:`FLAG_PICKLE` in
    ``flags`` what has no typed encoding is pickled, and so may the result be.
    ``stored``: a :class:`Function` goes by digest (:func:`stored_digest`).
    """
    try:
        if type(fn) is str:
            if flags:
                task: list = [TASK_PYTHON, fn, list(args), kwargs or {}, flags]
            elif kwargs:
                task = [TASK_PYTHON, fn, list(args), kwargs]
            else:
                return values.pack([TASK_PYTHON, fn, list(args)])
        else:
            assert isinstance(fn, Function)
            task = [TASK_FUNCTION, fn.digest, None if stored else fn.blob, fn.env, list(args),
                    kwargs or {}, flags]
        return values.pack(task, bool(flags & FLAG_PICKLE))
    except (TypeError, ValueError, OverflowError) as exc:
        name = fn if type(fn) is str else fn.name  # type: ignore[union-attr]
        raise SerializationError(f"arguments of {name} cannot be sent: {exc}") from None


def task_encoder(fn: "str | Function", flags: int = 0,
                 stored: bool = False) -> Callable[[Sequence[Any]], bytes]:
    """A function encoding calls of ``fn`` with positional arguments only, into exactly
    the blobs :func:`python_task` makes, with what does not change packed once (``map``
    encodes its elements with it: the function's pickle is not packed again per task)."""
    allow = bool(flags & FLAG_PICKLE)
    if type(fn) is str:
        if flags:
            head, tail = b"\x95\x00" + _packb(fn), _packb({}) + _packb(flags)
        else:
            head, tail = b"\x93\x00" + _packb(fn), b""
        name = fn
    else:
        assert isinstance(fn, Function)
        head = b"".join((b"\x97\x02", _packb(fn.digest), _packb(None if stored else fn.blob),
                         values.pack(fn.env)))
        tail, name = _packb({}) + _packb(flags), fn.name
    pack, join = values.pack, b"".join

    def encode(args: Sequence[Any]) -> bytes:
        try:
            return join((head, pack(list(args), allow), tail))
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"arguments of {name} cannot be sent: {exc}") from None

    return encode


def task_options(options: Mapping[str, Any]) -> dict:
    """Check task options (``timeout``: positive seconds or None; ``capture_output``:
    bool) and return their wire form (only what is set; empty if none). Raises
    :class:`ConfigError`."""
    wire: dict = {}
    for name in options:
        if name not in ("timeout", "capture_output"):
            raise ConfigError(f"unknown task option {name!r} (options are timeout and "
                              "capture_output)")
    timeout = options.get("timeout")
    if timeout is not None:
        if (type(timeout) not in (int, float) or not 0 < timeout < 1e9
                or timeout != timeout):
            raise ConfigError(f"timeout must be a positive number of seconds, "
                              f"not {timeout!r}")
        wire["timeout"] = float(timeout)
    capture = options.get("capture_output", False)
    if type(capture) is not bool:
        raise ConfigError(f"capture_output must be True or False, not {capture!r}")
    if capture:
        wire["capture"] = True
    return wire


def with_options(task: bytes, options: Mapping[str, Any]) -> bytes:
    """Wrap a Python task blob with its options (the wire form of :func:`task_options`);
    ``task`` itself if there are none."""
    if not options:
        return task
    return _packb((TASK_OPTIONS, dict(options), task))


def read_options(blob: bytes) -> dict | None:
    """The options of a task blob wrapped by :func:`with_options`, else None. Reads the
    first two fields only (the slot calls it for blobs whose second byte is
    TASK_OPTIONS: ``[3, ...]`` starts ``0x93 0x03``)."""
    if blob[:2] != b"\x93\x03":
        return None
    unpacker = msgpack.Unpacker(max_buffer_size=len(blob))
    unpacker.feed(blob)
    try:
        unpacker.read_array_header()
        unpacker.skip()
        options = unpacker.unpack()
    except Exception:
        return None
    return options if isinstance(options, dict) else None


def split_output(blob: bytes) -> tuple[bytes, str, str, bool] | None:
    """A result with captured output: ``(the task's result blob, stdout, stderr,
    truncated)``; None for any other result."""
    if blob[1:2] != b"\x07":
        return None
    try:
        result = _unpackb(blob)
        _, inner, out, err, truncated = result
        return bytes(inner), _text(out), _text(err), bool(truncated)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None


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


def result_value(blob: bytes, worker: str | None = None, allow_pickle: bool = False) -> Any:
    """Decode a result blob: return the value, or raise the task's error (as its own type
    when :func:`remote_error` can)."""
    try:
        result = _unpackb(blob, strict_map_key=False, ext_hook=values.decoder(allow_pickle))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise TaskError("SerializationError", f"the result cannot be decoded: {exc}", "",
                        worker) from None
    kind = result[0]
    if kind == RESULT_VALUE:
        return result[1]
    if kind == RESULT_SHELL:
        _, code, out, err, seconds, truncated, *files = result
        return ShellResult(code, _text(out), _text(err), seconds, truncated, worker,
                           files[0] if files else {})
    if kind == RESULT_ERROR:
        raise remote_error(result, worker, allow_pickle)
    if kind == RESULT_TIMEOUT:
        raise TaskTimeout(result[1], _text(result[2]), _text(result[3]), worker)
    if kind == RESULT_CRASHED:
        raise WorkerCrashed(result[1], worker)
    if kind == RESULT_LOST:
        raise WorkerLost(result[3], result[1], result[2])
    if kind == RESULT_CANCELLED:
        raise CancelledError()
    if kind == RESULT_OUTPUT:
        return result_value(bytes(result[1]), worker, allow_pickle)
    raise TaskError("ProtocolError", f"unknown result kind {kind!r}", "", worker)


def remote_error(result: list, worker: str | None, allow_pickle: bool = False
                 ) -> BaseException:
    """The exception a failed task's result stands for.

    As its own type when that type is a builtin or already imported here (a worker never
    makes the client import a module), built from the exception's arguments, with the
    remote traceback as its ``__cause__`` (as ``ProcessPoolExecutor`` does); a pickled
    exception when the client allows pickles; else a :class:`TaskError`.
    """
    remote_type, message, tb = result[1], result[2], result[3]
    exc: BaseException | None = None
    if allow_pickle and len(result) > 5 and isinstance(result[5], BaseException):
        exc = result[5]
    elif len(result) > 4 and isinstance(result[4], (list, tuple)):
        cls = _known_exception(remote_type)
        if cls is not None:
            try:
                exc = cls(*result[4])
            except Exception:
                exc = None
    if exc is None:
        return TaskError(remote_type, message, tb, worker)
    exc.__cause__ = RemoteTraceback(tb, worker)
    return exc


def _known_exception(name: Any) -> type | None:
    """The exception class ``name`` (``ValueError``, ``pkg.mod.Error``) if it is a builtin
    or in a module already imported; never imports anything."""
    if not isinstance(name, str) or len(name) > 256:
        return None
    obj: Any = None
    if "." not in name:
        obj = getattr(builtins, name, None)
    else:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = sys.modules.get(".".join(parts[:i]))
            if module is not None:
                obj = module
                for part in parts[i:]:
                    obj = getattr(obj, part, None)
                break
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def error_result(remote_type: str, message: str, traceback_text: str = "") -> bytes:
    """Encode a failed task's result."""
    return _packb((RESULT_ERROR, remote_type, message, traceback_text))


def lost_result(worker: str, attempts: int) -> bytes:
    """Encode the result of a task given up after ``attempts`` lost workers."""
    return _packb((RESULT_LOST, worker, attempts,
                   f"the task's worker was lost {attempts} times (last: {worker}); "
                   "not retried again"))


CANCELLED = _packb((RESULT_CANCELLED,))  #: the result of a task cancelled before it ran


def timeout_result(timeout: float, seconds: float, stdout: bytes = b"",
                   stderr: bytes = b"") -> bytes:
    """Encode the result of a task killed at its time limit."""
    return _packb((RESULT_TIMEOUT, timeout, stdout, stderr, seconds))


def crashed_result(message: str) -> bytes:
    """Encode the result of a task whose process died."""
    return _packb((RESULT_CRASHED, message))
