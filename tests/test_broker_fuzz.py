"""zfalkon.broker under hostile input: 100,000 malformed frames while it serves real work.

The attacker never reads the broker's answers; the broker must answer at most a bounded
number of ERRORs, keep its memory bounded and keep serving the honest client and workers.
"""

from __future__ import annotations

import random
import threading
import time

import msgpack
import psutil
import zmq

import tasks
from conftest import worker_env
from zfalkon import Executor, LocalCluster
from zfalkon import protocol as P
from zfalkon.constants import PROTOCOL_VERSION

FRAMES = 100_000


def hostile_frames(rng: random.Random) -> list[list[bytes]]:
    """A mix of malformed and hostile messages (each a list of frames for one send)."""
    good_submit = P.encode(P.Submit(1, 0, [1], [b"x"]))
    submit, results = P.TAGS[P.Submit], P.TAGS[P.Results]
    unknown = max(P.TAGS.values()) + 1
    kinds = [
        lambda: [rng.randbytes(rng.randint(0, 64))],  # garbage
        lambda: [msgpack.packb([rng.randint(unknown, 10**6), "x"])],  # unknown tag
        lambda: [msgpack.packb([submit, 1, 0, "not a list", 5])],  # wrong field types
        lambda: [msgpack.packb([submit, 1, 0, [True], [b""]])],  # bool where an int is expected
        lambda: [msgpack.packb([1, 999, "9.9", "worker", {}])],  # wrong protocol version
        lambda: [msgpack.packb([1, PROTOCOL_VERSION, "0.1.0", "slot",
                                {"worker_id": [1, 2], "slot": 0}])],
        lambda: [msgpack.packb({"a": 1})],  # not an array
        lambda: [msgpack.packb(msgpack.ExtType(5, b"xx"))],  # extension type
        lambda: [good_submit],  # valid frame, but before HELLO
        lambda: [b"a", b"b", b"c"],  # too many frames
        lambda: [msgpack.packb([results, rng.randint(1, 10**6), 0, 10**6, 0, [1], [b"r"]])],
        # ... RESULTS from nobody (and a huge window)
        lambda: [good_submit[:-1]],  # truncated
    ]
    return [rng.choice(kinds)() for _ in range(FRAMES)]


def finish(sock: zmq.Socket, timeout: float = 60.0) -> int:
    """Say HELLO and ask STATUS; read until STATUS arrives; return the ERRORs read. (HELLO
    again every 1.5 s: HELLOs beyond 2 a second per routing id are ignored, and the flood
    had HELLOs in it.)"""
    errors = 0
    deadline = time.monotonic() + timeout
    asked = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - asked > 1.5:
            sock.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": "attacker"})))
            sock.send(P.encode(P.StatusRequest()))
            asked = time.monotonic()
        if not sock.poll(500):
            continue
        msg = P.decode(sock.recv())
        if isinstance(msg, P.Status):
            return errors
        errors += isinstance(msg, P.Error)
    raise AssertionError("the broker never answered STATUS after the flood")


def test_broker_survives_a_flood_of_hostile_frames_while_serving_work():
    rng = random.Random(20261124)
    frames = hostile_frames(rng)
    with LocalCluster(workers=2, env=worker_env()) as cluster:
        broker = psutil.Process(cluster.broker.pid)
        with Executor(cluster.address) as ex:
            list(ex.map(abs, range(10_000)))  # warm up: steady-state memory
            rss_before = broker.memory_info().rss
            ctx = zmq.Context()
            attackers = [ctx.socket(zmq.DEALER) for _ in range(4)]
            for sock in attackers:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 0)
                sock.connect(cluster.address)

            flood_errors: list[BaseException] = []

            def flood(sock: zmq.Socket, part: list[list[bytes]]) -> None:
                try:
                    for msg in part:
                        sock.send_multipart(msg)
                except BaseException as exc:  # re-raised below, in the test's thread
                    flood_errors.append(exc)

            quarter = FRAMES // 4
            threads = [threading.Thread(target=flood, args=(s, frames[i * quarter:(i + 1) * quarter]))
                       for i, s in enumerate(attackers)]
            for t in threads:
                t.start()
            n = 20_000
            results = list(ex.map(tasks.identity, range(n)))  # honest work, during the flood
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads)
            assert not flood_errors, flood_errors  # every attacker sent its whole share
            # Each attacker ends with HELLO + STATUS on its own connection: its STATUS answer
            # proves the broker handled every frame before it (zmq keeps per-pipe order).
            errors_answered = [finish(sock) for sock in attackers]
            status = cluster.status()
            more = list(ex.map(abs, range(-1000, 1000)))
            rss_after = broker.memory_info().rss
            for sock in attackers:
                sock.close()
            ctx.term()
        assert results == list(range(n))
        assert more == [abs(i) for i in range(-1000, 1000)]
        assert status["workers"] == 2 and status["slots"] == 2
        assert broker.is_running()
        # bad frames were answered within a per-peer budget, not one ERROR each
        assert all(0 < e < quarter // 2 for e in errors_answered), errors_answered
        assert rss_after - rss_before < 64 * 2**20, (rss_before, rss_after)
