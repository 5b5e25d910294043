"""Measures a coordinator's memory through floods of connections that never
speak: VmRSS before, during and after each flood.

    cargo build --release
    python3 bench/connection_flood.py target/release/muster [CONNECTIONS] [FLOODS]

Defaults: 2,000 connections a flood, three floods. Half of each flood's
connections send nothing; the other half send an HTTP/2 preface and an
empty SETTINGS frame and then nothing, so they pass the handshake timeout
and stay until the idle timeout or eviction. The flooding client closes
them all, the script waits until the coordinator holds as many file
descriptors as before the flood (read from /proc, so that measuring adds
no traffic of its own), waits a few seconds more, and measures again. RELIABILITY.md records
the figures."""

import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time

MUSTER = os.path.abspath(sys.argv[1])
CONNECTIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
FLOODS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
GREETING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SETTLE_DEADLINE = 30.0
# Longer than the coordinator's check for closed connections (5 s), after
# which it returns freed memory to the system.
AFTER_CLOSE = 7.0


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def listening(pid, port):
    with open(f"/proc/{pid}/net/tcp") as f:
        return any(f":{port:04X} 00000000:0000 0A" in line for line in f)


def wait_until(what, deadline, check):
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out after {deadline}s waiting for {what}")


def flood(port, count):
    connections = []
    for index in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        if index % 2:
            connection.sendall(GREETING)
        connections.append(connection)
    return connections


def main():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="muster-flood-")
    port = free_port()
    log = open(os.path.join(workdir, "coordinator.log"), "w")
    coordinator = subprocess.Popen(
        [MUSTER, "coordinator", "--listen", f"127.0.0.1:{port}",
         "--db", os.path.join(workdir, "muster.db")],
        stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until("the coordinator to listen", 20,
                   lambda: listening(coordinator.pid, port))
        time.sleep(1)
        baseline = rss_kib(coordinator.pid)
        files = open_files(coordinator.pid)
        print(f"before: {baseline / 1024:.1f} MiB")
        for round_ in range(1, FLOODS + 1):
            connections = flood(port, CONNECTIONS)
            time.sleep(1)
            during = rss_kib(coordinator.pid)
            for connection in connections:
                connection.close()
            wait_until("the flood's connections to close", SETTLE_DEADLINE,
                       lambda: open_files(coordinator.pid) <= files)
            time.sleep(AFTER_CLOSE)
            after = rss_kib(coordinator.pid)
            print(f"flood {round_}: {CONNECTIONS} connections, during "
                  f"{during / 1024:.1f} MiB, after {after / 1024:.1f} MiB "
                  f"({100 * (after - baseline) / baseline:+.0f} % of before)")
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=10)


if __name__ == "__main__":
    main()
