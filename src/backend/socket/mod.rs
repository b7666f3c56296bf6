//! The socket backend: the same relay core over ordinary UDP sockets, for hosts where
//! AF_XDP cannot run.

pub(crate) mod worker;

use oxidize_relay_core::config::Config;

use super::{AnyWorker, Backend, WorkerShared, worker_core};
use crate::backend::socket::worker::SocketWorker;
use crate::run::SetupError;
use crate::sys::iface::IfaceInfo;

/// Binds the listen sockets (SO_REUSEPORT) of every worker. The kernel sends their datagrams,
/// so it, not the relay, fragments or applies path MTU discovery to what does not fit.
pub(crate) fn build(config: &Config, shared: &WorkerShared) -> Result<Backend, SetupError> {
    // As many workers as AF_XDP would run: the configured queues, else the interface's RX queues.
    let workers = config.interfaces[0]
        .queues
        .unwrap_or_else(|| IfaceInfo::lookup(&config.interfaces[0].name).map_or(1, |info| info.rx_queues.max(1)));
    let mut backend = Backend::new("socket");
    for id in 0..workers {
        let (core, updates) = worker_core(config, shared, id, workers, vec![[0; 6]], vec![u16::MAX])?;
        backend.add_worker(&core, updates);
        backend.workers.push(AnyWorker::Socket(SocketWorker::new(core)?));
    }
    tracing::info!(workers, "socket backend bound its listen sockets (SO_REUSEPORT)");
    Ok(backend)
}
