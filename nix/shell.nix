{ mkShell
, oxidize-relay
, linuxHeaders
, cargo
, clippy
, rustfmt
, rust-analyzer
, python3
, iproute2
, ethtool
, nixpkgs-fmt
, deadnix
}:

mkShell {
  inputsFrom = [ oxidize-relay ];
  packages = [ cargo clippy rustfmt rust-analyzer python3 iproute2 ethtool nixpkgs-fmt deadnix ];
  inherit (oxidize-relay) hardeningDisable;
  BPF_EXTRA_CFLAGS = "-I${linuxHeaders}/include";
}
