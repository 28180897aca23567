#!/bin/sh
# kiln-time-wait: holds time-sync.target (and so k3s) until NTP has set the clock, only where
# a wrong clock does harm and only for a bounded time.
#
# First boot: k3s is about to make its certificates, so wait up to $1 seconds for
# systemd-timesyncd's first answer. With none (no NTP server reachable), go on: the clock is
# never earlier than the image's build time (systemd's clock-epoch floor), and say so.
# Later boots: no wait. systemd-timesyncd restores the clock it saved at shutdown, so time
# never goes backwards, and a power cut with the internet down must not keep k3s from starting.
set -u
limit=${1:-120}
root=${KILN_ROOT:-}
if [ -e "$root/var/lib/kiln/firstboot.done" ]; then
    echo "kiln-time-wait: not the first boot; not waiting for NTP (clock now $(date -u '+%F %T') UTC)"
    exit 0
fi
i=0
while [ "$i" -lt "$limit" ]; do
    if [ -e "$root/run/systemd/timesync/synchronized" ]; then
        echo "kiln-time-wait: clock synchronised by NTP after $i s"
        exit 0
    fi
    sleep 1
    i=$((i + 1))
done
echo "kiln-time-wait: no NTP answer in $limit s; going on with the clock at $(date -u '+%F %T') UTC (never earlier than the image's build time)"
exit 0
