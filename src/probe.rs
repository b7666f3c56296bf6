//! What this host can do for the relay, and which backend `mode = "auto"` picks.

use std::fs;
use std::io;
use std::sync::Arc;

use caps::{CapSet, Capability};

use oxidize_relay_core::config::{Config, Mode, XdpMode};
use serde_json::{Value, json};

use crate::sys::iface::{IfaceError, IfaceInfo};
use crate::sys::netlink::RouteSocket;
use crate::sys::{xdp, xsk};

#[derive(Debug, Clone)]
pub struct InterfaceReport {
    pub name: String,
    pub driver: Option<String>,
    pub rx_queues: Option<u32>,
    /// `None` when the interface is missing or the kernel does not advertise XDP features.
    pub native_xdp: Option<bool>,
    pub zero_copy: Option<bool>,
    pub error: Option<IfaceError>,
}

/// Everything `probe` prints and `auto` decides from.
#[derive(Debug, Clone)]
pub struct HostReport {
    pub kernel: String,
    pub btf: bool,
    pub xdp_programs: bool,
    pub af_xdp_sockets: Result<(), Arc<io::Error>>,
    pub cap_net_admin: bool,
    pub cap_net_raw: bool,
    pub cap_bpf: bool,
    pub cap_ipc_lock: bool,
    /// Bytes; `None` means unlimited.
    pub memlock_limit: Option<u64>,
    pub hugepages_free: u64,
    pub hugepage_kib: u64,
    pub interfaces: Vec<InterfaceReport>,
}

/// The oldest kernel the AF_XDP backend runs on: it attaches XDP through a BPF link (Linux 5.9)
/// and shares one UMEM between the queues of several interfaces (5.10). The guest rig
/// (tests/vm) runs the scenarios that fit a guest on Debian 11's 5.10, 12's 6.1 and 13's 6.12.
pub const MIN_AF_XDP_KERNEL: (u32, u32) = (5, 10);

/// Major and minor of a kernel release string such as `6.1.0-50-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The backend `auto` chose, with the reasons behind it.
#[derive(Debug, Clone)]
pub struct Choice {
    pub mode: Mode,
    pub reasons: Vec<String>,
}

