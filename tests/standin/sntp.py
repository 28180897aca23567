#!/usr/bin/env python3
"""TEST DOUBLE: a minimal SNTP server for the QEMU boot tests (not an NTP implementation).

On first boot the images wait (bounded) for time sync before k3s starts, and the guests'
NTP server is the inventory's gateway, which QEMU maps to this machine's loopback (or, for the
cluster, an address in the test's own network namespace). Answers every request with the
host clock, stratum 1. Usage: sntp.py ADDRESS [PORT]
"""
import socket
import struct
import sys
import time

NTP_DELTA = 2208988800  # 1900-01-01 to 1970-01-01


def ts(t):
    sec = int(t) + NTP_DELTA
    frac = int((t - int(t)) * (1 << 32))
    return struct.pack("!II", sec, frac)


def main():
    addr = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 123
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print(f"sntp stand-in on {addr}:{port}", flush=True)
    while True:
        data, peer = s.recvfrom(512)
        if len(data) < 48:
            continue
        recv = time.time()
        version = (data[0] >> 3) & 7 or 4
        head = struct.pack("!BBbb", (version << 3) | 4, 1, data[2], -20)
        head += struct.pack("!II", 0, 0x10) + b"KILN"
        now = time.time()
        reply = head + ts(now) + data[40:48] + ts(recv) + ts(time.time())
        s.sendto(reply, peer)


if __name__ == "__main__":
    main()
