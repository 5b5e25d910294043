#!/usr/bin/env bash
# Builds the muster image and runs the three-node cluster of
# docker-compose.yml. Needs cargo and a Docker engine with compose (either
# `docker compose` or `docker-compose`); no image registry.
#
#   scripts/cluster.sh up       build the static binary and the image, start it all
#   scripts/cluster.sh nodes    muster nodes list, run inside the coordinator
#   scripts/cluster.sh partition SERVICE   cut a container off the network
#   scripts/cluster.sh heal SERVICE        connect it again
#   scripts/cluster.sh down     stop and remove the containers (volumes kept)
#   scripts/cluster.sh destroy  stop and remove containers, volumes and the image
#   scripts/cluster.sh build    only build the static binary and the image
#   scripts/cluster.sh static   only build the static binary (the cluster test runs this)
#   scripts/cluster.sh compose ARGS...   any other compose command
set -euo pipefail
cd "$(dirname "$0")/.."

target="${MUSTER_TARGET:-$(uname -m)-unknown-linux-gnu}"

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  else
    docker-compose "$@"
  fi
}

# The one build of the static binary, shared by `up` and the cluster test.
# An explicit --target keeps RUSTFLAGS off build scripts and puts the binary
# in a folder of its own; the Dockerfile copies it from there.
static_binary() {
  local variable
  # Run from `cargo test`, this inherits the variables cargo sets for the
  # test's own package. Build scripts watch some of them (ring's watches
  # CARGO_MANIFEST_DIR and CARGO_PKG_*), so a build with them and one
  # without would rebuild each other's crates every time. Cargo's own
  # settings (CARGO_HOME, CARGO_PROFILE_*, ...) are kept, except
  # CARGO_ENCODED_RUSTFLAGS, which would override the RUSTFLAGS below.
  for variable in $(compgen -e); do
    case "$variable" in
      CARGO | CARGO_MANIFEST_* | CARGO_PKG_* | CARGO_CRATE_NAME | CARGO_BIN_NAME | \
        CARGO_BIN_EXE_* | CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR | \
        CARGO_RUSTC_CURRENT_DIR | CARGO_CFG_* | CARGO_FEATURE_* | OUT_DIR | \
        CARGO_ENCODED_RUSTFLAGS)
        unset "$variable" ;;
    esac
  done
  CARGO_TARGET_DIR=target/static RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked --target "$target"
}

build() {
  static_binary
  compose build --build-arg "TARGET=$target" coordinator
}

# The compose network a service's container is on, and the container.
network_and_container() {
  local container project
  container="$(compose ps -q "$1")"
  [[ -n "$container" ]] || { echo "no running container for $1" >&2; exit 1; }
  project="$(docker inspect --format '{{index .Config.Labels "com.docker.compose.project"}}' "$container")"
  echo "${project}_muster" "$container"
}

case "${1:-}" in
  build) build ;;
  static) static_binary ;;
  up) build; compose up -d ;;
  nodes) compose exec -T coordinator /muster nodes list ;;
  partition) read -r network container < <(network_and_container "${2:?service}")
    docker network disconnect "$network" "$container" ;;
  heal) read -r network container < <(network_and_container "${2:?service}")
    docker network connect --alias "$2" "$network" "$container" ;;
  down) compose down ;;
  destroy) compose down --volumes --rmi all --remove-orphans ;;
  compose) shift; compose "$@" ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
