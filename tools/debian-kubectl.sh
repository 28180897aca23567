#!/usr/bin/env bash
# Unpacks Debian's kubectl (package kubernetes-client, bookworm: 1.20) into DEST, for the test
# that checks `kiln kubeconfig` with it. Unpacked, not installed: another package may own
# /usr/bin/kubectl (this machine has a cloud SDK's), and the test must run Debian's. Uses apt
# with a private configuration (this machine's apt state is untouched), the Debian mirror this
# machine's apt uses (tools/debian-mirror.sh) and the Debian archive keyring. Idempotent: a DEST
# holding the binary (its `done` file) is left alone.
#
# usage: debian-kubectl.sh DEST      prints the path of kubectl on stdout
set -euo pipefail
dest=${1:?usage: debian-kubectl.sh DEST}
here=$(dirname "$0")
if [ -f "$dest/done" ]; then
    echo "$dest/usr/bin/kubectl"
    exit 0
fi
host_suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
mirror=$(bash "$here/debian-mirror.sh" "$host_suite")
arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$dest"
touch "$work/status"
echo "deb [arch=$arch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main" \
    >"$work/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State=$work/state" -o "Dir::Cache=$work/cache" -o "Dir::State::status=$work/status"
    -o "APT::Architecture=$arch" -o "APT::Architectures::=$arch" -o Acquire::Languages=none
    -o APT::Sandbox::User=root
)
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$work" && apt-get "${apt_opts[@]}" -qq download kubernetes-client >&2)
dpkg-deb -x "$work"/kubernetes-client_*.deb "$dest"
"$dest/usr/bin/kubectl" version --client >&2
dpkg-deb -f "$work"/kubernetes-client_*.deb Version >"$dest/done"
echo "$dest/usr/bin/kubectl"
