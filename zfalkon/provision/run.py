"""The provisioning loop: ask the broker for STATUS, let the :class:`Scaler` decide, repeat."""

from __future__ import annotations

import logging
import threading

from zfalkon.client import query_status
from zfalkon.errors import BrokerUnavailable
from zfalkon.provision.policy import Scaler

log = logging.getLogger("zfalkon.provision")


def run_scaler(scaler: Scaler, broker: str, *, keys: str | None = None,
               interval: float = 2.0, stop: threading.Event | None = None) -> None:
    """Step ``scaler`` every ``interval`` seconds until ``stop`` is set."""
    stop = stop or threading.Event()
    reported = None
    while not stop.is_set():
        try:
            did = scaler.step(query_status(broker, timeout=5.0, keys=keys))
        except BrokerUnavailable as exc:
            log.warning("no status from the broker (%s); not scaling", exc)
        except Exception:  # a provider error (throttling, credentials): try again later
            log.exception("scaling step failed; trying again in %.0f s", interval)
        else:
            if did["paused"] and did["paused"] != reported:
                log.error("%s (restart the provisioner to resume)", did["paused"])
            reported = did["paused"]
        stop.wait(interval)
