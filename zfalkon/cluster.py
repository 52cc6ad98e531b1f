"""LocalCluster: a broker and worker processes on 127.0.0.1, started and stopped by PID."""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Mapping, Sequence

from zfalkon.client import query_status
from zfalkon.constants import STOP_GRACE_SECONDS
from zfalkon.errors import BrokerUnavailable, ConfigError

log = logging.getLogger("zfalkon.cluster")


class LocalCluster:
    """A broker and ``workers`` worker agents on this machine, as real processes.

    Args:
        workers: worker agents to start (0 gives a broker alone).
        slots_per_worker: slots (concurrent tasks) per worker.
        host: loopback address to listen on.
        port: 0 picks a free port.
        env: extra environment for the worker processes (e.g. ``PYTHONPATH``).
        startup_timeout: seconds to wait for every slot to register.
        log_level: log level of the child processes (they log to this stderr).
        rtt_ms: put the workers behind an emulated link with this round-trip time (a
            :mod:`zfalkon.linkproxy` process adding half of it each way); clients still
            connect to the broker directly.
        broker_args: extra ``zfalkon broker`` options (e.g. ``["--journal", DIR]``).
        worker_args: extra ``zfalkon worker`` options (e.g. ``["--cache-bytes", "0"]``).
        secure: run with CurveZMQ: fresh keys in a private temporary directory, one worker
            key for every worker and :attr:`client_keys`, a client bundle, for Executors.
        keep_workers: replace a worker agent that dies (a task may kill its agent: the
            broker quarantines that task, the cluster keeps its capacity), at most one a
            second (``zfalkon run --workers N`` does).

    Use as a context manager; :attr:`address` is the broker's ``tcp://127.0.0.1:PORT``.
    """

    def __init__(self, workers: int = 2, slots_per_worker: int = 1, *, host: str = "127.0.0.1",
                 port: int = 0, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 30.0, log_level: str = "WARNING",
                 rtt_ms: float = 0.0, broker_args: Sequence[str] = (),
                 worker_args: Sequence[str] = (), secure: bool = False,
                 keep_workers: bool = False) -> None:
        if workers < 0 or slots_per_worker < 1 or rtt_ms < 0:
            raise ConfigError("workers must be >= 0, slots_per_worker >= 1, rtt_ms >= 0")
        self.workers = workers
        self.slots_per_worker = slots_per_worker
        self.host = host
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.rtt_ms = rtt_ms
        self.broker_args = list(broker_args)
        self.worker_args = list(worker_args)
        self.secure = secure
        self.key_dir: str | None = None
        self.client_keys: str | None = None  # with secure: pass as Executor(keys=...)
        self._worker_keys: list[str] = []
        self.address = ""
        self.worker_address = ""  # where workers connect: the broker, or the link proxy
        self.broker: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self._announcers: list[subprocess.Popen] = []
        self.worker_procs: list[subprocess.Popen] = []
        self.keep_workers = keep_workers
        self.replaced = 0  #: worker agents started again after they died
        self._keeper: threading.Thread | None = None
        self._stopping = threading.Event()
        self._procs_lock = threading.Lock()  # worker_procs, between stop() and the keeper

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "zfalkon", "--log-level", self.log_level, *args]

    def start(self) -> None:
        """Start the broker, then the workers; return when every slot has registered."""
        try:
            self._start_broker()
            for _ in range(self.workers):
                self.add_worker()
            self.wait_for_slots(self.workers * self.slots_per_worker)
            if self.keep_workers:
                self._stopping.clear()
                self._keeper = threading.Thread(target=self._keep, name="zfalkon-keeper",
                                                daemon=True)
                self._keeper.start()
        except BaseException:
            self.stop()
            raise

    def _start_broker(self) -> None:
        if self.secure:
            self._make_keys()
        self.broker, self.address = self._launch_broker(self.port)
        self.worker_address = self.address
        if self.rtt_ms > 0:
            self.proxy, self.worker_address = self._start_announcing(
                [sys.executable, "-m", "zfalkon.linkproxy", "--target", self.address,
                 "--delay-ms", str(self.rtt_ms / 2)],
                "zfalkon linkproxy listening on ", "link proxy")

    def _make_keys(self) -> None:
        from zfalkon import security

        self.key_dir = tempfile.mkdtemp(prefix="zfalkon-keys-")
        keys = os.path.join(self.key_dir, "broker")
        security.init_keys(keys)
        self.client_keys = security.new_key(keys, "cluster-client", "client")
        self._worker_keys = ["--keys", security.new_key(keys, "cluster-worker", "worker")]
        self.broker_args += ["--keys", keys]

    def _launch_broker(self, port: int) -> tuple[subprocess.Popen, str]:
        return self._start_announcing(
            self._cmd("broker", "--listen", f"tcp://{self.host}:{port}", *self.broker_args),
            "zfalkon broker listening on ", "broker")

    def _start_announcing(self, cmd: list[str], prefix: str,
                          what: str) -> tuple[subprocess.Popen, str]:
        """Start a process that prints ``PREFIX ADDRESS`` once ready; return both."""
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=self.env, text=True)
        self._announcers.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                if line.startswith(prefix):
                    return proc, line[len(prefix):].strip()
                if not line:
                    break
            if proc.poll() is not None:
                break
        raise BrokerUnavailable(f"the {what} did not start (exit status {proc.poll()})")

    def add_worker(self, slots: int | None = None, *extra: str) -> subprocess.Popen:
        """Start one more worker agent (``extra``: more worker options); return it."""
        proc = subprocess.Popen(
            self._cmd("worker", "--broker", self.worker_address,
                      "--slots", str(slots or self.slots_per_worker), *self._worker_keys,
                      *self.worker_args, *extra),
            env=self.env, start_new_session=True)  # (a killpg of its group spares us)
        with self._procs_lock:
            self.worker_procs.append(proc)
        return proc

    def _keep(self) -> None:
        """The keeper thread (``keep_workers``): a worker agent found dead is replaced."""
        while not self._stopping.wait(1.0):
            with self._procs_lock:
                dead = [p for p in self.worker_procs if p.poll() is not None]
                if self._stopping.is_set() or not dead:
                    continue
                self.worker_procs.remove(dead[0])
            log.warning("a worker agent of the local cluster died (exit status %s): "
                        "starting another", dead[0].returncode)
            self.add_worker()
            self.replaced += 1

    def wait_for_slots(self, slots: int, timeout: float | None = None) -> dict:
        """Wait until the broker counts at least ``slots`` slots; return its status."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        status: dict = {}
        while time.monotonic() < deadline:
            status = query_status(self.address, timeout=5.0, keys=self.client_keys)
            if status["slots"] >= slots:
                return status
            dead = [p.pid for p in self.worker_procs if p.poll() is not None]
            if dead:
                raise BrokerUnavailable(f"worker processes {dead} exited during startup")
            time.sleep(0.05)
        raise BrokerUnavailable(
            f"only {status.get('slots', 0)} of {slots} slots registered within the timeout")

    def restart_broker(self, kill: bool = True) -> None:
        """Stop the broker (SIGKILL by PID, or SIGTERM) and start a new one on the same port.

        Workers are not touched: they notice and register again by themselves.
        """
        old = self.broker
        assert old is not None, "the cluster is not running"
        if kill:
            old.kill()
        _terminate([old])
        if old.stdout is not None:
            old.stdout.close()
        self._announcers.remove(old)
        port = int(self.address.rpartition(":")[2])
        self.broker, address = self._launch_broker(port)
        self._announcers.insert(0, self.broker)
        assert address == self.address, (address, self.address)

    def status(self) -> dict:
        """The broker's status."""
        return query_status(self.address, keys=self.client_keys)

    def stop(self) -> None:
        """SIGTERM the workers (they drain), then the broker; SIGKILL any that linger."""
        self._stopping.set()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        with self._procs_lock:
            procs, self.worker_procs = self.worker_procs, []
        _terminate([p for p in procs if p.poll() is None])
        _terminate(self._announcers[::-1])  # the proxy (if any), then the broker
        for proc in self._announcers:
            if proc.stdout is not None:
                proc.stdout.close()
        self._announcers = []
        self.broker = self.proxy = None
        if self.key_dir is not None:
            shutil.rmtree(self.key_dir, ignore_errors=True)
            self.key_dir = None


def _terminate(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS + 5
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
