//! Shared by the privileged test files.

/// Whether this process runs with uid 0. Privileged tests need root (XDP, BPF, netns).
///
/// Outside CI a non-root run prints a loud SKIPPED line and returns false; in
/// CI (`CI` set) it panics, because there the tests must really run.
pub fn privileged(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false);
    if root {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (XDP, BPF, network namespaces) and CI must run it; run the suite as root");
    }
    eprintln!("\n!!! SKIPPED {test}: needs root (XDP, BPF, network namespaces); run `sudo cargo test` !!!\n");
    false
}
