#!/usr/bin/env bash
# The whole test suite: unit, BPF_PROG_TEST_RUN fixtures and the privileged
# netns/AF_XDP end-to-end tests. Run as root; without root the privileged tests say SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line over every test binary (the last binary cargo runs is a doc-test one with no tests).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
