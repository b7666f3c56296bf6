# The files and directories the package is built from, relative to the repository root.
# A plain list (no nixpkgs needed): CI copies exactly these into a scratch directory and
# checks that cargo can read, format-check and build the workspace from them alone.
[
  "Cargo.toml"
  "Cargo.lock"
  "rustfmt.toml"
  "build.rs"
  "benches"
  "bpf"
  "core"
  "dashboards"
  "examples"
  "src"
  "tests"
]
