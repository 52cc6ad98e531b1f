"""The scaling policy: grow the pool with the queue, in steps and under hard caps; give up
on boots that never register; pause after repeated failures; shrink when idle.

:class:`Scaler` is driven by :meth:`Scaler.step`, once every few seconds, with the
broker's STATUS. Decisions, in order:

1. **Boot deadline**: an instance whose worker has *never* registered ``boot_deadline``
   seconds after launch is terminated and counts as a failure; so does one that vanished
   before ever registering (its VM powered itself off). A worker that registered once
   and is missing now (a broker restart, a short partition) is left alone: it comes back
   by itself, or its vm-agent powers it off.
2. **Scale out** when queued tasks exceed the free capacity (idle slots of registered
   workers, plus ``slots_per_instance`` for each instance still booting): launch
   ``ceil(shortfall / slots_per_instance)``, at most ``step`` at a time, never past
   ``max_instances``, never more than ``max_launches_per_minute`` in any 60 s (and
   never fewer than ``min_instances`` in all). Instances launched but not yet listed by
   the provider (EC2's listing is eventually consistent) count against the cap.
3. **Pause**: after ``max_failures`` consecutive failures (a launch the provider refused,
   or a boot past its deadline) scale-out stops and :attr:`Scaler.paused` says why; a
   newly registered worker resets the count. :meth:`Scaler.resume` clears it.
4. **Scale in**: with nothing queued, a worker that has run nothing for ``idle_seconds``
   is terminated (its provider drains it first), down to ``min_instances``.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field

from zfalkon.provision.base import Provisioner, ProvisionError

log = logging.getLogger("zfalkon.provision")


@dataclass
class Policy:
    """Knobs of the scaling policy (defaults suit short-task sweeps on small instances)."""

    min_instances: int = 0
    max_instances: int = 10
    slots_per_instance: int = 2
    step: int = 4
    max_launches_per_minute: int = 10
    boot_deadline: float = 600.0
    idle_seconds: float = 120.0
    max_failures: int = 3


@dataclass
class Scaler:
    """Applies a :class:`Policy` to a provisioner; see the module docstring."""

    provisioner: Provisioner
    policy: Policy
    paused: str | None = None
    failures: int = 0
    launched: int = 0
    terminated: int = 0
    _launch_times: collections.deque = field(default_factory=collections.deque)
    _busy_at: dict[str, float] = field(default_factory=dict)
    _registered: set[str] = field(default_factory=set)  # instance ids seen registered
    _unlisted: dict[str, float] = field(default_factory=dict)  # launched, not yet listed
    _booting: set[str] = field(default_factory=set)  # listed, never registered

    def resume(self) -> None:
        self.paused, self.failures = None, 0

    def step(self, status: dict, now: float | None = None) -> dict:
        """One decision from the broker's STATUS; returns what it did (for logs and tests)."""
        now = time.time() if now is None else now
        p = self.policy
        instances = self.provisioner.instances()
        workers = {w["name"]: w for w in status["worker_list"]}
        did: dict = {"launched": 0, "terminated": [], "expired": []}
        listed = {i.id for i in instances}
        for iid in self._booting - listed:  # gone before it ever registered
            self._fail(f"instance {iid} went away without registering")
        self._booting &= listed
        for iid in [i for i, t in self._unlisted.items()
                    if i in listed or now - t > p.boot_deadline]:
            del self._unlisted[iid]

        booting = []
        for inst in instances:
            w = workers.get(inst.worker)
            if w is not None:
                if inst.id not in self._registered:
                    self._registered.add(inst.id)
                    self._booting.discard(inst.id)
                    self.failures = 0  # a boot that worked
                if w["running"] or inst.worker not in self._busy_at:
                    self._busy_at[inst.worker] = now
            elif inst.id in self._registered:
                continue  # registered before: away for now (broker restart, partition)
            elif now - inst.launched > p.boot_deadline:
                log.error("instance %s never registered within %.0f s; terminating it",
                          inst.id, p.boot_deadline)
                self.provisioner.terminate([inst.id])
                self._booting.discard(inst.id)
                did["expired"].append(inst.id)
                self._fail(f"instance {inst.id} did not register within {p.boot_deadline:.0f} s")
            else:
                booting.append(inst)
                self._booting.add(inst.id)
        live = [i for i in instances if i.id not in did["expired"]]
        unlisted = len(self._unlisted)  # launched, not listed yet: booting too

        ours = [workers[i.worker] for i in live if i.worker in workers]
        free = sum(max(0, w["slots"] - w["running"]) for w in ours if not w["draining"])
        free += (len(booting) + unlisted) * p.slots_per_instance
        shortfall = status["queued"] - free
        while self._launch_times and now - self._launch_times[0] > 60:
            self._launch_times.popleft()
        need = max(math.ceil(shortfall / p.slots_per_instance) if shortfall > 0 else 0,
                   p.min_instances - len(live) - unlisted)
        if need > 0 and not self.paused:
            n = min(need, p.step,
                    p.max_instances - len(live) - unlisted,
                    p.max_launches_per_minute - len(self._launch_times))
            if n > 0:
                try:
                    new = self.provisioner.launch(n)
                except ProvisionError as exc:
                    log.error("launch failed: %s", exc)
                    self._fail(str(exc))
                else:
                    self._launch_times.extend([now] * len(new))
                    self._unlisted.update((i.id, now) for i in new)
                    self.launched += len(new)
                    did["launched"] = len(new)
                    log.info("launched %d (queued %d, free slots %d)", len(new),
                             status["queued"], free)
        elif status["queued"] == 0:
            idle = [i for i in live if i.worker in workers
                    and now - self._busy_at.get(i.worker, now) >= p.idle_seconds]
            surplus = len(live) - p.min_instances
            gone = [i.id for i in idle[:max(0, surplus)]]
            if gone:
                log.info("scaling in: %s idle for %.0f s", ", ".join(gone), p.idle_seconds)
                self.provisioner.terminate(gone)
                did["terminated"] = gone
                self.terminated += len(gone)
        did["paused"] = self.paused
        did["instances"] = len(live) - len(did["terminated"])
        return did

    def _fail(self, reason: str) -> None:
        self.failures += 1
        if self.failures >= self.policy.max_failures and not self.paused:
            self.paused = (f"scale-out paused after {self.failures} consecutive failures; "
                           f"last: {reason}")
            log.error("%s", self.paused)
