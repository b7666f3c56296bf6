//! The control thread's loop: next hops, keepalives, the stats file, metrics, the
//! summary line, the watchdog, and what signals (reload, drain, resume) and link changes ask for.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use oxidize_relay_core::config::Config;
use oxidize_relay_core::counters::Counters;
use oxidize_relay_core::route::UpstreamId;
use oxidize_relay_core::{IfaceId, NextHop};
use serde_json::{Map, Value, json};

use crate::backend::Attached;
use crate::backend::worker_core::WorkerUpdate;
use crate::health_check::HealthChecker;
use crate::keepalive::Keepalives;
use crate::metrics;
use crate::nexthop::NextHopResolver;
use crate::reload::{Reloadable, Reloader, WORKER_WAIT};
use crate::run::SetupError;
use crate::stats::Totals;
use crate::sys::bpf_abi::XdpCounter;
use crate::systemd::Notifier;

const CONTROL_TICK: Duration = Duration::from_millis(200);
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);

pub(crate) struct StatsContext<'a> {
    pub(crate) backend: &'static str,
    pub(crate) attached: &'a [Attached],
    pub(crate) counters: &'a [Arc<Counters>],
    pub(crate) stats_file: Option<&'a PathBuf>,
}

impl StatsContext<'_> {
    pub(crate) fn xdp_counters(&self) -> Vec<(String, Option<[u64; XdpCounter::ALL.len()]>)> {
        self.attached.iter().map(|a| (a.info.name.clone(), a.program.counters().ok())).collect()
    }

    pub(crate) fn json(&self, totals: &Totals, running: bool) -> Value {
        let xdp: Vec<_> =
            self.attached.iter().map(|a| (a.info.name.clone(), a.mode.name(), a.program.counters().ok())).collect();
        let mut extra = Map::new();
        extra.insert("backend".into(), json!(self.backend));
        extra.insert("workers".into(), json!(self.counters.len()));
        extra.insert("running".into(), json!(running));
        totals.to_json(&xdp, extra)
    }

    pub(crate) fn write(&self, totals: &Totals, running: bool) {
        let Some(path) = self.stats_file else { return };
        if let Err(error) = write_atomically(path, &self.json(totals, running).to_string()) {
            tracing::warn!(path = %path.display(), %error, "writing the stats file failed");
        }
    }
}

/// What an operator asks of a running relay by signal: SIGHUP reloads the config,
/// SIGUSR1 drains (no new sessions; existing ones are served), SIGUSR2 resumes.
pub(crate) struct OperatorSignals {
    reload: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
    resume: Arc<AtomicBool>,
}

impl OperatorSignals {
    pub(crate) fn register() -> Result<Self, SetupError> {
        use signal_hook::consts::{SIGHUP, SIGUSR1, SIGUSR2};
        let flag = |signal| {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal, flag.clone()).map(|_| flag).map_err(SetupError::Signals)
        };
        Ok(OperatorSignals { reload: flag(SIGHUP)?, drain: flag(SIGUSR1)?, resume: flag(SIGUSR2)? })
    }
}

/// Everything the control thread runs, borrowed from `run`.
pub(crate) struct ControlPlane<'a> {
    pub(crate) config: &'a Config,
    pub(crate) stop: &'a AtomicBool,
    pub(crate) signals: &'a OperatorSignals,
    pub(crate) resolver: NextHopResolver,
    pub(crate) unresolved: &'a Receiver<UpstreamId>,
    pub(crate) updates: &'a [Sender<WorkerUpdate>],
    pub(crate) stats: &'a StatsContext<'a>,
    pub(crate) notifier: &'a Notifier,
    pub(crate) keepalives: Keepalives,
    pub(crate) reloader: Reloader,
    /// Cleared while draining; the metrics endpoint's `/ready` reads it.
    pub(crate) accepting: &'a AtomicBool,
    pub(crate) health: HealthChecker,
    /// The workers' clock, which the health checks read activity times on.
    pub(crate) epoch: Instant,
}

