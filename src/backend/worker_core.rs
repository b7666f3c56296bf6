//! What every worker has, whichever backend drives it: its share of the relay,
//! counters, clock and the channels to and from the control thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use oxidize_relay_core::config::WaitMode;
use oxidize_relay_core::counters::Counters;
use oxidize_relay_core::relay::ReloadedLimits;
use oxidize_relay_core::route::{RouteTable, UpstreamId};
use oxidize_relay_core::{IfaceId, NextHop, NoHop, Relay};

/// How long an idle worker in event mode sleeps before checking for shutdown and updates.
pub const IDLE_POLL: Duration = Duration::from_millis(100);
/// Session slots examined for expiry per millisecond with traffic (or per idle poll): a 10,000-port
/// share is swept every 40 ms under load. Sweeping per burst instead read 256 slots' cache lines
/// for every burst, however small.
pub const EXPIRY_BUDGET: usize = 256;
/// Room in each channel between the control thread and a worker. A worker never blocks on a
/// full one: an unresolved upstream it cannot report now is reported by its next packet, and
/// the control thread refreshes every next hop each second anyway.
pub const CHANNEL_CAPACITY: usize = 1024;

/// A change the control thread pushes to every worker, applied between two bursts.
#[derive(Debug, Clone)]
pub enum WorkerUpdate {
    NextHop(UpstreamId, Result<NextHop, NoHop>),
    /// A reload: the successor route table and this worker's share of the limits.
    Reconfigure(Arc<RouteTable>, ReloadedLimits),
    /// Drain (false: no new sessions) or resume (true).
    AcceptSessions(bool),
    /// The health checks' verdict on an upstream (true: up).
    Health(UpstreamId, bool),
    /// An interface's MTU changed while the relay ran.
    Mtu(IfaceId, u16),
}

/// What every worker has, whichever backend drives it.
#[derive(Debug)]
pub struct WorkerCore {
    pub id: usize,
    pub relay: Relay,
    pub counters: Arc<Counters>,
    pub batch_size: usize,
    pub wait: WaitMode,
    pub updates: Receiver<WorkerUpdate>,
    pub unresolved: Sender<UpstreamId>,
    pub stop: Arc<AtomicBool>,
    pub epoch: Instant,
}

impl WorkerCore {
    /// Whether to go round the loop again; counts the iteration for the watchdog.
    pub fn running(&self) -> bool {
        self.counters.loops.add(1);
        !self.stop.load(Ordering::Relaxed)
    }

    /// Milliseconds since the relay started: the core's clock, read once per batch.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Takes the control thread's changes.
    pub fn apply_updates(&mut self) {
        while let Ok(update) = self.updates.try_recv() {
            match update {
                WorkerUpdate::NextHop(upstream, hop) => self.relay.set_next_hop(upstream, hop),
                WorkerUpdate::Reconfigure(routes, limits) => self.relay.reconfigure(routes, &limits),
                WorkerUpdate::AcceptSessions(accepting) => self.relay.set_accepting_sessions(accepting),
                WorkerUpdate::Health(upstream, up) => self.relay.set_upstream_health(upstream, up),
                WorkerUpdate::Mtu(iface, mtu) => self.relay.set_mtu(iface, mtu),
            }
        }
    }

    /// Asks the control thread to resolve upstreams a packet could not reach.
    pub fn report_unresolved(&mut self) {
        for upstream in self.relay.take_unresolved() {
            // Full (reported again by the next packet) or gone (shutting down): never wait on the packet path.
            let _ = self.unresolved.try_send(upstream);
        }
    }
}
