"""Parsl on zfalkon: :class:`ZfalkonExecutor`, a Parsl executor whose blocks are zfalkon workers.

The one-line switch from Parsl's ``HighThroughputExecutor``::

    from parsl.config import Config
    from zfalkon.parsl import ZfalkonExecutor

    parsl.load(Config(executors=[ZfalkonExecutor()]))

It is a block-provider executor like HTEX: any Parsl provider (``LocalProvider``,
``SlurmProvider``, ...) launches blocks whose command is ``zfalkon worker --broker ADDR``
(one worker per node, ``--slots`` concurrent tasks each). At ``start()`` it runs its own
broker (a ``zfalkon broker`` subprocess on ``address``:``port``, a free port by default),
unless ``broker="tcp://HOST:PORT"`` names one that is already running; ``shutdown()``
stops only what it started (its broker, by PID; Parsl scales the blocks in first).

Tasks go through a :class:`zfalkon.Executor` with ``functions="value"`` and
``pickle=True``: the function Parsl hands over (the app wrapped by Parsl's error, staging,
timeout and monitoring wrappers) travels by value with cloudpickle, arguments and results
that have no typed encoding are pickled both ways, and exceptions keep their type, so
apps see what they see on HTEX. Workers need Parsl installed (as HTEX's do), because the
wrappers and ``RemoteExceptionWrapper`` are Parsl's.

``bash_app`` tasks run as zfalkon *shell* tasks (:meth:`zfalkon.Executor.shell`), so they
get zfalkon's process-group kill and output cap: the executor recognises the function
Parsl hands over for a bash app (Parsl's ``remote_side_bash_executor`` under its error
wrapper), evaluates the app's body here, at submission, to get the command string Parsl
would compute on the worker, and sends ``/bin/bash -c`` with a small wrapper script that
does what ``remote_side_bash_executor`` does on the worker: opens the ``stdout=`` and
``stderr=`` files (their directories made, ``w``/``a`` modes, the "executable follows"
header on stderr), runs the command under ``/bin/bash``, and checks ``outputs=``. The
outcome maps onto Parsl's: exit 0 returns 0, another exit status raises
``BashExitFailure`` with it (127 for a command not found, 126 for one not executable, -N
for a command killed by signal N, 128+N with ``outputs=``, where the wrapper waits for
it to check them), a file that cannot be opened ``BadStdStreamFile``, a
missing output ``MissingOutputs``, and the ``walltime=`` keyword (or ``walltime`` in the
resource specification) becomes the task's zfalkon time limit, past which the command's
whole process group is killed and Parsl sees ``AppTimeout``. A command's own process group
is killed when it exits, too: background processes it leaves do not outlive it. What a
command writes to stdout and stderr without redirection is captured (up to the worker's
output cap) and logged at DEBUG, where HTEX leaves it in the block's log.

A bash app falls back to the Python-task path (Parsl's function, run on the worker as
before) when its body raises or returns something other than a string (the worker then
raises Parsl's own error for it), when a ``stdout``/``stderr`` mode is not ``w``, ``w+``,
``a`` or ``a+``, when ``walltime`` is not a positive number, when a string has a NUL, when
Parsl wrapped the function further (resource monitoring on, or a staging provider that
stages in the task, such as HTTP or Globus), or with ``bash_apps="python"``. Since the
body runs on the submitting host, a body that needs the worker's state (its environment,
host name or files) should use ``bash_apps="python"``.

Resource specification: ``walltime`` (seconds) in ``parsl_resource_specification``
becomes a zfalkon time limit (``Executor.options(timeout=...)``): past it the task's
process is killed on its worker (even a call stuck in C code), and Parsl sees the
``AppTimeout`` its own walltime raises; any other key raises
``InvalidResourceSpecification``, as on HTEX.

Parsl is imported by this module only: ``import zfalkon`` does not need it
(``pip install 'zfalkon[parsl]'``).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

try:
    from parsl.app.bash import remote_side_bash_executor
    from parsl.app.errors import wrap_error
    from parsl.executors.errors import InvalidResourceSpecification
    from parsl.executors.status_handling import BlockProviderExecutor
    from parsl.jobs.states import JobStatus
    from parsl.monitoring.radios.base import RadioConfig
    from parsl.monitoring.radios.filesystem import FilesystemRadio
    from parsl.providers import LocalProvider
    from parsl.providers.base import ExecutionProvider
    from parsl.utils import RepresentationMixin
except ImportError as exc:  # pragma: no cover - exercised only without parsl
    raise ImportError(f"zfalkon.parsl needs Parsl ({exc}): pip install 'zfalkon[parsl]'") from exc

from zfalkon.client import Executor, query_status
from zfalkon.constants import CONNECT_TIMEOUT_SECONDS, STOP_GRACE_SECONDS
from zfalkon.errors import (
    BrokerUnavailable,
    ConfigError,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
    WorkerLost,
)
from zfalkon.payload import ShellResult

logger = logging.getLogger(__name__)

#: Resource-specification keys this executor understands.
RESOURCE_KEYS = frozenset({"walltime"})

_LOOPBACK = ("127.0.0.1", "localhost", "::1")

DEFAULT_LAUNCH_CMD = "zfalkon --log-level {log_level} worker --broker {broker} {slots}{keys}{options}"

#: How bash apps run: "shell" (zfalkon shell tasks) or "python" (Parsl's own function).
BASH_APP_MODES = ("shell", "python")

#: The code of the function ``parsl.app.errors.wrap_error`` returns: a bash app reaches
#: an executor as that wrapper around ``partial(remote_side_bash_executor, app)``.
_WRAP_ERROR_CODE = getattr(wrap_error(len), "__code__", None)

#: ``stdout``/``stderr`` modes the shell reproduces: truncate (``>``) or append (``>>``).
_STD_MODES = {"w": "w", "w+": "w", "a": "a", "a+": "a"}

#: The signal the wrapper kills itself with when outputs are missing: a command's own
#: death by a signal reaches the wrapper as an exit status, so this is unambiguous.
_MISSING_SIGNAL = signal.SIGUSR2

#: What ``remote_side_bash_executor`` does on the worker, in bash. Arguments: a marker,
#: the command, then for stdout and for stderr a mode ("" none, "w", "a"), the directory
#: to make and the path, then the paths of ``outputs=``.
BASH_WRAPPER = r"""m=$1 c=$2 om=$3 od=$4 op=$5 em=$6 ed=$7 ep=$8
shift 8
exec 9>&2
if [ -n "$om" ]; then
  [ -z "$od" ] || mkdir -p -- "$od" 2>/dev/null
  if [ "$om" = a ]; then { exec 3>>"$op"; } 2>/dev/null; else { exec 3>"$op"; } 2>/dev/null; fi \
    || { printf '%s stdout\n' "$m" >&9; exit 1; }
