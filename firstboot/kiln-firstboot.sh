#!/bin/sh
# kiln first boot: grow the root filesystem, make SSH host keys, decide how to join the k3s
# cluster, then enable and start k3s. Run once by kiln-firstboot.service.
#
# Every step is idempotent and marks itself done, so a power cut at any point is repaired by the
# next boot running the script again; /var/lib/kiln/firstboot.done ends it for good.
# Each line goes to stderr, which the unit sends to the journal (and the console).
set -eu

KILN_ROOT=${KILN_ROOT:-}
STATE=$KILN_ROOT/var/lib/kiln/firstboot
LIB=${KILN_LIB:-/usr/lib/kiln}
SYS=${KILN_SYS:-/sys}

log() { echo "kiln-firstboot: $*" >&2; }

# shellcheck disable=SC1091
. "$KILN_ROOT/etc/kiln/node.env"
export KILN_NODE KILN_IP KILN_ROLE KILN_BOOTSTRAP KILN_MODE KILN_PEERS

step() {
    name=$1
    shift
    if [ -e "$STATE/$name.done" ]; then
        log "step $name: done on an earlier boot"
        return 0
    fi
    log "step $name: start"
    "$@"
    mkdir -p "$STATE"
    : > "$STATE/$name.done"
    sync
    log "step $name: done"
}

# 1. The image's root partition was sized to its content; take the rest of the disk.
grow_root() {
    # major:minor of the root filesystem's block device, then its partition number and disk.
    mm=$(stat -c '%Hd:%Ld' /)
    sys=$(readlink -f "$SYS/dev/block/$mm")
    part=${sys##*/}
    disk=$(basename "$(dirname "$sys")")
    num=$(cat "$sys/partition")
    log "root is /dev/$part (partition $num of /dev/$disk)"
    # growpart: 0 = grown, 1 = nothing to do (already at the end), anything else = failure.
    rc=0
    growpart "/dev/$disk" "$num" >&2 || rc=$?
    case $rc in
        0) log "partition $num grown to the end of /dev/$disk" ;;
        1) log "partition $num already ends at the end of /dev/$disk" ;;
        *) log "growpart failed ($rc)"; return 1 ;;
    esac
    resize2fs "/dev/$part" >&2
}

# 2. The image has no host keys (one image, many nodes); this node makes its own.
ssh_host_keys() {
    # A power cut can leave an empty key file, which ssh-keygen -A would keep.
    for k in "$KILN_ROOT"/etc/ssh/ssh_host_*_key; do
        [ -e "$k" ] || continue
        if [ ! -s "$k" ] || [ ! -s "$k.pub" ]; then
            rm -f "$k" "$k.pub"
        fi
    done
    if [ -n "$KILN_ROOT" ]; then ssh-keygen -A -f "$KILN_ROOT" >&2; else ssh-keygen -A >&2; fi
}

# 3. Join decision -> /etc/rancher/k3s/config.yaml (0600, holds the token).
join_config() {
    # shellcheck disable=SC1091
    . "$LIB/kiln-join.sh"
    decision=$(kiln_decide)
    kiln_write_config "$decision"
    log "k3s will $decision"
}

# 4. Start k3s now and on every later boot. --no-block: k3s is ordered after this unit.
start_k3s() {
    if [ "$KILN_ROLE" = server ]; then unit=k3s.service; else unit=k3s-agent.service; fi
    systemctl enable "$unit" >&2
    systemctl start --no-block "$unit" >&2
}

step grow-root grow_root
step ssh-host-keys ssh_host_keys
step join-config join_config
step start-k3s start_k3s
: > "$KILN_ROOT/var/lib/kiln/firstboot.done"
sync
log "first boot complete"
