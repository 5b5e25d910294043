#!/usr/bin/env bash
# Benchmarks a release coordinator against the swarm simulator.
#
#   bench/run.sh [FLEET_SIZE...]          default: 1000 10000 19000
#
# For each fleet size it starts a coordinator (pinned to CPU 0 where the
# machine has two or more) and enough swarm processes (pinned to the other
# CPUs) to hold the fleet, then measures in one run: coordinator CPU per
# heartbeat, RSS per connected agent, ack latency, database writes, and
# recovery after a SIGKILL of the coordinator. Results go to stdout and to
# bench/results/<date>.md. See BENCHMARKS.md for what each figure means.
#
# Settings (environment): HEARTBEAT (1s), OFFLINE_AFTER (5s),
# MAX_HEARTBEATS_PER_SECOND (100000), WINDOW (30, seconds measured), WARMUP
# (10, seconds after all agents registered), AGENTS_PER_SWARM (9500),
# WATCHERS (0: how many `muster nodes watch --output json > /dev/null` run
# for the whole run, pinned with the swarms), DASHBOARDS (0: how many
# bench/sse_follow.py follow the dashboard's /events as an open page does),
# DB_URL (unset: a SQLite file per run; a postgres:// URL of an empty
# database: the store on PostgreSQL, one fleet size per database).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --quiet
# Each swarm process and the coordinator hold one file per agent.
ulimit -n "$(ulimit -Hn)"
exec python3 bench/driver.py target/release/muster "${@:-1000 10000 19000}"
