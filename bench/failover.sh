#!/usr/bin/env bash
# Failover of a 10,000-agent fleet between two coordinators on one
# PostgreSQL: SIGKILL the leader, and time until the standby leads and until
# every node is ONLINE under it.
#
#   DB_URL=postgres://USER@HOST:PORT/EMPTY_DB [LEASE=10s] bench/failover.sh
#
# Both coordinators are pinned to CPU 0, the two swarms of 5,000 agents to
# CPU 1. Prints the registration time, when the standby led, when all were
# ONLINE under it (both from the SIGKILL), and the most nodes it ever showed
# OFFLINE at once. Every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DB_URL:?set DB_URL to an empty PostgreSQL database}"
LEASE=${LEASE:-10s}
cargo build --release --locked --quiet
M=$PWD/target/release/muster
WORK=$(mktemp -d)
ulimit -n "$(ulimit -Hn)"
common=(--db "$DB_URL" --heartbeat-interval 1s --offline-after 5s
  --max-heartbeats-per-second 100000 --http-listen 127.0.0.1:0 --leader-lease "$LEASE"
  --log warn,muster::coordinator=info,muster::coordinator::session=warn)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
online_and_offline() {
  "$M" nodes list --coordinator "$1" --output json 2>/dev/null | python3 -c \
    'import json,sys; d=json.load(sys.stdin); print(sum(x["state"]=="ONLINE" for x in d), sum(x["state"]=="OFFLINE" for x in d))' \
    2>/dev/null || echo "0 0"
}

taskset -c 0 "$M" coordinator --listen 127.0.0.1:17800 "${common[@]}" > "$WORK/a.log" 2>&1 &
leader=$!; pids+=("$leader")
for _ in $(seq 200); do grep -q "coordinator role: leader" "$WORK/a.log" && break; sleep 0.1; done
taskset -c 0 "$M" coordinator --listen 127.0.0.1:17810 "${common[@]}" > "$WORK/b.log" 2>&1 &
pids+=("$!")
for _ in $(seq 200); do grep -q "coordinator role: standby" "$WORK/b.log" && break; sleep 0.1; done
urls=http://127.0.0.1:17800,http://127.0.0.1:17810
for first in 0 5000; do
  taskset -c 1 "$M" swarm --coordinator "$urls" --agents 5000 --first-agent "$first" \
    --source-addresses 8 --log error > "$WORK/swarm-$first.log" 2>&1 &
  pids+=("$!")
done

start=$(now)
for _ in $(seq 600); do
  read -r on _ <<< "$(online_and_offline http://127.0.0.1:17800)"
  [ "$on" = 10000 ] && break
  sleep 0.5
done
echo "registered: $on agents in $(since "$start") s"
sleep 10

kill -9 "$leader"
killed=$(now)
led=""
worst=0
for _ in $(seq 2400); do
  if [ -z "$led" ] && grep -q "coordinator role: leader" "$WORK/b.log"; then led=$(since "$killed"); fi
  read -r on off <<< "$(online_and_offline http://127.0.0.1:17810)"
  [ "$off" -gt "$worst" ] && worst=$off
  if [ -n "$led" ] && [ "$on" = 10000 ]; then
    echo "lease $LEASE: the standby led ${led} s after the SIGKILL; all 10000 ONLINE under it $(since "$killed") s after; most shown OFFLINE at once: $worst"
    exit 0
  fi
  sleep 0.25
done
echo "not all ONLINE under the standby within the bound; logs in $WORK" >&2
exit 1
