//! The two ways of moving packets, each a module of the same shape: `build` sets the
//! backend up (sockets bound, programs attached) and returns a [`Backend`] whose
//! workers `run::run` spawns; the stop flag ends them and dropping the backend's
//! attachments detaches XDP.

pub(crate) mod af_xdp;
pub(crate) mod socket;
pub mod worker_core;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crossbeam_channel::Sender;
use oxidize_relay_core::config::Config;
use oxidize_relay_core::counters::Counters;
use oxidize_relay_core::directory::NatDirectory;
use oxidize_relay_core::health::UpstreamActivity;
use oxidize_relay_core::route::{RouteTable, UpstreamId};
use oxidize_relay_core::session::Timeouts;
use oxidize_relay_core::{Relay, RelaySettings};

use crate::backend::af_xdp::worker::Worker;
use crate::backend::socket::worker::SocketWorker;
use crate::backend::worker_core::{CHANNEL_CAPACITY, WorkerCore, WorkerUpdate};
use crate::run::SetupError;
use crate::sys;
use crate::sys::iface::IfaceInfo;
use crate::sys::xdp::{AttachedMode, XdpProgram};

/// An XDP program attached to one interface, with the mode it got.
pub(crate) struct Attached {
    pub(crate) info: IfaceInfo,
    pub(crate) program: XdpProgram,
    pub(crate) mode: AttachedMode,
    /// Whether the kernel bound each queue's AF_XDP socket in zero-copy mode (else copy), by queue.
    pub(crate) zero_copy: Vec<bool>,
}

/// A worker of either backend, ready to move onto its thread.
pub(crate) enum AnyWorker {
    AfXdp(Worker),
    Socket(SocketWorker),
}

impl AnyWorker {
    pub(crate) fn relay_mut(&mut self) -> &mut oxidize_relay_core::Relay {
        match self {
            AnyWorker::AfXdp(worker) => &mut worker.core.relay,
            AnyWorker::Socket(worker) => &mut worker.core.relay,
        }
    }
}

/// What both backends hand the control thread.
pub(crate) struct Backend {
    pub(crate) name: &'static str,
    pub(crate) attached: Vec<Attached>,
    pub(crate) workers: Vec<AnyWorker>,
    pub(crate) counters: Vec<Arc<Counters>>,
    pub(crate) updates: Vec<Sender<WorkerUpdate>>,
}

/// Per-worker pieces both backends build the same way.
pub(crate) struct WorkerShared {
    pub(crate) routes: Arc<RouteTable>,
    /// Every worker's NAT sessions, readable by all (replies land on any queue).
    pub(crate) directory: Arc<NatDirectory>,
    /// When each upstream was last sent to and answered, for the health checks.
    pub(crate) activity: Arc<UpstreamActivity>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) unresolved: Sender<UpstreamId>,
    pub(crate) epoch: Instant,
}

/// The backend-independent part of worker `worker` of `workers`: its relay (with its
/// share of NAT ports, sessions and the global limit), counters and channels.
pub(crate) fn worker_core(
    config: &Config,
    shared: &WorkerShared,
    worker: u32,
    workers: u32,
    iface_macs: Vec<[u8; 6]>,
    iface_mtus: Vec<u16>,
) -> Result<(WorkerCore, Sender<WorkerUpdate>), SetupError> {
    let per_worker = config.nat_port_count() / workers as usize;
    let first = config.nat.ports.0 + (worker as usize * per_worker) as u16;
    let settings = RelaySettings {
        iface_macs,
        iface_mtus,
        directory: shared.directory.clone(),
        nat_ports: (first, first + per_worker as u16 - 1),
        seed: sys::random_u64().map_err(SetupError::Seed)?,
        max_sessions: config.nat.max_sessions.div_ceil(workers as usize),
        timeouts: Timeouts {
            idle: config.nat.idle_timeout_secs * 1000,
            unreplied: config.nat.unreplied_timeout_secs * 1000,
        },
        verify_checksums: config.security.verify_checksums,
        global_limit: config.security.global_limit.per_worker(u64::from(workers)),
        max_sessions_per_source: config.security.max_sessions_per_source,
        source_table_entries: config.security.source_table_entries,
        activity: shared.activity.clone(),
    };
    let counters = Arc::new(Counters::default());
    let (update_tx, update_rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
    let core = WorkerCore {
        id: worker as usize,
        relay: Relay::new(shared.routes.clone(), settings, counters.clone()),
        counters,
        batch_size: config.runtime.batch_size,
        wait: config.runtime.wait,
        updates: update_rx,
        unresolved: shared.unresolved.clone(),
        stop: shared.stop.clone(),
        epoch: shared.epoch,
    };
    Ok((core, update_tx))
}

impl Backend {
    pub(crate) fn new(name: &'static str) -> Self {
        Backend { name, attached: Vec::new(), workers: Vec::new(), counters: Vec::new(), updates: Vec::new() }
    }

    pub(crate) fn add_worker(&mut self, core: &WorkerCore, updates: Sender<WorkerUpdate>) {
        self.updates.push(updates);
        self.counters.push(core.counters.clone());
    }
}
