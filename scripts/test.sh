#!/usr/bin/env bash
# The whole test suite: unit, BPF_PROG_TEST_RUN fixtures and the privileged
# netns/AF_XDP end-to-end tests. Run as root; without root the privileged tests say SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo test --workspace --locked
