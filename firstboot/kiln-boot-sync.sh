#!/bin/sh
# kiln-boot-sync: puts the newest installed kernel (and the one before it, the way back) on
# the boot partition and points the boot configuration at it. Installed by kiln; run by
# Debian's kernel hooks (/etc/kernel/post{inst,rm}.d) and initramfs-tools' post-update hook,
# or by hand. POSIX sh (dash), idempotent.
#
# Layout on the boot partition: one directory per kernel, k/<version>-<hash>/, holding the
# kernel, its initramfs and device trees under the names the board's boot path reads (and,
# for the Raspberry Pi firmware, cmdline.txt). A directory is written under a temporary name
# and renamed when complete, and its name changes with its content, so a directory the
# configuration names is never rewritten in place. The configuration (extlinux.conf,
# config.txt, or systemd-boot's loader/entries/kiln*.conf) is written to a temporary file and renamed: the one step that switches kernels.
# Directories no configuration names are removed last. The files the image was built with
# (at the partition's root) are never touched: the firmware falls back to them.
#
# Board data comes from /etc/kiln/boot.env (written by kiln from the board profile); this
# script knows no board.
set -eu

ROOT=${KILN_ROOT:-}
. "$ROOT/etc/kiln/boot.env"
BOOT=${KILN_BOOT_DIR_OVERRIDE:-$KILN_BOOT_DIR}

say() { echo "kiln-boot-sync: $*" >&2; }
die() { say "$*; the boot configuration was left as it was"; exit 1; }

# Mounted from /etc/fstab at boot (nofail: a slow or missing device does not stop the boot);
# try once more here before giving up.
if [ -z "${KILN_BOOT_DIR_OVERRIDE:-}" ] && ! mountpoint -q "$BOOT"; then
    mount "$BOOT" 2>/dev/null || true
    mountpoint -q "$BOOT" || die "$BOOT is not mounted (it should be, from /etc/fstab)"
fi

