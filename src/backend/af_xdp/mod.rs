//! The AF_XDP backend: the XDP program on every interface, one AF_XDP socket per
//! (interface, queue) on a UMEM per worker, one worker per queue.

pub(crate) mod worker;

use oxidize_relay_core::config::{Config, InterfaceRole};

use super::{AnyWorker, Attached, Backend, WorkerShared, worker_core};
use crate::backend::af_xdp::worker::Worker;
use crate::probe::HostReport;
use crate::run::SetupError;
use crate::sys::bpf_abi::RelayConfig;
use crate::sys::iface::IfaceInfo;
use crate::sys::xdp::XdpProgram;
use crate::sys::xsk::{self, FramePool, QueueSocket};

/// Attaches the XDP program to every interface and binds an AF_XDP socket on every queue.
pub(crate) fn build(config: &Config, report: &HostReport, shared: &WorkerShared) -> Result<Backend, SetupError> {
    let infos = config.interfaces.iter().map(|i| IfaceInfo::lookup(&i.name)).collect::<Result<Vec<_>, _>>()?;
    let queues = served_queues(config, &infos)?;
    let mut attached = Vec::new();
    for (interface, info) in config.interfaces.iter().zip(infos) {
        let mut program = XdpProgram::load(config.nat.max_sessions.try_into().unwrap_or(u32::MAX))?;
        program.configure(&xdp_config(config))?;
        for route in &config.routes {
            program.add_listen(route.listen)?;
        }
        let mode = program.attach(info.index, report.xdp_mode_for(&info.name, interface.xdp_mode))?;
        tracing::info!(interface = %info.name, driver = %info.driver, mode = mode.name(), "XDP program attached");
        attached.push(Attached { info, program, mode, zero_copy: Vec::new() });
    }

    let iface_macs: Vec<_> = attached.iter().map(|a| a.info.mac).collect();
    let iface_mtus: Vec<_> = attached.iter().map(|a| a.info.mtu).collect();
    for a in &attached {
        warn_if_beyond_frame(&a.info.name, a.info.mtu, config.pool.frame_size);
    }
    let mut backend = Backend::new("af_xdp");
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
        for (a, interface) in attached.iter_mut().zip(&config.interfaces) {
            let socket = QueueSocket::bind(&pool, &a.info.name, queue, domain_of(interface.role))?;
            a.zero_copy.push(socket.zero_copy);
            a.program.register_socket(queue, socket.fd())?;
            tracing::info!(interface = %a.info.name, queue, zero_copy = socket.zero_copy, hugepages = pool.hugepages, "AF_XDP socket bound");
            sockets.push(socket);
        }
        let (core, updates) = worker_core(config, shared, queue, queues, iface_macs.clone(), iface_mtus.clone())?;
        backend.add_worker(&core, updates);
        let flow_maps = attached.iter().map(|a| a.program.flow_map()).collect();
        backend.workers.push(AnyWorker::AfXdp(Worker { core, pool, sockets, flow_maps }));
    }
    backend.attached = attached;
    Ok(backend)
}

/// Says so when `mtu` is more than a UMEM frame of `frame_size` carries: larger datagrams are
/// dropped by XDP and counted (never truncated), at start and when the MTU changes.
pub(crate) fn warn_if_beyond_frame(interface: &str, mtu: u16, frame_size: u32) {
    let carried = xsk::max_frame_len(frame_size).saturating_sub(14);
    if u32::from(mtu) > carried {
        tracing::warn!(
            interface,
            mtu,
            carried,
            "the interface's MTU is above what an AF_XDP frame holds: larger datagrams are dropped and counted as datagram_too_large (set pool.frame_size = 4096 or lower the MTU)"
        );
    }
}

/// What the XDP program needs of the config (set at start and by every reload).
pub(crate) fn xdp_config(config: &Config) -> RelayConfig {
    RelayConfig {
        nat_port_first: config.nat.ports.0,
        nat_port_last: config.nat.ports.1,
        new_flows_per_second: config.security.new_flows_per_second,
        max_frame_len: xsk::max_frame_len(config.pool.frame_size),
        pad: 0,
    }
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
