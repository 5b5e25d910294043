"""Drives one benchmark run for bench/run.sh: a coordinator, swarm
processes, measurements from /proc, and the recovery after a SIGKILL.

Figures come from the processes themselves: CPU and RSS from /proc/PID of
the coordinator, acks and reconnects from the swarm's JSON reports, writes
from the coordinator's Prometheus counters of store writes."""

import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

MUSTER = os.path.abspath(sys.argv[1])
SIZES = [int(n) for arg in sys.argv[2:] for n in arg.split()]
HEARTBEAT = os.environ.get("HEARTBEAT", "1s")
OFFLINE_AFTER = os.environ.get("OFFLINE_AFTER", "5s")
MAX_HPS = os.environ.get("MAX_HEARTBEATS_PER_SECOND", "100000")
WINDOW = float(os.environ.get("WINDOW", "30"))
WARMUP = float(os.environ.get("WARMUP", "10"))
PER_SWARM = int(os.environ.get("AGENTS_PER_SWARM", "9500"))
WATCHERS = int(os.environ.get("WATCHERS", "0"))
DASHBOARDS = int(os.environ.get("DASHBOARDS", "0"))
# A postgres:// URL of an empty database to use instead of a SQLite file in
# the run's directory (one fleet size per database).
DB_URL = os.environ.get("DB_URL")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CPUS = sorted(os.sched_getaffinity(0))
REGISTER_DEADLINE = 120.0
RECOVERY_DEADLINE = 180.0


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def pinned(cpus, argv):
    if len(CPUS) >= 2:
        return ["taskset", "-c", ",".join(map(str, cpus))] + argv
    return argv


def coordinator_cpus():
    return CPUS[:1]


def swarm_cpus():
    return CPUS[1:] if len(CPUS) >= 2 else CPUS


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Coordinator:
    def __init__(self, workdir, port):
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_port = free_port()
        self.log_path = os.path.join(workdir, "coordinator.log")
        self.proc = None

    def start(self):
        argv = pinned(coordinator_cpus(), [
            MUSTER, "coordinator",
            "--listen", f"127.0.0.1:{self.port}",
            "--db", DB_URL or os.path.join(self.workdir, "muster.db"),
            "--heartbeat-interval", HEARTBEAT,
            "--offline-after", OFFLINE_AFTER,
            "--max-heartbeats-per-second", MAX_HPS,
            "--http-listen", f"127.0.0.1:{self.metrics_port}",
            "--log", "warn,muster::coordinator=info,muster::coordinator::session=warn",
        ])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = open(self.log_path, "a")
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out)
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self.nodes() is not None:
                    return
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.kill()
            time.sleep(0.1)  # the port may still be held briefly; try again
        raise SystemExit(f"coordinator did not start; see {self.log_path}")

    def nodes(self):
        done = subprocess.run(
            [MUSTER, "nodes", "list", "--output", "json", "--coordinator", self.url],
            capture_output=True, text=True)
        if done.returncode != 0:
            return None
        return json.loads(done.stdout)

    def writer_totals(self):
        """Store write transactions and last_seen rows since this process
        started, from its /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        totals = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("muster_store_write_transactions_total",
                        "muster_store_last_seen_written_total"):
                totals[name] = int(float(value))
        return (totals.get("muster_store_write_transactions_total", 0),
                totals.get("muster_store_last_seen_written_total", 0))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Swarm:
    def __init__(self, workdir, index, first, agents, coordinator_url):
        self.out_path = os.path.join(workdir, f"swarm{index}.jsonl")
        self.err_path = os.path.join(workdir, f"swarm{index}.log")
        argv = pinned(swarm_cpus(), [
            MUSTER, "swarm",
            "--coordinator", coordinator_url,
            "--agents", str(agents),
            "--first-agent", str(first),
            "--source-addresses", "8",
            "--report-every", "1s",
            "--log", "error",
        ])
        self.proc = subprocess.Popen(argv, stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w"))

    def last(self):
        report = None
        with open(self.out_path) as f:
            for line in f:
                if line.strip():
                    try:
                        report = json.loads(line)
                    except json.JSONDecodeError:
                        pass
        return report

    def reports_since(self, elapsed):
        with open(self.out_path) as f:
            return [r for r in map(json.loads, filter(str.strip, f)) if r["elapsed_s"] > elapsed]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Watcher:
    """`muster nodes watch --output json > /dev/null`, for the whole run; it
    resumes by itself across the coordinator's restart."""

    def __init__(self, workdir, index, coordinator_url):
        argv = pinned(swarm_cpus(), [
            MUSTER, "nodes", "watch", "--output", "json",
            "--coordinator", coordinator_url,
        ])
        self.err_path = os.path.join(workdir, f"watch-{index}.err")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.err_path, "w"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Dashboard:
    """bench/sse_follow.py on the coordinator's /events, as an open dashboard
    page follows it, for the whole run."""

    def __init__(self, workdir, index, events_url):
        follower = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sse_follow.py")
        argv = pinned(swarm_cpus(), [sys.executable, follower, events_url])
        self.err_path = os.path.join(workdir, f"dashboard-{index}.err")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.err_path, "w"))

    stop = Watcher.stop


