"""A cloud on loopback that proves the boot path: moto's EC2 server plays EC2, and every
instance it reports running is "booted" by running its rendered user-data in a sandbox.

* :class:`MotoServer`: ``python -m moto.server`` on 127.0.0.1, started and stopped by PID.
* :class:`FakeMetadata`: an IMDSv2 service on 127.0.0.1 (token, ``instance-id``,
  ``spot/instance-action`` once :meth:`FakeMetadata.interrupt` is called), one path
  prefix per instance.
* :class:`SimCloud`: polls moto; for each new running instance it reads the user-data
  back from EC2 (``DescribeInstanceAttribute``), applies its cloud-config
  ``write_files`` under a sandbox directory and runs its ``runcmd`` with
  ``ZFALKON_ROOT`` set to the sandbox: the real ``bootstrap/zfalkon-boot.sh`` then
  starts the real ``zfalkon vm-agent``, whose worker connects to the real broker. An
  instance terminated in moto gets SIGTERM (EC2's ACPI shutdown: the worker drains);
  a sandbox that exits by itself (the vm-agent's power-off) is terminated in moto.

What is simulated, and so not proven here: systemd (the sandbox runs the vm-agent in the
foreground), the pip install of zfalkon (the sandbox uses this interpreter's), and the
real network between EC2 and the broker.

``python -m zfalkon.provision.sim [--port 5000]`` runs the three until Ctrl-C, to try
``zfalkon ec2 up --endpoint-url http://127.0.0.1:5000`` by hand (README, "Try it on a
simulated cloud"). It needs the ``sim`` extra (moto, boto3, PyYAML).
"""

from __future__ import annotations

import base64
import http.server
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

