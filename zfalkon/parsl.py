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

``bash_app`` tasks are Parsl's own Python function that runs the command (with its
``stdout``/``stderr`` redirection and ``walltime``), so they run here as Python tasks, not
as zfalkon shell tasks: files a bash app writes land on the worker's file system, as with
HTEX.

Resource specification: ``walltime`` (seconds) in ``parsl_resource_specification``
becomes a zfalkon time limit (``Executor.options(timeout=...)``): past it the task's
process is killed on its worker (even a call stuck in C code), and Parsl sees the
``AppTimeout`` its own walltime raises; any other key raises
``InvalidResourceSpecification``, as on HTEX.

Parsl is imported by this module only: ``import zfalkon`` does not need it
(``pip install 'zfalkon[parsl]'``).
"""

from __future__ import annotations

import logging
import os
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
from zfalkon.errors import BrokerUnavailable, ConfigError, TaskTimeout

logger = logging.getLogger(__name__)

#: Resource-specification keys this executor understands.
RESOURCE_KEYS = frozenset({"walltime"})

_LOOPBACK = ("127.0.0.1", "localhost", "::1")

DEFAULT_LAUNCH_CMD = "zfalkon --log-level {log_level} worker --broker {broker} {slots}{keys}{options}"


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
                 remote_monitoring_radio: Optional[RadioConfig] = None) -> None:
        BlockProviderExecutor.__init__(self, provider=provider if provider else LocalProvider(),
                                       block_error_handler=block_error_handler)
        if slots is not None and slots < 1:
            raise ConfigError("slots must be at least 1")
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
        if resource_specification:
            invalid = set(resource_specification) - RESOURCE_KEYS
            if invalid:
                raise InvalidResourceSpecification(
                    invalid, "the zfalkon executor accepts only these resource keys: "
                    + ", ".join(sorted(RESOURCE_KEYS)))
            walltime = resource_specification.get("walltime")
            if walltime is not None:
                return self._submit_with_walltime(func, float(walltime), args, kwargs)
        fut = self.executor.submit(func, *args, **kwargs)
        return self._track(fut)

    def _submit_with_walltime(self, func: Callable, walltime: float, args: tuple,
                              kwargs: dict) -> Future:
        """A zfalkon time limit (the task's process is killed past it, even in C code);
        its TaskTimeout reaches Parsl as the AppTimeout Parsl's own walltime raises."""
        from parsl.app.errors import AppTimeout

        assert self.executor is not None
        inner = self.executor.options(timeout=walltime).submit(func, *args, **kwargs)
        outer: Future = Future()
        outer.task_id = inner.task_id  # type: ignore[attr-defined]

        def settle(done: Future) -> None:
            if done.cancelled():
                outer.cancel()
                outer.set_running_or_notify_cancel()
                return
            exc = done.exception()
            if isinstance(exc, TaskTimeout):
                name = getattr(func, "__name__", "app")
                outer.set_exception(AppTimeout(f"App {name} exceeded walltime: "
                                               f"{walltime:g} seconds"))
            elif exc is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(done.result())

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
