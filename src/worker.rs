//! One worker per queue index: RX burst, relay core, TX burst, run to completion.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use oxidize_relay_core::config::WaitMode;
use oxidize_relay_core::counters::Counters;
use oxidize_relay_core::route::UpstreamId;
use oxidize_relay_core::{DropReason, IfaceId, NextHop, Relay, Verdict};
use xsk_rs::FrameDesc;

use crate::sys::xdp::FlowMap;
use crate::sys::xsk::{self, FramePool, QueueSocket};

/// How long an idle worker in event mode sleeps before checking for shutdown and updates.
const IDLE_POLL_MS: i32 = 100;
/// Session slots examined per batch for expiry: a full sweep of 10,000 ports takes ~40 idle polls or batches.
const EXPIRY_BUDGET: usize = 256;

/// A change the control thread pushes to every worker.
#[derive(Debug, Clone, Copy)]
pub enum WorkerUpdate {
    NextHop(UpstreamId, Option<NextHop>),
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

    /// Takes the control thread's next-hop changes.
    pub fn apply_updates(&mut self) {
        while let Ok(update) = self.updates.try_recv() {
            match update {
                WorkerUpdate::NextHop(upstream, hop) => self.relay.set_next_hop(upstream, hop),
            }
        }
    }

    /// Asks the control thread to resolve upstreams a packet could not reach.
    pub fn report_unresolved(&mut self) {
        for upstream in self.relay.take_unresolved() {
            // The control thread may be gone during shutdown; nothing to do then.
            let _ = self.unresolved.send(upstream);
        }
    }
}

/// An AF_XDP worker: its share of the relay plus its frames and sockets; moved onto its thread.
#[derive(Debug)]
pub struct Worker {
    pub core: WorkerCore,
    pub pool: FramePool,
    /// Indexed by [`IfaceId`].
    pub sockets: Vec<QueueSocket>,
    /// Each interface program's established-flows map, kept in step with the sessions.
    pub flow_maps: Vec<FlowMap>,
}

impl Worker {
    /// Runs until `stop` is set.
    pub fn run(mut self) {
        let mut rx_batch = vec![FrameDesc::default(); self.core.batch_size];
        let mut tx_batches: Vec<Vec<FrameDesc>> =
            self.sockets.iter().map(|_| Vec::with_capacity(self.core.batch_size * self.sockets.len())).collect();
        let fds: Vec<_> = self.sockets.iter().map(QueueSocket::fd).collect();
        self.core.counters.pool_domains.set(self.pool.domain_count() as u64);
        // Half of each domain goes to the fill rings right away so every interface can receive.
        let share = self.pool.capacity(0) / 2 / self.sockets.len().div_ceil(self.pool.domain_count());
        for socket in &mut self.sockets {
            socket.refill(&mut self.pool, share);
        }

        while self.core.running() {
            self.core.apply_updates();
            let now = self.core.now();
            let received = self.poll_once(now, &mut rx_batch, &mut tx_batches);
            let flow_maps = &self.flow_maps;
            self.core.relay.expire(now, EXPIRY_BUDGET, |session| {
                for map in flow_maps {
                    map.remove(session.flow.client, session.flow.listen.port());
                }
            });
            for flow in self.core.relay.take_admitted() {
                for map in &self.flow_maps {
                    if let Err(error) = map.insert(flow.client, flow.listen.port()) {
                        tracing::debug!(%error, "registering an established flow with XDP failed");
                    }
                }
            }
            self.core.report_unresolved();
            self.publish_pool();
            if received == 0 {
                self.idle(&fds);
            }
        }
    }

    /// One pass over every socket: reclaim, refill, receive, relay, transmit.
    fn poll_once(&mut self, now: u64, rx_batch: &mut [FrameDesc], tx_batches: &mut [Vec<FrameDesc>]) -> usize {
        let mut received_total = 0;
        for socket in &mut self.sockets {
            socket.reclaim(&mut self.pool, rx_batch);
            socket.refill(&mut self.pool, rx_batch.len());
        }
        for (ingress, socket) in self.sockets.iter_mut().enumerate() {
            let received = socket.receive(rx_batch);
            received_total += received;
            for desc in &mut rx_batch[..received] {
                let mut frame = self.pool.packet_mut(desc);
                let len = frame.contents().len();
                self.core.counters.rx_packets.add(1);
                self.core.counters.rx_bytes.add(len as u64);
                // Expose the whole frame so a tunnel header can grow it in place, then set its new length.
                let room = {
                    let mut cursor = frame.cursor();
                    let room = cursor.buf_len();
                    cursor.set_pos(room);
                    room
                };
                let (verdict, new_len) =
                    self.core.relay.handle_sized(now, IfaceId(ingress as u8), &mut frame.contents_mut()[..room], len);
                frame.cursor().set_pos(new_len);
                match verdict {
                    Verdict::Forward(egress) => tx_batches[usize::from(egress.0)].push(*desc),
                    Verdict::Drop(_) => self.pool.release(*desc),
                }
            }
        }
        for (socket, batch) in self.sockets.iter_mut().zip(tx_batches.iter_mut()) {
            if batch.is_empty() {
                continue;
            }
            let sent = socket.transmit(batch);
            let bytes: usize = batch[..sent].iter().map(|d| d.lengths().data()).sum();
            self.core.counters.tx_packets.add(sent as u64);
            self.core.counters.tx_bytes.add(bytes as u64);
            for desc in batch.drain(sent..) {
                self.core.counters.count_drop(DropReason::TxRingFull);
                self.pool.release(desc);
            }
            batch.clear();
            if socket.wake_tx_if_needed() {
                self.core.counters.wakeups.add(1);
            }
        }
        received_total
    }

    fn idle(&mut self, fds: &[i32]) {
        // Unsent frames must not wait for the next received packet: kick TX instead of sleeping.
        let mut kicked = false;
        for socket in &mut self.sockets {
            if !socket.tx_unsent() {
                continue;
            }
            if socket.wake_tx_if_needed() {
                self.core.counters.wakeups.add(1);
            }
            kicked = true;
        }
        if kicked {
            return;
        }
        match self.core.wait {
            WaitMode::BusyPoll => {
                if self.sockets.iter().any(QueueSocket::fill_needs_wakeup) {
                    self.core.counters.wakeups.add(1);
                    let _ = xsk::wait_readable(fds, 0);
                }
                std::hint::spin_loop();
            }
            WaitMode::Event => {
                self.core.counters.wakeups.add(1);
                if let Err(error) = xsk::wait_readable(fds, IDLE_POLL_MS) {
                    tracing::warn!(worker = self.core.id, %error, "poll on AF_XDP sockets failed");
                }
            }
        }
    }

    fn publish_pool(&self) {
        for (index, counters) in self.core.counters.pools.iter().enumerate().take(self.pool.domain_count()) {
            let stats = self.pool.stats(index);
            counters.in_use.set(self.pool.in_use(index) as u64);
            counters.capacity.set(self.pool.capacity(index) as u64);
            counters.allocs.set(stats.allocs);
            counters.frees.set(stats.frees);
            counters.failures.set(stats.failures);
        }
    }
}
