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
