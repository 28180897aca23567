#!/usr/bin/env bash
# Installs the system packages kiln and its tests need (Debian 12 or 13).
# As root it installs them; otherwise it prints the exact commands and exits non-zero.
set -euo pipefail

# mke2fs must read a tarball (-d with tar input: e2fsprogs >= 1.47.1). Debian 12 has 1.47.0,
# bookworm-backports has 1.47.2.
PACKAGES=(e2fsprogs libarchive13 gdisk fdisk dosfstools mtools zstd xz-utils)

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
mke2fs_ok() {
    command -v mke2fs >/dev/null || return 1
    v=$(mke2fs -V 2>&1 | awk 'NR==1{print $2}')
    [ "$(printf '%s\n' 1.47.1 "$v" | sort -V | head -n1)" = 1.47.1 ]
}
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
need_backports=0
if [ "$codename" = bookworm ] && ! mke2fs_ok; then
    need_backports=1
fi
if [ ${#missing[@]} -eq 0 ] && [ $need_backports -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "kiln needs system packages. Run as root:" >&2
    if [ $need_backports -eq 1 ]; then
        echo "  add the bookworm-backports suite to your apt sources (same mirror as bookworm), then" >&2
        echo "  apt-get update && apt-get install -y -t bookworm-backports e2fsprogs" >&2
    fi
    echo "  apt-get update && apt-get install -y ${PACKAGES[*]}" >&2
    exit 1
fi

if [ $need_backports -eq 1 ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Same mirror as the system's own bookworm sources.
    uri=$(grep -rhoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep -v -e security -e '^\[' | head -n1 || true)
    if [ -z "$uri" ]; then
        echo "cannot find the Debian mirror in /etc/apt; add bookworm-backports by hand" >&2
        exit 1
    fi
    echo "deb $uri bookworm-backports main" > /etc/apt/sources.list.d/kiln-backports.list
fi
apt-get update
if [ $need_backports -eq 1 ]; then
    apt-get install -y -t bookworm-backports e2fsprogs
fi
apt-get install -y "${PACKAGES[@]}"
mke2fs_ok || { echo "mke2fs is still older than 1.47.1" >&2; exit 1; }
