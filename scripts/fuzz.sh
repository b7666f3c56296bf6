#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 20) from its committed seed corpus.
# New inputs go to a scratch corpus, so the repository keeps only the seeds.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
# cargo-fuzz needs unstable compiler flags: use nightly where installed, else let stable accept them.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then toolchain=(+nightly); else toolchain=(); export RUSTC_BOOTSTRAP=1; fi
for target in $(cargo "${toolchain[@]}" fuzz list); do
    scratch="$(mktemp -d)"
    echo "fuzz $target for ${seconds}s"
    log="$scratch.log"
    if ! cargo "${toolchain[@]}" fuzz run "$target" "$scratch" "corpus/$target" -- -max_total_time="$seconds" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz target $target failed"
        exit 1
    fi
    grep -E '^Done' "$log"
    rm -rf "$scratch" "$log"
done
