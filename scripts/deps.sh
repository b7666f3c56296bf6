#!/usr/bin/env bash
# Installs what building and testing oxidize-relay needs on Debian 12, as root.
set -euo pipefail

packages=(clang llvm libelf-dev zlib1g-dev libpcap-dev m4 pkg-config make gcc
          iproute2 ethtool iputils-ping python3 libcap2-bin procps)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup, Rust 1.85 or newer)" >&2; exit 1; }
