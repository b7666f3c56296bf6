//! `oxidize-relay run`: pick the backend, set it up, run the control loop,
//! and tear everything down on SIGTERM/SIGINT.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use oxidize_relay_core::config::{Config, InterfaceRole, Mode};
use oxidize_relay_core::counters::Counters;
use oxidize_relay_core::directory::NatDirectory;
use oxidize_relay_core::route::{RouteTable, UpstreamId};
use oxidize_relay_core::session::Timeouts;
use oxidize_relay_core::{NextHop, Relay, RelaySettings};
use serde_json::{Map, Value, json};

use crate::keepalive::Keepalives;
use crate::metrics;
use crate::metrics_endpoint::{self, EndpointError};
use crate::nexthop::NextHopResolver;
use crate::preflight::{self, KeyFileError};
use crate::probe::{self, HostReport};
use crate::socket_worker::{SocketSetupError, SocketWorker};
use crate::stats::Totals;
use crate::sys;
use crate::sys::bpf_abi::{RelayConfig, XdpCounter};
use crate::sys::iface::{IfaceError, IfaceInfo};
use crate::sys::netlink::{NetlinkError, RouteSocket};
use crate::sys::xdp::{AttachedMode, XdpError, XdpProgram};
use crate::sys::xsk::{self, FramePool, QueueSocket, XskError};
use crate::systemd::Notifier;
use crate::worker::Worker;
use crate::worker_core::{CHANNEL_CAPACITY, WorkerCore, WorkerUpdate};

/// How long start-up waits for upstream next hops before declaring ready anyway.
const RESOLVE_AT_START: Duration = Duration::from_secs(3);
const CONTROL_TICK: Duration = Duration::from_millis(200);
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Mode(String),
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

/// An XDP program attached to one interface, with the mode it got.
struct Attached {
    info: IfaceInfo,
    program: XdpProgram,
    mode: AttachedMode,
}

/// A worker of either backend, ready to move onto its thread.
enum AnyWorker {
    AfXdp(Worker),
    Socket(SocketWorker),
}

/// What both backends hand the control thread.
struct Backend {
    name: &'static str,
    attached: Vec<Attached>,
    workers: Vec<AnyWorker>,
    counters: Vec<Arc<Counters>>,
    updates: Vec<Sender<WorkerUpdate>>,
}

