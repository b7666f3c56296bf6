//! oxidize-relay: the I/O layer (`sys`, the only unsafe code), the AF_XDP
//! workers and the control thread around the pure `oxidize-relay-core`.

pub mod backend;
pub mod control;
pub mod handover;
pub mod health_check;
pub mod keepalive;
pub mod log_limit;
pub mod metrics;
pub mod metrics_endpoint;
pub mod nexthop;
pub mod preflight;
pub mod probe;
pub mod reload;
pub mod run;
pub mod stats;
pub mod stats_view;
pub mod sys;
pub mod systemd;
