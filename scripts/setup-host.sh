#!/usr/bin/env bash
# Installs what the demo and the tests need on a Debian/Ubuntu host and makes sure a libvirt daemon
# answers on qemu:///system. Idempotent: a second run changes nothing and takes about a second.
#
# The host is the operator's: the distribution's packages with their defaults (QEMU runs as its
# unprivileged user under its security driver), qemu.conf is never edited, and a running libvirt
# daemon is used as it is, never killed or restarted. The only fix-up is the one udev makes on a
# real host and containers lack: /dev/kvm usable by the kvm group.
set -euo pipefail

cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86
          qemu-utils pkg-config gcc python3-dev python3-pip util-linux ca-certificates curl
          mmdebstrap extlinux e2fsprogs xfsprogs parted
          ceph-mon ceph-mgr ceph-osd ceph-common qemu-block-extra)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# What udev's rules do on a real host (60-kvm / 50-udev-default): /dev/kvm belongs to the kvm group.
# Without it QEMU, as the distribution's unprivileged user, cannot use KVM and libvirt re-probes QEMU
# on every define. Only a device still root:root is touched.
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G /dev/kvm)" = root ]; then
  echo "setup: /dev/kvm is root-only (no udev here): giving it to the kvm group, as udev would"
  $SUDO chgrp kvm /dev/kvm
  $SUDO chmod 660 /dev/kvm
fi

libvirt_answers() { $SUDO virsh -c qemu:///system version >/dev/null 2>&1; }

if ! libvirt_answers; then
  if pgrep -x libvirtd >/dev/null || pgrep -x virtqemud >/dev/null; then
    echo "setup: a libvirt daemon runs; waiting for it to answer"
  elif [ -d /run/systemd/system ]; then
    # systemd decides monolithic or modular daemons from the units the distribution installed.
    if systemctl list-unit-files virtqemud.socket >/dev/null 2>&1 \
        && systemctl is-enabled virtqemud.socket >/dev/null 2>&1; then
      $SUDO systemctl start virtqemud.socket virtlogd.socket
    else
      $SUDO systemctl start libvirtd.service
    fi
  else
    # No init system to ask (a container): start the daemons the packages ship, with their defaults.
    echo "setup: starting virtlogd and libvirtd (no systemd here)"
    $SUDO mkdir -p /run/libvirt
    pgrep -x virtlogd >/dev/null || $SUDO virtlogd -d
    $SUDO libvirtd -d
  fi
  for _ in $(seq 1 100); do
    if libvirt_answers; then break; fi
    sleep 0.2
  done
fi
if ! libvirt_answers; then
  echo "setup: no libvirt daemon answers on qemu:///system (see journalctl -u libvirtd or virtqemud)" >&2
  exit 1
fi
# A daemon started by systemd's socket also needs virtlogd for QEMU's logs.
if ! pgrep -x virtlogd >/dev/null; then
  if [ -d /run/systemd/system ]; then $SUDO systemctl start virtlogd.socket; else $SUDO virtlogd -d; fi
fi

if ! command -v uv >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/uv" ]; then
  echo "setup: installing uv"
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv \
    || python3 -m pip install --quiet --break-system-packages uv
fi
UV=$(command -v uv || echo "$HOME/.local/bin/uv")
# Bytecode compiled once here: where PYTHONDONTWRITEBYTECODE is set (CI images often set it), every
# start would compile the whole import graph again, and the worker's start to first poll took 3-4 s.
"$UV" sync --quiet --frozen --compile-bytecode
.venv/bin/python -m compileall -q workflows activities starter common worker.py >/dev/null
