//! The AF_XDP worker, one per queue index: RX burst, relay core, TX burst, run to completion.

use oxidize_relay_core::Relay;
use oxidize_relay_core::config::WaitMode;
use oxidize_relay_core::counters::KernelSocketStat;
use oxidize_relay_core::{IfaceId, Verdict};

use crate::backend::worker_core::{EXPIRY_BUDGET, IDLE_POLL, WorkerCore};
use crate::sys::xdp::FlowMap;
use crate::sys::xsk::{self, Frame, FramePool, QueueSocket};

/// How often a worker reads its sockets' kernel counters (one getsockopt per socket).
const KERNEL_STATS_EVERY_MS: u64 = 200;

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

/// Frames waiting for room in each egress socket's TX ring, and the receive buffer.
struct Bursts {
    received: Vec<Frame>,
    /// Indexed by egress [`IfaceId`]; never longer than [`Bursts::backlog`].
    outgoing: Vec<Vec<Frame>>,
    backlog: usize,
}

impl Bursts {
    /// How many frames may be received now: every one might go out of the
    /// fullest egress, which must have room for it (the receive ring holds the rest).
    fn receivable(&self, batch: usize) -> usize {
        let room = self.outgoing.iter().map(|queue| self.backlog - queue.len()).min().unwrap_or(0);
        batch.min(room)
    }
}

impl Worker {
    /// Runs until `stop` is set.
    pub fn run(mut self) -> Relay {
        let batch = self.core.batch_size;
        // Two bursts of backlog per egress: one in flight to the ring, one just received.
        let backlog = 2 * batch;
        let mut bursts = Bursts {
            received: Vec::with_capacity(batch),
            outgoing: self.sockets.iter().map(|_| Vec::with_capacity(backlog)).collect(),
            backlog,
        };
        let fds: Vec<_> = self.sockets.iter().map(QueueSocket::fd).collect();
        self.core.counters.pool_domains.set(self.pool.domain_count() as u64);
        // Half of each domain goes to the fill rings right away so every interface can receive.
        let share = self.pool.capacity(0) / 2 / self.sockets.len().div_ceil(self.pool.domain_count());
        for socket in &mut self.sockets {
            socket.refill(&mut self.pool, share);
        }
        let mut kernel_stats_at = 0;

        while self.core.running() {
            self.core.apply_updates();
            let now = self.core.now();
            let received = self.poll_once(now, &mut bursts);
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
            if now >= kernel_stats_at {
                self.publish_pool();
                self.publish_kernel_stats();
                kernel_stats_at = now + KERNEL_STATS_EVERY_MS;
            }
            if received == 0 && bursts.outgoing.iter().all(Vec::is_empty) {
                self.idle(&fds);
            }
        }
        // Its sessions go to the control thread, which hands them to the next relay process.
        self.core.relay
    }

    /// One pass over every socket: reclaim, refill, receive, relay, transmit.
    fn poll_once(&mut self, now: u64, bursts: &mut Bursts) -> usize {
        let mut received_total = 0;
        for socket in &mut self.sockets {
            socket.reclaim(&mut self.pool);
            socket.refill(&mut self.pool, self.core.batch_size);
        }
        for (ingress, socket) in self.sockets.iter_mut().enumerate() {
            let received = socket.receive(bursts.receivable(self.core.batch_size), &mut bursts.received);
            received_total += received;
            for mut frame in bursts.received.drain(..) {
                let len = frame.len();
                self.core.counters.rx_packets.add(1);
                self.core.counters.rx_bytes.add(len as u64);
                let (verdict, _) = {
                    let mut data = self.pool.packet_mut(&mut frame);
                    // Expose the whole frame so a tunnel header can grow it in place, then set its new length.
                    let room = {
                        let mut cursor = data.cursor();
                        let room = cursor.buf_len();
                        cursor.set_pos(room);
                        room
                    };
                    let outcome =
                        self.core.relay.relay_frame(now, IfaceId(ingress as u8), &mut data.contents_mut()[..room], len);
                    data.cursor().set_pos(outcome.1);
                    outcome
                };
                match verdict {
                    Verdict::Forward(egress) => bursts.outgoing[usize::from(egress.0)].push(frame),
                    Verdict::Drop(_) => self.pool.release(frame),
                }
            }
        }
        for (socket, queue) in self.sockets.iter_mut().zip(bursts.outgoing.iter_mut()) {
            if queue.is_empty() {
                continue;
            }
            let (sent, bytes) = socket.transmit(queue);
            self.core.counters.tx_packets.add(sent as u64);
            self.core.counters.tx_bytes.add(bytes as u64);
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
                // As xsk_fwd.c: with nothing received, wake the kernel if it waits for fill-ring entries.
                if self.sockets.iter().any(QueueSocket::fill_needs_wakeup) {
                    self.core.counters.wakeups.add(1);
                    let _ = xsk::wait_readable(fds, 0);
                }
                std::hint::spin_loop();
            }
            WaitMode::Event => {
                self.core.counters.wakeups.add(1);
                if let Err(error) = xsk::wait_readable(fds, IDLE_POLL.as_millis() as i32) {
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

    /// Copies the kernel's per-socket counts (drops the relay never sees) into the worker's counters.
    fn publish_kernel_stats(&self) {
        let mut sums = [0u64; KernelSocketStat::COUNT];
        for socket in &self.sockets {
            match socket.kernel_stats() {
                Ok(stats) => sums.iter_mut().zip(stats).for_each(|(sum, value)| *sum += value),
                Err(error) => tracing::debug!(worker = self.core.id, %error, "reading XDP_STATISTICS failed"),
            }
        }
        for (counter, value) in self.core.counters.kernel.iter().zip(sums) {
            counter.set(value);
        }
    }
}
