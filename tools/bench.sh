#!/usr/bin/env bash
# make bench: kiln against genimage on the same base and layout (GPT, 512 MiB FAT32 boot,
# ext4 root), end to end from the base tarball to a finished raw image; kiln build --all
# against five single builds; peak RSS for the base and for a base twice its size.
# Runs are interleaved; the table shows medians and ratios. Prints numbers, asserts nothing.
#
# Needs root (genimage's input tree is the base extracted with its owners) and the cached
# rk1 base (`kiln base rk1`). ROUNDS=N changes the number of runs (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
KILN=$PWD/target/release/kiln
work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

cargo build --release --locked -q
base=$("$KILN" base rk1 | awk '{print $3}')
command -v genimage >/dev/null || { echo "genimage missing: apt-get install genimage" >&2; exit 1; }

# A workspace: the repository's inventory and boards, stand-in k3s files and loader (the
# benchmark measures image writing, not downloads).
mkdir -p "$work/ws"
cp -r kiln.toml boards overlays "$work/ws/"
( cd "$work/ws" && "$KILN" secrets init >/dev/null )
printf '#!/bin/sh\n# benchmark stand-in for k3s\n' > "$work/k3s"
head -c 1048576 /dev/zero > "$work/images.tar.zst"
# A stand-in loader: kiln checks the Rockchip idbloader magic `RKNS` at its start.
{ printf 'RKNS'; head -c 1048572 /dev/urandom; } > "$work/uboot.bin"
ART="--artifact uboot=$work/uboot.bin --artifact k3s=$work/k3s --artifact k3s-images=$work/images.tar.zst"
export work KILN base ART

# Peak RSS (KiB, the largest process) and wall seconds of a shell command, via GNU time.
measure() { # name shell-command
    local name=$1; shift
    /usr/bin/time -f "%e %M" -o "$work/t" bash -c "$*" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    read -r secs rss < "$work/t"
    echo "$name $secs $rss" >> "$work/results"
}

kiln_one() {
    rm -rf "$work/ws/out"
    # shellcheck disable=SC2086
    ( cd "$work/ws" && "$KILN" build rk1-1 --format raw --artifact "base=$1" $ART )
}

# genimage: extract the tarball (as genimage needs a directory), boot files into a FAT32
# vfat image, the tree into ext4 with mke2fs, both into a GPT disk.
genimage_one() {
    rm -rf "$work/g"; mkdir -p "$work/g/root" "$work/g/in" "$work/g/out" "$work/g/boot"
    zstd -dc "$base" | tar -x -C "$work/g/root" --numeric-owner
    k=$(ls "$work/g/root/boot/" | grep '^vmlinuz-' | head -n1)
    cp "$work/g/root/boot/$k" "$work/g/boot/vmlinuz"
    cp "$work/g/root/boot/initrd.img-${k#vmlinuz-}" "$work/g/boot/initrd.img"
    cat > "$work/g/genimage.cfg" <<EOF
image boot.vfat {
    vfat { extraargs = "-F 32" files = { "$work/g/boot/vmlinuz", "$work/g/boot/initrd.img" } }
    size = 512M
}
image root.ext4 {
    ext4 { use-mke2fs = true label = "rootfs" }
    size = 1200M
}
image disk.img {
    hdimage { partition-table-type = "gpt" }
    partition boot { image = "boot.vfat" offset = 16M bootable = true }
    partition root { image = "root.ext4" }
}
EOF
    genimage --config "$work/g/genimage.cfg" --rootpath "$work/g/root" \
        --tmppath "$work/g/tmp" --inputpath "$work/g/out" --outputpath "$work/g/out"
}

# kiln with its .xz (what the BMC takes), and the baseline it replaced: xz -6 (the preset kiln
# used before) on every core, over the same raw image.
kiln_xz() {
    rm -rf "$work/ws/out"
    # shellcheck disable=SC2086
    ( cd "$work/ws" && "$KILN" build rk1-1 --format xz --artifact "base=$base" $ART )
}
xz6_cli() { xz -6 -T0 -c "$work/one.img" > "$work/one.img.xz6"; }

# The physical floor of one image: read the base tarball once, write the image's data once
# (as one file of that many bytes), sync.
floor() {
    cat "$base" > /dev/null
    head -c "$data_bytes" /dev/zero > "$work/floor.bin"
    sync "$work/floor.bin"
    rm -f "$work/floor.bin"
}

export -f kiln_one genimage_one kiln_xz xz6_cli floor

# A base twice the size: the same tree again under /opt/copy.
double="$work/double.tar.zst"
rm -rf "$work/d"; mkdir -p "$work/d/opt/copy"
zstd -dc "$base" | tar -x -C "$work/d" --numeric-owner
zstd -dc "$base" | tar -x -C "$work/d/opt/copy" --numeric-owner
tar -C "$work/d" --numeric-owner -c . | zstd -q -T0 -o "$double"
rm -rf "$work/d"

