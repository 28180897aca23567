#!/usr/bin/env bash
# The same job as github-actions.yml for any CI system (or a workstation): run as root on
# Debian 12/13 (or in a privileged Debian container) from the repository's top directory.
#
# Environment: KILN_STAGING_TOKEN, KILN_PRODUCTION_TOKEN (token file contents) and
# KILN_STAGING_CA, KILN_PRODUCTION_CA (the cluster's CA directory without the root and
# intermediate keys, which builds never need:
#   tar -C secrets -cz --exclude=root-ca.key --exclude=intermediate-ca.key production.ca | base64 -w0
# ); existing secrets/* are used when unset. UBOOT (path to u-boot-rockchip.bin, optional),
# KILN_CACHE_DIR (keep it between runs: bases take ~12 minutes to build).
# Outputs in out/: <node>.img (+ .zst, .xz), <node>.img.bmap, SHA256SUMS, kiln-manifest.json.
set -euo pipefail

bash tools/setup-host.sh
umask 077
mkdir -p secrets
[ -n "${KILN_STAGING_TOKEN:-}" ] && printf '%s\n' "$KILN_STAGING_TOKEN" > secrets/staging.token
[ -n "${KILN_PRODUCTION_TOKEN:-}" ] && printf '%s\n' "$KILN_PRODUCTION_TOKEN" > secrets/production.token
[ -n "${KILN_STAGING_CA:-}" ] && printf '%s' "$KILN_STAGING_CA" | base64 -d | tar -xz -C secrets
[ -n "${KILN_PRODUCTION_CA:-}" ] && printf '%s' "$KILN_PRODUCTION_CA" | base64 -d | tar -xz -C secrets
umask 022

cargo build --release --locked
kiln=target/release/kiln
"$kiln" check
"$kiln" build --all --skip-missing --format zst --format xz ${UBOOT:+--artifact uboot="$UBOOT"}
(cd out && sha256sum --check --strict SHA256SUMS)
echo "images, bmaps, SHA256SUMS and kiln-manifest.json are in out/"
