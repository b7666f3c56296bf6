//! Privileged end-to-end scenarios: each runs `tests/scenarios/run.py` (the
//! same script the NixOS VM tests run) against the real binary, in network
//! namespaces over veth with real AF_XDP sockets and real UDP peers.

mod common;

use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Scenarios are CPU-bound on a small machine: run one at a time so timing-sensitive checks are fair.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Deletes every namespace of one scenario on drop, even when the scenario or the test panicked.
struct NamespaceGuard {
    prefix: String,
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{}-", self.prefix)) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

fn scenario(name: &str, backend: &str) {
    run_scenario(name, backend, None);
}

/// Whether the QEMU guest rig can run here (tests/vm): QEMU, busybox and /dev/net/tun.
///
/// Outside CI a missing piece prints a loud SKIPPED line; in CI it panics, because there the
/// guest tests must really run (`scripts/deps.sh` installs what they need).
fn guest_rig(test: &str) -> bool {
    let missing: Vec<&str> =
        [("qemu-system-x86_64", "/usr/bin/qemu-system-x86_64"), ("busybox", "/bin/busybox"), ("tun", "/dev/net/tun")]
            .into_iter()
            .filter(|(_, path)| std::fs::metadata(path).is_err())
            .map(|(name, _)| name)
            .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: the guest rig needs {missing:?} and CI must run it; run scripts/deps.sh");
    }
    eprintln!(
        "\n!!! SKIPPED {test}: the guest rig needs {missing:?} (apt install qemu-system-x86 busybox-static) !!!\n"
    );
    false
}

/// A scenario with the relay in a QEMU guest on a Debian suite's kernel (tests/vm), or in a namespace.
fn run_scenario(name: &str, backend: &str, guest: Option<&str>) {
    let test = match guest {
        Some(suite) => format!("{name} ({backend}, Debian {suite} guest)"),
        None => format!("{name} ({backend})"),
    };
    if !common::privileged(&test) || (guest.is_some() && !guest_rig(&test)) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let guard = NamespaceGuard {
        prefix: format!("oxt{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed)),
    };
    let output = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scenarios/run.py"))
        .args(["--relay", env!("CARGO_BIN_EXE_oxidize-relay"), "--prefix", &guard.prefix, "--backend", backend, name])
        .args(guest.map(|suite| ["--guest", suite]).into_iter().flatten())
        .output()
        .expect("python3 runs the scenario");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "scenario {test} failed ({}):\n{stdout}\n{stderr}", output.status);
}

/// One test per scenario and backend: the same scenario script, the same assertions.
macro_rules! scenarios {
    ($backend:ident: $($test:ident => $name:literal),* $(,)?) => {
        mod $backend {
            $(
                #[test]
                fn $test() {
                    super::scenario($name, stringify!($backend));
                }
            )*
        }
    };
}

scenarios! { af_xdp:
    ipv4_one_arm_100k_datagrams => "ipv4-one-arm",
    ipv6_one_arm => "ipv6-one-arm",
    ipv4_two_arm => "ipv4-two-arm",
    ipv6_two_arm_100k_datagrams => "ipv6-two-arm",
    four_queues_four_workers => "four-queues",
    bursts_beyond_the_tx_ring_wait_instead_of_dropping => "tx-pressure",
    a_config_serving_fewer_queues_than_the_nic_is_refused => "unserved-queues",
    thousand_clients_get_only_their_own_replies => "many-clients",
    idle_sessions_expire => "session-expiry",
    tcp_to_the_relay_host_works_while_attached => "tcp-coexistence",
    sigkill_leaves_traffic_to_the_kernel => "sigkill-fallback",
    reloads_lose_nothing_and_bad_ones_are_refused => "reload",
    a_draining_relay_serves_sessions_and_opens_none => "drain",
    a_dead_upstream_is_routed_around_and_taken_back => "upstream-health",
    upstreams_get_the_real_client_address_in_proxy_v2 => "proxy-protocol",
    datagrams_too_big_for_the_egress_get_icmp_too_big => "path-mtu",
    icmp_errors_reach_the_client_translated => "icmp-errors",
    a_restart_keeps_every_session => "restart-continuity",
    oversize_datagrams_are_counted_never_cut => "oversize",
    foreign_macs_and_own_sources_create_no_session => "never-sessions",
    an_upstream_back_with_a_new_mac_is_found_again => "stale-neighbour",
    a_deleted_interface_ends_the_relay_loudly => "interface-deleted",
    a_deleted_route_counts_as_no_route => "route-deleted",
    a_restart_right_after_sigkill_waits_for_the_old_link => "restart-after-sigkill",
    spoofed_and_malformed_flood_spares_the_legitimate_client => "flood",
    a_spoofed_flood_cannot_take_every_nat_port => "exhaustion",
    idle_connections_to_the_metrics_endpoint_cannot_hurt => "metrics-abuse",
    a_settled_client_keeps_every_reply_under_every_attack_at_once => "under-attack",
    runs_unprivileged_and_drops_capabilities => "least-privilege",
    relay_chain_over_an_oxtunnel_hop => "chain",
}

