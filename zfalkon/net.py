"""Addresses and sockets: the one place that parses ``tcp://HOST:PORT``."""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING

import zmq

from zfalkon.constants import DEFAULT_PORT, HEARTBEAT_MISSES, HEARTBEAT_SECONDS
from zfalkon.errors import ConfigError

if TYPE_CHECKING:
    from zfalkon.security import PeerKeys

_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^:\[\]/]+)(?::([0-9]+|\*))?")


def parse_address(address: str, *, default_port: int | None = DEFAULT_PORT) -> tuple[str, str]:
    """Split ``tcp://HOST[:PORT]`` into host and port (``*`` for any free port)."""
    match = _ADDRESS.fullmatch(address)
    if not match:
        raise ConfigError(f"address {address!r} must look like tcp://HOST:PORT")
    host, port = match.group(1), match.group(2)
    if port is None:
        if default_port is None:
            raise ConfigError(f"address {address!r} needs a port")
        port = str(default_port)
    if port in ("0", "*"):
        return host, "*"
    if not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r} has a port outside 1-65535")
    return host, port


def listen_endpoint(address: str) -> str:
    """The bind endpoint for a ``--listen`` value; port 0 or ``*`` picks a free port."""
    host, port = parse_address(address)
    return f"tcp://{host}:{port}"


def broker_endpoint(address: str) -> str:
    """The connect endpoint for a ``--broker`` value (default port if none given)."""
    host, port = parse_address(address)
    if port == "*":
        raise ConfigError(f"broker address {address!r} needs a real port")
    return f"tcp://{host}:{port}"


def is_loopback(endpoint: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    host, _ = parse_address(endpoint)
    host = host.strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def make_socket(ctx: zmq.Context, kind: int, endpoint: str,
                keys: "PeerKeys | None" = None) -> zmq.Socket:
    """A socket with ZMTP heartbeats, and IPv6 enabled when the endpoint needs it.

    ``keys``: connect as a CurveZMQ client with this bundle (see :mod:`zfalkon.security`).
    """
    sock = ctx.socket(kind)
    if "[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
    set_heartbeats(sock)
    if keys is not None:
        keys.connect_with(sock)
    return sock


def set_heartbeats(sock: zmq.Socket) -> None:
    """ZMTP heartbeats: keep NAT state alive, and drop a connection that stops answering."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_SECONDS * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_SECONDS * HEARTBEAT_MISSES * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(HEARTBEAT_SECONDS * HEARTBEAT_MISSES * 1000))


class Waker:
    """A self-pipe: :meth:`wake` (from a signal handler or another thread) makes :attr:`fd`
    readable, so a loop polling it returns; :meth:`drain` resets it. Waking a closed
    Waker does nothing (never a write to a closed, or reused, descriptor)."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.RLock()  # re-entrant: a signal handler may interrupt wake()

    def wake(self) -> None:
        with self._lock:
            if self._w < 0:
                return
            try:
                os.write(self._w, b"x")
            except BlockingIOError:
                pass  # already full of wake-ups

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._w >= 0:
                os.close(self.fd)
                os.close(self._w)
                self._w = -1


_EVENTS = int(zmq.EVENTS)  # plain ints: pyzmq's enums cost microseconds per operation
_POLLIN = int(zmq.POLLIN)


def readable(sock: zmq.Socket) -> bool:
    """True if a message is waiting on ``sock`` (``ZMQ_EVENTS`` has ``POLLIN``): how a
    loop drains an edge-triggered ZeroMQ socket."""
    events: int = sock.getsockopt(_EVENTS)  # type: ignore[assignment]  # (an int option)
    return events & _POLLIN != 0
