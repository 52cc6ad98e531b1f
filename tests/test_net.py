"""zfalkon.net: address parsing."""

from __future__ import annotations

import pytest

from zfalkon.constants import DEFAULT_PORT
from zfalkon.errors import ConfigError
from zfalkon.net import broker_endpoint, is_loopback, listen_endpoint, parse_address


@pytest.mark.parametrize("address, expected", [
    ("tcp://127.0.0.1:7000", ("127.0.0.1", "7000")),
    ("tcp://example.org", ("example.org", str(DEFAULT_PORT))),
    ("tcp://[::1]:5", ("[::1]", "5")),
    ("tcp://0.0.0.0:0", ("0.0.0.0", "*")),
    ("tcp://0.0.0.0:*", ("0.0.0.0", "*")),
    ("tcp://h:65535", ("h", "65535")),
])
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1:7000", "tcp://", "tcp://h:", "tcp://h:65536",
                                     "tcp://h:-1", "udp://h:1", "tcp://h:1/path",
                                     ""])
def test_parse_address_refuses(address):
    with pytest.raises(ConfigError):
        parse_address(address)


def test_parse_address_without_default_port():
    with pytest.raises(ConfigError, match="needs a port"):
        parse_address("tcp://h", default_port=None)


def test_endpoints():
    assert listen_endpoint("tcp://127.0.0.1:0") == "tcp://127.0.0.1:*"
    assert broker_endpoint("tcp://127.0.0.1") == f"tcp://127.0.0.1:{DEFAULT_PORT}"
    with pytest.raises(ConfigError, match="real port"):
        broker_endpoint("tcp://127.0.0.1:0")


@pytest.mark.parametrize("address, loop", [
    ("tcp://127.0.0.1:1", True), ("tcp://127.5.0.1:1", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:1", True), ("tcp://10.0.0.1:1", False), ("tcp://example.org:1", False),
])
def test_is_loopback(address, loop):
    assert is_loopback(address) is loop


def test_waker_wakes_a_poll_and_is_harmless_after_close():
    import select

    from zfalkon.net import Waker

    waker = Waker()
    poller = select.poll()
    poller.register(waker.fd, select.POLLIN)
    assert poller.poll(0) == []
    for _ in range(100_000):  # more wake-ups than the pipe holds: never blocks
        waker.wake()
    assert poller.poll(0)
    waker.drain()
    assert poller.poll(0) == []
    waker.close()
    waker.wake()  # after close: a no-op, not a write to a closed descriptor
    waker.close()
