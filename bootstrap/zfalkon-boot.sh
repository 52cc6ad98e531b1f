#!/bin/bash
# First boot of a zfalkon worker VM: run once by cloud-init (runcmd) after write_files
# has put /etc/zfalkon/worker.json, the key bundle and the systemd unit in place.
#
# 1. install the pinned zfalkon unless the image (ami/) already has it;
# 2. hand the worker to systemd (zfalkon-worker.service runs `zfalkon vm-agent`, which
#    powers the VM off when it is idle, never registered, or got a spot notice).
#
# ZFALKON_ROOT: set only by the cloud simulation (zfalkon.provision.sim): every path is
# under that sandbox, nothing is installed, and the vm-agent runs in the foreground.
set -euo pipefail
ROOT="${ZFALKON_ROOT:-}"
CONF="$ROOT/etc/zfalkon/worker.json"
conf() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or "")' \
        "$CONF" "$1"
}
VERSION="$(conf zfalkon_version)"
WHEEL="$(conf wheel_url)"
chmod 700 "$ROOT/etc/zfalkon"
[ ! -d "$ROOT/etc/zfalkon/keys" ] || chmod 700 "$ROOT/etc/zfalkon/keys"

installed="$(zfalkon --version 2>/dev/null || true)"
if [ "$installed" != "zfalkon $VERSION" ]; then
    if [ -n "$ROOT" ]; then
        echo "zfalkon-boot: sandbox has '$installed', user-data wants $VERSION" >&2
        exit 1
    fi
    if ! python3 -m venv --help >/dev/null 2>&1; then
        apt-get update -q && apt-get install -y -q python3-venv
    fi
    python3 -m venv /opt/zfalkon
    if [ -n "$WHEEL" ]; then
        /opt/zfalkon/bin/pip install --quiet "zfalkon[aws] @ $WHEEL"
    else
        /opt/zfalkon/bin/pip install --quiet "zfalkon[aws]==$VERSION"
    fi
    ln -sf /opt/zfalkon/bin/zfalkon /usr/local/bin/zfalkon
fi

if [ -z "$ROOT" ] && command -v systemctl >/dev/null; then
    id zfalkon >/dev/null 2>&1 ||
        useradd --system --home-dir /var/lib/zfalkon --create-home --shell /usr/sbin/nologin zfalkon
    chown -R zfalkon: /etc/zfalkon
    systemctl daemon-reload
    systemctl enable --now zfalkon-worker.service
else
    exec zfalkon vm-agent --config /etc/zfalkon/worker.json
fi
