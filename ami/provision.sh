#!/usr/bin/env bash
# Provision a zfalkon worker image (run by Packer as root on Debian 12).
#
# Env: ZFALKON_VERSION (required), ZFALKON_WHEEL_URL (optional: install this wheel
# instead of zfalkon==$ZFALKON_VERSION from PyPI).
# The unit is installed but neither enabled nor started: the instance's user-data writes
# /etc/zfalkon/worker.json and starts zfalkon-worker at boot.
set -euo pipefail

: "${ZFALKON_VERSION:?ZFALKON_VERSION must be set}"
ZFALKON_WHEEL_URL="${ZFALKON_WHEEL_URL:-}"
export DEBIAN_FRONTEND=noninteractive

apt-get update
apt-get install -y --no-install-recommends python3 python3-venv python3-pip

python3 -m venv /opt/zfalkon
/opt/zfalkon/bin/pip install --no-cache-dir --upgrade pip
if [[ -n "$ZFALKON_WHEEL_URL" ]]; then
    /opt/zfalkon/bin/pip install --no-cache-dir "zfalkon[aws] @ ${ZFALKON_WHEEL_URL}"
else
    /opt/zfalkon/bin/pip install --no-cache-dir "zfalkon[aws]==${ZFALKON_VERSION}"
fi
ln -sf /opt/zfalkon/bin/zfalkon /usr/local/bin/zfalkon
/usr/local/bin/zfalkon --version

if ! id -u zfalkon >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/zfalkon --create-home \
        --shell /usr/sbin/nologin zfalkon
fi

install -m 0644 -o root -g root /tmp/zfalkon-worker.service \
    /etc/systemd/system/zfalkon-worker.service
rm -f /tmp/zfalkon-worker.service
systemctl daemon-reload

apt-get clean
rm -rf /var/lib/apt/lists/*
