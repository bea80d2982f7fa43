"""A separate Redis client timing plain GETs (HGETs), one at a time, until told to stop.

    python bench/redis_probe.py --port P --key-template 'cache:grp{g}:item{i}' \
        --groups 0,1,2 --per-group 100000 --max-seconds 60 --out samples.json

Each sample is (start, latency) in monotonic nanoseconds (CLOCK_MONOTONIC, the clock
`time.monotonic()` reads in the harness), so the harness can cut out the window in which a
pattern delete ran. Closed loop on one raw socket: no client library in the measurement.
Stops on SIGTERM/SIGINT, or after --max-seconds whatever happens, then writes --out.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import time
from array import array

_running = True


def _stop(*_: object) -> None:
    global _running
    _running = False


def _read_reply(sock: socket.socket, buf: bytearray) -> None:
    """Consume one RESP bulk/simple/error reply from the socket."""
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        buf += chunk
    head, _, _rest = bytes(buf).partition(b"\r\n")
    need = len(head) + 2
    if head[:1] == b"$" and int(head[1:]) >= 0:
        need += int(head[1:]) + 2
    while len(buf) < need:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        buf += chunk
    del buf[:need]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-template", default="cache:grp{g}:item{i}")
    parser.add_argument("--groups", default="0,1,2,4,5,6,7,8,9")
    parser.add_argument("--per-group", type=int, default=100_000)
    parser.add_argument("--hash-field", help="HGET this field instead of GET (hash layout)")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    groups = [int(g) for g in args.groups.split(",")]
    rng = random.Random(7)
    commands = []
    for _ in range(4096):
        key = args.key_template.format(g=rng.choice(groups), i=rng.randrange(args.per_group))
        k = key.encode()
        if args.hash_field:
            f = args.hash_field.encode()
            commands.append(
                b"*3\r\n$4\r\nHGET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(f), f)
            )
        else:
            commands.append(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k))

    starts, latencies = array("q"), array("q")
    sock = socket.create_connection(("127.0.0.1", args.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    deadline = time.monotonic() + args.max_seconds
    n = 0
    clock = time.monotonic_ns
    try:
        while _running and time.monotonic() < deadline:
            t0 = clock()
            sock.sendall(commands[n & 4095])
            _read_reply(sock, buf)
            t1 = clock()
            starts.append(t0)
            latencies.append(t1 - t0)
            n += 1
    finally:
        sock.close()
        with open(args.out, "w") as f:
            json.dump({"starts_ns": starts.tolist(), "latencies_ns": latencies.tolist()}, f)


if __name__ == "__main__":
    main()
