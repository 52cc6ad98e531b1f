"""LinkProxy: the user-space WAN-link emulator, on real sockets on 127.0.0.1.

Servers here are small threaded TCP servers; every socket has a timeout, every loop a
bound, and every proxy, server and process is stopped in a ``finally`` or a ``with``.
Timing checks assert lower bounds (the emulated delay) and compare against an undelayed
proxy rather than asserting tight upper bounds: the machines are shared and noisy.
"""

from __future__ import annotations

import hashlib
import math
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import pytest

from conftest import child_env, stop_process, wait_until, worker_process
from zfalkon import ConfigError, Executor, LocalCluster
from zfalkon.linkproxy import READY_PREFIX, LinkProxy, TcpServer, echo, proxy_overhead

IO_TIMEOUT = 15.0


def Server(handler: Callable[[socket.socket], object]) -> TcpServer:
    """The module's threaded test server, with a timeout on every connection."""
    return TcpServer(handler, conn_timeout=IO_TIMEOUT)


def sink(conn: socket.socket) -> bytes:
    """Read everything until EOF, close, and return what came."""
    chunks = []
    while True:
        data = conn.recv(262144)
        if not data:
            break
        chunks.append(data)
    conn.close()
    return b"".join(chunks)


def connect(address: str) -> socket.socket:
    """A client connection with a timeout on every call."""
    port = int(address.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(262144)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def round_trips(address: str, count: int) -> list[float]:
    """Seconds per round trip of a 32-byte message through ``address`` (an echo path)."""
    times = []
    with connect(address) as c:
        for i in range(count):
            msg = f"{i:032d}".encode()
            start = time.monotonic()
            c.sendall(msg)
            assert recv_exactly(c, len(msg)) == msg
            times.append(time.monotonic() - start)
    return times


def ready_line(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    """The first stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s (exit status {proc.poll()})"
    return proc.stdout.readline()


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "zfalkon-linkproxy"]


@pytest.fixture
def echo_server() -> Iterator[Server]:
    with Server(echo) as server:
        yield server


# -- bytes ---------------------------------------------------------------------------------


def test_bytes_intact_both_ways_concurrently(echo_server: Server) -> None:
    """Several MB each way, on three connections at once, through delay and jitter."""
    size = 3 * 1024 * 1024
    payloads = [os.urandom(size) for _ in range(3)]
    received: list[bytes | None] = [None] * 3
    errors: list[BaseException] = []

    def one(i: int, address: str) -> None:
        try:
            with connect(address) as c:
                sender = threading.Thread(target=lambda: (c.sendall(payloads[i]),
                                                          c.shutdown(socket.SHUT_WR)))
                sender.start()
                received[i] = recv_all(c)  # echoed concurrently with the sending
                sender.join(IO_TIMEOUT)
        except BaseException as exc:
            errors.append(exc)

    with LinkProxy(echo_server.address, delay_ms=3, jitter_ms=2, seed=1) as proxy:
        threads = [threading.Thread(target=one, args=(i, proxy.address)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        for i in range(3):
            assert received[i] is not None and len(received[i]) == size
            assert hashlib.sha256(received[i]).digest() == hashlib.sha256(payloads[i]).digest()
        assert proxy.accepted == 3
        wait_until(lambda: proxy.open_connections == 0, 5, message="connections closed")
        assert proxy.bytes_up == proxy.bytes_down == 3 * size
    assert not echo_server.errors


def test_distinct_data_each_way() -> None:
    """The server streams its own data while hashing what it receives."""
    down = os.urandom(2 * 1024 * 1024)
    up = os.urandom(2 * 1024 * 1024 + 17)

    def handler(conn: socket.socket) -> None:
        writer = threading.Thread(target=conn.sendall, args=(down,))
        writer.start()
        digest = hashlib.sha256(recv_all(conn)).digest()
        writer.join(IO_TIMEOUT)
        conn.sendall(digest)
        conn.close()

    with Server(handler) as server, LinkProxy(server.address, delay_ms=2) as proxy:
        with connect(proxy.address) as c:
            sender = threading.Thread(target=lambda: (c.sendall(up), c.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_all(c)
            sender.join(IO_TIMEOUT)
        assert got[:-32] == down
        assert got[-32:] == hashlib.sha256(up).digest()
        assert not server.errors


# -- timing --------------------------------------------------------------------------------


def test_delay_applied_to_round_trip(echo_server: Server) -> None:
    with LinkProxy(echo_server.address, delay_ms=30) as slow, \
            LinkProxy(echo_server.address) as fast:
        slow_rtts = round_trips(slow.address, 5)
        fast_rtts = round_trips(fast.address, 20)
    assert min(slow_rtts) >= 0.060, slow_rtts  # 2 x 30 ms, never early
    assert statistics.median(fast_rtts) < statistics.median(slow_rtts) / 3, (fast_rtts, slow_rtts)


def test_jitter_keeps_order() -> None:
    count = 300
    messages = [f"message {i:06d}\n".encode() for i in range(count)]
    with Server(sink) as server, \
            LinkProxy(server.address, delay_ms=1, jitter_ms=15, seed=7) as proxy:
        start = time.monotonic()
        with connect(proxy.address) as c:
            for i, msg in enumerate(messages):
                c.sendall(msg)  # separate sends, so the proxy reads many chunks
                if i % 10 == 0:
                    time.sleep(0.002)  # (pacing: many chunks, each with its own jitter)
        wait_until(lambda: server.results or server.errors, IO_TIMEOUT, message="sink done")
        assert not server.errors
        assert server.results[0] == b"".join(messages)
        assert time.monotonic() - start < IO_TIMEOUT


def test_bandwidth_cap() -> None:
    size = 1_000_000
    done = threading.Event()
    finished: list[float] = []

    def timed_sink(conn: socket.socket) -> None:
        got = len(sink(conn))
        finished.append(time.monotonic())
        done.set()
        assert got == size

    with Server(timed_sink) as server, \
            LinkProxy(server.address, bandwidth_bps=8e6) as proxy:
        with connect(proxy.address) as c:
            start = time.monotonic()
            c.sendall(os.urandom(size))
            c.shutdown(socket.SHUT_WR)
            assert done.wait(IO_TIMEOUT)
        elapsed = finished[0] - start
        assert not server.errors
    assert elapsed >= 0.9, elapsed  # 1 MB at 8 Mbit/s is 1.0 s on the wire
    assert elapsed < 10, elapsed


# -- closing -------------------------------------------------------------------------------


def test_client_close_delivers_data_then_eof() -> None:
    data = os.urandom(300_000)
    with Server(sink) as server, LinkProxy(server.address, delay_ms=20) as proxy:
        c = connect(proxy.address)
        c.sendall(data)
        c.close()  # a full close, data still in flight in the proxy
        wait_until(lambda: server.results or server.errors, IO_TIMEOUT, message="sink done")
        assert not server.errors
        assert server.results[0] == data
        wait_until(lambda: proxy.open_connections == 0, 5, message="connection closed")


def test_server_close_delivers_data_then_eof() -> None:
    data = os.urandom(300_000)

    def send_and_close(conn: socket.socket) -> None:
        conn.sendall(data)
        conn.close()

    with Server(send_and_close) as server, LinkProxy(server.address, delay_ms=20) as proxy:
        with connect(proxy.address) as c:
            assert recv_all(c) == data
        assert not server.errors
        wait_until(lambda: proxy.open_connections == 0, 5, message="connection closed")


def test_half_close_keeps_other_direction(echo_server: Server) -> None:
    """After the client's EOF the server can still answer (the echo of the tail)."""
    with LinkProxy(echo_server.address, delay_ms=10) as proxy, connect(proxy.address) as c:
        c.sendall(b"before EOF")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"before EOF"


def test_reset_closes_both_sides() -> None:
    seen: list[str] = []

    def watch(conn: socket.socket) -> None:
        try:
            seen.append("eof" if conn.recv(100) == b"" else "data")
        except ConnectionResetError:
            seen.append("reset")

    with Server(watch) as server, LinkProxy(server.address) as proxy:
        c = connect(proxy.address)
        wait_until(lambda: proxy.open_connections == 1, 5, message="connected")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()  # RST
        wait_until(lambda: seen, 5, message="server notices")
        assert seen == ["reset"]
        wait_until(lambda: proxy.open_connections == 0, 5, message="connection closed")


def test_unreachable_target_closes_client() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LinkProxy(f"tcp://127.0.0.1:{port}") as proxy:
        try:  # the reset may come before connect() returns, or on the first read
            with connect(proxy.address) as c:
                assert c.recv(10) == b""
        except ConnectionResetError:
            pass
        assert proxy.accepted == 1
        wait_until(lambda: proxy.open_connections == 0, 5, message="connection closed")


def test_stop_with_open_connections(echo_server: Server) -> None:
    proxy = LinkProxy(echo_server.address, delay_ms=200).start()
    clients = []
    try:
        for _ in range(3):
            c = connect(proxy.address)
            c.sendall(os.urandom(100_000))  # still queued in the proxy when it stops
            clients.append(c)
        wait_until(lambda: proxy.open_connections == 3, 5, message="connected")
        start = time.monotonic()
        proxy.stop()
        assert time.monotonic() - start < 3
        assert not proxy.running and not proxy_threads()
        for c in clients:  # every client sees the end of its connection
            c.settimeout(5)
            try:
                recv_all(c)
            except ConnectionResetError:
                pass
    finally:
        proxy.stop()
        for c in clients:
            c.close()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        LinkProxy("127.0.0.1:5")
    with pytest.raises(ConfigError):
        LinkProxy("tcp://127.0.0.1:0")
    with pytest.raises(ConfigError):
        LinkProxy("tcp://127.0.0.1:5", delay_ms=-1)
    with pytest.raises(ConfigError):
        LinkProxy("tcp://127.0.0.1:5", bandwidth_bps=0)
    with pytest.raises(ConfigError):
        LinkProxy("tcp://127.0.0.1:5", jitter_ms=math.nan)
    proxy = LinkProxy("tcp://127.0.0.1:5")
    with pytest.raises(RuntimeError):
        proxy.address
    proxy.stop()  # stopping an unstarted proxy is harmless


# -- fault injection: freeze, thaw, reset -------------------------------------------------

QUIET = 0.5  # how long "nothing moves" is watched for (an absence has to be waited out)


def silent(sock: socket.socket, seconds: float = QUIET) -> bool:
    """True if nothing (no byte, no EOF, no reset) arrives on ``sock`` for ``seconds``."""
    ready, _, _ = select.select([sock], [], [], seconds)
    return not ready


def lines(count: int, tag: str = "") -> bytes:
    return b"".join(f"{tag}line {i:06d}\n".encode() for i in range(count))


def echo_watch(conn: socket.socket) -> str:
    """Echo until EOF or a reset; return which ended it."""
    try:
        while True:
            data = conn.recv(262144)
            if not data:
                return "eof"
            conn.sendall(data)
    except ConnectionResetError:
        return "reset"
    finally:
        conn.close()


def echoes(address: str, count: int) -> list[socket.socket]:
    """``count`` connections through ``address``, each checked with one echo."""
    socks = []
    for i in range(count):
        c = connect(address)
        c.sendall(b"hello %d\n" % i)
        assert recv_exactly(c, len(b"hello %d\n" % i)) == b"hello %d\n" % i
        socks.append(c)
    return socks


def test_freeze_holds_client_bytes_and_thaw_delivers_them_in_order(echo_server: Server) -> None:
    data = lines(2000)  # ~26 kB: fits in the kernel's buffers while the proxy reads nothing
    with LinkProxy(echo_server.address) as proxy:
        (c,) = echoes(proxy.address, 1)
        assert proxy.connections() == [0]
        assert proxy.freeze() == [0]
        assert proxy.connections(frozen=True) == [0]
        up, down = proxy.bytes_up, proxy.bytes_down
        c.sendall(data)
        assert silent(c)
        assert (proxy.bytes_up, proxy.bytes_down) == (up, down)  # nothing moved either way
        assert proxy.thaw() == [0]
        assert proxy.connections(frozen=True) == []
        assert recv_exactly(c, len(data)) == data
        c.sendall(b"after\n")  # and the link works as before
        assert recv_exactly(c, 6) == b"after\n"
        c.close()


def test_freeze_holds_server_bytes_and_thaw_delivers_them_in_order() -> None:
    data = lines(3000, "down ")
    frozen, answered = threading.Event(), threading.Event()

    def answer_late(conn: socket.socket) -> None:
        assert conn.recv(10) == b"go"
        assert frozen.wait(IO_TIMEOUT)  # the test has frozen the link
        conn.sendall(data)
        conn.close()
        answered.set()

    with Server(answer_late) as server, LinkProxy(server.address) as proxy, \
            connect(proxy.address) as c:
        c.sendall(b"go")
        wait_until(lambda: proxy.bytes_up == 2, IO_TIMEOUT, interval=0.001,
                   message="the request reached the server")
        assert proxy.freeze() == [0]
        frozen.set()
        down = proxy.bytes_down
        assert answered.wait(IO_TIMEOUT)
        assert silent(c)  # the server's answer (and its EOF) wait at the proxy
        assert proxy.bytes_down == down
        proxy.thaw()
        assert recv_all(c) == data  # every byte, in order, then the EOF
        assert not server.errors


def test_thaw_releases_bytes_the_proxy_held_in_order(echo_server: Server) -> None:
    """Bytes already read into the proxy's delay queue when the freeze came stay held past
    their release time, then go out, in order, before anything newer."""
    with LinkProxy(echo_server.address, delay_ms=400, jitter_ms=20, seed=3) as proxy:
        (c,) = echoes(proxy.address, 1)
        first, second = lines(500, "a "), lines(500, "b ")
        up = proxy.bytes_up
        c.sendall(first)
        # the proxy reads it at once, and holds it for its 400 ms delay (its queue is
        # private: no public counter shows bytes read and not yet written)
        wait_until(lambda: sum(conn.up.pending for conn in list(proxy._conns))
                   == len(first), IO_TIMEOUT, interval=0.001, message="the proxy holds it")
        proxy.freeze()
        assert proxy.bytes_up == up  # still in the proxy's queue
        c.sendall(second)
        assert silent(c, 0.42 + QUIET)  # past every release time
        assert proxy.bytes_up == up
        proxy.thaw()
        assert recv_exactly(c, len(first) + len(second)) == first + second
        c.close()


def test_a_frozen_proxy_freezes_new_connections_too(echo_server: Server) -> None:
    with LinkProxy(echo_server.address) as proxy:
        assert proxy.freeze() == []  # nothing open yet
        with connect(proxy.address) as c:  # accepted (and connected to the target) ...
            wait_until(lambda: proxy.connections() == [0], IO_TIMEOUT, message="accepted")
            assert proxy.connections(frozen=True) == [0]
            c.sendall(b"held\n")
            assert silent(c)  # ... but moves no bytes
            assert proxy.bytes_up == 0
            assert proxy.thaw() == [0]
            assert recv_exactly(c, 5) == b"held\n"
        with connect(proxy.address) as c:  # thaw() lifted the freeze for new ones as well
            c.sendall(b"free\n")
            assert recv_exactly(c, 5) == b"free\n"


def test_freeze_only_the_selected_connections(echo_server: Server) -> None:
    with LinkProxy(echo_server.address) as proxy:
        socks = echoes(proxy.address, 3)
        assert proxy.freeze(lambda i: i == 1) == [1]
        for i in (0, 2):  # the others carry on
            socks[i].sendall(b"still %d\n" % i)
            assert recv_exactly(socks[i], 8) == b"still %d\n" % i
        socks[1].sendall(b"held 1\n")
        assert silent(socks[1])
        socks.append(connect(proxy.address))  # index 3: not selected, not frozen
        socks[3].sendall(b"new 3\n")
        assert recv_exactly(socks[3], 6) == b"new 3\n"
        assert proxy.freeze({4, 5}) == []  # indexes to come: frozen at birth
        socks.append(connect(proxy.address))  # index 4
        wait_until(lambda: 4 in proxy.connections(), IO_TIMEOUT, message="accepted")
        assert proxy.connections(frozen=True) == [1, 4]
        socks[4].sendall(b"held 4\n")
        assert proxy.thaw([1]) == [1]  # thaw one; the other stays frozen
        assert recv_exactly(socks[1], 7) == b"held 1\n"
        assert silent(socks[4])
        assert proxy.thaw() == [4]
        assert recv_exactly(socks[4], 7) == b"held 4\n"
        for s in socks:
            s.close()


def test_reset_sends_rst_to_both_sides_of_the_selected_connections() -> None:
    with Server(echo_watch) as server, LinkProxy(server.address) as proxy:
        socks = echoes(proxy.address, 3)
        assert proxy.reset([1]) == [1]
        with pytest.raises(ConnectionResetError):  # ECONNRESET, not an orderly EOF
            socks[1].recv(10)
        wait_until(lambda: server.results == ["reset"], IO_TIMEOUT, message="server reset")
        assert proxy.connections() == [0, 2]
        for i in (0, 2):  # the others are untouched
            socks[i].sendall(b"ok\n")
            assert recv_exactly(socks[i], 3) == b"ok\n"
        proxy.freeze([2])  # a frozen connection can be reset too
        assert proxy.reset() == [0, 2]
        for i in (0, 2):
            with pytest.raises(ConnectionResetError):
                socks[i].recv(10)
        wait_until(lambda: len(server.results) == 3, IO_TIMEOUT, message="server resets")
        assert server.results == ["reset"] * 3
        assert proxy.connections() == [] and proxy.open_connections == 0
        socks.append(connect(proxy.address))  # the proxy still accepts: index 3
        socks[3].sendall(b"again\n")
        assert recv_exactly(socks[3], 6) == b"again\n"
        assert proxy.connections() == [3]
        for s in socks:
            s.close()
        assert not server.errors


def test_controls_from_many_threads_while_bytes_flow(echo_server: Server) -> None:
    size = 2 * 1024 * 1024
    payload = os.urandom(size)
    errors: list[BaseException] = []
    rounds: list[int] = []
    stop = threading.Event()

    with LinkProxy(echo_server.address) as proxy, connect(proxy.address) as c:
        def fiddle(seed: int) -> None:
            try:
                while not stop.is_set():
                    proxy.freeze(lambda i: i % 2 == seed % 2)
                    proxy.connections()
                    proxy.thaw()
                    rounds.append(seed)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=fiddle, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            sender = threading.Thread(target=lambda: (c.sendall(payload),
                                                      c.shutdown(socket.SHUT_WR)))
            sender.start()
            time.sleep(0.5)  # the fault's duration: bytes flow while controls hammer
        finally:
            stop.set()
            for t in threads:
                t.join(IO_TIMEOUT)
        proxy.thaw()
        got = recv_all(c)
        sender.join(IO_TIMEOUT)
        assert not errors, errors
        assert len(rounds) > 40, len(rounds)  # the controls really ran while bytes moved
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def test_controls_before_start_and_after_stop(echo_server: Server) -> None:
    proxy = LinkProxy(echo_server.address)
    assert proxy.freeze() == [] and proxy.connections() == []
    proxy.start()
    try:
        with connect(proxy.address) as c:  # the freeze made before start applies
            wait_until(lambda: proxy.connections(frozen=True) == [0], IO_TIMEOUT)
            c.sendall(b"x")
            assert silent(c)
            proxy.stop()  # prompt, frozen connections and all
            assert not proxy.running
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass
        assert proxy.connections() == [] and proxy.thaw() == [] and proxy.reset() == []
    finally:
        proxy.stop()
    with pytest.raises(ConfigError):
        LinkProxy(echo_server.address).freeze(42)  # type: ignore[arg-type]


def test_zfalkon_worker_survives_a_short_freeze() -> None:
    """A freeze shorter than the heartbeat timeout is only a pause: the worker stays
    registered and its tasks come back once the link thaws."""
    with LocalCluster(workers=0) as cluster, \
            LinkProxy(cluster.address) as proxy, \
            worker_process(proxy.address, "--slots", "1"):
        cluster.wait_for_slots(1, timeout=30)
        with Executor(cluster.address) as ex:
            assert ex.submit(abs, -1).result(timeout=30) == 1
            assert proxy.freeze() == proxy.connections()
            future = ex.submit(abs, -2)
            assert not future.done() and cluster.status()["done"] == 1
            time.sleep(1.0)  # the fault's duration (well under HEARTBEAT_SECONDS * MISSES)
            assert not future.done()
            proxy.thaw()
            assert future.result(timeout=30) == 2
            assert cluster.status()["workers"] == 1


# -- zfalkon through the proxy -------------------------------------------------------------


def test_worker_behind_proxy_runs_tasks() -> None:
    with LocalCluster(workers=0) as cluster, \
            LinkProxy(cluster.address, delay_ms=20) as proxy, \
            worker_process(proxy.address, "--slots", "1"):
        cluster.wait_for_slots(1, timeout=30)
        assert proxy.accepted >= 1
        with Executor(cluster.address) as ex:
            assert ex.submit(abs, -7).result(timeout=30) == 7
            start = time.monotonic()
            assert ex.submit(abs, -3).result(timeout=30) == 3
            assert time.monotonic() - start >= 0.040  # the task crosses the link both ways
            result = ex.shell("echo hi").result(timeout=30)
            assert result.returncode == 0 and result.stdout == "hi\n"
            assert list(ex.map(abs, [-1, -2, -3], timeout=30)) == [1, 2, 3]
        assert proxy.bytes_up > 0 and proxy.bytes_down > 0


def test_proxy_overhead_is_sane() -> None:
    result = proxy_overhead(samples=300)
    assert set(result) == {"direct_ms", "proxied_ms", "added_ms"}
    assert all(math.isfinite(v) for v in result.values())
    assert result["direct_ms"] > 0 and result["proxied_ms"] > 0
    assert result["added_ms"] > -1.0  # the proxy adds two hops; noise may nibble at it
    assert not proxy_threads()


# -- command line --------------------------------------------------------------------------


def test_cli_runs_until_sigterm(echo_server: Server) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "zfalkon.linkproxy", "--target", echo_server.address,
         "--delay-ms", "10", "--jitter-ms", "1", "--bandwidth-mbps", "100"],
        stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        line = ready_line(proc)
        assert line.startswith(READY_PREFIX), line
        address = line[len(READY_PREFIX):].strip()
        assert address.startswith("tcp://127.0.0.1:")
        assert min(round_trips(address, 3)) >= 0.020
        code, took = stop_process(proc)
        assert code == 0 and took < 5
    finally:
        stop_process(proc)
        proc.stdout.close()


def test_cli_rejects_bad_target() -> None:
    proc = subprocess.run([sys.executable, "-m", "zfalkon.linkproxy", "--target", "nonsense"],
                          capture_output=True, text=True, env=child_env(), timeout=30)
    assert proc.returncode == 2
    assert "tcp://HOST:PORT" in proc.stderr


def test_cli_sigint(echo_server: Server) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "zfalkon.linkproxy", "--target",
                             echo_server.address], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        assert ready_line(proc).startswith(READY_PREFIX)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
        proc.stdout.close()
