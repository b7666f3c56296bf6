//! NAT sessions: each (client, listen address) pair owns one relay port toward
//! its upstream until it has been idle for the configured timeout.
//!
//! The owning worker finds its sessions by a keyed hash of the flow; every
//! worker finds any session's binding by NAT port (or flow) in the shared
//! [`NatDirectory`]. Memory is allocated once, at construction, for the full
//! capacity: a flood of new clients can fill the table, never grow it.

use core::net::{IpAddr, SocketAddr};
use std::collections::VecDeque;
use std::sync::Arc;

use crate::directory::{Binding, IndexError, NatDirectory};
use crate::flow_index::FlowIndex;
use crate::ratelimit::TokenPair;
use crate::route::{RouteId, UpstreamId};
use crate::seed::Seeds;
use crate::time::Millis;
use crate::wire::MacAddr;

/// How long a freed port waits before a new session may take it: replies still in flight
/// to the old session would otherwise reach the new one's client.
const QUARANTINE: Millis = 2_000;
/// Evicted sessions waiting for the worker's clean-up (XDP flow map, session socket) at its next expiry pass.
const MAX_RETIRED: usize = 1024;

/// Which of the worker's interfaces a frame arrived on or leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IfaceId(pub u8);

/// The client-facing side of a flow: who sent it and which listen address they used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub listen: SocketAddr,
}

/// Hashes the addresses as a few machine words instead of walking the
/// `SocketAddr` enums field by field (the flow hash is on every packet's path).
impl core::hash::Hash for FlowKey {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        let ports = (u64::from(self.client.port()) << 16) | u64::from(self.listen.port());
        match (self.client.ip(), self.listen.ip()) {
            (IpAddr::V4(client), IpAddr::V4(listen)) => {
                state.write_u64((u64::from(client.to_bits()) << 32) | u64::from(listen.to_bits()));
                state.write_u64(ports);
            }
            (client, listen) => {
                state.write_u128(ip_bits(client));
                state.write_u128(ip_bits(listen));
                state.write_u64(ports | 1 << 63);
            }
        }
    }
}

fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_bits()),
        IpAddr::V6(v6) => v6.to_bits(),
    }
}

/// One live NAT binding, as its owning worker keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub flow: FlowKey,
    pub route: RouteId,
    pub upstream: UpstreamId,
    /// Relay address the upstream sees (and replies to), with [`Session::nat_port`].
    pub nat_ip: IpAddr,
    pub nat_port: u16,
    /// Where replies to the client go: the interface and MAC the client's packet came from.
    pub client_iface: IfaceId,
    pub client_mac: MacAddr,
    /// The owner's latest client packet; replies and other workers refresh the directory's time.
    pub last_seen: Millis,
    pub created: Millis,
    /// This session's per-session rate-limit buckets.
    pub tokens: TokenPair,
    /// The flow id a tunnelled client side (a previous relay) gave this flow; echoed in replies.
    pub peer_flow: u32,
}

impl Session {
    /// What every worker may read of this session.
    pub fn binding(&self) -> Binding {
        Binding {
            flow: self.flow,
            nat_ip: self.nat_ip,
            upstream: self.upstream,
            route: self.route,
            client_iface: self.client_iface,
            client_mac: self.client_mac,
            peer_flow: self.peer_flow,
        }
    }
}

/// A session's place in the table, valid until that session expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u16);

/// Why a session could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitError {
    TableFull,
    PortsExhausted,
    /// Another worker created this flow's session at the same moment, under this NAT port.
    Contended(u16),
}

/// One worker's share of the NAT table: a fixed port range it alone allocates
/// from, publishes into the shared [`NatDirectory`] and expires.
#[derive(Debug)]
pub struct SessionTable {
    first_port: u16,
    slots: Vec<Option<Session>>,
    by_flow: FlowIndex,
    /// Free slot indexes, drawn at random (RFC 6056), so the next port cannot be guessed.
    free: Vec<u16>,
    /// Freed slots with the time they were freed, oldest first: reused only after [`QUARANTINE`],
    /// unless no other port is left (then the longest-waiting one, rather than refusing the client).
    quarantine: VecDeque<(u16, Millis)>,
    capacity: usize,
    idle_timeout: Millis,
    unreplied_timeout: Millis,
    sweep_cursor: usize,
    /// The clock reading of the latest sweep: slots are swept at most once per millisecond,
    /// however many bursts a busy worker runs in it (a sweep reads `budget` slots' cache lines).
    swept_at: Option<Millis>,
    /// Sessions in creation order (slot, created): the eviction candidates when the table is full.
    /// Entries of sessions that ended or became established are skipped when met.
    by_age: VecDeque<(u16, Millis)>,
    /// Sessions evicted to make room, until the worker's next expiry pass reports them.
    retired: Vec<Session>,
    directory: Arc<NatDirectory>,
    seeds: Seeds,
}

