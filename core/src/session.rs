//! NAT sessions: each (client, listen address) pair owns one relay port toward
//! its upstream until it has been idle for the configured timeout.
//!
//! Replies are found by direct indexing with the NAT port; new packets by a
//! hash of the flow. Memory is allocated once, at construction, for the full
//! capacity: a flood of new clients can fill the table, never grow it.

use core::net::{IpAddr, SocketAddr};
use std::collections::{HashMap, VecDeque};

use crate::ratelimit::TokenPair;
use crate::route::{RouteId, UpstreamId};
use crate::time::Millis;
use crate::wire::MacAddr;

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

/// One live NAT binding.
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
    pub last_seen: Millis,
    /// This session's per-session rate-limit buckets.
    pub tokens: TokenPair,
    /// The flow id a tunnelled client side (a previous relay) gave this flow; echoed in replies.
    pub peer_flow: u32,
}

/// A session's place in the table, valid until that session expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u16);

/// Why a session could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitError {
    TableFull,
    PortsExhausted,
}

/// A fixed-capacity NAT table over a contiguous port range.
#[derive(Debug)]
pub struct SessionTable {
    first_port: u16,
    slots: Vec<Option<Session>>,
    by_flow: HashMap<FlowKey, u16, ahash::RandomState>,
    /// Free slot indexes, oldest-freed first, so a port is not reused right after it expires.
    free: VecDeque<u16>,
    capacity: usize,
    idle_timeout: Millis,
    sweep_cursor: usize,
}

impl SessionTable {
    /// A table owning ports `ports.0..=ports.1` that holds at most `capacity` sessions.
    pub fn new(ports: (u16, u16), capacity: usize, idle_timeout: Millis) -> Self {
        let (first, last) = ports;
        let slot_count = usize::from(last.saturating_sub(first)) + 1;
        SessionTable {
            first_port: first,
            slots: vec![None; slot_count],
            by_flow: HashMap::with_capacity_and_hasher(capacity.min(slot_count), ahash::RandomState::new()),
            free: (0..slot_count as u32).map(|s| s as u16).collect(),
            capacity,
            idle_timeout,
            sweep_cursor: 0,
        }
    }

    /// The session for `flow`, refreshed to `now`.
    #[inline]
    pub fn touch_flow(&mut self, flow: &FlowKey, now: Millis) -> Option<&Session> {
        let slot = self.find(flow)?;
        self.refresh(slot, now).map(|s| &*s)
    }

    /// The session owning `nat_port`. The caller refreshes `last_seen` only
    /// once the packet proved it belongs to the session, so strangers cannot keep it alive.
    #[inline]
    pub fn by_port_mut(&mut self, nat_port: u16) -> Option<&mut Session> {
        let slot = usize::from(nat_port.checked_sub(self.first_port)?);
        self.slots.get_mut(slot)?.as_mut()
    }

    /// Whether `port` belongs to this table's range.
    #[inline]
    pub fn owns_port(&self, port: u16) -> bool {
        port.checked_sub(self.first_port).is_some_and(|slot| usize::from(slot) < self.slots.len())
    }

    /// Creates a session; `template.nat_port` is ignored and assigned here.
    pub fn admit(&mut self, template: Session) -> Result<&Session, AdmitError> {
        let slot = self.admit_slot(template)?;
        self.slots[usize::from(slot.0)].as_ref().ok_or(AdmitError::TableFull)
    }

    /// Like [`admit`](Self::admit), returning the new session's slot.
    pub fn admit_slot(&mut self, mut template: Session) -> Result<Slot, AdmitError> {
        if self.by_flow.len() >= self.capacity {
            return Err(AdmitError::TableFull);
        }
        let slot = self.free.pop_front().ok_or(AdmitError::PortsExhausted)?;
        template.nat_port = self.first_port + slot;
        self.by_flow.insert(template.flow, slot);
        self.slots[usize::from(slot)] = Some(template);
        Ok(Slot(slot))
    }