impl HostReport {
    pub fn gather(interfaces: &[String]) -> Self {
        // Unreadable counts as absent: probe reports, it does not guess.
        let has = |cap: Capability| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false);
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        HostReport {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default(),
            btf: fs::metadata("/sys/kernel/btf/vmlinux").is_ok(),
            xdp_programs: xdp::kernel_loads_xdp(),
            af_xdp_sockets: xsk::af_xdp_socket_available().map_err(Arc::new),
            cap_net_admin: has(Capability::CAP_NET_ADMIN),
            cap_net_raw: has(Capability::CAP_NET_RAW),
            // CAP_SYS_ADMIN implies what CAP_BPF grants on kernels that have it.
            cap_bpf: has(Capability::CAP_BPF) || has(Capability::CAP_SYS_ADMIN),
            cap_ipc_lock: has(Capability::CAP_IPC_LOCK),
            memlock_limit: memlock_limit(),
            hugepages_free: meminfo_value(&meminfo, "HugePages_Free:"),
            hugepage_kib: meminfo_value(&meminfo, "Hugepagesize:"),
            interfaces: interfaces.iter().map(|name| interface_report(name)).collect(),
        }
    }

    /// The backend `auto` would run: AF_XDP when the kernel, the capabilities
    /// and every interface allow it, otherwise the socket backend.
    pub fn choose(&self) -> Choice {
        let mut blockers = Vec::new();
        if !self.kernel_supported() {
            let (major, minor) = MIN_AF_XDP_KERNEL;
            blockers.push(format!(
                "Linux {} is older than {major}.{minor}, the oldest the AF_XDP backend runs on (XDP through a BPF link, one UMEM shared across interfaces)",
                self.kernel
            ));
        }
        if !self.xdp_programs {
            blockers.push(if self.cap_bpf {
                "the kernel does not load XDP programs".to_owned()
            } else {
                "cannot load XDP programs: CAP_BPF (or CAP_SYS_ADMIN) is missing".to_owned()
            });
        }
        if let Err(error) = &self.af_xdp_sockets {
            blockers.push(format!(
                "cannot open AF_XDP sockets ({error}): kernel without CONFIG_XDP_SOCKETS or CAP_NET_RAW missing"
            ));
        }
        if !self.cap_net_admin {
            blockers.push("cannot attach XDP: CAP_NET_ADMIN is missing".into());
        }
        for interface in &self.interfaces {
            if let Some(error) = &interface.error {
                blockers.push(with_causes(error));
            }
        }
        if !blockers.is_empty() {
            return Choice { mode: Mode::Socket, reasons: blockers };
        }
        let reasons = self
            .interfaces
            .iter()
            .map(|i| {
                let xdp = match i.native_xdp {
                    Some(true) => "native XDP",
                    Some(false) => "generic XDP (driver has no native XDP)",
                    None => "native XDP if the driver takes it, else generic",
                };
                let copy = if i.zero_copy == Some(true) { "zero-copy" } else { "copy mode" };
                format!("{} ({}): {xdp}, {copy}", i.name, i.driver.as_deref().unwrap_or("?"))
            })
            .collect();
        Choice { mode: Mode::AfXdp, reasons }
    }

    /// Whether the kernel is one the AF_XDP backend supports (an unreadable release is given the benefit of the doubt).
    pub fn kernel_supported(&self) -> bool {
        kernel_version(&self.kernel).is_none_or(|version| version >= MIN_AF_XDP_KERNEL)
    }

    /// The XDP mode to use on `name` when the config says `auto`.
    pub fn xdp_mode_for(&self, name: &str, configured: XdpMode) -> XdpMode {
        match (configured, self.interfaces.iter().find(|i| i.name == name).and_then(|i| i.native_xdp)) {
            (XdpMode::Auto, Some(false)) => XdpMode::Generic,
            (mode, _) => mode,
        }
    }

    pub fn to_json(&self) -> Value {
        let choice = self.choose();
        json!({
            "kernel": self.kernel,
            "kernel_supported_by_af_xdp": self.kernel_supported(),
            "btf": self.btf,
            "xdp_programs": self.xdp_programs,
            "af_xdp_sockets": self.af_xdp_sockets.is_ok(),
            "capabilities": {
                "net_admin": self.cap_net_admin, "net_raw": self.cap_net_raw,
                "bpf": self.cap_bpf, "ipc_lock": self.cap_ipc_lock,
            },
            "memlock_limit_bytes": self.memlock_limit,
            "hugepages": { "free": self.hugepages_free, "size_kib": self.hugepage_kib },
            "interfaces": self.interfaces.iter().map(|i| json!({
                "name": i.name, "driver": i.driver, "rx_queues": i.rx_queues,
                "native_xdp": i.native_xdp, "zero_copy": i.zero_copy, "error": i.error.as_ref().map(with_causes),
            })).collect::<Vec<_>>(),
            "auto_mode": mode_name(choice.mode),
            "reasons": choice.reasons,
        })
    }

    pub fn to_table(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let maybe = |b: Option<bool>| b.map_or("unknown", yes);
        let mut out = String::new();
        let mut row = |key: &str, value: String| out.push_str(&format!("{key:<22} {value}\n"));
        let (major, minor) = MIN_AF_XDP_KERNEL;
        let supported = if self.kernel_supported() { "" } else { ": too old for AF_XDP" };
        row("kernel", format!("{} (AF_XDP needs {major}.{minor} or later{supported})", self.kernel));
        row("BTF", yes(self.btf).into());
        row("XDP programs", yes(self.xdp_programs).into());
        row("AF_XDP sockets", self.af_xdp_sockets.as_ref().map_or_else(|e| format!("no ({e})"), |()| "yes".into()));
        row("CAP_NET_ADMIN", yes(self.cap_net_admin).into());
        row("CAP_NET_RAW", yes(self.cap_net_raw).into());
        row("CAP_BPF", yes(self.cap_bpf).into());
        row("CAP_IPC_LOCK", yes(self.cap_ipc_lock).into());
        row("memlock limit", self.memlock_limit.map_or("unlimited".into(), |b| format!("{} KiB", b / 1024)));
        row("hugepages free", format!("{} x {} KiB", self.hugepages_free, self.hugepage_kib));
        for i in &self.interfaces {
            let detail = match &i.error {
                Some(error) => with_causes(error),
                None => format!(
                    "driver {}, {} RX queues, native XDP {}, zero-copy {}",
                    i.driver.as_deref().unwrap_or("?"),
                    i.rx_queues.unwrap_or(0),
                    maybe(i.native_xdp),
                    maybe(i.zero_copy)
                ),
            };
            row(&format!("interface {}", i.name), detail);
        }
        let choice = self.choose();
        row("auto would choose", mode_name(choice.mode).into());
        for reason in choice.reasons {
            row("", format!("- {reason}"));
        }
        out
    }
}