/// Per-worker pieces both backends build the same way.
struct WorkerShared {
    routes: Arc<RouteTable>,
    /// Every worker's NAT sessions, readable by all (replies land on any queue).
    directory: Arc<NatDirectory>,
    stop: Arc<AtomicBool>,
    unresolved: Sender<UpstreamId>,
    epoch: Instant,
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
        write_atomically(path, "{}")
            .map_err(|source| SetupError::StatsFile { path: path.display().to_string(), source })?;
    }
    let (mode, report) = probe::resolve_mode(&config).map_err(SetupError::Mode)?;
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
        Mode::Socket => socket_backend(&config, &shared)?,
        Mode::AfXdp | Mode::Auto => af_xdp_backend(&config, &report, &shared)?,
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
        publish(&mut resolver, &backend.attached, &backend.updates)?;
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
    let outcome = control_loop(
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

/// The backend-independent part of worker `worker` of `workers`: its relay (with its
/// share of NAT ports, sessions and the global limit), counters and channels.
fn worker_core(
    config: &Config,
    shared: &WorkerShared,
    worker: u32,
    workers: u32,
    iface_macs: Vec<[u8; 6]>,
) -> Result<(WorkerCore, Sender<WorkerUpdate>), SetupError> {
    let per_worker = config.nat_port_count() / workers as usize;
    let first = config.nat.ports.0 + (worker as usize * per_worker) as u16;
    let settings = RelaySettings {
        iface_macs,
        directory: shared.directory.clone(),
        nat_ports: (first, first + per_worker as u16 - 1),
        seed: sys::random_u64().map_err(SetupError::Seed)?,
        max_sessions: config.nat.max_sessions.div_ceil(workers as usize),
        timeouts: Timeouts {
            idle: config.nat.idle_timeout_secs * 1000,
            unreplied: config.nat.unreplied_timeout_secs * 1000,
        },
        verify_checksums: config.security.verify_checksums,
        global_limit: config.security.global_limit.per_worker(u64::from(workers)),
        max_sessions_per_source: config.security.max_sessions_per_source,
        source_table_entries: config.security.source_table_entries,
    };
    let counters = Arc::new(Counters::default());
    let (update_tx, update_rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
    let core = WorkerCore {
        id: worker as usize,
        relay: Relay::new(shared.routes.clone(), settings, counters.clone()),
        counters,
        batch_size: config.runtime.batch_size,
        wait: config.runtime.wait,
        updates: update_rx,
        unresolved: shared.unresolved.clone(),
        stop: shared.stop.clone(),
        epoch: shared.epoch,
    };
    Ok((core, update_tx))
}

impl Backend {
    fn add_worker(&mut self, core: &WorkerCore, updates: Sender<WorkerUpdate>) {
        self.updates.push(updates);
        self.counters.push(core.counters.clone());
    }
}

fn af_xdp_backend(config: &Config, report: &HostReport, shared: &WorkerShared) -> Result<Backend, SetupError> {
    let infos = config.interfaces.iter().map(|i| IfaceInfo::lookup(&i.name)).collect::<Result<Vec<_>, _>>()?;
    let queues = served_queues(config, &infos)?;
    let mut attached = Vec::new();
    for (interface, info) in config.interfaces.iter().zip(infos) {
        let mut program = XdpProgram::load(config.nat.max_sessions.try_into().unwrap_or(u32::MAX))?;
        program.configure(&RelayConfig {
            nat_port_first: config.nat.ports.0,
            nat_port_last: config.nat.ports.1,
            new_flows_per_second: config.security.new_flows_per_second,
            max_frame_len: xsk::max_frame_len(config.pool.frame_size),
            pad: 0,
        })?;
        for route in &config.routes {
            program.add_listen(route.listen)?;
        }
        let mode = program.attach(info.index, report.xdp_mode_for(&info.name, interface.xdp_mode))?;
        tracing::info!(interface = %info.name, driver = %info.driver, mode = mode.name(), "XDP program attached");
        attached.push(Attached { info, program, mode });
    }

    let iface_macs: Vec<_> = attached.iter().map(|a| a.info.mac).collect();
    let mut backend = Backend {
        name: "af_xdp",
        attached: Vec::new(),
        workers: Vec::new(),
        counters: Vec::new(),
        updates: Vec::new(),
    };
    for queue in 0..queues {
        // Two-arm relays keep client-facing and upstream-facing frames apart; one-arm shares one domain.
        let separate = config.interfaces.iter().all(|i| i.role != InterfaceRole::Both);
        let domain_of = |role: InterfaceRole| usize::from(separate && role == InterfaceRole::Upstream);
        let pool = FramePool::new(
            config.pool.frames_per_worker,
            config.pool.frame_size,
            config.pool.hugepages,
            if separate { 2 } else { 1 },
        )?;
        if config.pool.hugepages && !pool.hugepages {
            tracing::warn!(
                worker = queue,
                "no 2 MiB hugepages available for the UMEM; using normal pages (reserve with vm.nr_hugepages)"
            );
        }
        let mut sockets = Vec::new();
        for (a, interface) in attached.iter().zip(&config.interfaces) {
            let socket = QueueSocket::bind(&pool, &a.info.name, queue, domain_of(interface.role))?;
            a.program.register_socket(queue, socket.fd())?;
            tracing::info!(interface = %a.info.name, queue, zero_copy = socket.zero_copy, hugepages = pool.hugepages, "AF_XDP socket bound");
            sockets.push(socket);
        }
        let (core, updates) = worker_core(config, shared, queue, queues, iface_macs.clone())?;
        backend.add_worker(&core, updates);
        let flow_maps = attached.iter().map(|a| a.program.flow_map()).collect();
        backend.workers.push(AnyWorker::AfXdp(Worker { core, pool, sockets, flow_maps }));
    }
    backend.attached = attached;
    Ok(backend)
}

fn socket_backend(config: &Config, shared: &WorkerShared) -> Result<Backend, SetupError> {
    // As many workers as AF_XDP would run: the configured queues, else the interface's RX queues.
    let workers = config.interfaces[0]
        .queues
        .unwrap_or_else(|| IfaceInfo::lookup(&config.interfaces[0].name).map_or(1, |info| info.rx_queues.max(1)));
    let mut backend = Backend {
        name: "socket",
        attached: Vec::new(),
        workers: Vec::new(),
        counters: Vec::new(),
        updates: Vec::new(),
    };
    for id in 0..workers {
        let (core, updates) = worker_core(config, shared, id, workers, vec![[0; 6]])?;
        backend.add_worker(&core, updates);
        backend.workers.push(AnyWorker::Socket(SocketWorker::new(core)?));
    }
    tracing::info!(workers, "socket backend bound its listen sockets (SO_REUSEPORT)");
    Ok(backend)
}

/// How many queues of each interface the workers serve: every RX queue it has
/// (RSS may put relay traffic on any of them), the same count on every interface.
fn served_queues(config: &Config, infos: &[IfaceInfo]) -> Result<u32, SetupError> {
    for (interface, info) in config.interfaces.iter().zip(infos) {
        match interface.queues {
            Some(wanted) if wanted > info.rx_queues => {
                return Err(SetupError::Queues { interface: info.name.clone(), available: info.rx_queues, wanted });
            }
            Some(wanted) if wanted < info.rx_queues => {
                return Err(SetupError::QueuesUnserved {
                    interface: info.name.clone(),
                    available: info.rx_queues,
                    wanted,
                });
            }
            _ => {}
        }
    }
    let counts: Vec<u32> = infos.iter().map(|info| info.rx_queues.max(1)).collect();
    if counts.windows(2).any(|pair| pair[0] != pair[1]) {
        let counts = infos.iter().map(|i| format!("{}: {}", i.name, i.rx_queues)).collect::<Vec<_>>().join(", ");
        return Err(SetupError::QueueCountsDiffer { counts });
    }
    let queues = counts[0];
    tracing::info!(queues, "one worker per RX queue of each interface");
    Ok(queues)
}

struct StatsContext<'a> {
    backend: &'static str,
    attached: &'a [Attached],
    counters: &'a [Arc<Counters>],
    stats_file: Option<&'a PathBuf>,
}

impl StatsContext<'_> {
    fn xdp_counters(&self) -> Vec<(String, Option<[u64; XdpCounter::ALL.len()]>)> {
        self.attached.iter().map(|a| (a.info.name.clone(), a.program.counters().ok())).collect()
    }

    fn json(&self, totals: &Totals, running: bool) -> Value {
        let xdp: Vec<_> =
            self.attached.iter().map(|a| (a.info.name.clone(), a.mode.name(), a.program.counters().ok())).collect();
        let mut extra = Map::new();
        extra.insert("backend".into(), json!(self.backend));
        extra.insert("workers".into(), json!(self.counters.len()));
        extra.insert("running".into(), json!(running));
        totals.to_json(&xdp, extra)
    }

    fn write(&self, totals: &Totals, running: bool) {
        let Some(path) = self.stats_file else { return };
        if let Err(error) = write_atomically(path, &self.json(totals, running).to_string()) {
            tracing::warn!(path = %path.display(), %error, "writing the stats file failed");
        }
    }
}