: > "$work/results"
for r in $(seq "$ROUNDS"); do
    measure kiln kiln_one "$base"
    measure genimage genimage_one
    measure kiln-2x kiln_one "$double"
    rm -rf "$work/ws/out"
    measure kiln-all "cd $work/ws && $KILN build --all --format raw --artifact base=$base $ART"
    # Four nodes of one board on two workers: two nodes alone would hide a node's cost behind
    # the other worker.
    measure kiln-4-rk1 "cd $work/ws && rm -rf out && $KILN build rk1-1 rk1-2 rk1-3 rk1-4 --format raw --artifact base=$base $ART"
    measure kiln-5-singles "cd $work/ws && for n in pi5-staging rk1-1 rk1-2 rk1-3 rk1-4; do $KILN build \$n --format raw --artifact base=$base $ART; done"
    kiln_one "$base" >/dev/null 2>&1
    cp --sparse=always "$work/ws/out/rk1-1.img" "$work/one.img"
    data_bytes=$(( $(stat -c %b "$work/one.img") * 512 ))
    export data_bytes
    measure floor floor
    measure kiln-xz kiln_xz
    # xz -6 takes minutes: once is enough for a baseline.
    [ "$r" -gt 1 ] || measure xz6-cli xz6_cli
    echo "round $r done" >&2
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
med() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$work/results" | median; }
printf '\n%-16s %10s %14s\n' run "median s" "peak RSS MiB"
for n in kiln genimage kiln-2x kiln-all kiln-4-rk1 kiln-5-singles floor kiln-xz xz6-cli; do
    printf '%-16s %10.2f %14.1f\n' "$n" "$(med "$n" 2)" "$(echo "$(med "$n" 3) / 1024" | bc -l)"
done
printf '\nkiln / genimage (one image, tarball to raw): %.2f\n' "$(echo "$(med kiln 2) / $(med genimage 2)" | bc -l)"
printf 'kiln build --all / one kiln build: %.2f\n' "$(echo "$(med kiln-all 2) / $(med kiln 2)" | bc -l)"
printf 'four rk1 nodes / one: %.2f\n' "$(echo "$(med kiln-4-rk1 2) / $(med kiln 2)" | bc -l)"
printf 'a further rk1 node ((kiln-4-rk1 - kiln) / 3) / the first (kiln): %.2f\n' "$(echo "($(med kiln-4-rk1 2) - $(med kiln 2)) / 3 / $(med kiln 2)" | bc -l)"
printf 'kiln build --all / five single builds: %.2f\n' "$(echo "$(med kiln-all 2) / $(med kiln-5-singles 2)" | bc -l)"
printf 'peak RSS, base twice the size / base: %.2f\n' "$(echo "$(med kiln-2x 3) / $(med kiln 3)" | bc -l)"
xz_pass=$(echo "$(med kiln-xz 2) - $(med kiln 2)" | bc -l)
printf 'kiln / physical floor (read the base once, write the data once, sync): %.2f\n' "$(echo "$(med kiln 2) / $(med floor 2)" | bc -l)"
printf "kiln's .xz pass (kiln-xz - kiln, %.2f s) / the image build: %.2f\n" "$xz_pass" "$(echo "$xz_pass / $(med kiln 2)" | bc -l)"
printf "kiln's .xz pass / xz -6 -T0 on the same image (the preset before): %.2f\n" "$(echo "$xz_pass / $(med xz6-cli 2)" | bc -l)"

# What crosses the BMC: it writes every byte of the raw image and reads it back.
rm -rf "$work/ws/out"
measure kiln-all-xz "cd $work/ws && $KILN build --all --format xz --artifact base=$base $ART"
printf "\nkiln build --all --format xz: %.2f s; its .xz passes per node ((that - kiln-all) / 5): %.2f s, / one image build: %.2f\n" \
    "$(med kiln-all-xz 2)" "$(echo "($(med kiln-all-xz 2) - $(med kiln-all 2)) / 5" | bc -l)" \
    "$(echo "($(med kiln-all-xz 2) - $(med kiln-all 2)) / 5 / $(med kiln 2)" | bc -l)"
printf '\n%-14s %12s %12s %8s %12s %10s\n' node "apparent MB" "data MB" "BMC/data" ".xz MB" "BMC s @20MB/s"
for img in "$work"/ws/out/*.img; do
    n=$(basename "$img" .img)
    app=$(stat -c %s "$img"); dat=$(( $(stat -c %b "$img") * 512 )); xzs=$(stat -c %s "$img.xz")
    printf '%-14s %12.1f %12.1f %8.2f %12.1f %10.0f\n' "$n" "$(echo "$app/1000000" | bc -l)" \
        "$(echo "$dat/1000000" | bc -l)" "$(echo "$app/$dat" | bc -l)" "$(echo "$xzs/1000000" | bc -l)" \
        "$(echo "2*$app/20000000" | bc -l)"
done
printf '(%s rounds, %s, %s cores, %s)\n' "$ROUNDS" "$(uname -m)" "$(nproc)" "$(date -u +%Y-%m-%d)"
