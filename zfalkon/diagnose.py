"""Why a broker did not answer: nothing listening, a host that drops packets, or a broker
that refused this client's keys (its CURVE handshake failed, which a ZeroMQ socket
monitor sees as ``HANDSHAKE_FAILED_*``). The command line uses it to replace a bare
"no answer" with what to fix, named by its flags (``--broker``, ``--keys``)."""

from __future__ import annotations

import socket
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from zfalkon import protocol as P
from zfalkon.constants import BROKER_ENV, KEYS_ENV
from zfalkon.errors import ConfigError
from zfalkon.net import broker_endpoint, make_socket, parse_address
from zfalkon.security import peer_keys

_FAILED = {
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "no detail",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol error",
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "authentication refused",
}


def explain_no_answer(address: str, keys: str | None, timeout: float = 3.0) -> str:
    """One sentence: why the broker at ``address`` does not answer this client."""
    endpoint = broker_endpoint(address)
    host, port = parse_address(endpoint)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return (f"nothing listens at {endpoint} (connection refused): is the broker "
                f"running, and is that its --listen address? (--broker, ${BROKER_ENV})")
    except socket.gaierror as exc:
        return f"cannot resolve the broker's host {host!r}: {exc.strerror} (--broker)"
    except (socket.timeout, TimeoutError):
        return (f"no TCP connection to {endpoint} within {timeout:g} s: the host is down, "
                f"or a firewall drops the packets (the broker's port must be open)")
    except OSError as exc:
        return f"cannot connect to {endpoint}: {exc.strerror or exc}"
    bundle = peer_keys(keys)
    what = _handshake(endpoint, bundle, timeout)
    if what == "refused":
        if bundle is None:
            return (f"the broker at {endpoint} refused a client without keys: it uses "
                    f"CurveZMQ; pass --keys BUNDLE (or set ${KEYS_ENV}) with a client "
                    f"bundle from 'zfalkon keys new NAME --role client'")
        return (f"the broker at {endpoint} refused the key {bundle.name!r} of "
                f"{bundle.directory} (CURVE handshake failed): is it authorized as a client "
                f"(zfalkon keys list), not revoked, and is the bundle's broker.key this "
                f"broker's? (--keys)")
    if what == "silent" and bundle is not None:
        return (f"the broker at {endpoint} does not complete the CURVE handshake with the "
                f"key {bundle.name!r} of {bundle.directory}: is the bundle's broker.key "
                f"this broker's, and does the broker use --keys? (--keys)")
    if what == "silent":
        return (f"something listens at {endpoint} but completes no ZeroMQ handshake: not a "
                f"zfalkon broker? (--broker)")
    return (f"the broker at {endpoint} accepted the connection but did not answer HELLO "
            f"in {timeout:g} s: overloaded, or not a zfalkon broker")


def _handshake(endpoint: str, bundle: object, timeout: float) -> str:
    """Connect as a client would and watch the socket: ``refused`` (HANDSHAKE_FAILED_*),
    ``silent`` (no handshake at all), ``ok`` (handshake done)."""
    ctx = zmq.Context()
    try:
        sock = make_socket(ctx, zmq.DEALER, endpoint, bundle)  # type: ignore[arg-type]
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket()
        sock.connect(endpoint)
        sock.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": "diagnose"})), zmq.NOBLOCK)
        deadline = time.monotonic() + timeout
        result = "silent"
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(monitor)["event"]
            if event in _FAILED:
                result = "refused"
                break
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                result = "ok"
                break
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        return result
    except (zmq.ZMQError, ConfigError):
        return "silent"
    finally:
        ctx.destroy(0)
