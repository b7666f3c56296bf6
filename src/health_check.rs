//! The control thread's half of upstream health: the passive check over what the workers
//! recorded ([`UpstreamActivity`]), active probes over ordinary UDP sockets (so they work
//! whichever backend runs), the verdicts pushed to the workers, and per-upstream metrics.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use oxidize_relay_core::directory::NatDirectory;
use oxidize_relay_core::health::{HealthPolicy, UpstreamActivity, UpstreamHealth};
use oxidize_relay_core::route::{Probe, RouteTable, UpstreamId};
use oxidize_relay_core::time::Millis;

use crate::keepalive::connected_socket;
use crate::metrics;

/// One upstream as the checker follows it.
#[derive(Debug)]
struct Followed {
    address: SocketAddr,
    policy: HealthPolicy,
    health: UpstreamHealth,
    prober: Option<Prober>,
}

/// An active probe of one upstream: a connected socket and the probe in flight.
#[derive(Debug)]
struct Prober {
    probe: Probe,
    socket: UdpSocket,
    sent_at: Option<Millis>,
    next_at: Millis,
}

/// Health of every upstream of the live routes.
#[derive(Debug)]
pub(crate) struct HealthChecker {
    upstreams: Vec<Option<Followed>>,
    activity: Arc<UpstreamActivity>,
    directory: Arc<NatDirectory>,
    nat_ports: (u16, u16),
}

impl HealthChecker {
    pub(crate) fn new(
        routes: &RouteTable,
        activity: Arc<UpstreamActivity>,
        directory: Arc<NatDirectory>,
        nat_ports: (u16, u16),
    ) -> std::io::Result<Self> {
        let mut checker = HealthChecker { upstreams: Vec::new(), activity, directory, nat_ports };
        checker.follow(routes)?;
        Ok(checker)
    }

    /// Follows the upstreams of `routes` (a reload's table): verdicts of the ones kept carry
    /// over; an upstream listed by several routes takes the first route's policy and probe.
    pub(crate) fn follow(&mut self, routes: &RouteTable) -> std::io::Result<()> {
        let mut upstreams: Vec<Option<Followed>> = (0..routes.upstreams().len()).map(|_| None).collect();
        for (_, route) in routes.live_routes() {
            for &id in &route.upstreams {
                let index = usize::from(id.0);
                if upstreams[index].is_some() {
                    continue;
                }
                let address = routes.upstream(id);
                let prober = match &route.probe {
                    Some(probe) => Some(Prober::new(address, probe.clone())?),
                    None => None,
                };
                let health = self.upstreams.get(index).and_then(Option::as_ref).map(|f| f.health).unwrap_or_default();
                upstreams[index] = Some(Followed { address, policy: route.health, health, prober });
            }
        }
        self.upstreams = upstreams;
        Ok(())
    }

    /// Runs the checks at `now` (the workers' clock); returns the verdicts that changed.
    pub(crate) fn tick(&mut self, now: Millis) -> Vec<(UpstreamId, bool)> {
        let mut changes = Vec::new();
        for (index, followed) in self.upstreams.iter_mut().enumerate() {
            let Some(followed) = followed else { continue };
            let id = UpstreamId(index as u16);
            let (sent, answered) = self.activity.times(id);
            let mut verdicts = Vec::new();
            verdicts.extend(followed.health.observe(&followed.policy, now, sent, answered));
            if let Some(prober) = &mut followed.prober {
                for outcome in prober.run(now) {
                    metrics::upstream_probe(followed.address, if outcome { "answered" } else { "failed" });
                    verdicts.extend(followed.health.probed(&followed.policy, outcome, now));
                }
            }
            if let Some(&up) = verdicts.last() {
                if up {
                    tracing::info!(upstream = %followed.address, "upstream is up again: new sessions may go to it");
                } else {
                    tracing::warn!(upstream = %followed.address, "upstream is down: no new sessions go to it, its sessions move at their next packet");
                }
                changes.push((id, up));
            }
            metrics::upstream_up(followed.address, followed.health.is_up());
        }
        changes
    }

    /// Publishes how many live sessions each upstream has (a scan of the NAT directory).
    pub(crate) fn publish_sessions(&self) {
        let mut sessions = vec![0u64; self.upstreams.len()];
        for port in self.nat_ports.0..=self.nat_ports.1 {
            if let Some(binding) = self.directory.binding(port)
                && let Some(count) = sessions.get_mut(usize::from(binding.upstream.0))
            {
                *count += 1;
            }
        }
        for (followed, count) in self.upstreams.iter().zip(sessions) {
            if let Some(followed) = followed {
                metrics::upstream_sessions(followed.address, count);
            }
        }
    }

    /// Every followed upstream's verdict, for workers that need them all again.
    pub(crate) fn verdicts(&self) -> impl Iterator<Item = (UpstreamId, bool)> + '_ {
        self.upstreams
            .iter()
            .enumerate()
            .filter_map(|(index, f)| f.as_ref().map(|f| (UpstreamId(index as u16), f.health.is_up())))
    }
}

impl Prober {
    fn new(upstream: SocketAddr, probe: Probe) -> std::io::Result<Self> {
        Ok(Prober { probe, socket: connected_socket(upstream)?, sent_at: None, next_at: 0 })
    }

    /// Reads answers, times out the probe in flight, sends the next one when due; returns
    /// the outcomes (true: answered) of the probes that finished.
    fn run(&mut self, now: Millis) -> Vec<bool> {
        let mut outcomes = Vec::new();
        let mut buffer = [0u8; 2048];
        loop {
            match self.socket.recv(&mut buffer) {
                Ok(n) => {
                    let answered = buffer[..n].windows(self.probe.expect.len()).any(|w| w == self.probe.expect);
                    if answered && self.sent_at.take().is_some() {
                        outcomes.push(true);
                    }
                }
                // ICMP port or host unreachable for the probe: a failure now, not at the timeout.
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    if self.sent_at.take().is_some() {
                        outcomes.push(false);
                    }
                }
                Err(_) => break,
            }
        }
        if self.sent_at.is_some_and(|sent| now >= sent + self.probe.timeout) {
            self.sent_at = None;
            outcomes.push(false);
        }
        if now >= self.next_at && self.sent_at.is_none() {
            // A refused send (ICMP from an earlier probe) shows up as the next recv's error.
            let _ = self.socket.send(&self.probe.send);
            self.sent_at = Some(now);
            self.next_at = now + self.probe.interval;
        }
        outcomes
    }
}