fi
if [ -n "$em" ]; then
  [ -z "$ed" ] || mkdir -p -- "$ed" 2>/dev/null
  if [ "$em" = a ]; then { exec 4>>"$ep"; } 2>/dev/null; else { exec 4>"$ep"; } 2>/dev/null; fi \
    || { printf '%s stderr\n' "$m" >&9; exit 1; }
fi
[ -z "$om" ] || exec 1>&3 3>&-
if [ -n "$em" ]; then
  exec 2>&4 4>&-
  printf '%s\n' '--> executable follows <--' "$c" '--> end executable <--' >&2
fi
[ $# -gt 0 ] || exec /bin/bash -c "$c" 9>&-
/bin/bash -c "$c" 9>&-
r=$?
[ "$r" -eq 0 ] || exit "$r"
i=0 gone=
for f; do
  [ -e "$f" ] || { printf '%s missing %d\n' "$m" "$i" >&9; gone=1; }
  i=$((i + 1))
done
[ -z "$gone" ] || kill -s USR2 $$
exit 0
"""


class _BashTask:
    """A bash app call turned into a zfalkon shell task (see :func:`_bash_task`)."""

    def __init__(self, name: str, argv: List[str], marker: str, stdout: str, stderr: str,
                 outputs: list, timeout: Optional[float], timeout_message: str) -> None:
        self.name = name
        self.argv = argv
        self.marker = marker
        self.stdout = stdout
        self.stderr = stderr
        self.outputs = outputs
        self.timeout = timeout
        self.timeout_message = timeout_message

    def outcome(self, result: ShellResult) -> int:
        """Parsl's outcome for the command's result: 0, or raise Parsl's error."""
        import parsl.app.errors as pe

        if result.stdout or result.stderr:
            logger.debug("bash app %s: stdout %r stderr %r%s", self.name, result.stdout,
                         result.stderr, " (truncated)" if result.truncated else "")
        code = result.returncode
        if code == 1:
            lines = result.stderr.splitlines()
            if f"{self.marker} stdout" in lines:
                raise pe.BadStdStreamFile(self.stdout)
            if f"{self.marker} stderr" in lines:
                raise pe.BadStdStreamFile(self.stderr)
        if code == -_MISSING_SIGNAL and self.outputs:
            prefix = f"{self.marker} missing "
            seen = {int(line[len(prefix):]) for line in result.stderr.splitlines()
                    if line.startswith(prefix) and line[len(prefix):].isdigit()}
            missing = [f for i, f in enumerate(self.outputs) if i in seen]
            if not missing:  # the marker lines were cut at the output cap: look here
                missing = [f for f in self.outputs if not os.path.exists(f.filepath)]
            raise pe.MissingOutputs(f"Missing outputs from app {self.name}",
                                    missing or list(self.outputs))
        if code != 0:
            raise pe.BashExitFailure(self.name, code)
        return 0


def _bash_app(func: Callable) -> Optional[Callable]:
    """The app function of a bash app as Parsl hands it to an executor (``wrap_error``'s
    wrapper around ``partial(remote_side_bash_executor, app)``, nothing else around it);
    None for any other function."""
    if _WRAP_ERROR_CODE is None or getattr(func, "__code__", None) is not _WRAP_ERROR_CODE:
        return None
    inner = getattr(func, "__wrapped__", None)
    if (not isinstance(inner, functools.partial) or inner.func is not remote_side_bash_executor
            or len(inner.args) != 1 or inner.keywords):
        return None
    return inner.args[0]


def _std_stream(name: str, spec: Any) -> Optional[tuple]:
    """``(mode, directory, path)`` for a ``stdout``/``stderr`` keyword, ``("", "", "")``
    for none; None if the shell cannot reproduce what Parsl's worker side would do."""
    from parsl.data_provider.files import File
    from parsl.utils import get_std_fname_mode

    if spec is None:
        return "", "", ""
    if isinstance(spec, File):
        path, mode = os.fspath(spec), "w"
    else:
        try:
            path, mode = get_std_fname_mode(name, spec)
        except Exception:
            return None
    if not isinstance(path, str) or not path or mode not in _STD_MODES:
        return None
    return _STD_MODES[mode], os.path.dirname(path), path


def _bash_task(app: Callable, args: tuple, kwargs: dict,
               spec_walltime: Optional[float]) -> Optional[_BashTask]:
    """Evaluate a bash app's body here, as ``remote_side_bash_executor`` would on the
    worker, and compose its shell task; None when it must run the Python way."""
    name = getattr(app, "__name__", "bash_app")
    try:
        command = app(*args, **kwargs)
    except Exception as exc:  # the worker raises Parsl's own error for it
        logger.debug("bash app %s: its body raised %r here: it runs as a Python task",
                     name, exc)
        return None
    if not isinstance(command, str):
        return None
    out = _std_stream("stdout", kwargs.get("stdout"))
    err = _std_stream("stderr", kwargs.get("stderr"))
    if out is None or err is None:
        return None
    try:
        outputs = list(kwargs.get("outputs") or [])
        paths = [f.filepath for f in outputs]
    except Exception:
        return None
    walltime = kwargs.get("walltime")
    if walltime is not None and (type(walltime) not in (int, float) or not walltime > 0):
        return None
    marker = f"zfalkon-parsl-{secrets.token_hex(8)}"
    argv = ["/bin/bash", "-c", BASH_WRAPPER, "zfalkon-parsl-bash", marker, command,
            *out, *err, *paths]
    if not all(isinstance(a, str) and "\0" not in a for a in argv):
        return None
    timeout: Optional[float] = None
    message = ""
    if walltime is not None:
        timeout = float(walltime)
        message = f"App {name} exceeded walltime: {walltime} seconds"
    if spec_walltime is not None and (timeout is None or spec_walltime < timeout):
        timeout = spec_walltime
        message = f"App {name} exceeded walltime: {spec_walltime:g} seconds"
    return _BashTask(name, argv, marker, out[2], err[2], outputs, timeout, message)


class ZfalkonExecutor(BlockProviderExecutor, RepresentationMixin):
    """A Parsl executor that runs apps on zfalkon workers launched as Parsl blocks.

    Args:
        label: the executor's label in Parsl.
        provider: where blocks run (default ``LocalProvider()``: one block on this host).
        broker: ``tcp://HOST:PORT`` of a running zfalkon broker to use; by default the
            executor starts its own at :meth:`start` and stops it at :meth:`shutdown`.
        address: the address its own broker listens on (default ``127.0.0.1``; give the
            host's name or address, or ``0.0.0.0``, when blocks run on other nodes).
        worker_address: the broker address written into the block command, when workers
            must reach it by another name (default: ``address``, or this host's name if
            ``address`` is a wildcard).
        port: its own broker's port (0: a free port).
        keys: a zfalkon *client* key bundle, for a ``broker`` started with ``--keys``.
        worker_keys: a zfalkon *worker* key bundle directory, passed to every worker as
            ``--keys`` (it must exist at that path on the worker nodes).
        encrypted: run its own broker with CurveZMQ: fresh keys under the run directory
            (``runinfo/NNN/LABEL/zfalkon-keys``, private; workers read their bundle there,
            so it needs a file system shared with the worker nodes, like HTEX's
            certificates). Default: on when ``address`` is not loopback.
        slots: concurrent tasks per worker (per node); default: the node's cores.
        launch_cmd: a template for the block command (``{broker}``, ``{slots}``, ``{keys}``,
            ``{options}``, ``{log_level}``, ``{block_id}``).
        worker_options: more ``zfalkon worker`` options (e.g. ``["--idle-exit", "600"]``).
        log_level: of the broker and worker processes.
        connect_timeout: seconds to wait for the broker's welcome.
        storage_access, working_dir, block_error_handler: as for HTEX.
        remote_monitoring_radio: how tasks report resource use when Parsl monitoring is
            on (default: ``FilesystemRadio``, through the run directory).
        bash_apps: ``"shell"`` (default): bash apps run as zfalkon shell tasks, their
            body evaluated at submission; ``"python"``: as Parsl's own function, a Python
            task on the worker (for bodies that need the worker's state).
    """

    def __init__(self,
                 label: str = "zfalkon",
                 provider: Optional[ExecutionProvider] = None,
                 broker: Optional[str] = None,
                 address: str = "127.0.0.1",
                 worker_address: Optional[str] = None,
                 port: int = 0,
                 keys: Optional[str] = None,
                 worker_keys: Optional[str] = None,
                 encrypted: Optional[bool] = None,
                 slots: Optional[int] = None,
                 launch_cmd: Optional[str] = None,
                 worker_options: Sequence[str] = (),
                 log_level: str = "WARNING",
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 storage_access: Optional[List[Any]] = None,
                 working_dir: Optional[str] = None,
                 block_error_handler: Union[bool, Callable[[BlockProviderExecutor, Dict[str, JobStatus]], None]] = True,
                 remote_monitoring_radio: Optional[RadioConfig] = None,
                 bash_apps: str = "shell") -> None:
        BlockProviderExecutor.__init__(self, provider=provider if provider else LocalProvider(),
                                       block_error_handler=block_error_handler)
        if slots is not None and slots < 1:
            raise ConfigError("slots must be at least 1")
        if bash_apps not in BASH_APP_MODES:
            raise ConfigError(f"bash_apps must be one of {', '.join(BASH_APP_MODES)}, "
                              f"not {bash_apps!r}")
        self.bash_apps = bash_apps
        self.label = label
        self.broker = broker
        self.address = address
        self.worker_address = worker_address
        self.port = port
        self.keys = keys
        self.worker_keys = worker_keys
        self.encrypted = encrypted
        self.slots = slots
        self.launch_cmd = launch_cmd
        self.worker_options = list(worker_options)
        self.log_level = log_level
        self.connect_timeout = connect_timeout
        self.storage_access = storage_access
        self.working_dir = working_dir
        self.remote_monitoring_radio = remote_monitoring_radio or FilesystemRadio()
        self.broker_address: Optional[str] = None  # where the client connects (set by start)
        self.executor: Optional[Executor] = None  # the zfalkon client (set by start)
        self._broker_proc: Optional[subprocess.Popen] = None
        self._client_keys = keys
        self._worker_keys = worker_keys
        self._lock = threading.Lock()
        self._task_counter = 0
        self._launch_template = ""

    # -- Parsl's executor interface ------------------------------------------------------

    @property
    def logdir(self) -> str:
        return os.path.join(self.run_dir, self.label)

    @property
    def workers_per_node(self) -> Union[int, float]:
        if self.slots:
            return self.slots
        cores = getattr(self.provider, "cores_per_node", None)
        return cores or os.cpu_count() or 1

    def start(self) -> None:
        """Start (or connect to) the broker, connect a zfalkon client, and compose the block
        command. Parsl's strategy launches the ``init_blocks``."""
        super().start()
        if self.broker is None:
            self._start_broker()
        else:
            self.broker_address = self.broker
        assert self.broker_address is not None
        try:
            self.executor = Executor(self.broker_address, name=f"parsl-{self.label}",
                                     connect_timeout=self.connect_timeout,
                                     keys=self._client_keys, functions="value", pickle=True)
        except BaseException:
            self._stop_broker()
            raise
        self._launch_template = self._compose_launch_cmd()
        logger.info("zfalkon executor %s: broker %s, block command %s", self.label,
                    self.broker_address, self._launch_template)

    def submit(self, func: Callable, resource_specification: Dict[str, Any],
               *args: Any, **kwargs: Any) -> Future:
        """Run ``func(*args, **kwargs)`` on a worker; return its future."""
        if self.bad_state_is_set:
            raise self.executor_exception
        if self.executor is None:
            raise RuntimeError(f"executor {self.label} is not started")
        walltime: Optional[float] = None
        if resource_specification:
            invalid = set(resource_specification) - RESOURCE_KEYS
            if invalid:
                raise InvalidResourceSpecification(
                    invalid, "the zfalkon executor accepts only these resource keys: "
                    + ", ".join(sorted(RESOURCE_KEYS)))
            if resource_specification.get("walltime") is not None:
                walltime = float(resource_specification["walltime"])
        if self.bash_apps == "shell":
            app = _bash_app(func)
            if app is not None:
                task = _bash_task(app, args, kwargs, walltime)
                if task is not None:
                    return self._submit_bash(task)
        if walltime is not None:
            return self._submit_with_walltime(func, walltime, args, kwargs)
        fut = self.executor.submit(func, *args, **kwargs)
        return self._track(fut)

    def _submit_with_walltime(self, func: Callable, walltime: float, args: tuple,
                              kwargs: dict) -> Future:
        """A zfalkon time limit (the task's process is killed past it, even in C code);
        its TaskTimeout reaches Parsl as the AppTimeout Parsl's own walltime raises."""
        assert self.executor is not None
        inner = self.executor.options(timeout=walltime).submit(func, *args, **kwargs)
        name = getattr(func, "__name__", "app")
        return self._settle(inner, f"App {name} exceeded walltime: {walltime:g} seconds",
                            lambda value: value)

    def _submit_bash(self, task: _BashTask) -> Future:
        """A bash app as a zfalkon shell task: its ShellResult becomes Parsl's outcome."""
        assert self.executor is not None
        inner = self.executor.shell(task.argv, timeout=task.timeout)
        return self._settle(inner, task.timeout_message, task.outcome, task.name)

    def _settle(self, inner: Future, timeout_message: str, outcome: Callable[[Any], Any],
                bash_name: Optional[str] = None) -> Future:
        """A future for Parsl that settles with ``outcome(result)`` of ``inner``, or its
        error (a TaskTimeout as Parsl's AppTimeout; for a bash app, an error of the shell
        task itself as the AppException Parsl's worker side raises)."""
        import parsl.app.errors as pe

        outer: Future = Future()
        outer.task_id = inner.task_id  # type: ignore[attr-defined]

        def settle(done: Future) -> None:
            if done.cancelled():
                outer.cancel()
                outer.set_running_or_notify_cancel()
                return
            exc = done.exception()
            if isinstance(exc, TaskTimeout):
                outer.set_exception(pe.AppTimeout(timeout_message))
            elif (bash_name is not None and isinstance(exc, TaskError)
                  and not isinstance(exc, (WorkerCrashed, WorkerLost))):
                outer.set_exception(pe.AppException(f"App {bash_name} caught exception", exc))
            elif exc is not None:
                outer.set_exception(exc)
            else:
                try:
                    outer.set_result(outcome(done.result()))
                except BaseException as error:
                    outer.set_exception(error)

        inner.add_done_callback(settle)
        return self._track(outer)

    def _track(self, fut: Future) -> Future:
        with self._lock:
            self._task_counter += 1
            fut.parsl_executor_task_id = self._task_counter  # type: ignore[attr-defined]
            self._tasks[fut.task_id] = fut  # type: ignore[attr-defined]
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future) -> None:
        self._tasks.pop(getattr(fut, "task_id", None), None)

    def outstanding(self) -> int:
        """Tasks submitted and not yet done (queued on the broker or running)."""
        return len(self._tasks)

    def _get_launch_command(self, block_id: str) -> str:
        return self._launch_template.replace("{block_id}", block_id)

    def shutdown(self) -> None:
        """Close the zfalkon client (cancelling what is still queued) and stop the broker
        this executor started, by PID. Parsl cancels the blocks before this."""
        ex, self.executor = self.executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True, timeout=5.0)
        if self._broker_proc is not None and self._status and all(
                s.terminal for s in self._status.values()):
            # The blocks were cancelled (Parsl scales in first): their workers drain and
            # say goodbye; stopping the broker before that leaves them waiting for it.
            self._wait_for_workers_to_leave(STOP_GRACE_SECONDS)
        self._stop_broker()
        super().shutdown()

    # -- the broker ----------------------------------------------------------------------

    def _wait_for_workers_to_leave(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = query_status(self.broker_address, timeout=2.0, keys=self._client_keys)
            except Exception:
                return
            if not status.get("workers"):
                return
            time.sleep(0.05)

    def _start_broker(self) -> None:
        loopback = self.address in _LOOPBACK
        encrypted = (not loopback) if self.encrypted is None else self.encrypted
        args = ["--listen", f"tcp://{self.address}:{self.port}"]
        if encrypted:
            args += ["--keys", self._make_keys()]
        elif not loopback:
            args.append("--insecure")
        cmd = [sys.executable, "-m", "zfalkon", "--log-level", self.log_level, "broker", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self._broker_proc = proc
        assert proc.stdout is not None
        prefix = "zfalkon broker listening on "
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                if line.startswith(prefix):
                    self.broker_address = line[len(prefix):].strip()
                    logger.info("zfalkon broker pid %d listening on %s", proc.pid,
                                self.broker_address)
                    return
                if not line:
                    break
            if proc.poll() is not None:
                break
        self._stop_broker()
        raise BrokerUnavailable(f"the zfalkon broker did not start: {shlex.join(cmd)}")

    def _make_keys(self) -> str:
        """A fresh broker key directory under the run directory, with a client bundle for
        this executor and a worker bundle for the blocks (unless ``worker_keys`` is given)."""
        from zfalkon import security

        base = os.path.join(self.logdir, "zfalkon-keys")
        os.makedirs(self.logdir, exist_ok=True)
        keydir = os.path.join(base, "broker")
        os.makedirs(base, mode=0o700, exist_ok=True)
        os.chmod(base, 0o700)
        security.init_keys(keydir)
        self._client_keys = security.new_key(keydir, "parsl-client", "client")
        if self.worker_keys is None:
            self._worker_keys = security.new_key(keydir, "parsl-workers", "worker")
        return keydir

    def _stop_broker(self) -> None:
        proc, self._broker_proc = self._broker_proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_SECONDS + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _compose_launch_cmd(self) -> str:
        assert self.broker_address is not None
        broker = self.broker_address
        if self.worker_address:
            broker = f"tcp://{self.worker_address}:{broker.rpartition(':')[2]}"
        elif self.broker is None and self.address in ("0.0.0.0", "*", "::"):
            broker = f"tcp://{socket.getfqdn()}:{broker.rpartition(':')[2]}"
        keys = f" --keys {shlex.quote(self._worker_keys)}" if self._worker_keys else ""
        slots = f"--slots {self.slots}" if self.slots else ""
        options = "".join(" " + shlex.quote(o) for o in self.worker_options)
        template = self.launch_cmd or DEFAULT_LAUNCH_CMD
        return template.format(broker=shlex.quote(broker), slots=slots, keys=keys,
                               options=options, log_level=self.log_level,
                               block_id="{block_id}")


__all__ = ["ZfalkonExecutor", "RESOURCE_KEYS"]
