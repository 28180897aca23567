#!/usr/bin/env bash
# Installs the system packages kiln and its tests need (Debian 12 or 13), and registers the
# qemu-user binfmt handler that mmdebstrap needs to build arm64 bases on another architecture.
# As root it does it; otherwise it prints the exact commands and exits non-zero.
set -euo pipefail

# Image writing and the independent checkers.
PACKAGES=(e2fsprogs libarchive13 gdisk fdisk dosfstools mtools zstd xz-utils openssh-client dash bmap-tools curl python3 genimage time bc initramfs-tools-core device-tree-compiler openssl file)
# Building bases (mmdebstrap + qemu-user) and booting images (qemu-system, U-Boot for QEMU,
# a VDE switch for the multi-node boot tests).
EMU_PACKAGES=(mmdebstrap arch-test qemu-user-static binfmt-support qemu-system-arm qemu-system-x86 ovmf u-boot-qemu vde2)

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
mke2fs_ok() {
    # mke2fs must read a tarball (-d with tar input: e2fsprogs >= 1.47.1).
    command -v mke2fs >/dev/null || return 1
    v=$(mke2fs -V 2>&1 | awk 'NR==1{print $2}')
    [ "$(printf '%s\n' 1.47.1 "$v" | sort -V | head -n1)" = 1.47.1 ]
}
installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
binfmt_ok() {
    [ "$(uname -m)" = aarch64 ] && return 0
    [ -r /proc/sys/fs/binfmt_misc/qemu-aarch64 ] &&
        head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64 | grep -qx enabled
}

missing=()
for p in "${PACKAGES[@]}" "${EMU_PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
# On Debian 12, e2fsprogs, mmdebstrap and QEMU come from bookworm-backports: 1.47.0's mke2fs
# cannot read a tarball, and bookworm's QEMU conflicts with the backported qemu-utils that
# these machines carry.
use_backports=0
if [ "$codename" = bookworm ]; then
    use_backports=1
fi
if [ ${#missing[@]} -eq 0 ] && mke2fs_ok && binfmt_ok; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "kiln needs system packages and the qemu-aarch64 binfmt handler. Run as root:" >&2
    if [ $use_backports -eq 1 ]; then
        echo "  add the bookworm-backports suite to your apt sources (same mirror as bookworm), then" >&2
        echo "  apt-get update && apt-get install -y -t bookworm-backports e2fsprogs ${EMU_PACKAGES[*]}" >&2
    fi
    echo "  apt-get install -y ${PACKAGES[*]} ${EMU_PACKAGES[*]}" >&2
    echo "  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64" >&2
    exit 1
fi

if [ ${#missing[@]} -gt 0 ] || ! mke2fs_ok; then
    if [ $use_backports -eq 1 ] && ! bash "$(dirname "$0")/debian-mirror.sh" bookworm-backports >/dev/null 2>&1; then
        # The same mirror as the system's own bookworm entry (third-party sources ignored).
        uri=$(bash "$(dirname "$0")/debian-mirror.sh" bookworm) || {
            echo "cannot add bookworm-backports: see above" >&2
            exit 1
        }
        echo "deb $uri bookworm-backports main" > /etc/apt/sources.list.d/kiln-backports.list
    fi
    apt-get update
    if [ $use_backports -eq 1 ]; then
        apt-get install -y -t bookworm-backports e2fsprogs "${EMU_PACKAGES[@]}"
    else
        apt-get install -y "${EMU_PACKAGES[@]}"
    fi
    apt-get install -y "${PACKAGES[@]}"
fi
mke2fs_ok || { echo "mke2fs is still older than 1.47.1" >&2; exit 1; }

# binfmt_misc may be unmounted in a container; the handler may be unregistered.
if ! binfmt_ok; then
    [ -e /proc/sys/fs/binfmt_misc/register ] ||
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable qemu-aarch64 2>/dev/null ||
        cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi
binfmt_ok || { echo "the qemu-aarch64 binfmt handler is not enabled" >&2; exit 1; }