/// Why the configured mode cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error(transparent)]
    Interface(IfaceError),
    #[error("mode = \"af_xdp\" cannot run on this host: {reasons}; use mode = \"auto\" or \"socket\"")]
    AfXdpUnavailable { reasons: String },
}

/// Resolves `mode` for `config`: `auto` probes; a forced `af_xdp` that cannot
/// work fails here, before anything is attached.
pub fn resolve_mode(config: &Config) -> Result<(Mode, HostReport), ModeError> {
    let names: Vec<String> = config.interfaces.iter().map(|i| i.name.clone()).collect();
    let report = HostReport::gather(&names);
    let choice = report.choose();
    if config.runtime.mode != Mode::Socket
        && let Some(missing) = report.interfaces.iter().find_map(|i| i.error.as_ref().filter(|e| e.is_missing()))
    {
        return Err(ModeError::Interface(missing.clone()));
    }
    match config.runtime.mode {
        Mode::Auto => {
            tracing::info!(mode = mode_name(choice.mode), reasons = %choice.reasons.join("; "), "mode auto: backend chosen");
            Ok((choice.mode, report))
        }
        Mode::AfXdp if choice.mode != Mode::AfXdp => {
            Err(ModeError::AfXdpUnavailable { reasons: choice.reasons.join("; ") })
        }
        forced => Ok((forced, report)),
    }
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Auto => "auto",
        Mode::AfXdp => "af_xdp",
        Mode::Socket => "socket",
    }
}

fn interface_report(name: &str) -> InterfaceReport {
    match IfaceInfo::lookup(name) {
        Ok(info) => {
            let features = RouteSocket::xdp_features(info.index).ok().flatten();
            InterfaceReport {
                name: name.to_owned(),
                driver: Some(info.driver),
                rx_queues: Some(info.rx_queues),
                native_xdp: features.map(|f| f.native()),
                zero_copy: features.map(|f| f.zero_copy()),
                error: None,
            }
        }
        Err(error) => InterfaceReport {
            name: name.to_owned(),
            driver: None,
            rx_queues: None,
            native_xdp: None,
            zero_copy: None,
            error: Some(error),
        },
    }
}

/// An error and every cause under it, as one line.
fn with_causes(error: &IfaceError) -> String {
    let mut line = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        line += &format!(": {inner}");
        cause = inner.source();
    }
    line
}

fn memlock_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max locked memory"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn meminfo_value(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kernel: &str) -> HostReport {
        HostReport {
            kernel: kernel.to_owned(),
            btf: true,
            xdp_programs: true,
            af_xdp_sockets: Ok(()),
            cap_net_admin: true,
            cap_net_raw: true,
            cap_bpf: true,
            cap_ipc_lock: true,
            memlock_limit: None,
            hugepages_free: 0,
            hugepage_kib: 2048,
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn kernel_versions_are_read_from_distribution_release_strings() {
        assert_eq!(kernel_version("6.1.0-50-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.117+deb13-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("5.10.0-32-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("4.19.0-27-amd64"), Some((4, 19)));
        assert_eq!(kernel_version(""), None);
    }

    #[test]
    fn a_kernel_below_the_minimum_makes_auto_use_sockets_and_says_why() {
        for supported in ["5.10.0-32-amd64", "6.1.0-50-amd64", "6.12.117+deb13-amd64", "6.18.0"] {
            assert_eq!(report(supported).choose().mode, Mode::AfXdp, "{supported}");
        }
        let old = report("5.4.0-216-generic").choose();
        assert_eq!(old.mode, Mode::Socket);
        assert!(old.reasons[0].contains("Linux 5.4.0-216-generic is older than 5.10"), "{:?}", old.reasons);
        assert!(report("4.19.0-27-amd64").to_table().contains("too old for AF_XDP"));
    }
}