    /// Where the session of `flow` lives, if it has one (one hash lookup).
    #[inline]
    pub fn find(&self, flow: &FlowKey) -> Option<Slot> {
        self.by_flow.get(flow).copied().map(Slot)
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

    /// Removes sessions idle for at least the timeout, examining at most
    /// `budget` slots from where the previous call stopped; `on_expired` sees
    /// each removed session. Returns how many expired.
    pub fn expire(&mut self, now: Millis, budget: usize, mut on_expired: impl FnMut(&Session)) -> usize {
        let mut expired = 0;
        for _ in 0..budget.min(self.slots.len()) {
            let slot = self.sweep_cursor;
            self.sweep_cursor = (self.sweep_cursor + 1) % self.slots.len();
            let Some(session) = &self.slots[slot] else {
                continue;
            };
            if now.saturating_sub(session.last_seen) < self.idle_timeout {
                continue;
            }
            on_expired(session);
            self.by_flow.remove(&session.flow);
            self.slots[slot] = None;
            self.free.push_back(slot as u16);
            expired += 1;
        }
        expired
    }

    pub fn len(&self) -> usize {
        self.by_flow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_flow.is_empty()
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
            tokens: TokenPair::full(&crate::ratelimit::Limit::default(), 0),
            peer_flow: 0,
        }
    }

    #[test]
    fn admit_then_find_by_flow_and_by_port() {
        let mut table = SessionTable::new((20000, 20009), 100, 1000);
        let created = *table.admit(session("10.0.0.7:4000")).expect("room");
        assert_eq!(created.nat_port, 20000);
        assert_eq!(table.touch_flow(&created.flow, 5).map(|s| s.nat_port), Some(20000));
        assert_eq!(table.by_port_mut(20000).map(|s| s.flow), Some(created.flow));
        assert!(table.by_port_mut(20001).is_none());
        assert!(table.by_port_mut(19999).is_none());
        assert!(table.by_port_mut(30000).is_none());
        assert!(table.owns_port(20009) && !table.owns_port(20010));
    }

    #[test]
    fn idle_sessions_expire_and_active_ones_stay() {
        let mut table = SessionTable::new((20000, 20009), 100, 1000);
        let idle = table.admit(session("10.0.0.7:1")).expect("room").flow;
        let busy = table.admit(session("10.0.0.7:2")).expect("room").flow;
        table.touch_flow(&busy, 900);
        assert_eq!(table.expire(999, 10, |_| {}), 0, "nothing is idle for a full timeout yet");
        assert_eq!(table.expire(1000, 10, |_| {}), 1);
        assert!(table.touch_flow(&idle, 1000).is_none());
        assert!(table.touch_flow(&busy, 1000).is_some());
        assert_eq!(table.expire(1999, 10, |_| {}), 0, "touched at 1000: not idle for a full timeout until 2000");
        assert_eq!(table.expire(2000, 10, |_| {}), 1);
    }

    #[test]
    fn freed_ports_are_reused_last() {
        let mut table = SessionTable::new((20000, 20002), 10, 10);
        let first = table.admit(session("10.0.0.7:1")).expect("room").nat_port;
        table.expire(100, 3, |_| {});
        let next = table.admit(session("10.0.0.7:2")).expect("room").nat_port;
        assert_ne!(first, next, "the expired port goes to the back of the queue");
    }

    #[test]
    fn capacity_and_port_exhaustion_refuse_without_touching_existing() {
        let mut table = SessionTable::new((20000, 20001), 10, 1000);
        let a = table.admit(session("10.0.0.7:1")).expect("room").flow;
        table.admit(session("10.0.0.7:2")).expect("room");
        assert_eq!(table.admit(session("10.0.0.7:3")).err(), Some(AdmitError::PortsExhausted));
        assert!(table.touch_flow(&a, 1).is_some());

        let mut small = SessionTable::new((20000, 20100), 1, 1000);
        small.admit(session("10.0.0.7:1")).expect("room");
        assert_eq!(small.admit(session("10.0.0.7:2")).err(), Some(AdmitError::TableFull));
        assert_eq!(small.len(), 1);
    }
}
