"""Render a worker VM's user-data: a cloud-config that writes the worker's configuration,
its key bundle and the systemd unit, then runs ``bootstrap/zfalkon-boot.sh``.

The files come from ``bootstrap/`` (installed as the package ``zfalkon_bootstrap``). The
result must stay under EC2's 16 KB user-data limit and pass ``cloud-init schema``
(both checked by tests/test_provision.py).
"""

from __future__ import annotations

import json
import os
from importlib import resources

from zfalkon._version import __version__
from zfalkon.errors import ConfigError

USER_DATA_LIMIT = 16 * 1024  #: EC2's limit on user-data, before base64
CONFIG_PATH = "/etc/zfalkon/worker.json"
KEYS_PATH = "/etc/zfalkon/keys"
BOOT_PATH = "/usr/local/sbin/zfalkon-boot"
UNIT_PATH = "/etc/systemd/system/zfalkon-worker.service"


def bootstrap_file(name: str) -> str:
    """The text of one file in ``bootstrap/``."""
    return resources.files("zfalkon_bootstrap").joinpath(name).read_text()


def _block(text: str) -> str:
    """A YAML literal block (``|``) at the indentation of a write_files ``content``."""
    return "|\n" + "".join(f"      {line}\n" if line else "\n" for line in text.splitlines())


def render(broker: str, *, pool: str, keys: str | None = None, slots: int = 0,
           idle_seconds: float = 600.0, register_deadline: float = 600.0,
           version: str = __version__, wheel_url: str = "") -> str:
    """The cloud-config for a worker of ``pool`` that connects to ``broker``.

    ``keys``: a worker key bundle directory (``zfalkon keys new NAME --role worker``); its
    files travel inside the user-data (see README, "Getting worker keys onto VMs").
    ``slots`` 0 means one per core.
    """
    config = {"broker": broker, "pool": pool, "slots": slots, "idle_seconds": idle_seconds,
              "register_deadline": register_deadline, "zfalkon_version": version,
              "wheel_url": wheel_url, "keys": KEYS_PATH if keys else None}
    files = [(CONFIG_PATH, "0600", json.dumps(config, indent=1))]
    if keys:
        from zfalkon.security import PeerKeys

        bundle = PeerKeys(keys)  # refuses a bundle with loose permissions
        for name in sorted(os.listdir(keys)):
            if name == "broker.key" or name == f"{bundle.name}.key_secret":
                with open(os.path.join(keys, name)) as f:
                    files.append((f"{KEYS_PATH}/{name}", "0600", f.read()))
    files.append((UNIT_PATH, "0644", bootstrap_file("zfalkon-worker.service")))
    files.append((BOOT_PATH, "0755", bootstrap_file("zfalkon-boot.sh")))
    out = [f"#cloud-config\n# zfalkon {version} worker of pool {pool}; "
           "rendered by zfalkon.provision.userdata\nwrite_files:\n"]
    for path, mode, content in files:
        out.append(f"  - path: {path}\n    permissions: '{mode}'\n    content: {_block(content)}")
    out.append(f"runcmd:\n  - [{BOOT_PATH}]\n")
    text = "".join(out)
    if len(text.encode()) > USER_DATA_LIMIT:
        raise ConfigError(f"user-data is {len(text.encode())} bytes, over EC2's "
                          f"{USER_DATA_LIMIT} byte limit")
    return text