impl ControlPlane<'_> {
    /// Runs until `stop` is set or an interface goes away.
    pub(crate) fn run(&mut self) -> Result<(), SetupError> {
        let stats = self.stats;
        let interval = Duration::from_secs(self.config.runtime.stats_interval_secs.max(1));
        let mut last_summary = (Instant::now(), Totals::collect(stats.counters));
        let mut last_refresh = Instant::now();
        let mut watchdog = (Instant::now(), worker_loops(stats.counters));
        let mut mtus: Vec<u16> = stats.attached.iter().map(|a| a.info.mtu).collect();
        while !self.stop.load(Ordering::Relaxed) {
            if let Some(gone) = stats.attached.iter().find(|a| !a.info.still_present()) {
                return Err(SetupError::InterfaceGone(gone.info.name.clone()));
            }
            self.follow_mtus(&mut mtus);
            // A worker that met an unresolved upstream wakes us early.
            let asked = self.unresolved.recv_timeout(CONTROL_TICK).is_ok();
            while self.unresolved.try_recv().is_ok() {}
            self.operator_requests();
            if asked || last_refresh.elapsed() >= NEXT_HOP_REFRESH {
                publish(&mut self.resolver, stats.attached, self.updates)?;
                self.health.publish_sessions();
                last_refresh = Instant::now();
            }
            let verdicts = self.health.tick(self.epoch.elapsed().as_millis() as u64);
            self.push_health(verdicts);
            self.keepalives.tick();
            crate::log_limit::report_suppressed();
            let totals = Totals::collect(stats.counters);
            stats.write(&totals, true);
            metrics::publish(stats.counters, &stats.xdp_counters());
            if last_summary.0.elapsed() >= interval {
                let seconds = last_summary.0.elapsed().as_secs_f64();
                let summary = totals.summary(&last_summary.1, seconds, stats.counters.len(), stats.backend);
                tracing::info!("{summary}");
                let draining = if self.accepting.load(Ordering::Relaxed) { "" } else { "draining; " };
                self.notifier.status(&format!("{draining}{summary}"));
                last_summary = (Instant::now(), totals);
            }
            // Ping only while every worker's loop advances: a stuck worker lets systemd restart us.
            if let Some(period) = self.notifier.watchdog_interval()
                && watchdog.0.elapsed() >= period
            {
                let loops = worker_loops(stats.counters);
                if loops.iter().zip(&watchdog.1).all(|(now, then)| now > then) {
                    self.notifier.watchdog();
                } else {
                    tracing::error!("a worker made no progress for {period:?}; withholding the watchdog ping");
                }
                watchdog = (Instant::now(), loops);
            }
        }
        Ok(())
    }

    /// Tells the workers when an interface's MTU changed (`ip link set … mtu`), so datagrams
    /// that no longer fit are answered with too-big instead of leaving to be dropped.
    fn follow_mtus(&self, mtus: &mut [u16]) {
        for (index, (attached, known)) in self.stats.attached.iter().zip(mtus.iter_mut()).enumerate() {
            let Some(mtu) = attached.info.current_mtu().filter(|mtu| mtu != known) else { continue };
            tracing::info!(interface = %attached.info.name, from = *known, to = mtu, "interface MTU changed");
            crate::backend::af_xdp::warn_if_beyond_frame(&attached.info.name, mtu, self.config.pool.frame_size);
            *known = mtu;
            self.broadcast(WorkerUpdate::Mtu(IfaceId(index as u8), mtu), "MTU change");
        }
    }

    /// Reload, drain and resume, as the signals asked since the last tick.
    fn operator_requests(&mut self) {
        if self.signals.reload.swap(false, Ordering::Relaxed) {
            tracing::info!("SIGHUP: reloading the config");
            self.notifier.reloading();
            let parts = Reloadable {
                attached: self.stats.attached,
                updates: self.updates,
                resolver: &mut self.resolver,
                keepalives: &mut self.keepalives,
            };
            match self.reloader.reload(parts) {
                Ok(()) => {
                    metrics::reload("applied");
                    if let Err(error) = self.health.follow(self.reloader.routes()) {
                        tracing::error!(%error, "opening health probe sockets for the reloaded routes failed");
                    }
                    let verdicts: Vec<_> = self.health.verdicts().collect();
                    self.push_health(verdicts);
                }
                Err(error) => {
                    tracing::error!(
                        error = &error as &dyn std::error::Error,
                        "reload failed; the running config stays in force"
                    );
                    metrics::reload("failed");
                }
            }
            self.notifier.ready("reloaded");
        }
        for (flag, accepting) in [(&self.signals.drain, false), (&self.signals.resume, true)] {
            if flag.swap(false, Ordering::Relaxed) {
                self.set_accepting(accepting);
            }
        }
    }

    /// Tells every worker the health verdicts that changed.
    fn push_health(&self, verdicts: Vec<(UpstreamId, bool)>) {
        for (upstream, up) in verdicts {
            self.broadcast(
                WorkerUpdate::Health(upstream, up),
                &format!("the health verdict on upstream {}", upstream.0),
            );
        }
    }

    /// Sends `update` to every worker, waiting a little for each; a worker that does not take
    /// it is stuck (the watchdog sees it) and is logged.
    fn broadcast(&self, update: WorkerUpdate, what: &str) {
        for (worker, sender) in self.updates.iter().enumerate() {
            if sender.send_timeout(update.clone(), WORKER_WAIT).is_err() {
                tracing::error!(worker, "a worker did not take {what}");
            }
        }
    }

    fn set_accepting(&self, accepting: bool) {
        self.broadcast(WorkerUpdate::AcceptSessions(accepting), "the drain/resume request");
        self.accepting.store(accepting, Ordering::Relaxed);
        metrics::draining(!accepting);
        if accepting {
            tracing::info!("SIGUSR2: resumed; new sessions are opened again");
            self.notifier.status("accepting new sessions");
        } else {
            tracing::info!(
                "SIGUSR1: draining; existing sessions are served, no new ones are opened, /ready answers 503"
            );
            self.notifier.status("draining: no new sessions");
        }
    }
}

/// Writes `path` through a temporary file and a rename, so readers never see half a file.
pub(crate) fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, text).and_then(|()| fs::rename(&temporary, path))
}

pub(crate) fn worker_loops(counters: &[Arc<Counters>]) -> Vec<u64> {
    counters.iter().map(|c| c.loops.get()).collect()
}

/// Refreshes next hops; new NAT source addresses go into every XDP program before workers use them.
pub(crate) fn publish(
    resolver: &mut NextHopResolver,
    attached: &[Attached],
    updates: &[Sender<WorkerUpdate>],
) -> Result<(), SetupError> {
    for (upstream, hop) in resolver.refresh() {
        if let Ok(NextHop { src_ip, .. }) = hop {
            for a in attached {
                a.program.add_nat_addr(src_ip)?;
            }
        }
        for sender in updates {
            // A worker whose channel is full is stuck (the watchdog sees it); the next refresh repeats this.
            if sender.try_send(WorkerUpdate::NextHop(upstream, hop)).is_err() {
                tracing::warn!(
                    upstream = upstream.0,
                    "a worker's update channel is full; next hop sent again at the next refresh"
                );
            }
        }
    }
    Ok(())
}
