//! Repeated log lines are rate limited per call site, so a fault that repeats
//! fast (a failing accept, a file that cannot be written) cannot fill the disk
//! or the journal: at most [`PER_WINDOW`] lines of one call site per
//! [`WINDOW`], and one line saying how many were left out.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing::callsite::Identifier;

pub const WINDOW: Duration = Duration::from_secs(10);
pub const PER_WINDOW: u32 = 5;

static SITES: Mutex<Option<HashMap<Identifier, Site>>> = Mutex::new(None);

struct Site {
    name: &'static str,
    started: Instant,
    logged: u32,
    suppressed: u64,
}

/// Whether an event of this call site may be logged now (to use as a `tracing_subscriber` filter).
pub fn allow(metadata: &Metadata<'_>) -> bool {
    if !metadata.is_event() {
        return true;
    }
    let mut sites = SITES.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    let site = sites.get_or_insert_with(HashMap::new).entry(metadata.callsite()).or_insert(Site {
        name: metadata.name(),
        started: now,
        logged: 0,
        suppressed: 0,
    });
    if now.duration_since(site.started) >= WINDOW && site.suppressed == 0 {
        site.started = now;
        site.logged = 0;
    }
    if site.logged < PER_WINDOW {
        site.logged += 1;
        return true;
    }
    site.suppressed += 1;
    false
}

/// Logs how many lines each call site had suppressed in its finished window (called by the control loop).
pub fn report_suppressed() {
    let finished: Vec<(&'static str, u64)> = {
        let mut sites = SITES.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        sites
            .get_or_insert_with(HashMap::new)
            .values_mut()
            .filter(|site| site.suppressed > 0 && now.duration_since(site.started) >= WINDOW)
            .map(|site| {
                let count = std::mem::take(&mut site.suppressed);
                site.started = now;
                site.logged = 0;
                (site.name, count)
            })
            .collect()
    };
    for (name, count) in finished {
        tracing::warn!("{count} more log lines like `{name}` were left out in the last {} s", WINDOW.as_secs());
    }
}