/// How long sessions live without traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Once established (answered, and client traffic for a while since).
    pub idle: Millis,
    /// Until then: short, since spoofed flows never get there.
    pub unreplied: Millis,
}

impl SessionTable {
    /// A table owning ports `ports.0..=ports.1` of `directory`'s range that holds
    /// at most `capacity` sessions; `seeds` key its hash and its port choice.
    pub fn new(
        directory: Arc<NatDirectory>,
        ports: (u16, u16),
        capacity: usize,
        timeouts: Timeouts,
        mut seeds: Seeds,
    ) -> Self {
        let (first, last) = ports;
        let slot_count = usize::from(last.saturating_sub(first)) + 1;
        SessionTable {
            first_port: first,
            slots: vec![None; slot_count],
            by_flow: FlowIndex::new(capacity.min(slot_count), seeds.hasher()),
            free: (0..slot_count as u32).map(|s| s as u16).collect(),
            quarantine: VecDeque::with_capacity(slot_count),
            capacity,
            idle_timeout: timeouts.idle,
            unreplied_timeout: timeouts.unreplied.min(timeouts.idle),
            sweep_cursor: 0,
            swept_at: None,
            by_age: VecDeque::with_capacity(slot_count),
            retired: Vec::with_capacity(MAX_RETIRED),
            directory,
            seeds,
        }
    }

    /// Whether `port` belongs to this worker's share.
    #[inline]
    pub fn owns_port(&self, port: u16) -> bool {
        port.checked_sub(self.first_port).is_some_and(|slot| usize::from(slot) < self.slots.len())
    }

    /// Creates a session, publishes it to every worker and returns its slot;
    /// `template.nat_port` is ignored and chosen here at random.
    /// When the table or the ports are full, the oldest session that is not established
    /// is evicted to make room (as conntrack drops entries that are not assured first).
    pub fn admit_slot(&mut self, mut template: Session) -> Result<Slot, AdmitError> {
        if self.by_flow.len() >= self.capacity && !self.evict_unestablished() {
            return Err(AdmitError::TableFull);
        }
        let now = template.created;
        let slot = match self.take_free(now) {
            Some(slot) => slot,
            None if self.evict_unestablished() => self.take_free(now).ok_or(AdmitError::PortsExhausted)?,
            None => return Err(AdmitError::PortsExhausted),
        };
        template.nat_port = self.first_port + slot;
        self.install(slot, template)
    }

    /// Takes over a session a previous relay process held, on its NAT port (the upstream
    /// knows the client by it); `established` as it was. Fails when the port is not this
    /// worker's, is taken, or the table is full: a take-over never evicts.
    pub fn restore(&mut self, session: Session, established: bool) -> Result<Slot, AdmitError> {
        if !self.owns_port(session.nat_port) || self.by_flow.len() >= self.capacity {
            return Err(AdmitError::TableFull);
        }
        let slot = session.nat_port - self.first_port;
        let free = self.free.iter().position(|&s| s == slot).ok_or(AdmitError::PortsExhausted)?;
        self.free.swap_remove(free);
        let installed = self.install(slot, session)?;
        if established {
            self.directory.answered(session.nat_port, session.last_seen);
            self.directory.client_sent(session.nat_port);
        }
        Ok(installed)
    }

    /// Puts `session` in `slot` and publishes it; on failure the slot is free again.
    fn install(&mut self, slot: u16, session: Session) -> Result<Slot, AdmitError> {
        self.directory.publish(session.nat_port, Some(&session.binding()), session.last_seen);
        let indexed = match self.directory.insert(&session.flow, session.nat_port) {
            Err(IndexError::Taken(port)) => Err(AdmitError::Contended(port)),
            Err(IndexError::Full) => Err(AdmitError::TableFull),
            // Sized for the capacity, so this does not happen; withdrawn all the same if it does.
            Ok(()) if !self.by_flow.insert(&session.flow, slot) => {
                self.directory.remove(&session.flow, session.nat_port);
                Err(AdmitError::TableFull)
            }
            Ok(()) => Ok(()),
        };
        if let Err(error) = indexed {
            self.directory.publish(session.nat_port, None, session.last_seen);
            self.free.push(slot);
            return Err(error);
        }
        if self.by_age.len() == self.by_age.capacity() {
            self.by_age.pop_front();
        }
        self.by_age.push_back((slot, session.created));
        self.slots[usize::from(slot)] = Some(session);
        Ok(Slot(slot))
    }