#[expect(clippy::too_many_arguments, reason = "the control thread's pieces, each borrowed from run()")]
fn control_loop(
    config: &Config,
    stop: &AtomicBool,
    ignored: &IgnoredSignals,
    resolver: &mut NextHopResolver,
    unresolved: &Receiver<UpstreamId>,
    updates: &[Sender<WorkerUpdate>],
    stats: &StatsContext<'_>,
    notifier: &Notifier,
    keepalives: &mut Keepalives,
) -> Result<(), SetupError> {
    let interval = Duration::from_secs(config.runtime.stats_interval_secs.max(1));
    let mut last_summary = (Instant::now(), Totals::collect(stats.counters));
    let mut last_refresh = Instant::now();
    let mut watchdog = (Instant::now(), worker_loops(stats.counters));
    while !stop.load(Ordering::Relaxed) {
        if let Some(gone) = stats.attached.iter().find(|a| !a.info.still_present()) {
            return Err(SetupError::InterfaceGone(gone.info.name.clone()));
        }
        // A worker that met an unresolved upstream wakes us early.
        let asked = unresolved.recv_timeout(CONTROL_TICK).is_ok();
        while unresolved.try_recv().is_ok() {}
        if asked || last_refresh.elapsed() >= NEXT_HOP_REFRESH {
            publish(resolver, stats.attached, updates)?;
            last_refresh = Instant::now();
        }
        keepalives.tick();
        ignored.log_received();
        crate::log_limit::report_suppressed();
        let totals = Totals::collect(stats.counters);
        stats.write(&totals, true);
        metrics::publish(stats.counters, &stats.xdp_counters());
        if last_summary.0.elapsed() >= interval {
            let seconds = last_summary.0.elapsed().as_secs_f64();
            let summary = totals.summary(&last_summary.1, seconds, stats.counters.len(), stats.backend);
            tracing::info!("{summary}");
            notifier.status(&summary);
            last_summary = (Instant::now(), totals);
        }
        // Ping only while every worker's loop advances: a stuck worker lets systemd restart us.
        if let Some(period) = notifier.watchdog_interval()
            && watchdog.0.elapsed() >= period
        {
            let loops = worker_loops(stats.counters);
            if loops.iter().zip(&watchdog.1).all(|(now, then)| now > then) {
                notifier.watchdog();
            } else {
                tracing::error!("a worker made no progress for {period:?}; withholding the watchdog ping");
            }
            watchdog = (Instant::now(), loops);
        }
    }
    Ok(())
}

/// Writes `path` through a temporary file and a rename, so readers never see half a file.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, text).and_then(|()| fs::rename(&temporary, path))
}

/// Signals an operator or a service manager may send that have no meaning yet
/// (SIGHUP will reload once reload exists): caught, logged, otherwise ignored.
struct IgnoredSignals {
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

    fn log_received(&self) {
        for (name, flag) in &self.flags {
            if flag.swap(false, Ordering::Relaxed) {
                tracing::warn!(signal = name, "received {name}: it has no meaning for this relay yet; ignored");
            }
        }
    }
}

fn worker_loops(counters: &[Arc<Counters>]) -> Vec<u64> {
    counters.iter().map(|c| c.loops.get()).collect()
}

/// Refreshes next hops; new NAT source addresses go into every XDP program before workers use them.
fn publish(
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
