"""Local provisioner: each "instance" is a ``zfalkon worker`` process on this host."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from typing import Sequence

from zfalkon.provision.base import Instance


class LocalProvisioner:
    """Worker processes on this machine, named ``POOL-N``; terminate means SIGTERM (drain)."""

    def __init__(self, broker: str, pool: str = "local", *, slots: int = 1,
                 worker_args: Sequence[str] = (), env: dict | None = None) -> None:
        self.broker = broker
        self.pool = pool
        self.slots = slots
        self.worker_args = list(worker_args)
        self.env = env
        self._procs: dict[str, tuple[subprocess.Popen, Instance]] = {}
        self._numbers = itertools.count(1)
        self._reaping: list[subprocess.Popen] = []  # terminated, still draining

    def launch(self, n: int) -> list[Instance]:
        out = []
        for _ in range(n):
            name = f"{self.pool}-{next(self._numbers)}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "zfalkon", "--log-level", "WARNING", "worker",
                 "--broker", self.broker, "--name", name, "--slots", str(self.slots),
                 *self.worker_args], env=self.env,
                start_new_session=True)  # (a killpg of a worker's group spares us)
            inst = Instance(name, "running", name, time.time())
            self._procs[name] = (proc, inst)
            out.append(inst)
        return out

    def terminate(self, ids: list[str]) -> None:
        for i in ids:
            entry = self._procs.pop(i, None)
            if entry and entry[0].poll() is None:
                entry[0].terminate()  # SIGTERM by PID: the worker drains, then exits
                self._reaping.append(entry[0])
        self._reap()

    def instances(self) -> list[Instance]:
        for name, (proc, _) in list(self._procs.items()):
            if proc.poll() is not None:  # exited by itself (idle, refused): gone
                del self._procs[name]
        self._reap()
        return [inst for _, inst in self._procs.values()]

    def _reap(self) -> None:
        self._reaping = [p for p in self._reaping if p.poll() is None]

    def close(self, timeout: float = 30.0) -> None:
        """Terminate every worker and wait for them (SIGKILL after ``timeout``)."""
        procs = [p for p, _ in self._procs.values()] + self._reaping
        self.terminate(list(self._procs))
        for p in procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._reaping = []
