#!/usr/bin/env bash
# Downloads the arm64 packages of a real second Debian kernel (trixie-backports'
# linux-image-arm64) into DEST, for the slow tier's kernel-update boot test, which installs
# them inside a booted RK1 image (trixie's own kernel is the first). Uses apt with a private
# configuration (this machine's apt state is untouched), the Debian mirror this machine's apt
# uses (tools/debian-mirror.sh) and the Debian archive keyring. Idempotent: a DEST holding a
# complete set (its `done` file) is left alone.
#
# usage: kernel-debs.sh DEST      prints the kernel version on stdout
set -euo pipefail
dest=${1:?usage: kernel-debs.sh DEST}
here=$(dirname "$0")
if [ -f "$dest/done" ]; then
    cat "$dest/done"
    exit 0
fi
host_suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
mirror=$(bash "$here/debian-mirror.sh" "$host_suite")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$dest"
touch "$work/status"
echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie-backports main" \
    >"$work/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State=$work/state" -o "Dir::Cache=$work/cache" -o "Dir::State::status=$work/status"
    -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Acquire::Languages=none
    -o APT::Sandbox::User=root
)
apt-get "${apt_opts[@]}" -qq update >&2
# linux-image-arm64 depends on linux-image-V (runs the kernel hooks), which depends on
# linux-binary-V (the kernel), linux-modules-V and linux-base-V (device trees), and
# pre-depends on a newer linux-base than trixie's.
pkg=$(apt-cache "${apt_opts[@]}" depends linux-image-arm64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
version=${pkg#linux-image-}
[ -n "$version" ] || { echo "no linux-image-V in trixie-backports' linux-image-arm64" >&2; exit 1; }
cd "$dest"
rm -f ./*.deb
apt-get "${apt_opts[@]}" -qq download "linux-image-$version" "linux-binary-$version" \
    "linux-modules-$version" "linux-base-$version" linux-base >&2
echo "$version" >done
echo "$version"
