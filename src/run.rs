//! `oxidize-relay run`: pick the backend, set it up, run the control loop,
//! and tear everything down on SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use oxidize_relay_core::Relay;
use oxidize_relay_core::config::{Config, Mode};
use oxidize_relay_core::directory::NatDirectory;
use oxidize_relay_core::health::UpstreamActivity;
use oxidize_relay_core::route::RouteTable;

use crate::backend::socket::worker::SocketSetupError;
use crate::backend::worker_core::CHANNEL_CAPACITY;
use crate::backend::{self, AnyWorker, Backend, WorkerShared};
use crate::control::{self, ControlPlane, OperatorSignals, StatsContext};
use crate::handover;
use crate::health_check::HealthChecker;
use crate::keepalive::Keepalives;
use crate::metrics;
use crate::metrics_endpoint::{self, EndpointError};
use crate::nexthop::NextHopResolver;
use crate::preflight::{self, KeyFileError};
use crate::probe::{self, ModeError};
use crate::reload::Reloader;
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
    #[error("opening the health probe sockets failed")]
    Probes(#[source] std::io::Error),
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

/// Options of `run` beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The file the config came from, re-read on SIGHUP (`None`: the quick form, no reload).
    pub config_file: Option<PathBuf>,
    /// Written every control tick (and at exit) with the counters as JSON.
    pub stats_file: Option<PathBuf>,
    /// Where a clean stop leaves the live sessions for the next start (see [`handover`]).
    pub state_dir: Option<PathBuf>,
}

pub fn run(config: Config, options: RunOptions) -> Result<(), SetupError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(SetupError::Signals)?;
    }
    // Registered before anything else: their default action would kill the relay silently.
    let signals = OperatorSignals::register()?;
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
    // The workers' clock; handed-over idle times and upstream activity are measured on it.
    let epoch = Instant::now();
    let activity = Arc::new(UpstreamActivity::default());
    let shared = WorkerShared {
        routes: routes.clone(),
        directory: directory.clone(),
        activity: activity.clone(),
        stop: stop.clone(),
        unresolved: unresolved_tx,
        epoch,
    };
    let backend = match mode {
        Mode::Socket => backend::socket::build(&config, &shared)?,
        Mode::AfXdp | Mode::Auto => backend::af_xdp::build(&config, &report, &shared)?,
    };
    drop(shared);

    // Everything privileged is done: programs attached, sockets bound, map fds open.
    // Drop every capability before any other thread exists (capabilities are per thread).
    let keep_bpf = match backend.attached.first() {
        Some(attached) => {
            let flows = attached.program.flow_map();
            sys::caps::maps_need_cap_bpf(|| flows.accessible()).map_err(SetupError::DropCapabilities)?
        }
        None => false,
    };
    sys::caps::drop_all(keep_bpf).map_err(SetupError::DropCapabilities)?;
    if keep_bpf {
        tracing::info!(
            kernel = %report.kernel,
            "setup done; every capability dropped but CAP_BPF: this kernel refuses the relay's BPF map updates without it while kernel.unprivileged_bpf_disabled is set (Linux 6.1 and later do not)"
        );
    } else {
        tracing::info!("setup done; all capabilities dropped");
    }
    let accepting = Arc::new(AtomicBool::new(true));
    if let Some(listen) = config.metrics_listen {
        metrics_endpoint::start(listen, accepting.clone())?;
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

    let Backend { name, attached, mut workers, counters, updates } = backend;
    let interfaces: Vec<String> = match mode {
        Mode::Socket => config.interfaces.iter().map(|i| i.name.clone()).collect(),
        Mode::AfXdp | Mode::Auto => attached.iter().map(|a| a.info.name.clone()).collect(),
    };
    let handover_file = options.state_dir.as_ref().map(|dir| dir.join(handover::FILE_NAME));
    if let Some(path) = &handover_file {
        inherit_sessions(path, &mut workers, &interfaces, epoch);
    }
    metrics::publish_static(name, &attached);
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

    let mut control = ControlPlane {
        config: &config,
        stop: &stop,
        signals: &signals,
        resolver,
        unresolved: &unresolved_rx,
        updates: &updates,
        stats: &context,
        notifier: &notifier,
        keepalives: Keepalives::new(&routes).map_err(SetupError::Keepalive)?,
        reloader: Reloader::new(options.config_file.clone(), config.clone(), routes.clone(), mode == Mode::Socket),
        accepting: &accepting,
        health: HealthChecker::new(&routes, activity, directory, config.nat.ports).map_err(SetupError::Probes)?,
        epoch,
    };
    let outcome = control.run();
    // Whatever ended the loop, the workers stop and the stats file stops claiming a running relay.
    stop.store(true, Ordering::Relaxed);

    notifier.stopping();
    tracing::info!("shutting down: stopping workers, detaching XDP");
    let relays: Vec<Relay> = handles
        .into_iter()
        .filter_map(|handle| match handle.join() {
            Ok(relay) => Some(relay),
            Err(_) => {
                tracing::error!("a worker thread panicked; its sessions are not handed over");
                None
            }
        })
        .collect();
    if let Some(path) = &handover_file
        && outcome.is_ok()
    {
        let now = epoch.elapsed().as_millis() as u64;
        match handover::save(path, &relays, &interfaces, now) {
            Ok(count) => {
                tracing::info!(sessions = count, path = %path.display(), "live sessions saved for the next start")
            }
            Err(error) => tracing::error!(error = &error as &dyn std::error::Error, "saving the live sessions failed"),
        }
    }
    let totals = Totals::collect(&counters);
    context.write(&totals, false);
    println!("{}", context.json(&totals, false));
    drop(attached);
    outcome
}

/// Takes over the sessions a previous relay process left, before any worker runs.
fn inherit_sessions(path: &Path, workers: &mut [AnyWorker], interfaces: &[String], epoch: Instant) {
    match handover::take(path) {
        Ok(None) => {}
        Ok(Some(inherited)) => {
            let mut relays: Vec<&mut Relay> = workers.iter_mut().map(AnyWorker::relay_mut).collect();
            handover::restore(&inherited, &mut relays, interfaces, epoch.elapsed().as_millis() as u64);
        }
        Err(error) => tracing::warn!(
            error = &error as &dyn std::error::Error,
            "the previous relay's sessions cannot be taken over; starting without them"
        ),
    }
}

fn spawn_workers(workers: Vec<AnyWorker>, cores: &[usize]) -> Result<Vec<JoinHandle<Relay>>, SetupError> {
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
