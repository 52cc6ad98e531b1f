"""zfalkon.security: keys on disk, and a real broker with CurveZMQ refusing whoever it must.

Every refusal has its positive twin: the same setup with the right key works.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid

import pytest
import zmq

import tasks
from conftest import child_env, start_broker, stop_process, wait_until, worker_process
from zfalkon import Executor, payload, query_status, security
from zfalkon import protocol as P
from zfalkon.broker import Broker
from zfalkon.errors import BrokerUnavailable, ConfigError, ProtocolError
from zfalkon.linkproxy import TcpServer

REFUSED_WITHIN = 2.0  # seconds a refused client waits for a welcome that never comes


# -- keys on disk ----------------------------------------------------------------------


def test_keys_init_new_list_revoke(tmp_path):
    d = str(tmp_path / "keys")
    security.init_keys(d)
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    assert oct(os.stat(os.path.join(d, "broker.key_secret")).st_mode & 0o777) == "0o600"
    bundle = security.new_key(d, "w1", "worker")
    security.new_key(d, "c1", "client")
    secret = os.path.join(bundle, "w1.key_secret")
    assert oct(os.stat(bundle).st_mode & 0o777) == "0o700"
    assert oct(os.stat(secret).st_mode & 0o777) == "0o600"
    peer = security.PeerKeys(bundle)
    assert peer.name == "w1" and peer.server == security.BrokerKeys(d).public
    assert [(k.name, k.role, k.revoked) for k in security.list_keys(d)] == [
        ("w1", "worker", False), ("c1", "client", False)]
    security.revoke(d, "c1")
    assert [(k.name, k.revoked) for k in security.list_keys(d)] == [
        ("w1", False), ("c1", True)]
    with pytest.raises(ConfigError, match="no authorized key"):
        security.revoke(d, "c1")
    with pytest.raises(ConfigError, match="already exists"):
        security.new_key(d, "w1", "client")
    with pytest.raises(ConfigError, match="already holds a broker key"):
        security.init_keys(d)
    with pytest.raises(ConfigError, match="key name"):
        security.new_key(d, "../evil", "worker")
    with pytest.raises(ConfigError, match="role"):
        security.new_key(d, "x", "admin")
    with pytest.raises(ConfigError, match="broker's own key"):
        security.new_key(d, "broker", "client")


def test_loose_permissions_are_refused_and_named(tmp_path):
    d = str(tmp_path / "keys")
    security.init_keys(d)
    bundle = security.new_key(d, "w1", "worker")
    os.chmod(d, 0o755)
    with pytest.raises(ConfigError, match="mode 0755.*chmod 700"):
        security.BrokerKeys(d)
    os.chmod(d, 0o700)
    security.BrokerKeys(d)  # back to private: fine
    secret = os.path.join(bundle, "w1.key_secret")
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match="mode 0644.*chmod 600"):
        security.PeerKeys(bundle)
    os.chmod(secret, 0o600)
    security.PeerKeys(bundle)


def test_unloadable_key_directories_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        security.BrokerKeys(str(tmp_path / "missing"))
    d = tmp_path / "keys"
    security.init_keys(str(d))
    (d / "broker.key_secret").write_text("not a key\n")
    with pytest.raises(ConfigError, match="no secret key|cannot load"):
        security.BrokerKeys(str(d))
    bundle = tmp_path / "bundle"
    bundle.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="exactly one"):
        security.PeerKeys(str(bundle))


def test_non_loopback_without_keys_needs_insecure():
    with pytest.raises(ConfigError, match="--insecure"):
        Broker("tcp://0.0.0.0:0")
    Broker("tcp://0.0.0.0:0", insecure=True).close()  # constructed, never bound
    Broker("tcp://127.0.0.1:0").close()  # loopback: no keys needed


@pytest.mark.parametrize("breakage", ["loose", "missing", "corrupt"])
def test_broker_process_refuses_to_start_with_bad_keys(tmp_path, breakage):
    d = tmp_path / "keys"
    security.init_keys(str(d))
    if breakage == "loose":
        os.chmod(d, 0o755)
    elif breakage == "missing":
        d = tmp_path / "nowhere"
    else:
        (d / "broker.key_secret").write_text("garbage")
    proc = subprocess.run([sys.executable, "-m", "zfalkon", "broker", "--listen",
                           "tcp://127.0.0.1:0", "--keys", str(d)], env=child_env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "listening" not in proc.stdout
    assert str(d) in proc.stderr


# -- a secure broker -------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A broker with keys, one authorized worker attached; yields a namespace of paths."""
    root = tmp_path_factory.mktemp("secure")
    d = str(root / "keys")
    security.init_keys(d)
    bundles = {name: security.new_key(d, name, role) for name, role in
               [("w1", "worker"), ("c1", "client"), ("c2", "client")]}
    other = str(root / "other")  # another broker's keys: its clients are strangers here
    security.init_keys(other)
    stranger = security.new_key(other, "stranger", "client")
    shutil.copyfile(os.path.join(d, "broker.key"), os.path.join(stranger, "broker.key"))
    wrong_server = security.new_key(other, "c3", "client")  # holds the other broker's key
    # Authorize c3's public key here too: only its idea of the broker's key is wrong.
    shutil.copyfile(os.path.join(other, "client", "c3.key"), os.path.join(d, "client", "c3.key"))
    proc, address = start_broker("tcp://127.0.0.1:0", "--keys", d)
    try:
        with worker_process(address, "--slots", "1", "--keys", bundles["w1"]):
            wait_until(lambda: query_status(address, keys=bundles["c1"])["slots"] >= 1, 30,
                       message="secure worker registered")
            yield type("Secure", (), dict(address=address, dir=d, stranger=stranger,
                                          wrong_server=wrong_server, **bundles))
    finally:
        stop_process(proc)
        proc.stdout.close()


