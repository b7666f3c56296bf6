//! `oxidize-relay run`: pick the backend, set it up, run the control loop,
//! and tear everything down on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use oxidize_relay_core::config::{Config, Mode};
use oxidize_relay_core::directory::NatDirectory;
use oxidize_relay_core::route::RouteTable;

use crate::backend::socket::worker::SocketSetupError;
use crate::backend::worker_core::CHANNEL_CAPACITY;
use crate::backend::{self, AnyWorker, Backend, WorkerShared};
use crate::control::{self, StatsContext};
use crate::keepalive::Keepalives;
use crate::metrics;
use crate::metrics_endpoint::{self, EndpointError};
use crate::nexthop::NextHopResolver;
use crate::preflight::{self, KeyFileError};
use crate::probe::{self, ModeError};
use crate::stats::Totals;
use crate::sys;
use crate::sys::iface::IfaceError;
use crate::sys::netlink::{NetlinkError, RouteSocket};
use crate::sys::xdp::XdpError;
use crate::sys::xsk::XskError;
use crate::systemd::Notifier;

/// How long start-up waits for upstream next hops before declaring ready anyway.
const RESOLVE_AT_START: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error(transparent)]
    Interface(#[from] IfaceError),
    #[error(transparent)]
    Xdp(#[from] XdpError),
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error(transparent)]
    Socket(#[from] SocketSetupError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Metrics(#[from] EndpointError),
    #[error("interface {interface} has {available} RX queues but the config asks for {wanted}")]
    Queues { interface: String, available: u32, wanted: u32 },
    #[error(
        "interface {interface} has {available} RX queues but the config serves only {wanted}: relay traffic \
         that RSS puts on the other queues would reach the kernel, which answers it with ICMP port unreachable. \
         Remove `queues` to serve them all, or reduce the channels: `ethtool -L {interface} combined {wanted}` \
         (NixOS: services.oxidize-relay.nic.{interface}.channels = {wanted})"
    )]
    QueuesUnserved { interface: String, available: u32, wanted: u32 },
    #[error(
        "the interfaces have different RX queue counts ({counts}); worker N serves queue N of every interface, \
         so make them equal with `ethtool -L IF combined N`"
    )]
    QueueCountsDiffer { counts: String },
    #[error("reading a random seed from the kernel failed")]
    Seed(#[source] std::io::Error),
    #[error(
        "interface {0} disappeared while the relay ran (deleted or replaced): its XDP program and AF_XDP \
         sockets went with it. Exiting so the service manager restarts the relay once the interface is back"
    )]
    InterfaceGone(String),
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("the stats file {path} cannot be written")]
    StatsFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the tunnel keepalive sockets failed")]
    Keepalive(#[source] std::io::Error),
    #[error("dropping capabilities after setup failed")]
    DropCapabilities(#[source] std::io::Error),
    #[error("registering signal handlers failed")]
    Signals(#[source] std::io::Error),
    #[error("spawning worker thread {worker} failed")]
    Spawn {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Options of `run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Written every control tick (and at exit) with the counters as JSON.
    pub stats_file: Option<PathBuf>,
}

pub fn run(config: Config, options: RunOptions) -> Result<(), SetupError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(SetupError::Signals)?;
    }
    // Their default action would kill the relay silently, leaving the stats file saying it runs.
    let ignored = IgnoredSignals::register()?;
    match sys::raise_descriptor_limit() {
        Ok(limit) => tracing::debug!(limit, "open descriptor limit"),
        Err(error) => tracing::warn!(%error, "raising the open descriptor limit failed"),
    }
    let mut config = config;
    for warning in preflight::load_tunnel_keys(&mut config)? {
        tracing::warn!("{warning}");
    }
    if let Some(warning) = preflight::local_port_overlap(&config) {
        tracing::warn!("{warning}");
    }
    if let Some(path) = &options.stats_file {
        // Found now rather than as a warning every 200 ms for the relay's whole life.
        control::write_atomically(path, "{}")
            .map_err(|source| SetupError::StatsFile { path: path.display().to_string(), source })?;
    }
    let (mode, report) = probe::resolve_mode(&config)?;
    let routes = Arc::new(RouteTable::new(&config.routes));
    let (unresolved_tx, unresolved_rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
    let directory = Arc::new(NatDirectory::new(config.nat.ports, sys::random_u64().map_err(SetupError::Seed)?));
    let shared = WorkerShared {
        routes: routes.clone(),
        directory,
        stop: stop.clone(),
        unresolved: unresolved_tx,
        epoch: Instant::now(),
    };
    let backend = match mode {
        Mode::Socket => backend::socket::build(&config, &shared)?,
        Mode::AfXdp | Mode::Auto => backend::af_xdp::build(&config, &report, &shared)?,
    };
    drop(shared);

    // Everything privileged is done: programs attached, sockets bound, map fds open.
    // Drop every capability before any other thread exists (capabilities are per thread).
    sys::caps::drop_all().map_err(SetupError::DropCapabilities)?;
    tracing::info!("setup done; all capabilities dropped");
    if let Some(listen) = config.metrics_listen {
        metrics_endpoint::start(listen)?;
        tracing::info!(%listen, "Prometheus metrics at http://{listen}/metrics");
    }

    let mut resolver = NextHopResolver::new(
        RouteSocket::open()?,
        backend.attached.iter().map(|a| a.info.clone()).collect(),
        config.neighbors.clone(),
        routes.upstreams().to_vec(),
    );
    let start = Instant::now();
    loop {
        control::publish(&mut resolver, &backend.attached, &backend.updates)?;
        if resolver.all_resolved() || start.elapsed() >= RESOLVE_AT_START || stop.load(Ordering::Relaxed) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }

    let Backend { name, attached, workers, counters, updates } = backend;
    metrics::publish_static(name, &attached.iter().map(|a| (a.info.name.clone(), a.mode.name())).collect::<Vec<_>>());
    let handles = spawn_workers(workers, &config.runtime.cores)?;
    let context = StatsContext {
        backend: name,
        attached: &attached,
        counters: &counters,
        stats_file: options.stats_file.as_ref(),
    };
    context.write(&Totals::collect(&counters), true);
    tracing::info!(workers = handles.len(), backend = name, routes = config.routes.len(), "relay ready");
    let notifier = Notifier::from_env();
    notifier.ready(&format!("{} workers, backend {name}", handles.len()));

    let mut keepalives = Keepalives::new(&routes).map_err(SetupError::Keepalive)?;
    let outcome = control::control_loop(
        &config,
        &stop,
        &ignored,
        &mut resolver,
        &unresolved_rx,
        &updates,
        &context,
        &notifier,
        &mut keepalives,
    );
    // Whatever ended the loop, the workers stop and the stats file stops claiming a running relay.
    stop.store(true, Ordering::Relaxed);

    notifier.stopping();
    tracing::info!("shutting down: stopping workers, detaching XDP");
    for handle in handles {
        if handle.join().is_err() {
            tracing::error!("a worker thread panicked");
        }
    }
    let totals = Totals::collect(&counters);
    context.write(&totals, false);
    println!("{}", context.json(&totals, false));
    drop(attached);
    outcome
}

/// Signals an operator or a service manager may send that have no meaning yet
/// (SIGHUP will reload once reload exists): caught, logged, otherwise ignored.
pub(crate) struct IgnoredSignals {
    flags: Vec<(&'static str, Arc<AtomicBool>)>,
}

impl IgnoredSignals {
    fn register() -> Result<Self, SetupError> {
        use signal_hook::consts::{SIGHUP, SIGUSR1, SIGUSR2};
        let mut flags = Vec::new();
        for (name, signal) in [("SIGHUP", SIGHUP), ("SIGUSR1", SIGUSR1), ("SIGUSR2", SIGUSR2)] {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal, flag.clone()).map_err(SetupError::Signals)?;
            flags.push((name, flag));
        }
        Ok(IgnoredSignals { flags })
    }

    pub(crate) fn log_received(&self) {
        for (name, flag) in &self.flags {
            if flag.swap(false, Ordering::Relaxed) {
                tracing::warn!(signal = name, "received {name}: it has no meaning for this relay yet; ignored");
            }
        }
    }
}

fn spawn_workers(workers: Vec<AnyWorker>, cores: &[usize]) -> Result<Vec<JoinHandle<()>>, SetupError> {
    let available = core_affinity::get_core_ids().unwrap_or_default();
    workers
        .into_iter()
        .enumerate()
        .map(|(id, worker)| {
            let core = cores.get(id).and_then(|c| available.iter().find(|a| a.id == *c).copied());
            if let Some(wanted) = cores.get(id).filter(|_| core.is_none()) {
                tracing::warn!(worker = id, core = wanted, "configured core is not available; worker left unpinned");
            }
            thread::Builder::new()
                .name(format!("oxr-worker-{id}"))
                .spawn(move || {
                    if let Some(core) = core
                        && core_affinity::set_for_current(core)
                    {
                        tracing::info!(worker = id, core = core.id, "worker pinned");
                    }
                    match worker {
                        AnyWorker::AfXdp(worker) => worker.run(),
                        AnyWorker::Socket(worker) => worker.run(),
                    }
                })
                .map_err(|source| SetupError::Spawn { worker: id, source })
        })
        .collect()
}
