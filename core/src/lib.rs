//! Pure core of oxidize-relay: packet views, checksums, routes, NAT sessions
//! and configuration. It never calls the OS and never reads a clock: time and
//! buffers are passed in, decisions come out, so every behaviour here is
//! testable without a kernel.
#![forbid(unsafe_code)]

pub mod admission;
pub mod checksum;
pub mod config;
pub mod counters;
pub mod directory;
pub mod drop_reason;
pub mod flow_index;
pub mod health;
pub mod icmp;
pub mod oxtunnel;
pub mod prefix;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod relay;
pub mod route;
pub mod seed;
pub mod session;
pub mod time;
pub mod tunnel_steps;
pub mod wire;

pub use drop_reason::DropReason;
pub use relay::{NextHop, NoHop, Relay, RelaySettings, Verdict};
pub use session::IfaceId;
