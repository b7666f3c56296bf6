//! Everything that talks to the kernel: the XDP program and its maps, AF_XDP
//! sockets and rings, rtnetlink, and interface facts. The only unsafe code in
//! the project lives under this module.

pub mod bpf_abi;
pub mod caps;
pub mod iface;
pub mod netlink;
pub mod udp;
pub mod xdp;
pub mod xsk;

/// Raises the soft limit on open descriptors to the hard limit (the socket backend holds one
/// per session); returns the limit now in force.
pub fn raise_descriptor_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the live struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// A random 64-bit value from the kernel's CSPRNG (getrandom(2)), for hash keys and port choice.
pub fn random_u64() -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the live buffer.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(bytes))
}
