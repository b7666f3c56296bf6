//! Upstream health. Workers record, per upstream, when a client last sent to it and when
//! it last answered ([`UpstreamActivity`], shared); the control thread turns that, and the
//! results of active probes, into up/down verdicts ([`UpstreamHealth`], pure) and pushes
//! them to the workers, which open new sessions only on healthy upstreams and move a dead
//! upstream's sessions at their next packet.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::route::UpstreamId;
use crate::time::Millis;

/// Upstreams one relay can know over its life (reloads only add to the table).
pub const MAX_UPSTREAMS: usize = 4096;

/// Per upstream: the last client packet relayed to it and its last answer, on the relay clock.
#[derive(Debug)]
pub struct UpstreamActivity {
    slots: Box<[Slot]>,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot {
    sent: AtomicU64,
    answered: AtomicU64,
}

impl Default for UpstreamActivity {
    fn default() -> Self {
        UpstreamActivity { slots: (0..MAX_UPSTREAMS).map(|_| Slot::default()).collect() }
    }
}

impl UpstreamActivity {
    #[inline]
    pub fn sent(&self, upstream: UpstreamId, now: Millis) {
        if let Some(slot) = self.slots.get(usize::from(upstream.0)) {
            advance(&slot.sent, now);
        }
    }

    #[inline]
    pub fn answered(&self, upstream: UpstreamId, now: Millis) {
        if let Some(slot) = self.slots.get(usize::from(upstream.0)) {
            advance(&slot.answered, now);
        }
    }

    /// (last sent, last answered) of `upstream`.
    pub fn times(&self, upstream: UpstreamId) -> (Millis, Millis) {
        self.slots
            .get(usize::from(upstream.0))
            .map_or((0, 0), |slot| (slot.sent.load(Ordering::Relaxed), slot.answered.load(Ordering::Relaxed)))
    }
}

/// Moves a shared time forward. The cache line is every worker's, so it is written at most
/// once per millisecond (the relay clock's tick), not once per packet; any worker may write.
#[inline]
fn advance(time: &AtomicU64, now: Millis) {
    if now > time.load(Ordering::Relaxed) {
        time.store(now, Ordering::Relaxed);
    }
}

/// How an upstream's health is judged (a route's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthPolicy {
    /// Down when clients sent to it for this long without a single answer; 0: never (passive check off).
    pub unanswered_timeout: Millis,
    /// A passively downed upstream is tried again (taken back as up) after this long.
    pub retry_after: Millis,
    /// Active probes: consecutive successes to come up, failures to go down.
    pub rise: u32,
    pub fall: u32,
}

/// One upstream's verdict and the evidence behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamHealth {
    down: bool,
    /// When the verdict last changed (0: at start, up).
    since: Millis,
    /// Down by the passive check, so retried after `retry_after` (active probes bring it back otherwise).
    passive: bool,
    /// Up: since when a client packet has waited for an answer (as first noticed).
    unanswered_since: Option<Millis>,
    successes: u32,
    failures: u32,
}

impl UpstreamHealth {
    /// Up until shown otherwise: a relay that starts must relay.
    pub fn is_up(&self) -> bool {
        !self.down
    }

    /// The passive check at `now` from the upstream's activity times. Returns the new
    /// verdict (true: up) when it changed.
    pub fn observe(&mut self, policy: &HealthPolicy, now: Millis, sent: Millis, answered: Millis) -> Option<bool> {
        if policy.unanswered_timeout == 0 {
            return None;
        }
        if !self.down {
            match self.unanswered_since {
                Some(since) if answered >= since => self.unanswered_since = None,
                // Only sends after the last verdict are evidence: older ones were judged already.
                None if sent > answered.max(self.since) => self.unanswered_since = Some(sent),
                _ => {}
            }
            let overdue = self.unanswered_since.is_some_and(|since| now >= since + policy.unanswered_timeout);
            return overdue.then(|| self.set(true, true, now));
        }
        let answered_again = answered > self.since;
        let retry = self.passive && now >= self.since + policy.retry_after;
        (answered_again || retry).then(|| self.set(false, false, now))
    }

