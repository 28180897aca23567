#!/bin/sh
# kiln-install: the one-shot installer of `kiln flash NODE --install` (boards whose system drive
# the BMC cannot write, the RK1 on NVMe). U-Boot boots it from the installer partition of the
# eMMC with `init=/usr/lib/kiln/kiln-install`, the system's root mounted read-only from the
# eMMC, so nothing changes the bytes it copies and no service starts.
#
# It writes the system image to the NVMe drive: the system's own partition table (saved on
# the installer partition), the partitions copied from the eMMC, zeros in between. Then it
# reads the whole image back from the drive and compares its sha256 with the one kiln
# recorded (the same as SHA256SUMS lists for <node>.img). Only then does it erase the
# eMMC's partition table, which leaves the loader and nothing bootable, and reboot: U-Boot
# goes on to the NVMe drive. On any failure it leaves the eMMC as it is and powers off.
#
# Runs as PID 1: it must never exit (the kernel would panic), so every path ends in reboot
# or power-off.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

MNT=/run/kiln-install

log() { echo "kiln-install: $*"; }

# sysrq: no init system to ask. 'b' reboots at once, 'o' powers off (after sync).
finish() {
    sync
    echo "$1" > /proc/sysrq-trigger
    while :; do sleep 60; done
}

fail() {
    log "FAILED: $*"
    log "the eMMC is unchanged; powering off (power on again to retry)"
    finish o
}

# The initramfs moved /proc, /sys, /dev and /run here; mount what is missing.
[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/class ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
mountpoint -q /run || mount -t tmpfs -o mode=0755 tmpfs /run

# The installer partition: the GPT partition named kiln-install (no udev: read sysfs).
part=
for u in /sys/class/block/*/uevent; do
    if grep -qx 'PARTNAME=kiln-install' "$u"; then
        part=$(basename "$(dirname "$u")")
        break
    fi
done
[ -n "$part" ] || fail "no partition named kiln-install"
src=$(basename "$(readlink -f "/sys/class/block/$part/..")")
mkdir -p "$MNT"
mount -t vfat -o ro "/dev/$part" "$MNT" || fail "cannot mount /dev/$part"
# shellcheck disable=SC1091
. "$MNT/kiln/install.env" || fail "no kiln/install.env on /dev/$part"
log "installing $KILN_NODE's system ($KILN_SYSTEM_BYTES bytes, sha256 $KILN_SYSTEM_SHA256) from /dev/$src"

# The NVMe drive: the first NVMe namespace. Its driver may still be probing.
dst=
i=0
while [ $i -lt 60 ]; do
    # nvmeXn1 only: with NVMe multipath (Debian's kernel has it) sysfs also lists the hidden
    # per-controller path nvmeXcYn1, which has no /dev node and sorts first.
    for d in /sys/class/block/nvme*n1; do
        n=$(basename "$d")
        case $n in *c*) continue ;; esac
        if [ ! -e "$d/partition" ] && [ -b "/dev/$n" ]; then
            dst=$n
            break
        fi
    done
    [ -n "$dst" ] && break
    sleep 1
    i=$((i + 1))
done
[ -n "$dst" ] || fail "no NVMe drive found after 60 s"
[ "$dst" != "$src" ] || fail "the NVMe drive is the drive the installer runs from"
dev=/dev/$dst
size=$(blockdev --getsize64 "$dev") || fail "cannot read the size of $dev"
[ "$size" -ge "$KILN_SYSTEM_BYTES" ] ||
    fail "$dev holds $size bytes; the system image needs $KILN_SYSTEM_BYTES"

# Nothing is lost: an NVMe drive that holds anything is written only if kiln was told so.
rc=0
found=$(blkid -p -o export "$dev" 2>/dev/null) || rc=$?
if [ $rc -ne 2 ]; then
    if [ "$KILN_OVERWRITE" = 1 ]; then
        log "$dev is not empty ($(echo "$found" | tr '\n' ' ')); overwriting it (--overwrite-nvme)"
    else
        fail "$dev is not empty ($(echo "$found" | tr '\n' ' ')); expected an empty drive (kiln flash --install --overwrite-nvme writes over it)"
    fi
fi

mib=1048576
first=$((KILN_FIRST / mib))
end=$((KILN_END / mib))
total=$((KILN_SYSTEM_BYTES / mib))
log "1/4 zeroing the partition table area of $dev"
dd if=/dev/zero of="$dev" bs=1M count="$first" conv=fsync status=none || fail "writing $dev"
log "2/4 copying the partitions ($((end - first)) MiB) from /dev/$src to $dev"
dd if="/dev/$src" of="$dev" bs=1M skip="$first" seek="$first" count=$((end - first)) \
    conv=fsync status=none || fail "copying to $dev"
dd if=/dev/zero of="$dev" bs=1M seek="$end" count=$((total - end)) conv=fsync status=none ||
    fail "writing $dev"
# The system's partition table last: until it is there, the drive boots nothing.
dd if="$MNT/kiln/gpt-backup.bin" of="$dev" bs=512 seek=$(((KILN_SYSTEM_BYTES - 16896) / 512)) \
    conv=fsync,notrunc status=none || fail "writing the backup GPT to $dev"
dd if="$MNT/kiln/gpt-primary.bin" of="$dev" bs=512 conv=fsync,notrunc status=none ||
    fail "writing the GPT to $dev"

log "3/4 reading $dev back"
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if="$dev" bs=1M count="$total" iflag=direct status=none | sha256sum | cut -d' ' -f1)
if [ "$got" != "$KILN_SYSTEM_SHA256" ]; then
    # Not left looking bootable.
    dd if=/dev/zero of="$dev" bs=1M count=1 conv=fsync status=none
    fail "$dev reads back with sha256 $got; expected $KILN_SYSTEM_SHA256"
fi
log "$dev verified: sha256 $got"

log "4/4 erasing the installer's partition table on /dev/$src (the loader stays)"
umount "$MNT"
srcsize=$(blockdev --getsize64 "/dev/$src") || fail "cannot read the size of /dev/$src"
dd if=/dev/zero of="/dev/$src" bs=512 count=34 conv=fsync,notrunc status=none ||
    fail "erasing the GPT of /dev/$src"
dd if=/dev/zero of="/dev/$src" bs=512 seek=$(((KILN_INSTALL_BYTES - 16896) / 512)) count=33 \
    conv=fsync,notrunc status=none || fail "erasing the backup GPT of /dev/$src"
if [ "$srcsize" -gt "$KILN_INSTALL_BYTES" ]; then
    dd if=/dev/zero of="/dev/$src" bs=512 seek=$((srcsize / 512 - 33)) count=33 \
        conv=fsync,notrunc status=none || true
fi
log "installed; rebooting into the NVMe system"
finish b
