"""Issue 12, "bounded state per peer", with CurveZMQ keys: one allow-listed client key that
opens many connections (a client record each) does not multiply the client limits. A real
broker with ``--keys`` on 127.0.0.1, one 1-slot worker, a raw attacker with ONE client key
and several connections each submitting big blobs, and an honest client of another key.
Every process is stopped by PID (conftest helpers).
"""

from __future__ import annotations

import time

import pytest
import tasks
import zmq
from conftest import RSS_BOUND, broker_process, steady_rss, wait_until, worker_process
from test_adversary_wire import PeakRss, report

from zfalkon import Executor, core, payload, query_status, security
from zfalkon import protocol as P

MIB = 2**20
CONNECTIONS = 4  # of the attacker's one key
BLOB = 8 * MIB  # one task per SUBMIT frame (an Executor's frames stay under 8 MiB)
#: Frames each connection sends: each alone would pass MAX_CLIENT_BYTES (256 MiB).
FRAMES = core.MAX_CLIENT_BYTES // BLOB + 4
#: Rounds (a frame on each connection) sent before the attacker waits for the broker to
#: have handled them: what is in flight at once (in ZeroMQ's receive pipes, being
#: decoded) stays a few frames per connection, so that RSS measures what the broker
#: keeps. (Sent all at once, up to ~150 MiB more were in flight in earlier runs.)
PACE = 2
#: Most the broker's RSS may grow under the attack: the key's queued bytes
#: (MAX_CLIENT_BYTES), plus twice the per-peer allowance (RSS_BOUND) for the rest: frames
#: of its five connections in flight, TASKS frames to the slot, allocator slack (here
#: 287-291 MiB for 248 MiB accepted). Without the per-key limits the broker took 992 MiB
#: of the attacker's tasks, and its RSS grew past 1 GiB.
GROWTH_BOUND = core.MAX_CLIENT_BYTES + 2 * RSS_BOUND


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("perkey") / "keys")
    security.init_keys(d)
    bundles = {name: security.new_key(d, name, role) for name, role in
               [("w1", "worker"), ("attacker", "client"), ("honest", "client")]}
    with broker_process("--keys", d) as (proc, address):
        with worker_process(address, "--slots", "1", "--keys", bundles["w1"]):
            wait_until(lambda: query_status(address, keys=bundles["honest"])["slots"] >= 1,
                       30, message="secure worker registered")
            yield type("Keyed", (), dict(proc=proc, address=address, **bundles))


def connect(ctx: zmq.Context, address: str, bundle: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 2)  # (the attacker holds little: sends block instead)
    sock.setsockopt(zmq.SNDTIMEO, 60_000)
    security.PeerKeys(bundle).connect_with(sock)
    sock.connect(address)
    return sock


def pong_ack(sock: zmq.Socket, timeout: float = 60.0) -> int:
    """PING and read until the PONG: the broker has handled every frame this connection
    sent before; returns its ack, the last SUBMIT frame it accepted (took into the
    stream). Nothing read is acknowledged: the attacker's results stay live."""
    mark = time.monotonic()
    sock.send(P.encode(P.Ping(mark)))
    deadline = mark + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(left * 1000), "no PONG"
        msg = P.decode(sock.recv())
        if isinstance(msg, P.Pong) and msg.sent == mark:
            return msg.ack


def held(keyed) -> int:
    """Tasks the broker holds: queued, or held by the slot."""
    s = query_status(keyed.address, keys=keyed.honest)
    return s["queued"] + s["running"] + s["prefetched"]


@pytest.mark.timeout(300)
def test_one_key_with_many_connections_gets_one_keys_worth_of_queued_bytes(keyed, ctx):
    """The attacker's key first keeps the only slot busy (one task that sleeps), so that
    its big tasks stay queued at the broker; then each of its CONNECTIONS submits
    FRAMES big tasks. The key gets MAX_CLIENT_BYTES accepted in all (not per
    connection), the broker's RSS grows by about that, and an honest client of another
    key has its SUBMITs accepted meanwhile, and its results once the attacker leaves."""
    every = [connect(ctx, keyed.address, keyed.attacker) for _ in range(CONNECTIONS + 1)]
    socks = every
    try:
        bases = []
        for sock in socks:
            sock.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": "attacker"})))
            assert sock.poll(10_000)
            welcome = P.decode(sock.recv())
            assert isinstance(welcome, P.Welcome), welcome
            bases.append(welcome.key << P.ID_SHIFT)
        blocker, socks, base0 = socks[0], socks[1:], bases.pop(0)
        blocker.send(P.encode(P.Submit(1, 0, [base0 + 1], [payload.python_task(
            "tasks:sleep_then", (0, 3600), {})])))
        assert pong_ack(blocker) == 1
        wait_until(lambda: held(keyed) >= 1, 30, message="the attacker's sleeping task held")
        blob = payload.python_task("tasks:identity", (bytes(BLOB),), {})
        steady_rss(keyed.proc)  # (the broker settled before the baseline)
        start = time.monotonic()
        with PeakRss(keyed.proc) as peak:
            for seq in range(1, FRAMES + 1):  # round robin over the key's connections
                for sock, base in zip(socks, bases):
                    sock.send(P.encode(P.Submit(seq, 0, [base + seq], [blob])))
                if seq % PACE == 0:
                    accepted = [pong_ack(sock) for sock in socks]
            accepted = [pong_ack(sock) for sock in socks]
            with Executor(keyed.address, keys=keyed.honest, connect_timeout=10) as ex:
                futures = [ex.submit(tasks.add, i, 1) for i in range(20)]
                wait_until(lambda: held(keyed) >= 1 + sum(accepted) + 20, 30,
                           message="the honest client's tasks accepted")
                attack = time.monotonic() - start
                for sock in [blocker, *socks]:  # the attacker leaves: its tasks go
                    sock.send(P.encode(P.Bye("done")))
                assert [f.result(timeout=120) for f in futures] == [i + 1 for i in range(20)]
        accepted_bytes = sum(accepted) * len(blob)
        offered = CONNECTIONS * FRAMES * len(blob)
        report(f"one key, {CONNECTIONS} connections offering {offered / MIB:.0f} MiB in "
               f"{BLOB >> 20} MiB tasks (kept queued): accepted", accepted_bytes / MIB)
        report("  broker RSS peak growth", peak.growth / MIB)
        report("  the attack took", attack, "s")
        assert keyed.proc.poll() is None
        assert accepted_bytes <= core.MAX_CLIENT_BYTES, accepted
        assert accepted_bytes >= core.MAX_CLIENT_BYTES - 2 * len(blob), accepted  # (bound
        assert peak.growth < GROWTH_BOUND  # reached: the attack was real)
    finally:
        for sock in every:
            sock.close(0)
