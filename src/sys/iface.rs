//! Interface facts from sysfs and if_nametoindex.

use std::ffi::CString;
use std::fs;
use std::io;
use std::sync::Arc;

use oxidize_relay_core::config::parse_mac;
use oxidize_relay_core::wire::MacAddr;

/// The interface index of `name`, if such an interface exists.
fn index_of(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: c_name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Why an interface cannot be served. Cloned into probe reports, hence the shared sources.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IfaceError {
    #[error("interface `{name}` not found")]
    NotFound {
        name: String,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("interface `{name}`: reading its MAC failed")]
    UnreadableMac {
        name: String,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("interface `{name}` has no Ethernet MAC (`{address}`)")]
    NotEthernet { name: String, address: String },
}

impl IfaceError {
    /// The interface does not exist (as opposed to existing without what AF_XDP needs).
    pub fn is_missing(&self) -> bool {
        matches!(self, IfaceError::NotFound { .. })
    }
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
    /// The IP MTU the kernel reports (`/sys/class/net/IF/mtu`) when the relay starts.
    pub mtu: u16,
}

impl IfaceInfo {
    /// Whether the interface this was looked up from still exists under its name and index
    /// (deleting it takes the XDP program and the AF_XDP sockets with it; a new one of the
    /// same name has another index and none of them).
    pub fn still_present(&self) -> bool {
        index_of(&self.name) == Some(self.index)
    }

    /// The interface's IP MTU now (an operator may change it while the relay runs).
    pub fn current_mtu(&self) -> Option<u16> {
        read_mtu(&self.name)
    }

    pub fn lookup(name: &str) -> Result<Self, IfaceError> {
        let index = index_of(name).unwrap_or(0);
        if index == 0 {
            return Err(IfaceError::NotFound { name: name.to_owned(), source: Arc::new(io::Error::last_os_error()) });
        }
        let sysfs = format!("/sys/class/net/{name}");
        let address = fs::read_to_string(format!("{sysfs}/address"))
            .map_err(|e| IfaceError::UnreadableMac { name: name.to_owned(), source: Arc::new(e) })?;
        let mac = parse_mac(address.trim())
            .ok_or_else(|| IfaceError::NotEthernet { name: name.to_owned(), address: address.trim().to_owned() })?;
        let rx_queues = fs::read_dir(format!("{sysfs}/queues"))
            .map(|entries| {
                entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("rx-")).count()
                    as u32
            })
            .unwrap_or(1)
            .max(1);
        let driver = ethtool_driver(name).unwrap_or_else(|| "unknown".into());
        let mtu = read_mtu(name).unwrap_or(1500);
        Ok(IfaceInfo { name: name.to_owned(), index, mac, rx_queues, driver, mtu })
    }
}

/// `/sys/class/net/NAME/mtu`, within what a u16 holds (IP MTUs above 65535 do not exist).
fn read_mtu(name: &str) -> Option<u16> {
    let text = fs::read_to_string(format!("/sys/class/net/{name}/mtu")).ok()?;
    text.trim().parse::<u32>().ok().map(|mtu| u16::try_from(mtu).unwrap_or(u16::MAX))
}

/// The driver name as `ethtool -i` reports it (ETHTOOL_GDRVINFO), for physical and virtual devices alike.
fn ethtool_driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x03;
    #[repr(C)]
    struct DriverInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
        counts: [u32; 5],
    }
    #[repr(C)]
    struct InterfaceRequest {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DriverInfo,
        padding: [u8; 16],
    }
    let mut info = DriverInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 160], counts: [0; 5] };
    let mut request = InterfaceRequest { name: [0; libc::IFNAMSIZ], data: &mut info, padding: [0; 16] };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    request.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a throwaway datagram socket for the ioctl; checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: request is a valid ifreq whose data points at a live ethtool_drvinfo of the kernel's layout.
    let result = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut request) };
    // SAFETY: fd was opened above and is not used after this.
    unsafe { libc::close(fd) };
    if result != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}
