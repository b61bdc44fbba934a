#!/usr/bin/env python3
"""Open N idle PostgreSQL connections to a proxy and report the proxy's resident memory.

Usage: idle_conns.py PORT PID N USER DATABASE

Each connection completes the startup handshake (trust authentication) up to ReadyForQuery, so
the proxy holds a fully established session and its upstream connection. Prints three numbers
in KiB: the proxy's RSS before connecting, with all N connections open and idle, and after
closing them. Part of benches/run.sh; standard library only.
"""

import socket
import struct
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def connect(port, user, database):
    s = socket.create_connection(("127.0.0.1", port))
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed during startup")
        buf += chunk
        while len(buf) >= 5:
            tag = buf[0:1]
            (length,) = struct.unpack("!i", buf[1:5])
            if len(buf) < 1 + length:
                break
            body = buf[5 : 1 + length]
            buf = buf[1 + length :]
            if tag == b"E":
                raise RuntimeError("server refused the connection: " + repr(body[:200]))
            if tag == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise RuntimeError("authentication other than trust requested")
            if tag == b"Z":
                return s


def main():
    port, pid, n, user, database = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    # One connection first, so lazily initialised state (thread pools, catalog caches) is not
    # counted as a per-connection cost.
    connect(port, user, database).close()
    time.sleep(1)
    before = rss_kib(pid)
    conns = [connect(port, user, database) for _ in range(n)]
    time.sleep(2)
    during = rss_kib(pid)
    for s in conns:
        s.sendall(b"X\0\0\0\4")
        s.close()
    time.sleep(2)
    after = rss_kib(pid)
    print(before, during, after)


if __name__ == "__main__":
    main()
