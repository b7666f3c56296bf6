//! The Nix side checked without nixpkgs (none is reachable here): what the
//! package is built from, how its BPF objects meet nixpkgs' compiler wrapper,
//! the settings the module renders, and that the VM tests cover every scenario.
//! Each needs `nix-instantiate` (Debian's `nix-bin`, installed by scripts/deps.sh);
//! without it they say SKIPPED, and fail under `CI`.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Flags nixpkgs' cc-wrapper adds to every C compile by default on x86_64 with clang
/// (pkgs/build-support/cc-wrapper/add-hardening.sh), by the hardening flag that adds them.
const WRAPPER_HARDENING: &[(&str, &[&str])] = &[
    ("fortify3", &["-O2", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=3"]),
    ("stackprotector", &["-fstack-protector-strong", "--param", "ssp-buffer-size=4"]),
    ("stackclashprotection", &["-fstack-clash-protection"]),
    ("pic", &["-fPIC"]),
    ("strictoverflow", &["-fwrapv"]),
    ("format", &["-Wformat", "-Wformat-security", "-Werror=format-security"]),
    ("zerocallusedregs", &["-fzero-call-used-regs=used-gpr"]),
];

/// Scenarios that are parts of other tests rather than tests of their own.
const HELPER_SCENARIOS: &[&str] = &["topology-up", "topology-down", "running-relay", "demo"];

fn nix_available(test: &str) -> bool {
    if Command::new("nix-instantiate").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test}: nix-instantiate is missing under CI (apt-get install nix-bin)");
    eprintln!("SKIPPED {test}: nix-instantiate not found (apt-get install nix-bin)");
    false
}

/// `nix-instantiate --eval --strict --json` of an expression, parsed.
fn nix_json(expression: &str) -> serde_json::Value {
    let output = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", expression])
        .current_dir(ROOT)
        .output()
        .expect("run nix-instantiate");
    assert!(output.status.success(), "nix-instantiate -E {expression}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("nix-instantiate prints JSON")
}

/// An attribute of the package derivation's arguments, evaluated with stand-ins for nixpkgs.
fn package_attribute(path: &str) -> serde_json::Value {
    nix_json(&format!(
        "(import ./nix/package.nix {{ lib = {{ }}; rustPlatform = {{ buildRustPackage = args: args; bindgenHook = null; }}; \
         llvmPackages = {{ clang = null; llvm = null; }}; pkg-config = null; m4 = null; elfutils = null; zlib = null; \
         libpcap = null; linuxHeaders = \"/usr\"; }}).{path}"
    ))
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value.as_array().expect("a list").iter().map(|v| v.as_str().expect("a string").to_owned()).collect()
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn the_package_source_set_alone_builds_and_formats() {
    if !nix_available("the_package_source_set_alone_builds_and_formats") {
        return;
    }
    let paths = strings(&nix_json("import ./nix/source-paths.nix"));
    let scratch = std::env::temp_dir().join(format!("oxr-source-set-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    // Exactly the tracked files under the listed paths, as lib.fileset hands them to the build.
    let listed = run(Command::new("git").args(["ls-files", "-z", "--"]).args(&paths).current_dir(ROOT));
    for file in listed.split('\0').filter(|f| !f.is_empty()) {
        let target = scratch.join(file);
        std::fs::create_dir_all(target.parent().expect("a parent")).expect("scratch directory");
        std::fs::copy(Path::new(ROOT).join(file), &target).unwrap_or_else(|e| panic!("copy {file}: {e}"));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The manifest and every target it declares (a missing bench file fails here already).
    run(Command::new(&cargo)
        .args(["metadata", "--offline", "--locked", "--no-deps", "--format-version", "1"])
        .current_dir(&scratch));
    run(Command::new(&cargo).args(["fmt", "--all", "--check"]).current_dir(&scratch));
    // Its own target directory under ours, kept between runs so only the workspace recompiles.
    let target_dir = PathBuf::from(ROOT).join("target").join("source-set");
    run(Command::new(&cargo)
        .args(["check", "--offline", "--locked", "--workspace", "--all-targets"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(&scratch));
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn bpf_objects_build_behind_nixpkgs_hardening_wrapper() {
    if !nix_available("bpf_objects_build_behind_nixpkgs_hardening_wrapper") {
        return;
    }
    let disabled = strings(&package_attribute("hardeningDisable"));
    let wrapper: Vec<&str> = WRAPPER_HARDENING
        .iter()
        .filter(|(flag, _)| !disabled.iter().any(|d| d == flag))
        .flat_map(|(_, flags)| flags.iter().copied())
        .collect();
    let libbpf_include = libbpf_include();
    let out = std::env::temp_dir().join(format!("oxr-hardened-{}.o", std::process::id()));
    // The wrapper puts its flags before the caller's, as cc-wrapper does.
    let ours = include_str!("../bpf/cflags");
    run(Command::new("clang")
        .args(&wrapper)
        .args(ours.split_whitespace())
        .args(["-D__TARGET_ARCH_x86", "-I/usr/include/x86_64-linux-gnu"])
        .arg(format!("-I{}", libbpf_include.display()))
        .args(["-c", "bpf/relay.bpf.c", "-o"])
        .arg(&out)
        .current_dir(ROOT));
    // libxdp's own BPF program, with the BPF_CFLAGS the package gives `make libxdp`.
    let bpf_cflags = package_attribute("env.BPF_CFLAGS");
    let xdp_tools = registry_crate("libxdp-sys-0.2.4").join("xdp-tools");
    run(Command::new("clang")
        .args(&wrapper)
        .args(bpf_cflags.as_str().expect("a string").split_whitespace())
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-I/usr/include/x86_64-linux-gnu"])
        .arg(format!("-I{}", xdp_tools.join("headers").display()))
        .arg(format!("-I{}", libbpf_include.display()))
        .arg("-c")
        .arg(xdp_tools.join("lib/libxdp/xsk_def_xdp_prog.c"))
        .arg("-o")
        .arg(&out));
    let _ = std::fs::remove_file(out);
}

#[test]
fn module_settings_render_to_configs_the_relay_accepts() {
    if !nix_available("module_settings_render_to_configs_the_relay_accepts") {
        return;
    }
    // The same data the module hands pkgs.formats.toml, rendered to TOML here, checked as the module does.
    for (name, expression) in [
        ("the module's option example", "import ./nixos/settings-example.nix"),
        ("the appliance's settings", "(import ./nixos/appliance-settings.nix) (import ./nixos/site-example.nix)"),
    ] {
        let value = nix_json(expression);
        let toml = toml::to_string(&value).unwrap_or_else(|e| panic!("{name}: not representable as TOML: {e}"));
        let path = std::env::temp_dir().join(format!("oxr-settings-{}-{}.toml", std::process::id(), name.len()));
        std::fs::write(&path, &toml).expect("write rendered settings");
        let output = Command::new(env!("CARGO_BIN_EXE_oxidize-relay"))
            .args(["check-config", "--file-only"])
            .arg(&path)
            .output()
            .expect("run check-config");
        let _ = std::fs::remove_file(&path);
        assert!(output.status.success(), "{name} rendered to:\n{toml}\n{}", String::from_utf8_lossy(&output.stderr));
    }
}

#[test]
fn every_scenario_runs_in_a_nixos_vm_test() {
    let scenarios = std::fs::read_to_string(Path::new(ROOT).join("tests/scenarios/run.py")).expect("run.py");
    let names: Vec<&str> = scenarios
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("@scenario(\"").or_else(|| line.strip_prefix("SCENARIOS[\""))?;
            rest.split('"').next()
        })
        .filter(|name| !HELPER_SCENARIOS.contains(name))
        .collect();
    assert!(names.len() > 20, "found the scenarios: {names:?}");
    let vm_tests: String = std::fs::read_dir(Path::new(ROOT).join("tests/nixos"))
        .expect("tests/nixos")
        .map(|entry| std::fs::read_to_string(entry.expect("entry").path()).expect("a VM test"))
        .collect();
    let missing: Vec<&&str> = names.iter().filter(|name| !vm_tests.contains(&format!("\"{name}\""))).collect();
    assert!(missing.is_empty(), "scenarios no NixOS VM test runs: {missing:?}");
}

fn libbpf_include() -> PathBuf {
    // libbpf-sys's build output holds the installed headers (bpf/bpf_helpers.h).
    let build = Path::new(ROOT).join("target/debug/build");
    std::fs::read_dir(&build)
        .expect("target/debug/build")
        .filter_map(|entry| entry.ok().map(|e| e.path().join("out/include")))
        .find(|include| include.join("bpf/bpf_helpers.h").exists())
        .expect("libbpf-sys's headers in target/debug/build")
}

fn registry_crate(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
    std::fs::read_dir(home.join("registry/src"))
        .expect("the cargo registry")
        .filter_map(|index| std::fs::read_dir(index.ok()?.path()).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(name)))
        .unwrap_or_else(|| panic!("{name} in the cargo registry"))
}
