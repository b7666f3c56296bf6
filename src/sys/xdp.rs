//! Loading, attaching and talking to the XDP program in `bpf/` through libbpf.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use libbpf_sys as bpf;
use oxidize_relay_core::config::XdpMode;

use super::bpf_abi::{AddrKey, EndpointKey, FlowKey, RelayConfig, XdpCounter};

/// The compiled program, built by build.rs.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

const PROGRAM_NAME: &CStr = c"oxidize_relay";
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// How long attaching waits for an interface that still has an XDP program (a killed relay's link).
const BUSY_RETRY: Duration = Duration::from_secs(3);

/// How the program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl XdpError {
    /// Attaching failed because the interface already has an XDP program.
    fn interface_busy(&self) -> bool {
        matches!(self, XdpError::Attach { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EBUSY) | Some(libc::EEXIST)))
    }
}

/// The id and name of the XDP program attached to `ifindex`, for an error message.
fn attached_program(ifindex: u32) -> String {
    // SAFETY: bpf_xdp_query_opts is a plain C struct for which all-zero is the documented default.
    let mut query: bpf::bpf_xdp_query_opts = unsafe { std::mem::zeroed() };
    query.sz = size_of::<bpf::bpf_xdp_query_opts>() as _;
    // SAFETY: query is initialised with its size, as libbpf requires.
    if unsafe { bpf::bpf_xdp_query(ifindex as i32, 0, &mut query) } != 0 || query.prog_id == 0 {
        return "unknown".into();
    }
    let id = query.prog_id;
    // SAFETY: plain syscall wrapper; a negative result is an error.
    let fd = unsafe { bpf::bpf_prog_get_fd_by_id(id) };
    if fd < 0 {
        return format!("program id {id}");
    }
    // SAFETY: fd was just returned to us and nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: bpf_prog_info is a plain C struct; all-zero asks for nothing but the fixed fields.
    let mut info: bpf::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut length = size_of::<bpf::bpf_prog_info>() as u32;
    // SAFETY: info is writable for `length` bytes and fd is a program fd.
    if unsafe { bpf::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut length) } != 0 {
        return format!("program id {id}");
    }
    let name: String = info.name.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
    format!("program id {id} named `{name}`")
}

