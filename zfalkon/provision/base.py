"""The provisioner interface: what the scaling policy needs from a source of machines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from zfalkon.errors import ZfalkonError


class ProvisionError(ZfalkonError):
    """A launch or termination failed (the provider's message is in the text)."""


@dataclass
class Instance:
    """One machine of a pool. ``worker`` is the name its worker registers under."""

    id: str
    state: str  # "pending", "running" (anything else is on its way out)
    worker: str
    launched: float  # time.time() of the launch


class Provisioner(Protocol):
    """Launches and terminates the machines of one pool."""

    pool: str

    def launch(self, n: int) -> list[Instance]:
        """Start ``n`` machines (raise ProvisionError if none could be started)."""

    def terminate(self, ids: list[str]) -> None:
        """Stop these machines; their workers drain first where the provider allows."""

    def instances(self) -> list[Instance]:
        """The pool's machines that are pending or running."""