def test_authorized_worker_and_client_work(secure):
    with Executor(secure.address, keys=secure.c1) as ex:
        assert ex.status()["slots"] == 1  # status goes over its own connection, same key
        assert list(ex.map(tasks.square, range(100))) == [i * i for i in range(100)]
        assert ex.shell("echo secret").result(timeout=30).stdout == "secret\n"


@pytest.mark.parametrize("who", ["plaintext", "stranger", "wrong_server"])
def test_peers_without_an_accepted_key_get_nothing(secure, who):
    keys = None if who == "plaintext" else getattr(secure, who)
    with pytest.raises(BrokerUnavailable, match="no answer"):
        Executor(secure.address, keys=keys, connect_timeout=REFUSED_WITHIN)
    # ... while an authorized client still works
    assert query_status(secure.address, keys=secure.c1)["slots"] == 1


def test_a_worker_key_cannot_act_as_a_client(secure):
    with pytest.raises(ProtocolError, match="may not register as a client") as info:
        Executor(secure.address, keys=secure.w1, connect_timeout=5)
    assert info.value.code == "unauthorized"


def curve_dealer(ctx: zmq.Context, address: str, bundle: str, ident: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, ident)
    security.PeerKeys(bundle).connect_with(sock)
    sock.connect(address)
    return sock


def answer(sock: zmq.Socket) -> P.Message:
    assert sock.poll(5000), "no answer from the broker"
    return P.decode(sock.recv())


@pytest.mark.parametrize("role", [P.ROLE_WORKER, P.ROLE_SLOT])
def test_a_client_key_cannot_register_as_a_worker_or_slot(secure, role):
    ctx = zmq.Context()
    try:
        sock = curve_dealer(ctx, secure.address, secure.c1, uuid.uuid4().bytes)
        sock.send(P.encode(P.hello(role, {"worker_id": "x", "slots": 1, "slot": 0})))
        msg = answer(sock)
        assert isinstance(msg, P.Error) and msg.code == "unauthorized", msg
        assert query_status(secure.address, keys=secure.c1)["workers"] == 1  # still just w1
    finally:
        ctx.destroy(linger=0)


def test_a_routing_id_cannot_be_taken_over_by_another_key(secure):
    """With keys the broker sets no ROUTER_HANDOVER: a connection of another key that
    presents a routing id in use is refused by libzmq (it never reaches the broker's code
    and receives nothing), and the id's owner keeps its route."""
    ctx = zmq.Context()
    ident = uuid.uuid4().bytes
    try:
        owner = curve_dealer(ctx, secure.address, secure.c1, ident)
        owner.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": "owner"})))
        assert isinstance(answer(owner), P.Welcome)
        thief = curve_dealer(ctx, secure.address, secure.c2, ident)
        thief.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": "thief"})))
        thief.send(P.encode(P.StatusRequest()))
        owner.send(P.encode(P.StatusRequest()))
        assert isinstance(answer(owner), P.Status)  # (after the thief's attempt)
        assert not thief.poll(2000), "the thief's connection was served"
        owner.send(P.encode(P.StatusRequest()))
        assert isinstance(answer(owner), P.Status)
    finally:
        ctx.destroy(linger=0)


