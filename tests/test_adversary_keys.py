"""Adversarial tests with --keys (CurveZMQ): one authorized key acting against another
key's peers. Breaks are kept as ``xfail(strict=True)`` with the reason."""

from __future__ import annotations

import uuid

import pytest
import zmq

import tasks  # noqa: F401  (workers import tests/tasks.py)
from conftest import start_broker, stop_process, wait_until, worker_process
from zfalkon import payload, query_status, security
from zfalkon import protocol as P


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv-keys")
    d = str(root / "keys")
    security.init_keys(d)
    bundles = {name: security.new_key(d, name, role) for name, role in
               [("w1", "worker"), ("w2", "worker"), ("c1", "client"), ("c2", "client")]}
    proc, address = start_broker("tcp://127.0.0.1:0", "--keys", d)
    try:
        with worker_process(address, "--slots", "1", "--keys", bundles["w1"]):
            wait_until(lambda: query_status(address, keys=bundles["c1"])["slots"] >= 1, 30,
                       message="secure worker registered")
            yield type("Keyed", (), dict(address=address, **bundles))
    finally:
        stop_process(proc)
        proc.stdout.close()


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def curve_dealer(ctx: zmq.Context, address: str, bundle: str, ident: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, ident)
    security.PeerKeys(bundle).connect_with(sock)
    sock.connect(address)
    return sock


def answer(sock: zmq.Socket, timeout: float = 5.0) -> P.Message:
    assert sock.poll(timeout * 1000), "no answer from the broker"
    return P.decode(sock.recv())


def names(address: str, keys: str) -> list[str]:
    return [w["name"] for w in query_status(address, keys=keys)["worker_list"]]


def test_a_worker_key_cannot_replace_another_keys_worker(keyed, ctx):
    victim = curve_dealer(ctx, keyed.address, keyed.w1, uuid.uuid4().bytes)
    thief = curve_dealer(ctx, keyed.address, keyed.w2, uuid.uuid4().bytes)
    try:
        victim.send(P.encode(P.hello(P.ROLE_WORKER, {"worker_id": "victim-id", "slots": 1,
                                                     "name": "victim"})))
        assert isinstance(answer(victim), P.Welcome)
        assert "victim" in names(keyed.address, keyed.c1)
        thief.send(P.encode(P.hello(P.ROLE_WORKER, {"worker_id": "victim-id", "slots": 1,
                                                    "name": "thief"})))
        answer(thief)  # WELCOME today; should be ERROR unauthorized
        now = names(keyed.address, keyed.c1)
        assert "victim" in now and "thief" not in now
    finally:
        for sock in (victim, thief):
            sock.send(P.encode(P.Bye("done")))
        victim.close(0)
        thief.close(0)


def test_a_silent_connection_of_another_key_does_not_get_a_clients_results(keyed, ctx):
    ident = uuid.uuid4().bytes
    owner = curve_dealer(ctx, keyed.address, keyed.c1, ident)
    thief = None
    try:
        owner.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": "owner"})))
        welcome = answer(owner)
        assert isinstance(welcome, P.Welcome)
        tid = (welcome.key << P.ID_SHIFT) + 1
        owner.send(P.encode(P.Submit(1, 0, [tid], [payload.python_task(
            "tasks:sleep_then", ("secret-result", 1.5), {})])))
        wait_until(lambda: query_status(keyed.address, keys=keyed.c2)["running"] >= 1, 10,
                   message="task running")
        thief = curve_dealer(ctx, keyed.address, keyed.c2, ident)  # sends nothing
        stolen = []
        for _ in range(20):  # bounded: until the result would have come, and a bit
            if not thief.poll(500):
                if query_status(keyed.address, keys=keyed.c2)["done"] >= 1:
                    break
                continue
            stolen.append(P.decode(thief.recv()))
        print(f"\nADVERSARY silent thief on the owner's routing id received: {stolen!r}")
        assert not any(isinstance(m, P.Deliver) and tid in m.ids for m in stolen), \
            "the thief received the owner's result"
    finally:
        owner.close(0)
        if thief is not None:
            thief.close(0)