    /// Moves the session in `slot` to another upstream (its own failed), keeping its NAT
    /// port; the new upstream must answer before it counts as established again.
    pub fn repoint(&mut self, slot: Slot, upstream: UpstreamId, nat_ip: IpAddr, now: Millis) -> Option<&mut Session> {
        let session = self.slots.get_mut(usize::from(slot.0))?.as_mut()?;
        session.upstream = upstream;
        session.nat_ip = nat_ip;
        self.directory.publish(session.nat_port, Some(&session.binding()), now);
        Some(session)
    }

    /// Every live session with whether it is established and when either side last sent.
    pub fn live(&self) -> impl Iterator<Item = (&Session, bool, Millis)> + '_ {
        self.slots.iter().flatten().map(|session| {
            let last = session.last_seen.max(self.directory.last_active(session.nat_port));
            (session, self.established(session), last)
        })
    }

    /// Sessions evicted since the last call, for the clean-up expiry does.
    pub fn take_retired(&mut self) -> std::vec::Drain<'_, Session> {
        self.retired.drain(..)
    }

    /// Where the session of `flow` lives, if this worker has it (one hash lookup).
    #[inline]
    pub fn find(&self, flow: &FlowKey) -> Option<Slot> {
        let holds = |slot: u16| self.slots[usize::from(slot)].as_ref().is_some_and(|s| s.flow == *flow);
        self.by_flow.find(flow, holds).map(Slot)
    }

    /// The session in `slot`.
    #[inline]
    pub fn get(&self, slot: Slot) -> Option<&Session> {
        self.slots.get(usize::from(slot.0))?.as_ref()
    }

    /// The session in `slot`, refreshed to `now`.
    #[inline]
    pub fn refresh(&mut self, slot: Slot, now: Millis) -> Option<&mut Session> {
        let session = self.slots.get_mut(usize::from(slot.0))?.as_mut()?;
        session.last_seen = now;
        Some(session)
    }

    /// Removes sessions idle (in both directions, on every worker) for at least
    /// the timeout, examining at most `budget` slots from where the previous sweep
    /// stopped, once per millisecond of `now` (later calls in the same millisecond
    /// do nothing); `on_expired` sees each removed session. Returns how many expired.
    pub fn expire(&mut self, now: Millis, budget: usize, mut on_expired: impl FnMut(&Session)) -> usize {
        if self.swept_at.replace(now) == Some(now) {
            return 0;
        }
        let mut expired = 0;
        for _ in 0..budget.min(self.slots.len()) {
            let slot = self.sweep_cursor;
            self.sweep_cursor = (self.sweep_cursor + 1) % self.slots.len();
            let Some(session) = &self.slots[slot] else {
                continue;
            };
            let last = session.last_seen.max(self.directory.last_active(session.nat_port));
            let timeout = if self.established(session) { self.idle_timeout } else { self.unreplied_timeout };
            if now.saturating_sub(last) < timeout {
                continue;
            }
            on_expired(session);
            self.release(slot as u16, now);
            expired += 1;
        }
        expired
    }

    /// Whether the client sent again after the upstream answered (on any worker's queue): a
    /// spoofed source never sees the answer, so even an upstream that answers everything (an
    /// echo, a game server) does not establish its flows.
    fn established(&self, session: &Session) -> bool {
        self.directory.established(session.nat_port)
    }

    /// Evicts the oldest session that is not established; whether one was found.
    fn evict_unestablished(&mut self) -> bool {
        if self.retired.len() == MAX_RETIRED {
            return false;
        }
        while let Some((slot, created)) = self.by_age.pop_front() {
            let Some(session) = self.slots[usize::from(slot)] else { continue };
            if session.created != created || self.established(&session) {
                continue;
            }
            self.retired.push(session);
            self.release(slot, session.last_seen);
            return true;
        }
        false
    }

    /// Ends the session in `slot`: withdrawn from the directory, its port quarantined.
    fn release(&mut self, slot: u16, now: Millis) {
        let Some(session) = self.slots[usize::from(slot)].take() else { return };
        self.directory.remove(&session.flow, session.nat_port);
        self.directory.publish(session.nat_port, None, now);
        self.by_flow.remove(&session.flow, slot);
        self.quarantine.push_back((slot, now));
    }

    pub fn len(&self) -> usize {
        self.by_flow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_flow.is_empty()
    }

    /// A random free slot; the longest-quarantined one when no other is left.
    fn take_free(&mut self, now: Millis) -> Option<u16> {
        while let Some(&(slot, freed)) = self.quarantine.front()
            && now.saturating_sub(freed) >= QUARANTINE
        {
            self.quarantine.pop_front();
            self.free.push(slot);
        }
        if self.free.is_empty() {
            return self.quarantine.pop_front().map(|(slot, _)| slot);
        }
        let index = self.seeds.below(self.free.len());
        Some(self.free.swap_remove(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(client: &str) -> Session {
        Session {
            flow: FlowKey { client: client.parse().expect("addr"), listen: "10.0.0.1:5000".parse().expect("addr") },
            route: RouteId(0),
            upstream: UpstreamId(0),
            nat_ip: "10.1.0.1".parse().expect("ip"),
            nat_port: 0,
            client_iface: IfaceId(0),
            client_mac: [2, 0, 0, 0, 0, 1],
            last_seen: 0,
            created: 0,
            tokens: TokenPair::full(&crate::ratelimit::Limit::default(), 0),
            peer_flow: 0,
        }
    }

    /// A table whose sessions live for `idle_timeout` whether answered or not.
    fn new_table(ports: (u16, u16), capacity: usize, idle_timeout: Millis) -> (SessionTable, Arc<NatDirectory>) {
        let directory = Arc::new(NatDirectory::new(ports, 1));
        let timeouts = Timeouts { idle: idle_timeout, unreplied: idle_timeout };
        (SessionTable::new(directory.clone(), ports, capacity, timeouts, Seeds::new(42)), directory)
    }

    /// Answered, then another client packet.
    fn establish(directory: &NatDirectory, session: &Session) {
        directory.answered(session.nat_port, 0);
        directory.client_sent(session.nat_port);
    }

    fn admit(table: &mut SessionTable, client: &str) -> Session {
        let slot = table.admit_slot(session(client)).expect("room");
        *table.get(slot).expect("admitted")
    }

    #[test]
    fn admit_publishes_the_binding_to_every_worker() {
        let (mut table, directory) = new_table((20000, 20009), 100, 1000);
        let created = admit(&mut table, "10.0.0.7:4000");
        assert!(table.owns_port(created.nat_port));
        assert_eq!(table.find(&created.flow).and_then(|s| table.get(s)).map(|s| s.nat_port), Some(created.nat_port));
        assert_eq!(directory.binding(created.nat_port), Some(created.binding()));
        assert_eq!(directory.find(&created.flow).map(|(port, _)| port), Some(created.nat_port));
        assert!(table.owns_port(20009) && !table.owns_port(20010) && !table.owns_port(19999));
    }

    #[test]
    fn nat_ports_are_not_handed_out_in_sequence() {
        let (mut table, _) = new_table((20000, 29999), 10_000, 1000);
        let ports: Vec<u16> = (0..50).map(|i| admit(&mut table, &format!("10.0.0.7:{}", 1000 + i)).nat_port).collect();
        let sequential = ports.windows(2).filter(|w| w[1] == w[0].wrapping_add(1)).count();
        assert!(sequential <= 2, "ports look sequential: {ports:?}");
    }

    #[test]
    fn idle_sessions_expire_and_active_ones_stay() {
        let (mut table, directory) = new_table((20000, 20009), 100, 1000);
        let idle = admit(&mut table, "10.0.0.7:1");
        let busy = admit(&mut table, "10.0.0.7:2");
        let answered = admit(&mut table, "10.0.0.7:3");
        let slot = table.find(&busy.flow).expect("busy");
        table.refresh(slot, 900);
        directory.touch(answered.nat_port, 950);
        assert_eq!(table.expire(999, 10, |_| {}), 0, "nothing is idle for a full timeout yet");
        assert_eq!(table.expire(1000, 10, |_| {}), 1);
        let stale = admit(&mut table, "10.0.0.7:4");
        assert_eq!(table.expire(1000, 10, |_| {}), 0, "one sweep per millisecond, however many bursts");
        assert!(table.find(&stale.flow).is_some());
        assert_eq!(table.expire(1001, 10, |_| {}), 1, "and the next millisecond's sweep takes it");
        assert!(table.find(&idle.flow).is_none());
        assert_eq!(directory.binding(idle.nat_port), None, "the expired binding is withdrawn");
        assert!(table.find(&busy.flow).is_some() && table.find(&answered.flow).is_some());
        assert_eq!(table.expire(1949, 10, |_| {}), 1, "the client-active one goes at 1900");
        assert_eq!(table.expire(1950, 10, |_| {}), 1, "a reply seen by any worker kept the other until 1950");
    }

    #[test]
    fn freed_ports_are_not_reused_at_once() {
        let (mut table, _) = new_table((20000, 20007), 10, 10);
        let first = admit(&mut table, "10.0.0.7:1").nat_port;
        table.expire(100, 8, |_| {});
        for i in 0..7 {
            assert_ne!(admit(&mut table, &format!("10.0.0.7:{}", 10 + i)).nat_port, first, "quarantined");
        }
        assert_eq!(admit(&mut table, "10.0.0.7:99").nat_port, first, "the last free port, once no other is left");
    }

    #[test]
    fn capacity_and_port_exhaustion_refuse_without_touching_established_sessions() {
        let (mut table, directory) = new_table((20000, 20001), 10, 1000);
        let a = admit(&mut table, "10.0.0.7:1");
        let b = admit(&mut table, "10.0.0.7:2");
        for session in [a, b] {
            establish(&directory, &session);
        }
        assert_eq!(table.admit_slot(session("10.0.0.7:3")).err(), Some(AdmitError::PortsExhausted));
        assert!(table.find(&a.flow).is_some());

        let (mut small, directory) = new_table((20000, 20100), 1, 1000);
        let only = admit(&mut small, "10.0.0.7:1");
        establish(&directory, &only);
        assert_eq!(small.admit_slot(session("10.0.0.7:2")).err(), Some(AdmitError::TableFull));
        assert_eq!(small.len(), 1);
    }

    #[test]
    fn unestablished_sessions_go_early_and_first_when_the_table_is_full() {
        let directory = Arc::new(NatDirectory::new((20000, 20003), 1));
        let timeouts = Timeouts { idle: 60_000, unreplied: 5_000 };
        let mut table = SessionTable::new(directory.clone(), (20000, 20003), 4, timeouts, Seeds::new(3));
        let settled = admit(&mut table, "10.0.0.7:1");
        establish(&directory, &settled);
        let spoofed: Vec<Session> = (2..5).map(|p| admit(&mut table, &format!("10.9.0.{p}:1"))).collect();
        // Answered (an echo answers anything), but the spoofed client never sent again: not established.
        directory.answered(spoofed[0].nat_port, 0);

        // Full: a new flow evicts the oldest session that is not established, never the settled one.
        let newcomer = admit(&mut table, "10.0.0.8:1");
        assert!(table.find(&spoofed[0].flow).is_none() && table.find(&settled.flow).is_some());
        assert_eq!(table.take_retired().map(|s| s.flow).collect::<Vec<_>>(), vec![spoofed[0].flow]);
        assert_eq!(
            newcomer.nat_port, spoofed[0].nat_port,
            "the only free port, once the quarantine is all that is left"
        );

        // The others expire after 5 s; the established one lives for the idle timeout.
        assert_eq!(table.expire(7_000, 8, |_| {}), 3);
        assert!(table.find(&settled.flow).is_some());
        assert_eq!(table.expire(62_000, 8, |_| {}), 1);
        assert!(table.is_empty());
    }

    #[test]
    fn a_flow_another_worker_holds_is_refused_with_its_port() {
        let directory = Arc::new(NatDirectory::new((20000, 20019), 1));
        let timeouts = Timeouts { idle: 1000, unreplied: 1000 };
        let mut first = SessionTable::new(directory.clone(), (20000, 20009), 10, timeouts, Seeds::new(1));
        let mut second = SessionTable::new(directory.clone(), (20010, 20019), 10, timeouts, Seeds::new(2));
        let held = admit(&mut first, "10.0.0.7:1");
        // The second worker missed the directory (a race) and tries to create the same flow.
        assert_eq!(second.admit_slot(session("10.0.0.7:1")).err(), Some(AdmitError::Contended(held.nat_port)));
        assert!(second.is_empty());
        assert_eq!(directory.find(&held.flow).map(|(port, _)| port), Some(held.nat_port));
    }
}