# Installed kernels with an initramfs, newest first (only those can boot).
versions=$(
    for k in "$ROOT"/boot/vmlinuz-*; do
        [ -f "$k" ] || continue
        v=${k##*/vmlinuz-}
        [ -f "$ROOT/boot/initrd.img-$v" ] && echo "$v"
    done | sort -V -r | head -n 2
)
[ -n "$versions" ] || die "no kernel in $ROOT/boot has an initramfs"

# The directory of the kernel's device trees (Debian's two places).
dtb_dir() {
    if [ -d "$ROOT/usr/lib/linux-image-$1" ]; then
        echo "$ROOT/usr/lib/linux-image-$1"
    else
        echo "$ROOT/usr/lib/modules/$1/dtb"
    fi
}

# Whether this run changed the boot partition (only then is the result reported).
changed=0

# Writes k/$2/ for version $1. Every step is checked by hand: `set -e` does not apply inside
# a function called from `if`.
stage() {
    v=$1
    tmp="$BOOT/k/.tmp-$2"
    rm -rf "$tmp" && mkdir -p "$tmp" || return 1
    cp "$ROOT/boot/vmlinuz-$v" "$tmp/$KILN_KERNEL_FILE" || return 1
    cp "$ROOT/boot/initrd.img-$v" "$tmp/$KILN_INITRD_FILE" || return 1
    src=$(dtb_dir "$v")
    for c in $KILN_DTB_COPIES; do
        from=${c%%:*}
        rest=${c#*:}
        to=${rest%%:*}
        need=${rest#*:}
        if [ -e "$src/$from" ]; then
            mkdir -p "$tmp/$(dirname "$to")" || return 1
            cp -R "$src/$from" "$tmp/$to" || return 1
        elif [ "$need" = required ]; then
            say "kernel $v has no device tree $from (in $src)"
            return 1
        fi
    done
    if [ "$KILN_BOOT_STYLE" = rpi-firmware ]; then
        echo "$KILN_CMDLINE" >"$tmp/cmdline.txt" || return 1
        # The firmware reads overlays from the prefix only when README exists there.
        if [ -d "$tmp/overlays" ]; then
            : >"$tmp/overlays/README" || return 1
        fi
    fi
    sync
    : >"$tmp/.complete" || return 1
    sync
    mv "$tmp" "$BOOT/k/$2" || return 1
    say "staged kernel $v in k/$2"
}

# Each kernel's directory is named after its version and content: k/<version>-<hash>.
ids=""
for v in $versions; do
    sum=$(cat "$ROOT/boot/vmlinuz-$v" "$ROOT/boot/initrd.img-$v" | sha256sum | cut -c1-12) ||
        die "reading kernel $v failed"
    id="$v-$sum"
    if [ ! -f "$BOOT/k/$id/.complete" ]; then
        if ! stage "$v" "$id"; then
            rm -rf "$BOOT"/k/.tmp-*
            die "copying kernel $v to $BOOT failed"
        fi
        changed=1
    fi
    ids="$ids $id"
done
set -- $ids
new=$1
prev=${2:-}

# Moves $1.kiln-tmp (just written) over $1, unless $1 says the same already.
commit() {
    tmp="$1.kiln-tmp"
    if [ -f "$1" ] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 0
    fi
    sync
    mv "$tmp" "$1"
    sync
    say "wrote $1"
    changed=1
}

label() { # id name
    v=${1%-*}
    printf 'label %s\n' "$2"
    printf '    menu label %s (%s, kernel %s)\n' "$KILN_NODE" "$KILN_BOARD" "$v"
    printf '    kernel /k/%s/%s\n' "$1" "$KILN_KERNEL_FILE"
    printf '    initrd /k/%s/%s\n' "$1" "$KILN_INITRD_FILE"
    printf '    fdtdir /k/%s/%s\n' "$1" "${KILN_FDTDIR#/}"
    printf '    append %s\n' "$KILN_CMDLINE"
}

bls() { # id title-suffix
    v=${1%-*}
    printf '# Written by kiln-boot-sync for %s.\n' "$KILN_NODE"
    printf 'title %s (%s, kernel %s)%s\n' "$KILN_NODE" "$KILN_BOARD" "$v" "$2"
    printf 'version %s\n' "$v"
    printf 'linux /k/%s/%s\n' "$1" "$KILN_KERNEL_FILE"
    printf 'initrd /k/%s/%s\n' "$1" "$KILN_INITRD_FILE"
    printf 'options %s\n' "$KILN_CMDLINE"
}

case $KILN_BOOT_STYLE in
systemd-boot)
    # Boot Loader Specification entries; loader/loader.conf (from the image) names kiln.conf
    # the default, and the previous kernel is one menu entry down.
    mkdir -p "$BOOT/loader/entries" || die "writing $BOOT/loader failed"
    bls "$new" "" >"$BOOT/loader/entries/kiln.conf.kiln-tmp" || die "writing $BOOT/loader failed"
    commit "$BOOT/loader/entries/kiln.conf"
    if [ -n "$prev" ]; then
        bls "$prev" " - previous" >"$BOOT/loader/entries/kiln-previous.conf.kiln-tmp" ||
            die "writing $BOOT/loader failed"
        commit "$BOOT/loader/entries/kiln-previous.conf"
    elif [ -e "$BOOT/loader/entries/kiln-previous.conf" ]; then
        rm -f "$BOOT/loader/entries/kiln-previous.conf"
        changed=1
    fi
    ;;
extlinux)
    mkdir -p "$BOOT/extlinux"
    {
        printf '# Written by kiln-boot-sync for %s: the newest kernel first, then the one\n' "$KILN_NODE"
        printf '# before it (U-Boot tries the next label when one fails to load).\n'
        printf 'default kiln\nmenu title kiln: %s\ntimeout 10\n\n' "$KILN_NODE"
        label "$new" kiln
        if [ -n "$prev" ]; then
            echo
            label "$prev" kiln-previous
        fi
    } >"$BOOT/extlinux/extlinux.conf.kiln-tmp" || die "writing $BOOT/extlinux failed"
    commit "$BOOT/extlinux/extlinux.conf"
    ;;
rpi-firmware)
    # The kernel, initramfs, cmdline.txt and device trees are read under os_prefix; if the
    # firmware does not find them there, it ignores the prefix and boots the image's own.
    { cat "$ROOT/etc/kiln/boot/config.txt" && printf 'os_prefix=k/%s/\n' "$new"; } \
        >"$BOOT/config.txt.kiln-tmp" || die "writing $BOOT/config.txt failed"
    commit "$BOOT/config.txt"
    # The way back, one copy away: cp config-previous.txt config.txt (on the node, or on any
    # machine the card or disk is put in).
    if [ -n "$prev" ]; then
        { cat "$ROOT/etc/kiln/boot/config.txt" && printf 'os_prefix=k/%s/\n' "$prev"; } \
            >"$BOOT/config-previous.txt.kiln-tmp" || die "writing $BOOT failed"
        commit "$BOOT/config-previous.txt"
    elif [ -e "$BOOT/config-previous.txt" ]; then
        rm -f "$BOOT/config-previous.txt"
        changed=1
    fi
    ;;
*)
    die "unknown boot style $KILN_BOOT_STYLE in $ROOT/etc/kiln/boot.env"
    ;;
esac

# What no configuration names any more.
for d in "$BOOT"/k/* "$BOOT"/k/.tmp-*; do
    [ -e "$d" ] || continue
    name=${d##*/}
    case " $ids " in
    *" $name "*) ;;
    *)
        rm -rf "$d"
        say "removed k/$name"
        changed=1
        ;;
    esac
done
sync
if [ "$changed" = 1 ]; then
    say "booting kernel ${new%-*}${prev:+ (previous: ${prev%-*})}"
fi
