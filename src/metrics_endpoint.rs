//! The `/metrics` HTTP endpoint, written so a client cannot take the relay down:
//! at most [`MAX_CONNECTIONS`] at once (a new one pushes out the oldest), each
//! closed after [`REQUEST_TIMEOUT`] or once answered, requests capped in size,
//! and one thread with a fixed set of descriptors whatever the load.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

/// Connections served at once: enough for a few scrapers; the endpoint's descriptors stay bounded.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that has not sent its request and read the answer by then is closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head accepted (a scrape's is a few hundred bytes).
const MAX_REQUEST: usize = 8 * 1024;
const LISTENER: Token = Token(usize::MAX);
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("installing the Prometheus recorder failed")]
    Recorder(#[source] BuildError),
    #[error("listening for metrics scrapes on {listen} failed")]
    Listen {
        listen: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("starting the metrics endpoint thread failed")]
    Thread(#[source] io::Error),
}

/// Installs the Prometheus recorder and serves it at `http://{listen}/metrics` from a thread of its own,
/// and `/ready`: 200 while `accepting` (new sessions are taken), 503 while the relay drains, so a
/// load balancer or a routing daemon can withdraw it.
pub fn start(listen: SocketAddr, accepting: Arc<AtomicBool>) -> Result<(), EndpointError> {
    let handle = PrometheusBuilder::new().install_recorder().map_err(EndpointError::Recorder)?;
    crate::metrics::describe();
    let failed = |source| EndpointError::Listen { listen, source };
    let listener = bind(listen).map_err(failed)?;
    let mut server = Server::new(TcpListener::from_std(listener), handle, accepting).map_err(failed)?;
    thread::Builder::new().name("oxr-metrics".into()).spawn(move || server.run()).map_err(EndpointError::Thread)?;
    Ok(())
}

/// A non-blocking listener that a restarted relay can bind while the old one's connections linger in TIME_WAIT.
fn bind(listen: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(listen), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    handle: PrometheusHandle,
    accepting: Arc<AtomicBool>,
    connections: Vec<Option<Connection>>,
}

struct Connection {
    stream: TcpStream,
    opened: Instant,
    request: Vec<u8>,
    response: Vec<u8>,
    written: usize,
}

impl Server {
    fn new(mut listener: TcpListener, handle: PrometheusHandle, accepting: Arc<AtomicBool>) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Server { poll, listener, handle, accepting, connections: (0..MAX_CONNECTIONS).map(|_| None).collect() })
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(MAX_CONNECTIONS + 1);
        loop {
            if let Err(error) = self.poll.poll(&mut events, Some(TICK)) {
                if error.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(%error, "metrics endpoint: poll failed");
                    thread::sleep(TICK);
                }
                continue;
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(slot) => self.serve(slot),
                }
            }
            self.close_expired();
            self.handle.run_upkeep();
        }
    }

    fn accept(&mut self) {
        loop {
            let (stream, _) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    // Out of descriptors, say: the listener stays readable, so back off instead of spinning.
                    tracing::warn!(%error, "metrics endpoint: accepting a connection failed");
                    thread::sleep(TICK);
                    return;
                }
            };
            let slot = match self.connections.iter().position(Option::is_none) {
                Some(free) => free,
                // Full: the connection open the longest makes room (idle ones never hold the endpoint).
                None => {
                    let oldest = self.oldest();
                    self.close(oldest);
                    oldest
                }
            };
            let mut connection =
                Connection { stream, opened: Instant::now(), request: Vec::new(), response: Vec::new(), written: 0 };
            let interest = Interest::READABLE | Interest::WRITABLE;
            if self.poll.registry().register(&mut connection.stream, Token(slot), interest).is_ok() {
                self.connections[slot] = Some(connection);
            }
        }
    }

    fn serve(&mut self, slot: usize) {
        let Some(connection) = self.connections.get_mut(slot).and_then(Option::as_mut) else { return };
        let done = match connection.progress(&self.handle, self.accepting.load(Ordering::Relaxed)) {
            Ok(done) => done,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        };
        if done {
            self.close(slot);
        }
    }

    fn close_expired(&mut self) {
        for slot in 0..self.connections.len() {
            if self.connections[slot].as_ref().is_some_and(|c| c.opened.elapsed() >= REQUEST_TIMEOUT) {
                self.close(slot);
            }
        }
    }

    fn oldest(&self) -> usize {
        (0..self.connections.len()).min_by_key(|&slot| self.connections[slot].as_ref().map(|c| c.opened)).unwrap_or(0)
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut connection) = self.connections[slot].take() {
            let _ = self.poll.registry().deregister(&mut connection.stream);
        }
    }
}

impl Connection {
    /// Reads the request, then writes the answer; `Ok(true)` once the connection is finished.
    fn progress(&mut self, handle: &PrometheusHandle, accepting: bool) -> io::Result<bool> {
        while self.response.is_empty() {
            let mut chunk = [0u8; 1024];
            let read = self.stream.read(&mut chunk)?;
            if read == 0 {
                return Ok(true);
            }
            self.request.extend_from_slice(&chunk[..read]);
            if self.request.windows(4).any(|w| w == b"\r\n\r\n") {
                self.response = respond(&self.request, handle, accepting);
            } else if self.request.len() > MAX_REQUEST {
                self.response = answer("431 Request Header Fields Too Large", "request too large\n");
            }
        }
        while self.written < self.response.len() {
            self.written += self.stream.write(&self.response[self.written..])?;
        }
        Ok(true)
    }
}

fn respond(request: &[u8], handle: &PrometheusHandle, accepting: bool) -> Vec<u8> {
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(path)) if path == b"/metrics" || path.starts_with(b"/metrics?") => {
            answer("200 OK", &handle.render())
        }
        (Some(b"GET"), Some(b"/ready")) if accepting => answer("200 OK", "ready\n"),
        (Some(b"GET"), Some(b"/ready")) => answer("503 Service Unavailable", "draining\n"),
        (Some(b"GET"), Some(_)) => answer("404 Not Found", "try /metrics or /ready\n"),
        _ => answer("405 Method Not Allowed", "GET /metrics\n"),
    }
}

fn answer(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_scrapes_and_nothing_else() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let get = |request: &[u8], accepting| String::from_utf8(respond(request, &handle, accepting)).expect("utf-8");
        let ok = get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", true);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("Connection: close"), "{ok}");
        assert!(get(b"GET / HTTP/1.1\r\n\r\n", true).starts_with("HTTP/1.1 404"));
        assert!(get(b"POST /metrics HTTP/1.1\r\n\r\n", true).starts_with("HTTP/1.1 405"));
        assert!(get(b"GET /ready HTTP/1.1\r\n\r\n", true).starts_with("HTTP/1.1 200 OK"));
        assert!(get(b"GET /ready HTTP/1.1\r\n\r\n", false).starts_with("HTTP/1.1 503"), "draining is not ready");
    }
}
