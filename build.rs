//! Compiles the XDP program in `bpf/` with clang into `$OUT_DIR/relay.bpf.o`.
//!
//! `CLANG` picks the compiler; `BPF_EXTRA_CFLAGS` adds flags (the Nix build
//! passes its kernel-header include path there). The flags themselves live in
//! `bpf/cflags`: besides the usual ones they undo what a hardening compiler
//! wrapper (nixpkgs' cc-wrapper) adds for host code and the BPF target cannot
//! take (a stack protector; stack-clash protection is merely unused there).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("relay.bpf.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // libbpf-sys (links = "bpf") exports the include dir holding <bpf/bpf_helpers.h>.
    let libbpf_include = env::var("DEP_BPF_INCLUDE").expect("libbpf-sys exports DEP_BPF_INCLUDE");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets the target arch");
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    let cflags = std::fs::read_to_string("bpf/cflags").expect("bpf/cflags lists the BPF compile flags");
    let mut command = Command::new(&clang);
    command
        .args(cflags.split_whitespace())
        .arg(format!("-D__TARGET_ARCH_{}", if arch == "x86_64" { "x86" } else { &arch }))
        .arg(format!("-I{libbpf_include}"))
        .arg(format!("-I{multiarch}"));
    if let Ok(extra) = env::var("BPF_EXTRA_CFLAGS") {
        command.args(extra.split_whitespace());
    }
    command.arg("-c").arg("bpf/relay.bpf.c").arg("-o").arg(&object);

    let status = command.status().unwrap_or_else(|e| {
        panic!("running `{clang}` to build bpf/relay.bpf.c failed: {e}; install clang (apt-get install clang)")
    });
    assert!(status.success(), "`{clang}` failed to compile bpf/relay.bpf.c ({status})");

    for file in ["bpf/cflags", "bpf/relay.bpf.c", "bpf/consts.h", "bpf/structs.h", "bpf/maps.h", "bpf/parse.h"] {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=BPF_EXTRA_CFLAGS");
}
