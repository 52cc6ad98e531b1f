"""LocalCluster: a broker and worker processes on 127.0.0.1, started and stopped by PID."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import Mapping

from zfalkon.client import query_status
from zfalkon.constants import STOP_GRACE_SECONDS
from zfalkon.errors import BrokerUnavailable, ConfigError

_READY_PREFIX = "zfalkon broker listening on "


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

    Use as a context manager; :attr:`address` is the broker's ``tcp://127.0.0.1:PORT``.
    """

    def __init__(self, workers: int = 2, slots_per_worker: int = 1, *, host: str = "127.0.0.1",
                 port: int = 0, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 30.0, log_level: str = "WARNING") -> None:
        if workers < 0 or slots_per_worker < 1:
            raise ConfigError("workers must be >= 0 and slots_per_worker >= 1")
        self.workers = workers
        self.slots_per_worker = slots_per_worker
        self.host = host
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.address = ""
        self.broker: subprocess.Popen | None = None
        self.worker_procs: list[subprocess.Popen] = []

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
        except BaseException:
            self.stop()
            raise

    def _start_broker(self) -> None:
        listen = f"tcp://{self.host}:{self.port}"
        self.broker = subprocess.Popen(self._cmd("broker", "--listen", listen),
                                       stdout=subprocess.PIPE, env=self.env, text=True)
        assert self.broker.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.broker.stdout], [], [], 0.2)
            if ready:
                line = self.broker.stdout.readline()
                if line.startswith(_READY_PREFIX):
                    self.address = line[len(_READY_PREFIX):].strip()
                    return
                if not line:
                    break
            if self.broker.poll() is not None:
                break
        raise BrokerUnavailable(f"the broker did not start (exit status {self.broker.poll()})")

    def add_worker(self, slots: int | None = None) -> subprocess.Popen:
        """Start one more worker agent; return its process."""
        proc = subprocess.Popen(
            self._cmd("worker", "--broker", self.address,
                      "--slots", str(slots or self.slots_per_worker)),
            env=self.env)
        self.worker_procs.append(proc)
        return proc

    def wait_for_slots(self, slots: int, timeout: float | None = None) -> dict:
        """Wait until the broker counts at least ``slots`` slots; return its status."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        status: dict = {}
        while time.monotonic() < deadline:
            status = query_status(self.address, timeout=5.0)
            if status["slots"] >= slots:
                return status
            dead = [p.pid for p in self.worker_procs if p.poll() is not None]
            if dead:
                raise BrokerUnavailable(f"worker processes {dead} exited during startup")
            time.sleep(0.05)
        raise BrokerUnavailable(
            f"only {status.get('slots', 0)} of {slots} slots registered within the timeout")

    def status(self) -> dict:
        """The broker's status."""
        return query_status(self.address)

    def stop(self) -> None:
        """SIGTERM the workers (they drain), then the broker; SIGKILL any that linger."""
        _terminate([p for p in self.worker_procs if p.poll() is None])
        self.worker_procs = []
        if self.broker is not None:
            _terminate([self.broker])
            if self.broker.stdout is not None:
                self.broker.stdout.close()
            self.broker = None


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
