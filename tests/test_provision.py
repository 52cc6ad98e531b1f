"""zfalkon.provision: user-data checked by cloud-init, the policy, and the whole boot path on
a simulated cloud (moto's EC2 server over HTTP on 127.0.0.1, user-data run in sandboxes,
real brokers and workers)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import tasks
from conftest import broker_process, child_env, stop_process, wait_until, worker_env
from zfalkon import Executor, security
from zfalkon.errors import ConfigError
from zfalkon.provision.base import Instance, ProvisionError
from zfalkon.provision.ec2 import POOL_TAG, EC2Provisioner, sweep_all
from zfalkon.provision.policy import Policy, Scaler
from zfalkon.provision.run import run_scaler
from zfalkon.provision.sim import FakeMetadata, MotoServer, SimCloud, boot_commands
from zfalkon.provision.userdata import USER_DATA_LIMIT, render

BROKER = "tcp://198.51.100.7:7450"  # rendered into user-data only, never connected to


# -- user-data -------------------------------------------------------------------------


def cloud_init_schema(path: str) -> subprocess.CompletedProcess:
    if shutil.which("cloud-init") is None:
        pytest.fail("cloud-init is not on PATH: install Debian's cloud-init "
                    "(apt-get install cloud-init); .ci/run does")
    return subprocess.run(["cloud-init", "schema", "--config-file", path],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def worker_bundle(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("keys") / "k")
    security.init_keys(d)
    return d, security.new_key(d, "pool1", "worker")


@pytest.mark.parametrize("with_keys", [False, True])
def test_rendered_user_data_is_valid_cloud_config_under_16k(tmp_path, worker_bundle, with_keys):
    text = render(BROKER, pool="p1", keys=worker_bundle[1] if with_keys else None)
    assert len(text.encode()) < USER_DATA_LIMIT
    path = tmp_path / "user-data"
    path.write_text(text)
    proc = cloud_init_schema(str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Valid cloud-config" in proc.stdout
    assert (b"key_secret" in text.encode()) is with_keys


def test_cloud_init_schema_catches_a_broken_user_data(tmp_path):
    """The control for the test above: the check fails on a user-data that is wrong."""
    text = render(BROKER, pool="p1").replace("permissions: '0600'", "permissions: 600", 1)
    path = tmp_path / "user-data"
    path.write_text(text)
    proc = cloud_init_schema(str(path))
    assert proc.returncode != 0 and "permissions" in proc.stdout + proc.stderr


def test_user_data_over_the_limit_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="16384 byte limit"):
        render(BROKER, pool="p" * 20000)


def test_boot_commands_write_files_under_the_sandbox(tmp_path, worker_bundle):
    commands = boot_commands(render(BROKER, pool="p1", keys=worker_bundle[1]), str(tmp_path))
    assert commands == [[str(tmp_path) + "/usr/local/sbin/zfalkon-boot"]]
    assert (tmp_path / "etc/zfalkon/worker.json").stat().st_mode & 0o777 == 0o600
    assert os.access(tmp_path / "usr/local/sbin/zfalkon-boot", os.X_OK)
    assert (tmp_path / "etc/zfalkon/keys/pool1.key_secret").exists()
    proc = subprocess.run(["bash", "-n", commands[0][0]], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# -- the policy, against a fake provisioner --------------------------------------------


class FakeProvisioner:
    pool = "fake"

    def __init__(self, fail_launches: bool = False) -> None:
        self.live: dict[str, Instance] = {}
        self.n = 0
        self.fail_launches = fail_launches
        self.terminated: list[str] = []

    def launch(self, n: int) -> list[Instance]:
        if self.fail_launches:
            raise ProvisionError("InsufficientInstanceCapacity")
        out = []
        for _ in range(n):
            self.n += 1
            inst = Instance(f"i-{self.n}", "running", f"i-{self.n}", self.now)
            self.live[inst.id] = inst
            out.append(inst)
        return out

    def terminate(self, ids: list[str]) -> None:
        for i in ids:
            self.live.pop(i, None)
            self.terminated.append(i)

    def instances(self) -> list[Instance]:
        return list(self.live.values())


def status(queued: int, workers: dict[str, int] | None = None, slots: int = 2) -> dict:
    return {"queued": queued, "worker_list": [
        {"name": n, "slots": slots, "running": r, "draining": False}
        for n, r in (workers or {}).items()]}


def test_scale_out_in_steps_within_caps():
    prov = FakeProvisioner()
    prov.now = 0.0
    scaler = Scaler(prov, Policy(max_instances=5, slots_per_instance=2, step=2,
                                 max_launches_per_minute=3))
    assert scaler.step(status(100), now=0)["launched"] == 2  # a step, not 50
    assert scaler.step(status(100), now=1)["launched"] == 1  # 3 launches a minute
    assert scaler.step(status(100), now=2)["launched"] == 0
    prov.now = 61.0
    assert scaler.step(status(100), now=61)["launched"] == 2  # minute over; max 5 in all
    assert scaler.step(status(100), now=62)["launched"] == 0
    assert len(prov.live) == 5


def test_no_scale_out_when_capacity_covers_the_queue():
    prov = FakeProvisioner()
    prov.now = 0.0
    scaler = Scaler(prov, Policy(slots_per_instance=2))
    prov.launch(1)
    assert scaler.step(status(2), now=1)["launched"] == 0  # one booting instance: 2 slots
    assert scaler.step(status(3), now=2)["launched"] == 1


def test_boots_that_never_register_are_terminated_and_pause_scale_out():
    prov = FakeProvisioner()
    prov.now = 0.0
    scaler = Scaler(prov, Policy(boot_deadline=10, max_failures=2, step=1))
    scaler.step(status(10), now=0)  # launches i-1, which never registers
    did = scaler.step(status(10), now=11)
    assert did["expired"] == ["i-1"] and not did["paused"]
    prov.now = 11.0
    did = scaler.step(status(10), now=22)
    assert did["expired"] == ["i-2"] and "paused after 2 consecutive failures" in did["paused"]
    assert "did not register" in did["paused"]
    assert scaler.step(status(10), now=23)["launched"] == 0  # paused
    scaler.resume()
    assert scaler.step(status(10), now=24)["launched"] == 1


def test_repeated_launch_failures_pause_and_say_why():
    prov = FakeProvisioner(fail_launches=True)
    prov.now = 0.0
    scaler = Scaler(prov, Policy(max_failures=3))
    for t in range(3):
        did = scaler.step(status(10), now=t)
    assert "InsufficientInstanceCapacity" in did["paused"]
    prov.fail_launches = False
    assert scaler.step(status(10), now=5)["launched"] == 0  # stays paused


def test_a_registered_worker_missing_for_a_while_is_not_a_failed_boot():
    """A broker restart: STATUS lists no workers for a moment. Instances that registered
    before must not be terminated as failed boots, nor pause scale-out."""
    prov = FakeProvisioner()
    prov.now = 0.0
    scaler = Scaler(prov, Policy(boot_deadline=10, max_failures=1, idle_seconds=1000))
    prov.launch(2)
    scaler.step(status(0, {"i-1": 1, "i-2": 1}), now=5)
    did = scaler.step(status(0, {}), now=100)  # nobody registered, long after launch
    assert did["expired"] == [] and did["terminated"] == [] and not did["paused"]
    assert len(prov.live) == 2


def test_an_instance_gone_before_registering_counts_as_a_failure():
    prov = FakeProvisioner()
    prov.now = 0.0
    scaler = Scaler(prov, Policy(max_failures=2, boot_deadline=100, slots_per_instance=5))
    assert scaler.step(status(5), now=0)["launched"] == 1  # i-1
    assert scaler.step(status(5), now=1)["launched"] == 0  # i-1 listed, booting
    prov.live.clear()  # its VM powered itself off (say, a version mismatch)
    assert scaler.step(status(5), now=2)["launched"] == 1  # i-2
    assert scaler.failures == 1
    scaler.step(status(5), now=3)  # i-2 listed, booting
    prov.live.clear()
    did = scaler.step(status(5), now=4)
    assert "went away without registering" in did["paused"]


def test_launched_but_not_yet_listed_instances_count_against_the_cap():
    prov = FakeProvisioner()
    prov.now = 0.0
    listed = prov.instances
    prov.instances = lambda: []  # the provider's listing lags
    scaler = Scaler(prov, Policy(max_instances=3, step=10, slots_per_instance=1))
    assert scaler.step(status(100), now=0)["launched"] == 3
    assert scaler.step(status(100), now=1)["launched"] == 0
    prov.instances = listed
    assert scaler.step(status(100), now=2)["launched"] == 0


def test_the_scaling_loop_survives_a_failing_step():
    class Flaky:
        calls = 0

        def step(self, status):
            Flaky.calls += 1
            raise RuntimeError("ThrottlingException")

    stop = threading.Event()
    with broker_process() as (_, address):
        loop = threading.Thread(target=run_scaler, args=(Flaky(), address),
                                kwargs=dict(interval=0.05, stop=stop))
        loop.start()
        wait_until(lambda: Flaky.calls >= 3, 30, message="steps after a failure")
        stop.set()
        loop.join(10)


def test_scale_in_after_idle_never_below_minimum():
    prov = FakeProvisioner()
    prov.now = 0.0
    scaler = Scaler(prov, Policy(min_instances=1, idle_seconds=30))
    prov.launch(3)
    busy = {"i-1": 1, "i-2": 1, "i-3": 1}
    scaler.step(status(0, busy), now=0)
    assert scaler.step(status(0, dict.fromkeys(busy, 0)), now=20)["terminated"] == []
    did = scaler.step(status(0, dict.fromkeys(busy, 0)), now=31)
    assert sorted(did["terminated"]) == ["i-1", "i-2"] and len(prov.live) == 1
    assert scaler.step(status(5, {"i-3": 0}), now=40)["terminated"] == []  # work queued


# -- the whole boot path on the simulated cloud ----------------------------------------


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture
def cloud(moto):
    ec2 = moto.client()
    meta = FakeMetadata()
    try:
        with SimCloud(ec2, meta, env=worker_env()) as sim:
            yield ec2, meta, sim
            assert sim.errors == []
    finally:
        sweep_all(ec2)
        meta.stop()


def image(ec2) -> str:
    return ec2.describe_images()["Images"][0]["ImageId"]


def live(ec2, pool: str) -> list[str]:
    return [i.id for i in EC2Provisioner(pool, ec2).instances()]


def test_queue_launches_instances_that_boot_run_tasks_drain_and_go(cloud):
    ec2, _, sim = cloud
    with broker_process() as (_, address):
        user_data = render(address, pool="e2e", slots=1, idle_seconds=600, register_deadline=60)
        prov = EC2Provisioner("e2e", ec2, ami=image(ec2), instance_type="t3.small",
                              user_data=user_data, spot=False)
        scaler = Scaler(prov, Policy(max_instances=2, slots_per_instance=1, step=2,
                                     idle_seconds=2, boot_deadline=60))
        stop = threading.Event()
        loop = threading.Thread(target=run_scaler, args=(scaler, address),
                                kwargs=dict(interval=0.3, stop=stop), daemon=True)
        loop.start()
        peak = 0
        try:
            with Executor(address) as ex:
                futures = [ex.submit(tasks.sleep_then, i, 0.2) for i in range(40)]
                deadline = time.monotonic() + 120
                while not all(f.done() for f in futures) and time.monotonic() < deadline:
                    peak = max(peak, ex.status()["workers"])
                    time.sleep(0.2)  # (poll interval: the condition is every future done)
                assert [f.result(timeout=1) for f in futures] == list(range(40))
                names = {w["name"] for w in ex.status()["worker_list"]}
            assert 1 <= scaler.launched <= 2 and peak <= 2  # within the cap
            assert names <= set(sim.booted)  # the workers are the booted instances
            # Idle: drained and terminated; the sandboxes exited.
            wait_until(lambda: not live(ec2, "e2e") and not sim.vms, 60,
                       message="idle instances terminated")
        finally:
            stop.set()
            loop.join(10)
    assert EC2Provisioner("e2e", ec2).sweep() == []
    tagged = ec2.describe_instances(Filters=[{"Name": "tag:" + POOL_TAG, "Values": ["e2e"]}])
    states = {i["State"]["Name"] for r in tagged["Reservations"] for i in r["Instances"]}
    assert states == {"terminated"}


def test_a_boot_that_never_registers_powers_itself_off(cloud):
    """Wrong broker address: the vm-agent gives up at the deadline and powers off (exit
    64); the simulated EC2 terminates the instance."""
    ec2, _, sim = cloud
    user_data = render("tcp://127.0.0.1:9", pool="dead", register_deadline=3)
    prov = EC2Provisioner("dead", ec2, ami=image(ec2), instance_type="t3.small",
                          user_data=user_data)
    (inst,) = prov.launch(1)
    wait_until(lambda: inst.id in sim.exits, 60, message="the instance powered off")
    assert sim.exits[inst.id] == 64, sim.console(inst.id)
    assert "did not register before the deadline" in sim.console(inst.id)
    wait_until(lambda: not live(ec2, "dead"), 30, message="terminated in EC2")


def test_spot_interruption_drains_and_the_tasks_finish_elsewhere(cloud, worker_bundle):
    """With keys: the worker bundle travels in the user-data and the VMs connect with it."""
    ec2, meta, sim = cloud
    key_dir, bundle = worker_bundle
    client = security.new_key(key_dir, "spot-client", "client")
    with broker_process("--keys", key_dir) as (_, address):
        user_data = render(address, pool="spot", slots=1, register_deadline=60, keys=bundle)
        prov = EC2Provisioner("spot", ec2, ami=image(ec2), instance_type="t3.small",
                              user_data=user_data, spot=True)
        (first,), (second,) = prov.launch(1), prov.launch(1)  # (moto: one spot per call)
        with Executor(address, keys=client) as ex:
            wait_until(lambda: ex.status()["workers"] == 2, 60, message="both registered")
            futures = [ex.submit(tasks.sleep_then, i, 0.3) for i in range(30)]

            def running_on_first() -> int:
                return sum(w["running"] for w in ex.status()["worker_list"]
                           if w["name"] == first.id)
            wait_until(lambda: running_on_first() >= 1, 30,
                       message="the first VM is running a task")  # interrupted mid-task
            meta.interrupt(first.id)
            wait_until(lambda: first.id in sim.exits, 60, message="interrupted VM powered off")
            assert [f.result(timeout=60) for f in futures] == list(range(30))
            assert "spot interruption notice" in sim.console(first.id)
            assert sim.exits[first.id] == 64
            workers = [w["name"] for w in ex.status()["worker_list"]]
            assert workers == [second.id]
        prov.sweep()


# -- the commands ----------------------------------------------------------------------


def zfalkon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zfalkon", "--log-level", "INFO", *args]


def aws_env(moto) -> dict:
    return {**child_env(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def test_ec2_up_status_down_and_sweep_commands(cloud, moto):
    """`zfalkon ec2 up` against moto: the queue brings up a VM that runs the tasks;
    `status` lists it; SIGTERM to `up` terminates the pool; `sweep` finds nothing left."""
    ec2, _, sim = cloud
    env = aws_env(moto)
    common = ["--region", "us-east-1", "--endpoint-url", moto.url]
    with broker_process() as (_, address):
        up = subprocess.Popen(zfalkon_cmd(
            "ec2", "up", "--pool", "cli", *common, "--broker", address, "--ami", image(ec2),
            "--max", "1", "--slots-per-instance", "1", "--interval", "0.3",
            "--boot-deadline", "60"), env=env, stderr=subprocess.PIPE, text=True)
        try:
            with Executor(address) as ex:
                futures = [ex.submit(tasks.add, i, 1) for i in range(20)]
                assert [f.result(timeout=90) for f in futures] == list(range(1, 21))
            listed = subprocess.run(zfalkon_cmd("ec2", "status", "--pool", "cli", *common),
                                    env=env, capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0 and " running" in listed.stdout, listed.stderr
            assert listed.stdout.split()[0] in sim.booted
        finally:
            up.send_signal(signal.SIGTERM)
            _, err = up.communicate(timeout=60)
        assert up.returncode == 0, err
        assert not live(ec2, "cli")
    swept = subprocess.run(zfalkon_cmd("ec2", "sweep", *common), env=env,
                           capture_output=True, text=True, timeout=60)
    assert swept.returncode == 0 and "terminated 0 zfalkon instances" in swept.stdout


def test_ec2_down_terminates_the_pool(cloud, moto):
    ec2, _, _ = cloud
    prov = EC2Provisioner("downpool", ec2, ami=image(ec2), instance_type="t3.small",
                          user_data=render("tcp://127.0.0.1:9", pool="downpool"))
    prov.launch(1)
    prov.launch(1)
    assert len(live(ec2, "downpool")) == 2
    down = subprocess.run(zfalkon_cmd("ec2", "down", "--pool", "downpool", "--region",
                                      "us-east-1", "--endpoint-url", moto.url),
                          env=aws_env(moto), capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "terminated 2 instances" in down.stdout, down.stderr
    assert not live(ec2, "downpool")
    with pytest.raises(ConfigError, match="needs an AMI"):
        EC2Provisioner("downpool", ec2).launch(1)  # a listing-only provisioner


def test_provision_local_follows_the_queue():
    with broker_process() as (_, address):
        proc = subprocess.Popen(zfalkon_cmd(
            "provision", "local", "--broker", address, "--max", "2", "--slots-per-instance",
            "1", "--idle-seconds", "1", "--interval", "0.3"), env=child_env())
        try:
            with Executor(address) as ex:
                assert ex.status()["workers"] == 0
                futures = [ex.submit(tasks.sleep_then, i, 0.05) for i in range(60)]
                assert [f.result(timeout=60) for f in futures] == list(range(60))
                wait_until(lambda: ex.status()["workers"] == 0, 30,
                           message="idle local workers scaled in")
        finally:
            stop_process(proc)
        assert proc.returncode == 0