    /// One active probe's outcome at `now`; returns the new verdict when it changed.
    pub fn probed(&mut self, policy: &HealthPolicy, answered: bool, now: Millis) -> Option<bool> {
        if answered {
            self.successes += 1;
            self.failures = 0;
            (self.down && self.successes >= policy.rise.max(1)).then(|| self.set(false, false, now))
        } else {
            self.failures += 1;
            self.successes = 0;
            (!self.down && self.failures >= policy.fall.max(1)).then(|| self.set(true, false, now))
        }
    }

    fn set(&mut self, down: bool, passive: bool, now: Millis) -> bool {
        *self = UpstreamHealth { down, since: now, passive, unanswered_since: None, successes: 0, failures: 0 };
        !down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSIVE: HealthPolicy = HealthPolicy { unanswered_timeout: 3_000, retry_after: 10_000, rise: 2, fall: 3 };

    #[test]
    fn unanswered_traffic_takes_an_upstream_down_and_an_answer_or_a_retry_brings_it_back() {
        let mut health = UpstreamHealth::default();
        assert_eq!(health.observe(&PASSIVE, 5_000, 5_000, 4_990), None, "a packet waits for its answer");
        assert_eq!(health.observe(&PASSIVE, 5_200, 5_200, 5_201), None, "answered: the wait is over");
        assert_eq!(health.observe(&PASSIVE, 60_000, 5_200, 5_201), None, "no client sent since: no evidence");
        assert_eq!(health.observe(&PASSIVE, 60_100, 60_100, 5_201), None, "a keepalive after a minute waits");
        assert_eq!(health.observe(&PASSIVE, 62_000, 62_000, 5_201), None);
        assert_eq!(health.observe(&PASSIVE, 63_100, 63_100, 5_201), Some(false), "unanswered for 3 s");
        assert!(!health.is_up());
        assert_eq!(health.observe(&PASSIVE, 64_000, 64_000, 5_201), None);
        assert_eq!(health.observe(&PASSIVE, 65_000, 65_000, 64_500), Some(true), "an answer brings it back");
        let mut retried = UpstreamHealth { down: true, since: 10_000, passive: true, ..UpstreamHealth::default() };
        assert_eq!(retried.observe(&PASSIVE, 40_000, 9_000, 5_000), Some(true));
        assert_eq!(
            retried.observe(&PASSIVE, 43_100, 9_000, 5_000),
            None,
            "sends from before it came back are no evidence"
        );
        assert_eq!(health.observe(&PASSIVE, 65_200, 65_200, 64_500), None, "a fresh wait starts");
        assert_eq!(health.observe(&PASSIVE, 68_300, 68_300, 64_500), Some(false));
        assert_eq!(health.observe(&PASSIVE, 78_300, 68_300, 64_500), Some(true), "retried after retry_after");
        assert_eq!(UpstreamHealth::default().observe(&HealthPolicy::default(), 99_000, 99_000, 0), None, "off");
    }

    #[test]
    fn probes_need_fall_failures_to_go_down_and_rise_successes_to_come_back() {
        let mut health = UpstreamHealth::default();
        assert_eq!(health.probed(&PASSIVE, false, 1), None);
        assert_eq!(health.probed(&PASSIVE, false, 2), None);
        assert_eq!(health.probed(&PASSIVE, true, 3), None, "a success resets the failures");
        for t in 4..6 {
            assert_eq!(health.probed(&PASSIVE, false, t), None);
        }
        assert_eq!(health.probed(&PASSIVE, false, 6), Some(false));
        assert_eq!(health.observe(&PASSIVE, 60_000, 0, 0), None, "a probed-down upstream is not retried blindly");
        assert_eq!(health.probed(&PASSIVE, true, 7), None);
        assert_eq!(health.probed(&PASSIVE, true, 8), Some(true));
    }

    #[test]
    fn activity_only_moves_forward() {
        let activity = UpstreamActivity::default();
        activity.sent(UpstreamId(3), 1_050);
        activity.sent(UpstreamId(3), 1_000);
        activity.answered(UpstreamId(3), 1_020);
        assert_eq!(activity.times(UpstreamId(3)), (1_050, 1_020), "a worker with an older clock does not go back");
        activity.sent(UpstreamId(u16::MAX), 5);
        assert_eq!(activity.times(UpstreamId(u16::MAX)), (0, 0), "beyond the table: ignored");
    }
}
