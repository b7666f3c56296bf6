#!/usr/bin/env bash
# Installs what building and testing oxidize-relay needs on Debian 12, as root:
# Debian's packages, then rustup and the Rust toolchain rust-toolchain.toml pins.
set -euo pipefail

packages=(clang llvm libelf-dev zlib1g-dev libpcap-dev m4 pkg-config make gcc curl ca-certificates
          iproute2 ethtool iputils-ping python3 libcap2-bin procps nix-bin
          qemu-system-x86 busybox-static)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x "$HOME/.cargo/bin/rustup" ] && export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v rustup >/dev/null; then
    # Debian 12's own cargo (1.63) is too old for this project: rustup provides the pinned toolchain.
    echo "installing rustup (minimal profile, no default toolchain) from https://sh.rustup.rs"
    if ! curl --proto '=https' --tlsv1.2 -fsS https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none >/dev/null; then
        echo "cannot install rustup: https://sh.rustup.rs is unreachable from this machine." >&2
        echo "Install rustup by other means (https://rustup.rs), then run this again." >&2
        exit 1
    fi
    export PATH="$HOME/.cargo/bin:$PATH"
fi
# Installs the toolchain rust-toolchain.toml names, if it is not there yet.
toolchain_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! (cd "$toolchain_dir" && rustup toolchain install >/dev/null 2>&1 && cargo --version >/dev/null); then
    echo "cannot install the Rust toolchain rust-toolchain.toml pins: is https://static.rust-lang.org reachable?" >&2
    exit 1
fi