def wait_until(what, deadline, check, every=0.5):
    started = time.monotonic()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() - started > deadline:
            raise SystemExit(f"timed out after {deadline}s waiting for {what}")
        time.sleep(every)


def totals(swarms):
    reports = [s.last() for s in swarms]
    if any(r is None for r in reports):
        return None
    return reports


def percentile(values, fraction):
    if not values:
        return None
    values = sorted(values)
    return values[max(0, int(-(-fraction * len(values) // 1)) - 1)]


def bench(n):
    workdir = tempfile.mkdtemp(prefix=f"muster-bench-{n}-")
    log(f"== {n} agents in {workdir}")
    coordinator = Coordinator(workdir, free_port())
    coordinator.start()
    time.sleep(1)
    rss_empty = rss_bytes(coordinator.proc.pid)

    watchers = [Watcher(workdir, index, coordinator.url) for index in range(WATCHERS)]
    events_url = f"http://127.0.0.1:{coordinator.metrics_port}/events"
    watchers += [Dashboard(workdir, index, events_url) for index in range(DASHBOARDS)]
    swarms = []
    for index, first in enumerate(range(0, n, PER_SWARM)):
        swarms.append(Swarm(workdir, index, first, min(PER_SWARM, n - first), coordinator.url))
    try:
        return measure(n, coordinator, swarms, rss_empty, workdir)
    except SystemExit as failure:
        reports = totals(swarms) or []
        log(f"   {n} agents: {failure}")
        return {
            "agents": n,
            "swarm_processes": len(swarms),
            "failed": str(failure),
            "registered": sum(r["registered"] for r in reports),
            "connected": sum(r["connected"] for r in reports),
            "failures": sum(r["failures"] for r in reports),
            "coordinator_rss_mib": rss_bytes(coordinator.proc.pid) / 2**20 if coordinator.proc.poll() is None else None,
        }
    finally:
        for s in swarms:
            s.stop()
        for w in watchers:
            w.stop()
        if coordinator.proc.poll() is None:
            coordinator.kill()


def measure(n, coordinator, swarms, rss_empty, workdir):
    def connected():
        reports = totals(swarms)
        return reports and sum(r["connected"] for r in reports) == n and reports

    reports = wait_until("every agent registered", REGISTER_DEADLINE, connected)
    registration_s = max(r["all_registered_s"] for r in reports)
    log(f"   all {n} registered after {registration_s:.1f}s")
    time.sleep(WARMUP)

    pid = coordinator.proc.pid
    start_reports = [s.last() for s in swarms]
    swarm_cpu0 = sum(cpu_seconds(s.proc.pid) for s in swarms)
    cpu0, tx0, rows0, t0 = cpu_seconds(pid), *coordinator.writer_totals(), time.monotonic()
    time.sleep(WINDOW)
    end_reports = [s.last() for s in swarms]
    cpu1, tx1, rows1, t1 = cpu_seconds(pid), *coordinator.writer_totals(), time.monotonic()
    swarm_cpu1 = sum(cpu_seconds(s.proc.pid) for s in swarms)
    load = open("/proc/loadavg").read().split()[0]
    rss_full = rss_bytes(pid)

    acks = sum(e["acks"] - s["acks"] for s, e in zip(start_reports, end_reports))
    span = sum(e["elapsed_s"] - s["elapsed_s"] for s, e in zip(start_reports, end_reports)) / len(swarms)
    periods = [r for s, start in zip(swarms, start_reports) for r in s.reports_since(start["elapsed_s"])]
    p50s = [r["ack_p50_ms"] for r in periods if r["ack_p50_ms"] is not None]
    p99s = [r["ack_p99_ms"] for r in periods if r["ack_p99_ms"] is not None]
    failures = sum(e["failures"] - s["failures"] for s, e in zip(start_reports, end_reports))
    heartbeats_per_s = acks / span
    result = {
        "agents": n,
        "swarm_processes": len(swarms),
        "watchers": WATCHERS,
        "dashboards": DASHBOARDS,
        "registration_s": registration_s,
        "heartbeats_per_s": heartbeats_per_s,
        "cpu_us_per_heartbeat": (cpu1 - cpu0) / (heartbeats_per_s * (t1 - t0)) * 1e6 if acks else None,
        "coordinator_cpu_share": (cpu1 - cpu0) / (t1 - t0),
        "swarm_cpu_share": (swarm_cpu1 - swarm_cpu0) / (t1 - t0),
        "load_average_1m": float(load),
        "rss_empty_mib": rss_empty / 2**20,
        "rss_full_mib": rss_full / 2**20,
        "rss_kib_per_agent": (rss_full - rss_empty) / n / 1024,
        "ack_p50_ms": percentile(p50s, 0.5),
        "ack_p99_ms_worst_second": max(p99s) if p99s else None,
        "ack_p99_ms_median_second": percentile(p99s, 0.5),
        "failures_in_window": failures,
        "db_transactions_per_s": (tx1 - tx0) / (t1 - t0),
        "db_rows_per_heartbeat": (rows1 - rows0) / acks if acks else None,
    }
    log("   steady state:", json.dumps(result))

    # Recovery: SIGKILL, start again on the same port and database.
    before = [s.last()["reconnects"] for s in swarms]
    coordinator.kill()
    killed = time.monotonic()
    coordinator.start()
    answering = time.monotonic()
    ever_offline = set()

    def all_online():
        nodes = coordinator.nodes()
        if nodes is None:
            return None
        ever_offline.update(x["node_id"] for x in nodes if x["state"] == "OFFLINE")
        online = sum(1 for x in nodes if x["state"] == "ONLINE")
        return online == n and time.monotonic()

    online_at = wait_until("every node ONLINE after the restart", RECOVERY_DEADLINE, all_online, every=0.25)

    def reconnected():
        reports = totals(swarms)
        done = reports and sum(r["connected"] for r in reports) == n and \
            sum(r["reconnects"] for r in reports) - sum(before) >= n
        return done and reports

    try:
        reports = wait_until("every agent re-registered", RECOVERY_DEADLINE, reconnected)
        reconnect_p50 = max(r["reconnect_p50_ms"] or 0 for r in reports)
        reconnect_p99 = max(r["reconnect_p99_ms"] or 0 for r in reports)
        reconnect_max = max(r["reconnect_max_ms"] or 0 for r in reports)
    except SystemExit as e:
        log("  ", e)
        reconnect_p50 = reconnect_p99 = reconnect_max = None
    # Watch a little longer: a node only probed must not go OFFLINE later.
    for _ in range(20):
        all_online()
        time.sleep(0.25)
    result.update({
        "restart_s": answering - killed,
        "all_online_after_restart_s": online_at - killed,
        "reconnect_p50_ms": reconnect_p50,
        "reconnect_p99_ms": reconnect_p99,
        "reconnect_max_ms": reconnect_max,
        "ever_offline": len(ever_offline),
    })
    log("   recovery:", json.dumps(result))
    return result


def fmt(value, digits=1):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def main():
    results = [bench(n) for n in SIZES]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = open("/proc/loadavg").read().split()[:3]
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = [
        f"# Benchmark run {stamp}",
        "",
        f"- machine: {len(os.sched_getaffinity(0))} CPUs ({model}), "
        f"{os.sysconf('SC_PHYS_PAGES') * PAGE / 2**30:.0f} GiB; load average at the end {' '.join(load)}",
        f"- command: `bench/run.sh {' '.join(map(str, SIZES))}` with HEARTBEAT={HEARTBEAT} "
        f"OFFLINE_AFTER={OFFLINE_AFTER} MAX_HEARTBEATS_PER_SECOND={MAX_HPS} "
        f"WINDOW={WINDOW:g} WARMUP={WARMUP:g} AGENTS_PER_SWARM={PER_SWARM}",
        f"- coordinator pinned to CPU {coordinator_cpus()}, swarms to CPUs {swarm_cpus()}",
        "",
        "| agents | swarms | heartbeats/s | CPU µs/heartbeat | coordinator CPU | RSS KiB/agent "
        "| ack p50 ms | ack p99 ms (worst s / median s) | DB tx/s | DB rows/heartbeat "
        "| registration s | all ONLINE after restart s | reconnect p50 / p99 / max ms | ever OFFLINE "
        "| swarm CPU | load avg |",
        "|" + " --- |" * 16,
    ]
    for r in results:
        if "failed" in r:
            lines.append(
                f"| {r['agents']:,} | {r['swarm_processes']} | never steady: {r['failed']}; "
                f"{r['connected']:,} connected, {r['failures']:,} link failures |" + " |" * 14)
            continue
        lines.append(
            f"| {r['agents']:,} | {r['swarm_processes']} | {fmt(r['heartbeats_per_s'], 0)} "
            f"| {fmt(r['cpu_us_per_heartbeat'])} | {fmt(r['coordinator_cpu_share'] * 100, 0)} % "
            f"| {fmt(r['rss_kib_per_agent'])} | {fmt(r['ack_p50_ms'], 2)} "
            f"| {fmt(r['ack_p99_ms_worst_second'], 2)} / {fmt(r['ack_p99_ms_median_second'], 2)} "
            f"| {fmt(r['db_transactions_per_s'], 2)} | {fmt(r['db_rows_per_heartbeat'], 3)} "
            f"| {fmt(r['registration_s'])} | {fmt(r['all_online_after_restart_s'])} "
            f"| {fmt(r['reconnect_p50_ms'], 0)} / {fmt(r['reconnect_p99_ms'], 0)} / {fmt(r['reconnect_max_ms'], 0)} "
            f"| {r['ever_offline']} | {fmt(r['swarm_cpu_share'] * 100, 0)} % | {r['load_average_1m']} |")
    lines += ["", "Raw figures:", "", "```json", json.dumps(results, indent=1), "```", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs("bench/results", exist_ok=True)
    name = datetime.datetime.now(datetime.timezone.utc).strftime("bench/results/%Y-%m-%dT%H%M.md")
    with open(name, "w") as f:
        f.write(text)
    log(f"written to {name}")


if __name__ == "__main__":
    main()
