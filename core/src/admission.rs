//! Who may send and who may open a session: the relay-wide and per-route
//! per-source rate limits and the per-source session cap. One worker's share,
//! owned by its relay; fixed memory except the session count per source, which
//! holds only sources with sessions and so is bounded by the session table.

use core::net::IpAddr;
use std::collections::HashMap;

use crate::drop_reason::DropReason;
use crate::ratelimit::{Limit, SourceLimiter, TokenPair};
use crate::route::RouteId;
use crate::seed::Seeds;
use crate::time::Millis;

#[derive(Debug)]
pub struct Admission {
    global_limit: Limit,
    global_tokens: TokenPair,
    source_limiter: SourceLimiter,
    sessions_per_source: HashMap<IpAddr, u32, ahash::RandomState>,
    max_sessions_per_source: usize,
}

impl Admission {
    /// `seeds` come from the OS: sources are chosen by whoever sends packets.
    pub fn new(
        global_limit: Limit,
        source_table_entries: usize,
        max_sessions_per_source: usize,
        max_sessions: usize,
        seeds: &mut Seeds,
    ) -> Self {
        Admission {
            global_tokens: TokenPair::full(&global_limit, 0),
            global_limit,
            source_limiter: SourceLimiter::new(source_table_entries, seeds.hasher()),
            sessions_per_source: HashMap::with_capacity_and_hasher(max_sessions, seeds.hasher()),
            max_sessions_per_source,
        }
    }

    /// A reload's limits: the global bucket starts full under a changed limit; per-source state is kept.
    pub fn set_limits(&mut self, global_limit: Limit, max_sessions_per_source: usize) {
        if global_limit != self.global_limit {
            self.global_tokens = TokenPair::full(&global_limit, 0);
            self.global_limit = global_limit;
        }
        self.max_sessions_per_source = max_sessions_per_source;
    }

    /// The relay-wide limit: checked first, before any lookup, so a flood costs little.
    #[inline]
    pub fn allow_global(&mut self, now: Millis, bytes: u64) -> Result<(), DropReason> {
        if self.global_limit.is_unlimited() || self.global_tokens.allow(&self.global_limit, now, bytes) {
            Ok(())
        } else {
            Err(DropReason::RateLimitedGlobal)
        }
    }

    /// Route `route`'s limit on everything one source address sends, over all its ports.
    #[inline]
    pub fn allow_source(
        &mut self,
        route: RouteId,
        limit: &Limit,
        source: IpAddr,
        now: Millis,
        bytes: u64,
    ) -> Result<(), DropReason> {
        if limit.is_unlimited() || self.source_limiter.allow(route.0, source, limit, now, bytes) {
            Ok(())
        } else {
            Err(DropReason::RateLimitedSource)
        }
    }

    /// Whether `source` may open one more session.
    pub fn may_open(&self, source: IpAddr) -> Result<(), DropReason> {
        let held = self.sessions_per_source.get(&source).copied().unwrap_or(0);
        if held as usize >= self.max_sessions_per_source { Err(DropReason::SourceSessionLimit) } else { Ok(()) }
    }

    pub fn opened(&mut self, source: IpAddr) {
        *self.sessions_per_source.entry(source).or_insert(0) += 1;
    }

    /// One session of `source` ended: forget the source once it holds none.
    pub fn closed(&mut self, source: IpAddr) {
        if let Some(count) = self.sessions_per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.sessions_per_source.remove(&source);
            }
        }
    }
}
