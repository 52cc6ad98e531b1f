"""Checks of the Packer template in ``ami/`` that need no AWS credentials and no network.

``packer validate`` (Debian's packer 1.6.6, amazon-ebs builder built in) parses the
template, evaluates variables and runs the builder's and provisioners' configuration checks
without contacting AWS.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMI_DIR = os.path.join(ROOT, "ami")
TEMPLATE = os.path.join(AMI_DIR, "zfalkon-worker.pkr.hcl")
UNIT = os.path.join(ROOT, "bootstrap", "zfalkon-worker.service")  # shared with user-data


def packer_validate(path: str, home: str) -> subprocess.CompletedProcess:
    packer = shutil.which("packer")
    if packer is None:
        pytest.fail("packer is not on PATH: install Debian's packer (apt-get install packer)")
    # No AWS variables are needed; a scratch HOME keeps any real ~/.aws out of it.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": home, "CHECKPOINT_DISABLE": "1"}
    return subprocess.run([packer, "validate", path], env=env, capture_output=True,
                          text=True, timeout=120)


def test_packer_validate(tmp_path):
    proc = packer_validate(AMI_DIR, str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_packer_validate_rejects_undefined_variable(tmp_path):
    with open(TEMPLATE) as f:
        text = f.read()
    assert "var.zfalkon_version" in text
    bad = tmp_path / "ami"
    bad.mkdir()
    shutil.copy(os.path.join(AMI_DIR, "provision.sh"), bad / "provision.sh")
    (tmp_path / "bootstrap").mkdir()
    shutil.copy(UNIT, tmp_path / "bootstrap" / "zfalkon-worker.service")
    (bad / "zfalkon-worker.pkr.hcl").write_text(
        text.replace("var.zfalkon_version", "var.no_such_variable"))
    proc = packer_validate(str(bad), str(tmp_path))
    assert proc.returncode != 0
    assert "no_such_variable" in proc.stdout + proc.stderr


def test_provision_script_syntax():
    proc = subprocess.run(["bash", "-n", os.path.join(AMI_DIR, "provision.sh")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    assert unit.read(UNIT) == [UNIT]
    service = unit["Service"]
    assert service["ExecStart"] == ("/usr/local/bin/zfalkon vm-agent "
                                    "--config /etc/zfalkon/worker.json")
    assert service["User"] == "zfalkon"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # (SIGTERM to the agent alone: its tasks finish)
    assert service["RestartPreventExitStatus"] == "64"  # the vm-agent's "power off"
    assert "systemctl poweroff" in service["ExecStopPost"]
    assert unit["Unit"]["Wants"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
