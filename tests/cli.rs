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
    assert!(String::from_utf8_lossy(&output.stderr).contains("interface `oxrnothere0`: not found"));
}
