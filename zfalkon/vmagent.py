"""``zfalkon vm-agent``: what runs on a cloud VM, around one worker, under systemd.

It starts ``zfalkon worker`` with the VM's configuration (``/etc/zfalkon/worker.json``,
written by the user-data in ``bootstrap/``) and then watches three things, once a second:

* **the registration deadline**: a worker that has not registered within
  ``register_deadline`` seconds (wrong broker address, refused key, no route) is stopped
  and the VM powers off, so a broken boot does not run up a bill;
* **idleness**: the worker itself drains and exits after ``idle_seconds`` without a task
  (``--idle-exit``), a safety net under the provisioner's own scale-in;
* **the spot interruption notice** (IMDSv2 ``spot/instance-action``, every 5 s): the
  worker is sent SIGTERM and drains (running tasks finish, prefetched ones go back to the
  broker) within the two minutes EC2 gives.

Whenever the worker exits, the VM's job is over: the agent exits with status 64, and the
systemd unit powers the machine off (``InstanceInitiatedShutdownBehavior=terminate`` makes
that a termination). ``$ZFALKON_ROOT`` (set by the cloud simulation) prefixes every path
in the configuration; ``$ZFALKON_IMDS`` overrides the metadata service address.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from zfalkon.constants import STOP_GRACE_SECONDS
from zfalkon.errors import ConfigError

log = logging.getLogger("zfalkon.vmagent")

POWEROFF_EXIT = 64  #: exit status that asks the systemd unit to power the VM off
IMDS = "http://169.254.169.254"
_SPOT_CHECK_SECONDS = 5.0
_DRAIN_SECONDS = 110.0  # of the 120 s a spot notice gives


class Metadata:
    """The EC2 instance metadata service, IMDSv2 (a session token on every request)."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self._token = ""
        self._token_expires = 0.0

    def _get_token(self) -> str:
        if time.monotonic() >= self._token_expires:
            request = urllib.request.Request(
                f"{self.base}/latest/api/token", method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
            with urllib.request.urlopen(request, timeout=2) as response:
                self._token = response.read().decode()
            self._token_expires = time.monotonic() + 21000
        return self._token

    def get(self, path: str) -> str | None:
        """The value at ``latest/meta-data/PATH``, or None if it is not there (404)."""
        request = urllib.request.Request(f"{self.base}/latest/meta-data/{path}",
                                         headers={"X-aws-ec2-metadata-token": self._get_token()})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def load_config(path: str) -> dict:
    """The VM's worker configuration (see ``bootstrap/``); paths under ``$ZFALKON_ROOT``."""
    root = os.environ.get("ZFALKON_ROOT", "")
    try:
        with open(root + path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the VM configuration {root + path}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("broker"), str):
        raise ConfigError(f"{root + path}: needs at least a \"broker\" address")
    config["root"] = root
    return config


def run_vm_agent(config_path: str) -> int:
    """Run the worker and watch it (see the module docstring); return the exit status."""
    config = load_config(config_path)
    root = config["root"]
    metadata = Metadata(os.environ.get("ZFALKON_IMDS") or config.get("imds") or IMDS)
    name = config.get("name")
    if not name:
        try:
            name = metadata.get("instance-id")
        except OSError as exc:
            log.warning("no instance metadata (%s); naming the worker after the host", exc)
    state_dir = root + config.get("state_dir", "/var/lib/zfalkon")
    os.makedirs(state_dir, exist_ok=True)
    ready = os.path.join(state_dir, "registered")
    if os.path.exists(ready):
        os.unlink(ready)
    cmd = [sys.executable, "-m", "zfalkon", "worker", "--broker", config["broker"],
           "--ready-file", ready, "--idle-exit", str(float(config.get("idle_seconds", 600)))]
    if name:
        cmd += ["--name", name]
    if config.get("slots"):
        cmd += ["--slots", str(int(config["slots"]))]
    if config.get("keys"):
        cmd += ["--keys", root + config["keys"]]
    worker = subprocess.Popen(cmd)
    stopping = False

    def on_signal(*_: object) -> None:  # systemd stopping us: pass it on, the worker drains
        nonlocal stopping
        stopping = True
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = time.monotonic() + float(config.get("register_deadline", 600))
    next_spot_check = 0.0
    reason = "the worker exited"
    while worker.poll() is None:
        time.sleep(1.0)
        now = time.monotonic()
        if not os.path.exists(ready) and now > deadline:
            reason = "the worker did not register before the deadline"
            log.error("%s; stopping it and powering off", reason)
            _stop(worker, STOP_GRACE_SECONDS)
            break
        if not stopping and now >= next_spot_check:
            next_spot_check = now + _SPOT_CHECK_SECONDS
            try:
                notice = metadata.get("spot/instance-action")
            except OSError:
                notice = None  # no metadata service: not a spot instance we can watch
            if notice:
                reason = f"spot interruption notice {notice}"
                log.warning("%s: draining the worker", reason)
                _stop(worker, _DRAIN_SECONDS)
                break
    if stopping:
        worker.wait()
        return 0  # systemd is stopping the VM, or an operator the unit: no power-off
    log.warning("%s (status %s): this VM is done, powering off", reason, worker.returncode)
    return POWEROFF_EXIT


def _stop(worker: subprocess.Popen, grace: float) -> None:
    """SIGTERM (the worker drains), then SIGKILL after ``grace`` seconds."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(grace)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
