//! Interface facts from sysfs and if_nametoindex.

use std::ffi::CString;
use std::fs;
use std::io;

use oxidize_relay_core::config::parse_mac;
use oxidize_relay_core::wire::MacAddr;

#[derive(Debug, thiserror::Error)]
#[error("interface `{name}`: {what}")]
pub struct IfaceError {
    name: String,
    what: String,
}

/// What the relay needs to know about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceInfo {
    pub name: String,
    pub index: u32,
    pub mac: MacAddr,
    /// Number of RX queues the kernel exposes.
    pub rx_queues: u32,
    pub driver: String,
}

impl IfaceInfo {
    pub fn lookup(name: &str) -> Result<Self, IfaceError> {
        let error = |what: String| IfaceError {
            name: name.to_owned(),
            what,
        };
        let c_name = CString::new(name).map_err(|_| error("name contains NUL".into()))?;
        // SAFETY: c_name is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if index == 0 {
            return Err(error(format!("not found ({})", io::Error::last_os_error())));
        }
        let sysfs = format!("/sys/class/net/{name}");
        let address = fs::read_to_string(format!("{sysfs}/address"))
            .map_err(|e| error(format!("reading its MAC failed: {e}")))?;
        let mac = parse_mac(address.trim())
            .ok_or_else(|| error(format!("has no Ethernet MAC (`{}`)", address.trim())))?;
        let rx_queues = fs::read_dir(format!("{sysfs}/queues"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                    .count() as u32
            })
            .unwrap_or(1)
            .max(1);
        let driver = fs::read_link(format!("{sysfs}/device/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .or_else(|| {
                // Virtual devices have no device/driver link; their kind is in uevent (DEVTYPE) or is the name prefix.
                fs::read_to_string(format!("{sysfs}/uevent"))
                    .ok()?
                    .lines()
                    .find_map(|l| l.strip_prefix("DEVTYPE=").map(str::to_owned))
            })
            .unwrap_or_else(|| "unknown".into());
        Ok(IfaceInfo {
            name: name.to_owned(),
            index,
            mac,
            rx_queues,
            driver,
        })
    }
}