scenarios! { socket:
    ipv4_one_arm_100k_datagrams => "ipv4-one-arm",
    ipv6_one_arm => "ipv6-one-arm",
    ipv4_two_arm => "ipv4-two-arm",
    ipv6_two_arm_100k_datagrams => "ipv6-two-arm",
    thousand_clients_get_only_their_own_replies => "many-clients",
    idle_sessions_expire => "session-expiry",
    tcp_to_the_relay_host_works_while_attached => "tcp-coexistence",
    runs_unprivileged_and_drops_capabilities => "least-privilege",
    relay_chain_over_an_oxtunnel_hop => "chain",
    reloads_lose_nothing_and_bad_ones_are_refused => "reload",
    a_draining_relay_serves_sessions_and_opens_none => "drain",
    a_dead_upstream_is_routed_around_and_taken_back => "upstream-health",
    upstreams_get_the_real_client_address_in_proxy_v2 => "proxy-protocol",
    datagrams_too_big_for_the_egress_get_icmp_too_big => "path-mtu",
    icmp_errors_reach_the_client_translated => "icmp-errors",
    a_restart_keeps_every_session => "restart-continuity",
    oversize_datagrams_are_counted_never_cut => "oversize",
    idle_connections_to_the_metrics_endpoint_cannot_hurt => "metrics-abuse",
}

/// Detection: auto falls back to sockets without capabilities or on an interface AF_XDP cannot serve.
mod detection {
    #[test]
    fn without_capabilities_auto_uses_sockets_and_forced_af_xdp_fails() {
        super::scenario("capability-fallback", "af_xdp");
    }

    #[test]
    fn an_l3_interface_makes_auto_fall_back() {
        super::scenario("l3-interface-fallback", "af_xdp");
    }
}

/// The relay in QEMU guests on the kernels operators run (Debian 12, 13 and 11), on two-queue
/// virtio-net NICs, in `auto` mode: the same scenario script, driven from the host.
macro_rules! guest_scenarios {
    ($($suite:ident),*: $tests:tt) => {
        $( guest_suite!($suite $tests); )*
    };
}

macro_rules! guest_suite {
    ($suite:ident { $($test:ident => $name:literal),* $(,)? }) => {
        mod $suite {
            $(
                #[test]
                fn $test() {
                    super::run_scenario($name, "af_xdp", Some(stringify!($suite)));
                }
            )*
        }
    };
}

guest_scenarios! { bookworm, trixie, bullseye: {
    ipv4_one_arm => "ipv4-one-arm",
    ipv6_one_arm => "ipv6-one-arm",
    ipv4_two_arm => "ipv4-two-arm",
    ipv6_two_arm => "ipv6-two-arm",
    thousand_clients_get_only_their_own_replies => "many-clients",
    idle_sessions_expire => "session-expiry",
    tcp_to_the_relay_host_works_while_attached => "tcp-coexistence",
    sigkill_leaves_traffic_to_the_kernel => "sigkill-fallback",
    spoofed_and_malformed_flood_spares_the_legitimate_client => "flood",
    relay_chain_over_an_oxtunnel_hop => "chain",
    reloads_lose_nothing_and_bad_ones_are_refused => "reload",
    a_draining_relay_serves_sessions_and_opens_none => "drain",
    icmp_errors_reach_the_client_translated => "icmp-errors",
    datagrams_too_big_for_the_egress_get_icmp_too_big => "path-mtu",
    upstreams_get_the_real_client_address_in_proxy_v2 => "proxy-protocol",
    oversize_datagrams_are_counted_never_cut => "oversize",
    a_dead_upstream_is_routed_around_and_taken_back => "upstream-health",
    an_upstream_back_with_a_new_mac_is_found_again => "stale-neighbour",
    a_deleted_route_counts_as_no_route => "route-deleted",
    foreign_macs_and_own_sources_create_no_session => "never-sessions",
}}