def test_revocation_applies_to_new_connections_without_restart(secure):
    with Executor(secure.address, keys=secure.c2) as ex:  # works before
        assert ex.submit(tasks.add, 2, 3).result(timeout=30) == 5
    security.revoke(secure.dir, "c2")
    with pytest.raises(BrokerUnavailable):
        Executor(secure.address, keys=secure.c2, connect_timeout=REFUSED_WITHIN)
    with Executor(secure.address, keys=secure.c1) as ex:  # others unaffected
        assert ex.submit(tasks.add, 2, 3).result(timeout=30) == 5


# -- what a wire tap sees --------------------------------------------------------------


class Tap:
    """A TCP relay on 127.0.0.1 that records every byte passing through it."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("tcp://").rpartition(":")
        self.target = (host, int(port))
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.server = TcpServer(self._relay)

    def _relay(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(self.target, timeout=10)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    with self.lock:
                        self.seen += data
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
        back.start()
        pump(conn, upstream)
        back.join(5)
        upstream.close()


@pytest.mark.parametrize("with_keys", [True, False])
def test_a_capture_on_the_wire_does_not_show_the_task(secure, with_keys, tmp_path):
    """With keys the command and its output are not in the captured bytes; the plaintext
    run through the same tap is the control that shows the tap sees them."""
    marker = f"zfalkon-wire-marker-{uuid.uuid4().hex}"
    if with_keys:
        address, keys, proc = secure.address, secure.c1, None
    else:
        proc, address = start_broker()
        keys = None
    try:
        tap = Tap(address)
        with tap.server:
            plain_worker = None if with_keys else worker_process(address, "--slots", "1")
            if plain_worker is not None:
                plain_worker.__enter__()
            try:
                with Executor(tap.server.address, keys=keys) as ex:
                    result = ex.shell(f"echo {marker}").result(timeout=30)
                    assert result.stdout == marker + "\n"
            finally:
                if plain_worker is not None:
                    plain_worker.__exit__(None, None, None)
        seen = bytes(tap.seen)
        assert len(seen) > 200  # the client's traffic went through the tap
        assert (marker.encode() in seen) is not with_keys
        assert (payload.shell_task(f"echo {marker}") in seen) is not with_keys
    finally:
        if proc is not None:
            stop_process(proc)
            proc.stdout.close()


def test_only_the_submitting_identity_can_claim_a_client_key_back(tmp_path):
    """After a journaled restart the key of an away client holds its tasks and results:
    another authorized client asking for that key gets a fresh one instead."""
    d = str(tmp_path / "keys")
    security.init_keys(d)
    alice, mallory = (security.new_key(d, n, "client") for n in ("alice", "mallory"))
    journal = str(tmp_path / "journal")
    ctx = zmq.Context()
    proc, address = start_broker("tcp://127.0.0.1:0", "--keys", d, "--journal", journal)
    try:
        sock = curve_dealer(ctx, address, alice, uuid.uuid4().bytes)
        sock.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": "alice"})))
        key = answer(sock).key
        tid = (key << P.ID_SHIFT) + 1
        sock.send(P.encode(P.Submit(1, 0, [tid], [payload.shell_task("true")])))
        wait_until(lambda: query_status(address, keys=alice)["queued"] == 1, 10,
                   message="queued")
        sock.close()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc, _ = start_broker(address, "--keys", d, "--journal", journal)
        for bundle, granted in ((mallory, False), (alice, True)):
            sock = curve_dealer(ctx, address, bundle, uuid.uuid4().bytes)
            sock.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": "x", "key": key})))
            welcome = answer(sock)
            assert isinstance(welcome, P.Welcome) and (welcome.key == key) is granted
    finally:
        stop_process(proc)
        proc.stdout.close()
        ctx.destroy(linger=0)
