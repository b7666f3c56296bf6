#!/usr/bin/env bash
# Builds the relay and relays real traffic through AF_XDP on a self-made
# client/relay/upstream namespace topology, then prints what it did. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the demo creates network namespaces and attaches XDP" >&2; exit 1; }
source scripts/deps.sh
cargo build --release --quiet
exec python3 tests/scenarios/run.py --relay target/release/oxidize-relay demo
