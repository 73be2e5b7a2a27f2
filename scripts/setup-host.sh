#!/usr/bin/env bash
# Installs what the demo and the tests need on a Debian/Ubuntu host and starts libvirtd.
# Idempotent: a second run changes nothing and takes about a second.
set -euo pipefail

cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86
          qemu-utils pkg-config gcc python3-dev python3-pip util-linux ca-certificates curl)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd resolves its compiled-in default user and group before it reads qemu.conf, so they must
# exist even though we override them (Debian creates them in libvirt-daemon-system, which we skip).
getent group kvm >/dev/null || $SUDO groupadd --system kvm
getent group libvirt-qemu >/dev/null || $SUDO groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || $SUDO useradd --system --no-create-home \
  --home-dir /var/lib/libvirt --shell /usr/sbin/nologin --gid kvm libvirt-qemu

# Guests of the demo and the tests run as root without a security driver: the host has no
# libvirt-qemu-owned image directory and may lack AppArmor/SELinux altogether.
QEMU_CONF=/etc/libvirt/qemu.conf
if ! grep -q '^# durable-rebuild' "$QEMU_CONF" 2>/dev/null; then
  printf '%s\n' '# durable-rebuild: guests run as root without a security driver' \
    'user = "root"' 'group = "root"' 'security_driver = "none"' | $SUDO tee -a "$QEMU_CONF" >/dev/null
  $SUDO pkill -x libvirtd 2>/dev/null || true
  sleep 0.5
fi

$SUDO mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/qemu
if ! pgrep -x virtlogd >/dev/null; then $SUDO virtlogd -d; fi
if ! pgrep -x libvirtd >/dev/null; then $SUDO libvirtd -d; fi
for _ in $(seq 1 50); do
  if $SUDO virsh -c qemu:///system version >/dev/null 2>&1; then break; fi
  sleep 0.2
done
if ! $SUDO virsh -c qemu:///system version >/dev/null 2>&1; then
  echo "setup: libvirtd did not answer on qemu:///system" >&2
  exit 1
fi

if ! command -v uv >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/uv" ]; then
  echo "setup: installing uv"
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv \
    || python3 -m pip install --quiet --break-system-packages uv
fi
UV=$(command -v uv || echo "$HOME/.local/bin/uv")
"$UV" sync --quiet --frozen
