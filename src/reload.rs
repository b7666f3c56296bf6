//! Reload (SIGHUP, `systemctl reload`): re-read the config file and apply what can
//! change live (routes, upstreams, draining, access lists, limits, tunnel keys) without
//! restarting workers, detaching XDP or dropping a packet of a session whose route and
//! upstream remain. A file that does not parse, or that changes what needs a restart,
//! leaves the running config in force; the reason is logged and the failure counted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use oxidize_relay_core::config::Config;
use oxidize_relay_core::relay::ReloadedLimits;
use oxidize_relay_core::route::RouteTable;

use crate::backend::Attached;
use crate::backend::worker_core::WorkerUpdate;
use crate::keepalive::Keepalives;
use crate::nexthop::NextHopResolver;
use crate::preflight::{self, ConfigFileError, KeyFileError};
use crate::sys::xdp::XdpError;

/// How long a worker may take to accept a change before the control thread gives up on it.
pub(crate) const WORKER_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    #[error("the relay was started without --config: there is no file to re-read")]
    NoFile,
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error(transparent)]
    Keys(#[from] KeyFileError),
    #[error("these settings changed and need a restart: {}; nothing was applied", .0.join(", "))]
    RestartNeeded(Vec<&'static str>),
    #[error(transparent)]
    Xdp(#[from] XdpError),
    #[error("opening the tunnel keepalive sockets failed")]
    Keepalive(#[source] std::io::Error),
    #[error("worker {0} did not take the new config within {WORKER_WAIT:?} (it is stuck; the watchdog will see it)")]
    WorkerStuck(usize),
}

/// The running config and what a reload changes.
pub(crate) struct Reloader {
    path: Option<PathBuf>,
    current: Config,
    routes: Arc<RouteTable>,
    /// The socket backend bound its listen sockets before dropping privileges.
    listen_fixed: bool,
}

/// The parts of the relay a reload touches.
pub(crate) struct Reloadable<'a> {
    pub(crate) attached: &'a [Attached],
    pub(crate) updates: &'a [Sender<WorkerUpdate>],
    pub(crate) resolver: &'a mut NextHopResolver,
    pub(crate) keepalives: &'a mut Keepalives,
}

impl Reloader {
    pub(crate) fn new(path: Option<PathBuf>, current: Config, routes: Arc<RouteTable>, socket_backend: bool) -> Self {
        Reloader { path, current, routes, listen_fixed: socket_backend }
    }

    /// The route table in force.
    pub(crate) fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// Re-reads the file and applies it; on error nothing changed.
    pub(crate) fn reload(&mut self, parts: Reloadable<'_>) -> Result<(), ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let mut new = preflight::read_config(path)?;
        new.runtime.mode = self.current.runtime.mode;
        for warning in preflight::load_tunnel_keys(&mut new)? {
            tracing::warn!("{warning}");
        }
        let restart = self.current.restart_needed(&new, self.listen_fixed);
        if !restart.is_empty() {
            return Err(ReloadError::RestartNeeded(restart));
        }
        let routes = Arc::new(self.routes.successor(&new.routes));
        let keepalives = Keepalives::new(&routes).map_err(ReloadError::Keepalive)?;
        let workers = parts.updates.len().max(1) as u64;
        let limits = ReloadedLimits {
            global_limit: new.security.global_limit.per_worker(workers),
            max_sessions_per_source: new.security.max_sessions_per_source,
            verify_checksums: new.security.verify_checksums,
        };
        let listens = |config: &Config| config.routes.iter().map(|r| r.listen).collect::<Vec<_>>();
        let (before, after) = (listens(&self.current), listens(&new));
        // Gone listen addresses leave XDP first, new ones join after the workers know their routes.
        for a in parts.attached {
            for gone in before.iter().filter(|l| !after.contains(l)) {
                a.program.remove_listen(*gone);
            }
        }
        for (worker, sender) in parts.updates.iter().enumerate() {
            sender
                .send_timeout(WorkerUpdate::Reconfigure(routes.clone(), limits), WORKER_WAIT)
                .map_err(|_| ReloadError::WorkerStuck(worker))?;
        }
        for a in parts.attached {
            for added in after.iter().filter(|l| !before.contains(l)) {
                a.program.add_listen(*added)?;
            }
            a.program.configure(&crate::backend::af_xdp::xdp_config(&new))?;
        }
        parts.resolver.set_upstreams(routes.upstreams());
        *parts.keepalives = keepalives;
        tracing::info!(
            routes = new.routes.len(),
            upstreams = routes.upstreams().len(),
            added_listen = ?after.iter().filter(|l| !before.contains(l)).collect::<Vec<_>>(),
            removed_listen = ?before.iter().filter(|l| !after.contains(l)).collect::<Vec<_>>(),
            "config reloaded"
        );
        self.routes = routes;
        self.current = new;
        Ok(())
    }
}