impl AttachedMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("bpf_object__open_mem of the relay's XDP object failed")]
    Open(#[source] io::Error),
    #[error("bpf_object__load failed (needs root or CAP_BPF+CAP_NET_ADMIN and a kernel with BTF; see `dmesg`)")]
    Load(#[source] io::Error),
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    #[error("attaching XDP to interface index {ifindex} in {mode} mode failed{hint}")]
    Attach {
        ifindex: u32,
        mode: &'static str,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("updating BPF map `{map}` failed")]
    MapUpdate {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading BPF map `{map}` failed")]
    MapRead {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[cfg(feature = "test-support")]
    #[error("bpf_prog_test_run_opts failed")]
    TestRun(#[source] io::Error),
}

/// One loaded instance of the program with its own maps (one per interface).
#[derive(Debug)]
pub struct XdpProgram {
    object: NonNull<bpf::bpf_object>,
    program_fd: RawFd,
    xsks: RawFd,
    listen: RawFd,
    nat_addrs: RawFd,
    relay_config: RawFd,
    stats: RawFd,
    flows: RawFd,
    /// The XDP link: closing it detaches the program, also when the process dies.
    link: Option<OwnedFd>,
}

// SAFETY: the bpf_object is only touched through &mut self or at drop, and
// libbpf objects carry no thread affinity.
unsafe impl Send for XdpProgram {}

impl XdpProgram {
    /// Opens and loads the embedded object into the kernel (maps created, program
    /// verified), with room for `max_flows` established client flows.
    pub fn load(max_flows: u32) -> Result<Self, XdpError> {
        // SAFETY: OBJECT is a valid, 'static ELF buffer; a null opts pointer selects defaults.
        let raw = unsafe { bpf::bpf_object__open_mem(OBJECT.as_ptr().cast(), OBJECT.len() as _, std::ptr::null()) };
        let object = NonNull::new(raw).ok_or_else(|| XdpError::Open(io::Error::last_os_error()))?;
        // Owns the object from here, so every early return below closes it.
        let mut program = XdpProgram {
            object,
            program_fd: -1,
            xsks: -1,
            listen: -1,
            nat_addrs: -1,
            relay_config: -1,
            stats: -1,
            flows: -1,
            link: None,
        };
        // SAFETY: object is open and not loaded yet, so its maps may still be resized; the name is NUL-terminated.
        let flows = unsafe { bpf::bpf_object__find_map_by_name(object.as_ptr(), c"flows".as_ptr()) };
        if flows.is_null() {
            return Err(XdpError::Missing("flows"));
        }
        // SAFETY: flows is a map of the open object, before load.
        let err = unsafe { bpf::bpf_map__set_max_entries(flows, max_flows.max(1)) };
        if err != 0 {
            return Err(XdpError::Load(io::Error::from_raw_os_error(-err)));
        }
        // SAFETY: object is a live bpf_object from open_mem.
        let err = unsafe { bpf::bpf_object__load(object.as_ptr()) };
        if err != 0 {
            return Err(XdpError::Load(io::Error::from_raw_os_error(-err)));
        }
        // SAFETY: object is loaded; the name is NUL-terminated.
        let prog = unsafe { bpf::bpf_object__find_program_by_name(object.as_ptr(), PROGRAM_NAME.as_ptr()) };
        if prog.is_null() {
            return Err(XdpError::Missing("program `oxidize_relay`"));
        }
        // SAFETY: prog is a program of the loaded object.
        program.program_fd = unsafe { bpf::bpf_program__fd(prog) };
        program.xsks = program.map_fd(c"xsks_map")?;
        program.listen = program.map_fd(c"listen_map")?;
        program.nat_addrs = program.map_fd(c"nat_addrs")?;
        program.relay_config = program.map_fd(c"relay_config_map")?;
        program.stats = program.map_fd(c"xdp_stats")?;
        program.flows = program.map_fd(c"flows")?;
        Ok(program)
    }

    /// Attaches to `ifindex` through a BPF link. `Auto` tries native first, then generic.
    pub fn attach(&mut self, ifindex: u32, mode: XdpMode) -> Result<AttachedMode, XdpError> {
        let attempts: &[AttachedMode] = match mode {
            XdpMode::Native => &[AttachedMode::Native],
            XdpMode::Generic => &[AttachedMode::Generic],
            XdpMode::Auto => &[AttachedMode::Native, AttachedMode::Generic],
        };
        let mut last_error = None;
        for &attempt in attempts {
            // A relay killed a moment ago leaves its link until the kernel has torn it down.
            let deadline = Instant::now() + BUSY_RETRY;
            loop {
                match self.link_create(ifindex, attempt) {
                    Ok(link) => {
                        self.link = Some(link);
                        return Ok(attempt);
                    }
                    Err(error) if error.interface_busy() && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    // Another mode would meet the same program.
                    Err(error) if error.interface_busy() => return Err(error),
                    Err(error) => {
                        last_error = Some(error);
                        break;
                    }
                }
            }
        }
        Err(last_error.expect("at least one attach attempt"))
    }

    /// Adds a listen endpoint: packets to it go to the AF_XDP socket.
    pub fn add_listen(&self, listen: SocketAddr) -> Result<(), XdpError> {
        update(self.listen, "listen_map", &EndpointKey::new(listen), &1u32)
    }

    /// Removes a listen endpoint (a reload dropped its route): its packets go back to the kernel.
    pub fn remove_listen(&self, listen: SocketAddr) {
        delete(self.listen, &EndpointKey::new(listen));
    }

    /// Adds a NAT source address: replies to it within the NAT range go to the socket.
    pub fn add_nat_addr(&self, ip: IpAddr) -> Result<(), XdpError> {
        update(self.nat_addrs, "nat_addrs", &AddrKey::new(ip), &1u8)
    }

    /// Sets the NAT port range and the per-CPU budget of new client flows per second (0 = none).
    pub fn configure(&self, config: &RelayConfig) -> Result<(), XdpError> {
        update(self.relay_config, "relay_config_map", &0u32, config)
    }

    /// A handle on the established-flows map for a worker thread.
    pub fn flow_map(&self) -> FlowMap {
        FlowMap { fd: self.flows }
    }

    /// Puts an AF_XDP socket into the slot of `queue`.
    pub fn register_socket(&self, queue: u32, socket_fd: RawFd) -> Result<(), XdpError> {
        update(self.xsks, "xsks_map", &queue, &(socket_fd as u32))
    }

    /// Each verdict counter summed over CPUs, in [`XdpCounter::ALL`] order.
    pub fn counters(&self) -> Result<[u64; XdpCounter::ALL.len()], XdpError> {
        // SAFETY: plain libbpf query without arguments.
        let cpus = unsafe { bpf::libbpf_num_possible_cpus() };
        let cpus = usize::try_from(cpus)
            .map_err(|_| XdpError::MapRead { map: "xdp_stats", source: io::Error::from_raw_os_error(-cpus) })?;
        let mut per_cpu = vec![0u64; cpus];
        let mut totals = [0u64; XdpCounter::ALL.len()];
        for (index, total) in totals.iter_mut().enumerate() {
            let key = index as u32;
            // SAFETY: a per-CPU array lookup writes one u64 per possible CPU into per_cpu, which has exactly that many.
            let err =
                unsafe { bpf::bpf_map_lookup_elem(self.stats, (&raw const key).cast(), per_cpu.as_mut_ptr().cast()) };
            if err != 0 {
                return Err(XdpError::MapRead { map: "xdp_stats", source: io::Error::from_raw_os_error(-err) });
            }
            *total = per_cpu.iter().sum();
        }
        Ok(totals)
    }

    /// Runs the program once over `frame` with BPF_PROG_TEST_RUN; returns the
    /// XDP action and the frame as the program left it.
    #[cfg(feature = "test-support")]
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), XdpError> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = bpf::bpf_test_run_opts {
            sz: size_of::<bpf::bpf_test_run_opts>() as _,
            data_in: frame.as_ptr().cast(),
            data_out: out.as_mut_ptr().cast(),
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: data_in/data_out point to live buffers of the sizes given; program_fd is loaded.
        let err = unsafe { bpf::bpf_prog_test_run_opts(self.program_fd, &mut opts) };
        if err != 0 {
            return Err(XdpError::TestRun(io::Error::from_raw_os_error(-err)));
        }
        out.truncate(opts.data_size_out as usize);
        Ok((opts.retval, out))
    }

    fn link_create(&self, ifindex: u32, mode: AttachedMode) -> Result<OwnedFd, XdpError> {
        // SAFETY: bpf_link_create_opts is a plain C struct for which all-zero is the documented default.
        let mut opts: bpf::bpf_link_create_opts = unsafe { std::mem::zeroed() };
        opts.sz = size_of::<bpf::bpf_link_create_opts>() as _;
        opts.flags = match mode {
            AttachedMode::Native => XDP_FLAGS_DRV_MODE,
            AttachedMode::Generic => XDP_FLAGS_SKB_MODE,
        };
        // SAFETY: program_fd is a loaded XDP program and opts is initialised above.
        let fd = unsafe { bpf::bpf_link_create(self.program_fd, ifindex as i32, bpf::BPF_XDP, &opts) };
        if fd < 0 {
            let source = io::Error::from_raw_os_error(-fd);
            let hint = match (mode, source.raw_os_error()) {
                (_, Some(libc::EBUSY)) | (_, Some(libc::EEXIST)) => format!(
                    "; another XDP program is attached to this interface: {} (see `ip link show`)",
                    attached_program(ifindex)
                ),
                (AttachedMode::Native, _) => {
                    "; the driver may not support native XDP: set xdp_mode = \"generic\"".into()
                }
                (AttachedMode::Generic, _) => String::new(),
            };
            return Err(XdpError::Attach { ifindex, mode: mode.name(), hint, source });
        }
        // SAFETY: fd is a fresh link fd owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn map_fd(&self, name: &'static CStr) -> Result<RawFd, XdpError> {
        // SAFETY: the object is loaded; name is NUL-terminated.
        let map = unsafe { bpf::bpf_object__find_map_by_name(self.object.as_ptr(), name.as_ptr()) };
        if map.is_null() {
            return Err(XdpError::Missing(name.to_str().unwrap_or("map")));
        }
        // SAFETY: map belongs to the loaded object.
        Ok(unsafe { bpf::bpf_map__fd(map) })
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        // Detach first (closing the link), then free maps and program.
        self.link = None;
        // SAFETY: object came from bpf_object__open_mem and is closed exactly once, here.
        unsafe { bpf::bpf_object__close(self.object.as_ptr()) };
    }
}

/// The established-flows map of one program, as workers see it. Valid while its
/// [`XdpProgram`] lives: the relay joins its workers before dropping programs.
#[derive(Debug, Clone, Copy)]
pub struct FlowMap {
    fd: RawFd,
}

impl FlowMap {
    /// Marks a client flow as established (one syscall per new session).
    pub fn insert(&self, client: SocketAddr, listen_port: u16) -> Result<(), XdpError> {
        update(self.fd, "flows", &FlowKey::new(client, listen_port), &1u8)
    }

    /// Forgets a flow whose session expired.
    pub fn remove(&self, client: SocketAddr, listen_port: u16) {
        delete(self.fd, &FlowKey::new(client, listen_port));
    }

    /// Whether this thread may use the map: a lookup of a flow that is not there answers
    /// "no such entry" when it may, and EPERM when the kernel wants a capability for it.
    pub fn accessible(&self) -> io::Result<()> {
        let key = FlowKey::new(SocketAddr::from(([0, 0, 0, 0], 0)), 0);
        let mut value = 0u8;
        // SAFETY: key and value are #[repr(C)] values whose sizes match the map's key and value sizes (asserted in bpf_abi).
        let err = unsafe {
            bpf::bpf_map_lookup_elem(self.fd, (&key as *const FlowKey).cast(), (&mut value as *mut u8).cast())
        };
        match err {
            0 => Ok(()),
            err if -err == libc::ENOENT => Ok(()),
            err => Err(io::Error::from_raw_os_error(-err)),
        }
    }
}

/// Deletes `key` from a map; a missing key is fine.
fn delete<K>(map_fd: RawFd, key: &K) {
    // SAFETY: key is a #[repr(C)] value whose size matches the map's key size (asserted in bpf_abi).
    unsafe { bpf::bpf_map_delete_elem(map_fd, (key as *const K).cast()) };
}

fn update<K, V>(map_fd: RawFd, map: &'static str, key: &K, value: &V) -> Result<(), XdpError> {
    // SAFETY: key and value are #[repr(C)] values whose sizes match the map's key and value sizes (asserted in bpf_abi).
    let err = unsafe { bpf::bpf_map_update_elem(map_fd, (key as *const K).cast(), (value as *const V).cast(), 0) };
    if err != 0 {
        return Err(XdpError::MapUpdate { map, source: io::Error::from_raw_os_error(-err) });
    }
    Ok(())
}

/// Whether the kernel loads XDP programs for this process (needs CAP_BPF or CAP_SYS_ADMIN).
pub fn kernel_loads_xdp() -> bool {
    // SAFETY: a probe call with no options; libbpf loads and unloads a trivial program.
    unsafe { bpf::libbpf_probe_bpf_prog_type(bpf::BPF_PROG_TYPE_XDP, std::ptr::null()) == 1 }
}