log = logging.getLogger("zfalkon.sim")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's server mode on 127.0.0.1 (AWS over real HTTP), as a child process."""

    def __init__(self, startup_timeout: float = 30.0, port: int = 0) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with status {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not answer within the timeout")

    def client(self, service: str = "ec2") -> Any:
        import boto3

        return boto3.client(service, region_name="us-east-1", endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "MotoServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeMetadata:
    """IMDSv2 on 127.0.0.1: ``/<instance-id>/latest/...`` answers for that instance."""

    TOKEN = "sim-token"

    def __init__(self) -> None:
        self.interrupted: set[str] = set()
        meta = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.endswith("/latest/api/token"):
                    self._reply(200, meta.TOKEN)
                else:
                    self._reply(404, "")

            def do_GET(self) -> None:  # noqa: N802
                if self.headers.get("X-aws-ec2-metadata-token") != meta.TOKEN:
                    self._reply(401, "")  # IMDSv2 only: no token, no answer
                    return
                instance, _, rest = self.path.lstrip("/").partition("/")
                if rest == "latest/meta-data/instance-id":
                    self._reply(200, instance)
                elif rest == "latest/meta-data/spot/instance-action" and \
                        instance in meta.interrupted:
                    self._reply(200, '{"action": "terminate", "time": "soon"}')
                else:
                    self._reply(404, "")

            def _reply(self, code: int, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def base(self, instance_id: str) -> str:
        return f"{self.url}/{instance_id}"

    def interrupt(self, instance_id: str) -> None:
        """From now on the instance sees a spot interruption notice."""
        self.interrupted.add(instance_id)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def boot_commands(user_data: str, sandbox: str) -> list[list[str]]:
    """Apply a cloud-config's ``write_files`` under ``sandbox``; return its ``runcmd``,
    with each absolute path the user-data wrote moved under the sandbox."""
    import yaml

    if not user_data.startswith("#cloud-config"):
        raise ValueError("the simulation boots cloud-config user-data only")
    config = yaml.safe_load(user_data)
    written = []
    for entry in config.get("write_files", []):
        path = sandbox + entry["path"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(entry.get("content", ""))
        os.chmod(path, int(entry.get("permissions", "0644"), 8))
        written.append(entry["path"])
    commands = []
    for cmd in config.get("runcmd", []):
        argv = cmd if isinstance(cmd, list) else ["sh", "-c", cmd]
        commands.append([sandbox + a if a in written else a for a in argv])
    return commands


class SimCloud:
    """Boots moto's running instances as sandboxed processes; see the module docstring."""

    def __init__(self, ec2: Any, metadata: FakeMetadata, *, poll: float = 0.3,
                 env: dict[str, str] | None = None) -> None:
        self.ec2 = ec2
        self.metadata = metadata
        self.poll = poll
        self.env = env or {}
        self.root = tempfile.mkdtemp(prefix="zfalkon-simcloud-")
        self.vms: dict[str, subprocess.Popen] = {}
        self.exits: dict[str, int] = {}  # instance id -> exit status of its sandbox
        self.booted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zfalkon-simcloud", daemon=True)
        self.errors: list[BaseException] = []

    def __enter__(self) -> "SimCloud":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self._sync()
            except Exception as exc:  # reported to the owner (tests) through .errors
                log.exception("simulated cloud failed")
                self.errors.append(exc)

    def _states(self) -> dict[str, str]:
        out = {}
        for page in self.ec2.get_paginator("describe_instances").paginate():
            for reservation in page["Reservations"]:
                for inst in reservation["Instances"]:
                    out[inst["InstanceId"]] = inst["State"]["Name"]
        return out

    def _sync(self) -> None:
        states = self._states()
        for iid, state in states.items():
            if state == "running" and iid not in self.vms and iid not in self.exits:
                self._boot(iid)
        for iid, proc in list(self.vms.items()):
            code = proc.poll()
            if code is not None:  # powered itself off: EC2 terminates it (shutdown behaviour)
                del self.vms[iid]
                self.exits[iid] = code
                if states.get(iid) in ("pending", "running"):
                    self.ec2.terminate_instances(InstanceIds=[iid])
            elif states.get(iid) not in ("pending", "running"):
                self._shutdown(iid, proc)  # terminated in EC2: ACPI shutdown, drain

    def _boot(self, iid: str) -> None:
        attr = self.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
        user_data = base64.b64decode(attr["UserData"].get("Value", "")).decode()
        sandbox = os.path.join(self.root, iid)
        os.makedirs(sandbox)
        commands = boot_commands(user_data, sandbox)
        env = {**os.environ, **self.env, "ZFALKON_ROOT": sandbox,
               "ZFALKON_IMDS": self.metadata.base(iid)}
        # One command (ours: the boot script, which execs the vm-agent) runs as the VM's
        # process itself, so that SIGTERM reaches the vm-agent; several run in a shell.
        argv = commands[0] if len(commands) == 1 else \
            ["sh", "-c", " && ".join(shlex.join(c) for c in commands)]
        log_file = open(os.path.join(sandbox, "console.log"), "wb")
        proc = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log_file.close()
        self.vms[iid] = proc
        self.booted.append(iid)
        log.info("booted %s (pid %d)", iid, proc.pid)

    def _shutdown(self, iid: str, proc: subprocess.Popen, grace: float = 30.0) -> None:
        proc.send_signal(signal.SIGTERM)  # the vm-agent passes it on; the worker drains
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the whole "VM"
            proc.wait()
        self.vms.pop(iid, None)
        self.exits[iid] = proc.returncode

    def console(self, iid: str) -> str:
        """What the instance's boot printed (its sandbox's console.log)."""
        try:
            with open(os.path.join(self.root, iid, "console.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        for iid, proc in list(self.vms.items()):
            self._shutdown(iid, proc, grace=10.0)
        shutil.rmtree(self.root, ignore_errors=True)


#: An image id moto's EC2 knows (the simulated instances boot this package, whatever
#: the image).
SIM_AMI = "ami-03cf127a"


def main(argv: list[str] | None = None) -> int:
    """``python -m zfalkon.provision.sim``: a simulated EC2 on 127.0.0.1 until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m zfalkon.provision.sim",
        description="A simulated EC2 on 127.0.0.1 (moto's server) that boots every "
                    "instance it runs as a local worker VM (a sandboxed process running "
                    "the real user-data), until Ctrl-C or SIGTERM; then the VMs are "
                    "stopped and moto with them.")
    parser.add_argument("--port", type=int, default=5000,
                        help="port of the EC2 endpoint (default: 5000; 0: any free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s zfalkon-sim %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = MotoServer(port=args.port)
    meta = FakeMetadata()
    try:
        ec2 = server.client()
        ami = SIM_AMI if any(True for _ in ec2.describe_images(ImageIds=[SIM_AMI])[
            "Images"]) else ec2.describe_images()["Images"][0]["ImageId"]
        with SimCloud(ec2, meta):
            print(f"simulated EC2 at {server.url} (region us-east-1; any credentials, "
                  f"e.g. AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing); an "
                  f"image to launch: --ami {ami}; Ctrl-C stops it", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                log.info("stopping the simulated VMs and moto")
    finally:
        meta.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
