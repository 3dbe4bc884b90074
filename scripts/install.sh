#!/usr/bin/env bash
# Install what hvlab needs on a fresh Debian 12 / Ubuntu machine, then hvlab itself (editable).
# Idempotent: a second run only checks.  Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    qemu-system-x86     # the nested runner (L1 VM under TCG with nested SVM)
    busybox-static      # the guest's userland in every initramfs
    cpio zstd xz-utils  # unpacking kernel modules
    debootstrap         # the QEMU 11 root for vfio-user interop
    iproute2 ethtool    # copied into guests for inspection; network namespaces on the host
    acpica-tools        # iasl, to check the generated ACPI tables in tests
    binutils            # as/objcopy, only to rebuild the probe guest (its bytes are committed)
    gcc libc6-dev       # gcc -static builds the guest's hvlab-udp flow tool (hvlab/guest/files/udpflow.c)
)

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
    [ "$p" = "#" ] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    sudo_ apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check -e '.[test,netns]' 2>&1 | grep -v -E '^(WARNING|DEPRECATION)' || true
"$PY" -c 'import hvlab, construct, scapy' || { echo "install.sh: hvlab did not install" >&2; exit 1; }
echo "install.sh: hvlab installed ($("$PY" -m hvlab --version))"
# QEMU 11 (trixie-backports) in a debootstrapped root under the cache: the qemu room's vfio-user-pci and,
# multi-threaded, the nested runner's L1 (Debian 12's QEMU 7.2 is only the fallback).  Once, ~30 s.
sudo_ env "PATH=$PATH" HOME="$HOME" "$PY" -m hvlab qemu --prepare
