{ lib
, rustPlatform
, llvmPackages
, pkg-config
, m4
, elfutils
, zlib
, libpcap
, linuxHeaders
}:

rustPlatform.buildRustPackage {
  pname = "oxidize-relay";
  version = "0.1.0";

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions (map (path: ../. + "/${path}") (import ./source-paths.nix));
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [
    llvmPackages.clang
    llvmPackages.llvm
    pkg-config
    m4
    rustPlatform.bindgenHook
  ];

  buildInputs = [
    elfutils
    zlib
    libpcap
  ];

  # build.rs, libbpf-sys and libxdp-sys compile BPF objects with clang -target bpf,
  # which rejects these hardening flags.
  hardeningDisable = [ "zerocallusedregs" "stackprotector" ];

  env.BPF_EXTRA_CFLAGS = "-I${linuxHeaders}/include";

  # Tests needing root (XDP, AF_XDP, network namespaces) print SKIPPED in the
  # unprivileged sandbox; the NixOS VM tests run the same scenarios for real.

  meta = {
    description = "Kernel-bypass UDP relay: XDP steering, AF_XDP data path, socket fallback";
    homepage = "https://github.com/oxidize-relay/oxidize-relay";
    license = lib.licenses.asl20;
    mainProgram = "oxidize-relay";
    platforms = lib.platforms.linux;
  };
}
