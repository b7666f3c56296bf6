//! The command line as an operator meets it: config checking and exit codes.
//! Unprivileged: nothing here attaches anything.

use std::process::{Command, Output};

fn relay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oxidize-relay")).args(args).output().expect("run oxidize-relay")
}

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("oxr-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, text).expect("write temp config");
    path
}

#[test]
fn example_config_checks_out() {
    let output = relay(&["check-config", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/two-arm.toml")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (2 interfaces, 2 routes)"));
}

#[test]
fn bad_configs_exit_2_with_file_line_and_column() {
    let cases = [
        ("wrong-type", "[[interface]]\nname = 7\n", ":2:8: invalid type"),
        ("unknown-key", "[runtime]\nturbo = true\n", ":2:1: unknown field `turbo`"),
        (
            "port-range",
            "[[interface]]\nname = \"eth0\"\n[nat]\nports = \"70000-80000\"\n[[route]]\nlisten = \"10.0.0.1:53\"\nupstreams = [\"10.1.0.1:53\"]\n",
            ":4:9: NAT ports",
        ),
        (
            "overlap",
            "[[interface]]\nname = \"eth0\"\n[[route]]\nlisten = \"10.0.0.1:53\"\nupstreams = [\"10.1.0.1:53\"]\n[[route]]\nlisten = \"0.0.0.0:53\"\nupstreams = [\"10.1.0.2:53\"]\n",
            ":7:10: listen address 0.0.0.0:53 overlaps",
        ),
    ];
    for (name, text, expected) in cases {
        let path = write_temp(name, text);
        for args in [
            vec!["check-config", path.to_str().expect("utf-8")],
            vec!["run", "--config", path.to_str().expect("utf-8")],
        ] {
            let output = relay(&args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{name} {args:?}: {stderr}");
            assert!(stderr.contains(expected), "{name} {args:?}: wanted `{expected}` in: {stderr}");
        }
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn unreadable_config_exits_2() {
    let output = relay(&["check-config", "/nonexistent/oxidize-relay.toml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read"));
}

#[test]
fn missing_interface_fails_with_its_name() {
    let output =
        relay(&["run", "--interface", "oxrnothere0", "--listen", "10.0.0.1:5000", "--upstream", "10.1.0.2:7000"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("interface `oxrnothere0` not found: No such device"));
}

#[test]
fn check_config_checks_the_key_files_a_route_names() {
    let dir = std::env::temp_dir().join(format!("oxr-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = "0123456789abcdef".repeat(4);
    let files = [("short", "0011".to_owned()), ("nonhex", good.replace('a', "z")), ("good", good.clone())];
    for (name, text) in &files {
        std::fs::write(dir.join(name), text).expect("key file");
    }
    let config = |key: &std::path::Path| {
        write_temp(
            "keyed",
            &format!(
                "[[interface]]\nname = \"eth0\"\n[[route]]\nlisten = \"10.0.0.1:53\"\nupstreams = [\"10.1.0.1:53\"]\n\
                 upstream_encap = \"oxtunnel\"\nupstream_key_file = \"{}\"\n",
                key.display()
            ),
        )
    };
    for (key, expected) in [
        (dir.join("missing"), "cannot read it"),
        (dir.join("short"), "exactly 64 hexadecimal digits"),
        (dir.join("nonhex"), "only hexadecimal digits"),
        (dir.clone(), "is a directory"),
    ] {
        let path = config(&key);
        let output = relay(&["check-config", path.to_str().expect("utf-8")]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{key:?}: {stderr}");
        assert!(stderr.contains(expected), "{key:?}: wanted `{expected}` in: {stderr}");
        let file_only = relay(&["check-config", "--file-only", path.to_str().expect("utf-8")]);
        assert_eq!(file_only.status.code(), Some(0), "--file-only leaves the key files to `run`");
    }
    let good_path = dir.join("good");
    std::fs::set_permissions(&good_path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let output = relay(&["check-config", config(&good_path).to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("may be read by other users"), "a world-readable key is warned about: {stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn quick_form_errors_speak_of_the_flags() {
    let output = relay(&["run", "--interface", "eth0", "--listen", "10.0.0.1:25000", "--upstream", "10.1.0.2:7000"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--interface/--listen/--upstream") && stderr.contains("NAT port range"), "{stderr}");
    assert!(!stderr.contains("line"), "no line numbers of a file the user never wrote: {stderr}");
}

#[test]
fn an_unwritable_stats_file_fails_at_start() {
    let output = relay(&[
        "run",
        "--interface",
        "oxrnothere0",
        "--listen",
        "10.0.0.1:5000",
        "--upstream",
        "10.1.0.2:7000",
        "--stats-file",
        "/nonexistent-dir/stats.json",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stats file /nonexistent-dir/stats.json cannot be written"), "{stderr}");
}

#[test]
fn a_nat_range_inside_the_local_port_range_is_warned_about() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("procfs");
    let low: u32 = range.split_whitespace().next().and_then(|n| n.parse().ok()).expect("low bound");
    let path = write_temp(
        "overlap-local",
        &format!(
            "[[interface]]\nname = \"eth0\"\n[nat]\nports = \"{}-{}\"\n[[route]]\nlisten = \"10.0.0.1:53\"\nupstreams = [\"10.1.0.1:53\"]\n",
            low,
            low + 999
        ),
    );
    let output = relay(&["check-config", path.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "a warning, not an error: {stderr}");
    assert!(stderr.contains("overlaps net.ipv4.ip_local_port_range"), "{stderr}");
}
