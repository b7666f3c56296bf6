//! The relay's TOML configuration: schema, presets and validation. Pure: the
//! caller reads the file; errors carry line and column.

use core::fmt;
use core::net::{IpAddr, SocketAddr};
use std::collections::HashSet;

use serde::Deserialize;
use toml::Spanned;

use crate::health::HealthPolicy;
use crate::prefix::parse_prefix;
use crate::proxy_protocol::ProxyHeader;
use crate::ratelimit::Limit;
use crate::route::{Probe, RouteSpec};
use crate::wire::MacAddr;

/// A validated configuration with presets applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub runtime: Runtime,
    pub pool: Pool,
    pub interfaces: Vec<Interface>,
    pub nat: Nat,
    pub security: Security,
    pub routes: Vec<RouteSpec>,
    pub neighbors: Vec<StaticNeighbor>,
    /// Where the Prometheus endpoint listens; `None` turns it off.
    pub metrics_listen: Option<SocketAddr>,
}

/// The metrics endpoint's default: loopback only.
pub const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(core::net::Ipv4Addr::LOCALHOST), 9184);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Busy polling, hugepages, no checksum verification: lowest latency, one core per queue spinning.
    MaxThroughput,
    /// Event-driven wakeups, checksum verification, smaller session caps.
    Secure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Auto,
    AfXdp,
    Socket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitMode {
    /// Spin on the rings: lowest latency, a full core per worker.
    BusyPoll,
    /// Sleep in poll(2) on the socket fds until traffic arrives.
    Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic when the driver cannot.
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterfaceRole {
    /// Clients and upstreams both behind this interface (one-arm).
    Both,
    Client,
    Upstream,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    pub mode: Mode,
    pub wait: WaitMode,
    /// Cores to pin workers to, in queue order; empty means no pinning.
    pub cores: Vec<usize>,
    pub batch_size: usize,
    pub stats_interval_secs: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub frames_per_worker: u32,
    pub frame_size: u32,
    pub hugepages: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Interface {
    pub name: String,
    /// Queues to serve (one worker each); `None`: every RX queue the interface has when the relay starts.
    pub queues: Option<u32>,
    pub xdp_mode: XdpMode,
    pub role: InterfaceRole,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Nat {
    pub ports: (u16, u16),
    pub idle_timeout_secs: u64,
    /// How long a session that never saw a reply lives (conntrack's unreplied UDP timeout):
    /// spoofed new flows never get one, so they go early and are the first evicted when the table is full.
    pub unreplied_timeout_secs: u64,
    pub max_sessions: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Security {
    pub verify_checksums: bool,
    /// Client traffic the whole relay accepts (split evenly between workers).
    pub global_limit: Limit,
    pub max_sessions_per_source: usize,
    /// Slots of each worker's per-source rate table (fixed memory).
    pub source_table_entries: usize,
    /// New client flows per second each CPU's XDP program lets through to the
    /// sockets (established flows are not counted); 0 turns the budget off.
    pub new_flows_per_second: u32,
}

/// A next-hop MAC the operator pins instead of asking the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticNeighbor {
    pub ip: IpAddr,
    pub mac: MacAddr,
}

/// A configuration error with its position in the source, when it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                write!(f, "line {line}, column {column}: {}", self.message)
            }
            _ => f.write_str(&self.message),
        }
    }
}

impl Config {
    /// Parses and validates a configuration file's text.
    pub fn from_toml(source: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(source).map_err(|e| {
            let (line, column) = e.span().map(|s| line_column(source, s.start)).unzip();
            ConfigError { line, column, message: e.message().to_owned() }
        })?;
        raw.resolve(source)
    }

    /// A one-route configuration for `oxidize-relay run --interface .. --listen .. --upstream ..`.
    pub fn quick(interface: &str, listen: SocketAddr, upstreams: &[SocketAddr]) -> Result<Config, ConfigError> {
        let upstreams = upstreams.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
        Config::from_toml(&format!(
            "[[interface]]\nname = \"{}\"\n\n[[route]]\nlisten = \"{listen}\"\nupstreams = [{upstreams}]\n",
            interface.escape_default()
        ))
    }

    /// The settings that differ in `new` and cannot change while the relay runs (they
    /// size memory, bind sockets or choose the backend); empty when a reload can apply
    /// `new`. Routes (upstreams, draining, access lists, limits, tunnel keys) and the
    /// security limits are reloadable, except that `listen_fixed` (the socket backend,
    /// whose listen sockets are bound before privileges are dropped) fixes the listen addresses.
    pub fn restart_needed(&self, new: &Config, listen_fixed: bool) -> Vec<&'static str> {
        let mut differ = Vec::new();
        let mut check = |changed: bool, what| {
            if changed {
                differ.push(what);
            }
        };
        check(self.runtime != new.runtime, "[runtime]");
        check(self.pool != new.pool, "[pool]");
        check(self.interfaces != new.interfaces, "[[interface]]");
        check(self.nat != new.nat, "[nat]");
        check(self.neighbors != new.neighbors, "[[neighbor]]");
        check(self.metrics_listen != new.metrics_listen, "[metrics]");
        check(self.security.source_table_entries != new.security.source_table_entries, "security.source_table_entries");
        let listens = |config: &Config| config.routes.iter().map(|r| r.listen).collect::<HashSet<_>>();
        check(listen_fixed && listens(self) != listens(new), "route listen addresses (on the socket backend)");
        differ
    }

    /// Number of NAT ports shared out among the workers.
    pub fn nat_port_count(&self) -> usize {
        usize::from(self.nat.ports.1 - self.nat.ports.0) + 1
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    preset: Option<Preset>,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    interface: Vec<RawInterface>,
    #[serde(default)]
    nat: RawNat,
    #[serde(default)]
    security: RawSecurity,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    neighbor: Vec<RawNeighbor>,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enable: Option<bool>,
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    mode: Option<Mode>,
    wait: Option<WaitMode>,
    #[serde(default)]
    cores: Vec<usize>,
    batch_size: Option<Spanned<usize>>,
    stats_interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    frames_per_worker: Option<Spanned<u32>>,
    frame_size: Option<Spanned<u32>>,
    hugepages: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: Spanned<String>,
    queues: Option<Spanned<u32>>,
    xdp_mode: Option<XdpMode>,
    role: Option<InterfaceRole>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNat {
    ports: Option<Spanned<String>>,
    idle_timeout_secs: Option<Spanned<u64>>,
    unreplied_timeout_secs: Option<Spanned<u64>>,
    max_sessions: Option<Spanned<usize>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    verify_checksums: Option<bool>,
    global_packets_per_second: Option<u64>,
    global_bytes_per_second: Option<u64>,
    max_sessions_per_source: Option<Spanned<usize>>,
    source_table_entries: Option<Spanned<usize>>,
    new_flows_per_second: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    listen: Spanned<SocketAddr>,
    upstreams: Spanned<Vec<SocketAddr>>,
    /// Upstreams that keep their sessions but get no new ones.
    #[serde(default)]
    draining_upstreams: Vec<Spanned<SocketAddr>>,
    /// Passive health: an upstream is down once a client packet to it waited this long
    /// with no answer from it to anyone; absent or 0: off.
    unanswered_timeout_secs: Option<u64>,
    /// A passively downed upstream is tried again after this long.
    down_retry_secs: Option<Spanned<u64>>,
    health_check: Option<Spanned<RawHealthCheck>>,
    /// `"v2"`: a PROXY protocol v2 header before the client's datagrams.
    proxy_protocol: Option<Spanned<String>>,
    /// `"every"` (default) or `"first"` datagram of a session.
    proxy_protocol_datagrams: Option<Spanned<String>>,
    #[serde(default)]
    allowed_clients: Vec<Spanned<String>>,
    per_source_packets_per_second: Option<u64>,
    per_source_bytes_per_second: Option<u64>,
    per_session_packets_per_second: Option<u64>,
    per_session_bytes_per_second: Option<u64>,
    encap: Option<Spanned<Encap>>,
    key_file: Option<Spanned<String>>,
    upstream_encap: Option<Spanned<Encap>>,
    upstream_key_file: Option<Spanned<String>>,
}

/// `[route.health_check]`: an active probe of each upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    /// The probe datagram's payload.
    send: String,
    /// An answer containing these bytes is a success.
    expect: String,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
}

const DEFAULT_DOWN_RETRY_SECS: u64 = 30;

/// How a hop is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Encap {
    None,
    Oxtunnel,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNeighbor {
    ip: IpAddr,
    mac: Spanned<String>,
}

/// `[runtime] batch_size`, `[pool] frame_size` and `[pool] frames_per_worker` when unset (whatever
/// the preset); the benchmark's bare forwarder uses them too.
pub const DEFAULT_BATCH_SIZE: usize = 64;
pub const DEFAULT_FRAME_SIZE: u32 = 2048;
pub const DEFAULT_FRAMES_PER_WORKER: u32 = 4096;

/// Defaults a preset sets; explicit keys override them.
struct PresetDefaults {
    wait: WaitMode,
    hugepages: bool,
    verify_checksums: bool,
    max_sessions: usize,
    idle_timeout_secs: u64,
    max_sessions_per_source: usize,
    new_flows_per_second: u32,
}

fn preset_defaults(preset: Option<Preset>) -> PresetDefaults {
    match preset {
        Some(Preset::MaxThroughput) => PresetDefaults {
            wait: WaitMode::BusyPoll,
            hugepages: true,
            verify_checksums: false,
            max_sessions: 65_536,
            idle_timeout_secs: 120,
            max_sessions_per_source: 4096,
            new_flows_per_second: 200_000,
        },
        Some(Preset::Secure) => PresetDefaults {
            wait: WaitMode::Event,
            hugepages: true,
            verify_checksums: true,
            max_sessions: 16_384,
            idle_timeout_secs: 60,
            max_sessions_per_source: 64,
            new_flows_per_second: 20_000,
        },
        None => PresetDefaults {
            wait: WaitMode::Event,
            hugepages: true,
            verify_checksums: false,
            max_sessions: 65_536,
            idle_timeout_secs: 120,
            max_sessions_per_source: 1024,
            // Per CPU: plenty for real clients arriving, small enough that a spoofed flood is shed in XDP.
            new_flows_per_second: 20_000,
        },
    }
}

const DEFAULT_NAT_PORTS: (u16, u16) = (20000, 29999);
/// As Linux conntrack's `nf_conntrack_udp_timeout` for flows without a reply.
const DEFAULT_UNREPLIED_TIMEOUT_SECS: u64 = 30;
/// Per-source rate table slots per worker: 65,536 x 64 bytes = 4 MiB.
const DEFAULT_SOURCE_TABLE: usize = 65_536;

/// Turns a byte span of the source into an error with line and column.
struct Positions<'a> {
    source: &'a str,
}

impl Positions<'_> {
    fn at(&self, span: core::ops::Range<usize>, message: String) -> ConfigError {
        let (line, column) = line_column(self.source, span.start);
        ConfigError { line: Some(line), column: Some(column), message }
    }
}

/// An error about the file as a whole, with no position.
fn whole_file(message: &str) -> ConfigError {
    ConfigError { line: None, column: None, message: message.into() }
}

impl RawConfig {
    fn resolve(self, source: &str) -> Result<Config, ConfigError> {
        let defaults = preset_defaults(self.preset);
        let pos = Positions { source };
        // One section at a time; routes need the NAT range to keep listen ports out of it.
        let runtime = self.runtime.resolve(&defaults, &pos)?;
        let pool = self.pool.resolve(&defaults, &pos)?;
        let interfaces = resolve_interfaces(self.interface, &pos)?;
        let nat = self.nat.resolve(&defaults, &pos)?;
        let routes = resolve_routes(self.route, nat.ports, &pos)?;
        let neighbors = resolve_neighbors(self.neighbor, &pos)?;
        let security = self.security.resolve(&defaults, &pos)?;
        Ok(Config {
            runtime,
            pool,
            interfaces,
            nat,
            security,
            routes,
            neighbors,
            metrics_listen: match self.metrics.enable {
                Some(false) => None,
                _ => Some(self.metrics.listen.unwrap_or(DEFAULT_METRICS_LISTEN)),
            },
        })
    }
}

impl RawRuntime {
    fn resolve(self, defaults: &PresetDefaults, pos: &Positions) -> Result<Runtime, ConfigError> {
        let batch_size = match self.batch_size {
            Some(b) if !(1..=256).contains(b.get_ref()) => {
                return Err(pos.at(b.span(), format!("batch_size must be between 1 and 256, not {}", b.get_ref())));
            }
            Some(b) => b.into_inner(),
            None => DEFAULT_BATCH_SIZE,
        };
        Ok(Runtime {
            mode: self.mode.unwrap_or(Mode::Auto),
            wait: self.wait.unwrap_or(defaults.wait),
            cores: self.cores,
            batch_size,
            stats_interval_secs: self.stats_interval_secs.unwrap_or(10),
        })
    }
}

impl RawPool {
    fn resolve(self, defaults: &PresetDefaults, pos: &Positions) -> Result<Pool, ConfigError> {
        let frame_size = match self.frame_size {
            Some(s) if ![2048, 4096].contains(s.get_ref()) => {
                return Err(pos.at(s.span(), format!("frame_size must be 2048 or 4096, not {}", s.get_ref())));
            }
            Some(s) => s.into_inner(),
            None => DEFAULT_FRAME_SIZE,
        };
        let frames_per_worker = match self.frames_per_worker {
            Some(f) if !f.get_ref().is_power_of_two() || *f.get_ref() < 256 => {
                return Err(pos.at(
                    f.span(),
                    format!("frames_per_worker must be a power of two of at least 256, not {}", f.get_ref()),
                ));
            }
            Some(f) => f.into_inner(),
            None => DEFAULT_FRAMES_PER_WORKER,
        };
        Ok(Pool { frames_per_worker, frame_size, hugepages: self.hugepages.unwrap_or(defaults.hugepages) })
    }
}

fn resolve_interfaces(raws: Vec<RawInterface>, pos: &Positions) -> Result<Vec<Interface>, ConfigError> {
    if raws.is_empty() {
        return Err(whole_file("no [[interface]] is configured"));
    }
    let mut seen = HashSet::new();
    let mut interfaces = Vec::new();
    for raw in raws {
        let name = raw.name.get_ref();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            return Err(pos.at(raw.name.span(), format!("`{name}` is not a valid interface name")));
        }
        if !seen.insert(name.clone()) {
            return Err(pos.at(raw.name.span(), format!("interface `{name}` is listed twice")));
        }
        let queues = match raw.queues {
            Some(q) if *q.get_ref() == 0 || *q.get_ref() > 256 => {
                return Err(pos.at(q.span(), format!("queues must be between 1 and 256, not {}", q.get_ref())));
            }
            Some(q) => Some(q.into_inner()),
            None => None,
        };
        interfaces.push(Interface {
            name: raw.name.into_inner(),
            queues,
            xdp_mode: raw.xdp_mode.unwrap_or(XdpMode::Auto),
            role: raw.role.unwrap_or(InterfaceRole::Both),
        });
    }
    let queue_counts: HashSet<Option<u32>> = interfaces.iter().map(|i| i.queues).collect();
    if queue_counts.len() > 1 {
        return Err(whole_file(
            "every interface must use the same number of queues (one worker serves queue N of each)",
        ));
    }
    let has = |role: InterfaceRole| interfaces.iter().any(|i| i.role == role || i.role == InterfaceRole::Both);
    if !has(InterfaceRole::Client) || !has(InterfaceRole::Upstream) {
        return Err(whole_file("interfaces need a client side and an upstream side (role = \"both\" is one-arm)"));
    }
    Ok(interfaces)
}

impl RawNat {
    fn resolve(self, defaults: &PresetDefaults, pos: &Positions) -> Result<Nat, ConfigError> {
        let ports = match &self.ports {
            Some(spec) => parse_port_range(spec.get_ref()).map_err(|m| pos.at(spec.span(), m))?,
            None => DEFAULT_NAT_PORTS,
        };
        let idle_timeout_secs =
            at_least_one(self.idle_timeout_secs, defaults.idle_timeout_secs, "idle_timeout_secs", pos)?;
        let unreplied_timeout_secs =
            at_least_one(self.unreplied_timeout_secs, DEFAULT_UNREPLIED_TIMEOUT_SECS, "unreplied_timeout_secs", pos)?;
        Ok(Nat {
            ports,
            idle_timeout_secs,
            // An unreplied session never outlives an answered one.
            unreplied_timeout_secs: unreplied_timeout_secs.min(idle_timeout_secs),
            max_sessions: at_least_one(self.max_sessions, defaults.max_sessions, "max_sessions", pos)?,
        })
    }
}

impl RawSecurity {
    fn resolve(self, defaults: &PresetDefaults, pos: &Positions) -> Result<Security, ConfigError> {
        Ok(Security {
            verify_checksums: self.verify_checksums.unwrap_or(defaults.verify_checksums),
            global_limit: Limit {
                packets_per_second: self.global_packets_per_second,
                bytes_per_second: self.global_bytes_per_second,
            },
            max_sessions_per_source: at_least_one(
                self.max_sessions_per_source,
                defaults.max_sessions_per_source,
                "max_sessions_per_source",
                pos,
            )?,
            source_table_entries: at_least_one(
                self.source_table_entries,
                DEFAULT_SOURCE_TABLE,
                "source_table_entries",
                pos,
            )?,
            new_flows_per_second: self.new_flows_per_second.unwrap_or(defaults.new_flows_per_second),
        })
    }
}

fn resolve_routes(raws: Vec<RawRoute>, nat_ports: (u16, u16), pos: &Positions) -> Result<Vec<RouteSpec>, ConfigError> {
    if raws.is_empty() {
        return Err(whole_file("no [[route]] is configured"));
    }
    let mut routes: Vec<RouteSpec> = Vec::new();
    for raw in raws {
        let route = raw.resolve(&routes, nat_ports, pos)?;
        routes.push(route);
    }
    Ok(routes)
}

impl RawRoute {
    /// One route, checked on its own and against the routes before it.
    fn resolve(self, earlier: &[RouteSpec], nat_ports: (u16, u16), pos: &Positions) -> Result<RouteSpec, ConfigError> {
        let listen = *self.listen.get_ref();
        let listen_error = |message: String| Err(pos.at(self.listen.span(), message));
        if listen.port() == 0 {
            return listen_error(format!("listen address {listen} has port 0"));
        }
        if listen.ip().is_multicast() || listen.ip() == IpAddr::V4(core::net::Ipv4Addr::BROADCAST) {
            return listen_error(format!(
                "listen address {listen} is multicast or broadcast; the relay serves unicast addresses"
            ));
        }
        if (nat_ports.0..=nat_ports.1).contains(&listen.port()) {
            return listen_error(format!(
                "listen port {} lies inside the NAT port range {}-{}",
                listen.port(),
                nat_ports.0,
                nat_ports.1
            ));
        }
        if let Some(other) = earlier.iter().find(|r| overlaps(r.listen, listen)) {
            return listen_error(format!("listen address {listen} overlaps route listening on {}", other.listen));
        }
        check_upstreams(listen, &self.upstreams, earlier, pos)?;
        let mut draining = Vec::new();
        for upstream in &self.draining_upstreams {
            if !self.upstreams.get_ref().contains(upstream.get_ref()) {
                return Err(pos.at(
                    upstream.span(),
                    format!("draining upstream {} is not one of the route's upstreams", upstream.get_ref()),
                ));
            }
            draining.push(*upstream.get_ref());
        }
        let mut allowed_clients = Vec::new();
        for prefix in &self.allowed_clients {
            let parsed = parse_prefix(prefix.get_ref()).map_err(|m| pos.at(prefix.span(), m))?;
            if matches!(parsed, ipnet::IpNet::V4(_)) != listen.is_ipv4() {
                return Err(pos.at(
                    prefix.span(),
                    format!(
                        "allowed client prefix {} can never match: listen address {listen} is of the other family",
                        prefix.get_ref()
                    ),
                ));
            }
            allowed_clients.push(parsed);
        }
        let proxy_header = resolve_proxy_header(
            self.proxy_protocol,
            self.proxy_protocol_datagrams,
            self.upstream_encap.as_ref().is_some_and(|e| *e.get_ref() == Encap::Oxtunnel),
            pos,
        )?;
        let (health, probe) =
            resolve_health(self.unanswered_timeout_secs, self.down_retry_secs, self.health_check, pos)?;
        Ok(RouteSpec {
            listen,
            draining,
            health,
            probe,
            proxy_header,
            upstreams: self.upstreams.into_inner(),
            allowed_clients,
            per_source: Limit {
                packets_per_second: self.per_source_packets_per_second,
                bytes_per_second: self.per_source_bytes_per_second,
            },
            per_session: Limit {
                packets_per_second: self.per_session_packets_per_second,
                bytes_per_second: self.per_session_bytes_per_second,
            },
            listen_key_file: tunnel_key_file(self.encap, self.key_file, "encap", "key_file", pos)?,
            listen_key: None,
            upstream_key_file: tunnel_key_file(
                self.upstream_encap,
                self.upstream_key_file,
                "upstream_encap",
                "upstream_key_file",
                pos,
            )?,
            upstream_key: None,
        })
    }
}

/// `proxy_protocol` and `proxy_protocol_datagrams` of a route. The header is for the final
/// upstream, so a route to relays over an OxTunnel hop refuses it (set it on the last relay).
fn resolve_proxy_header(
    version: Option<Spanned<String>>,
    datagrams: Option<Spanned<String>>,
    tunnelled: bool,
    pos: &Positions,
) -> Result<Option<ProxyHeader>, ConfigError> {
    let Some(version) = version else {
        return match datagrams {
            Some(d) => Err(pos.at(d.span(), "proxy_protocol_datagrams needs proxy_protocol = \"v2\"".into())),
            None => Ok(None),
        };
    };
    if version.get_ref() != "v2" {
        return Err(pos.at(version.span(), format!("proxy_protocol must be \"v2\", not \"{}\"", version.get_ref())));
    }
    if tunnelled {
        return Err(pos.at(
            version.span(),
            "proxy_protocol is for the final upstream: set it on the last relay of the chain, not on an OxTunnel hop"
                .into(),
        ));
    }
    match datagrams.as_ref().map(|d| d.get_ref().as_str()) {
        None | Some("every") => Ok(Some(ProxyHeader::EveryDatagram)),
        Some("first") => Ok(Some(ProxyHeader::FirstDatagram)),
        Some(other) => Err(pos.at(
            datagrams.as_ref().map_or(version.span(), Spanned::span),
            format!("proxy_protocol_datagrams must be \"every\" or \"first\", not \"{other}\""),
        )),
    }
}

/// A route's health policy and optional probe; defaults: passive off, retry after 30 s,
/// probe every 2 s with 1 s to answer, up after 2 answers, down after 3 misses.
fn resolve_health(
    unanswered_timeout_secs: Option<u64>,
    down_retry_secs: Option<Spanned<u64>>,
    check: Option<Spanned<RawHealthCheck>>,
    pos: &Positions,
) -> Result<(HealthPolicy, Option<Probe>), ConfigError> {
    let retry = at_least_one(down_retry_secs, DEFAULT_DOWN_RETRY_SECS, "down_retry_secs", pos)?;
    let mut policy = HealthPolicy {
        unanswered_timeout: unanswered_timeout_secs.unwrap_or(0) * 1000,
        retry_after: retry * 1000,
        rise: 2,
        fall: 3,
    };
    let Some(check) = check else { return Ok((policy, None)) };
    let span = check.span();
    let check = check.into_inner();
    let interval = check.interval_ms.unwrap_or(2000);
    let timeout = check.timeout_ms.unwrap_or(1000.min(interval));
    if interval < 100 || timeout == 0 || timeout > interval {
        return Err(pos.at(
            span,
            format!(
                "health_check needs interval_ms >= 100 and 0 < timeout_ms <= interval_ms (got {interval} and {timeout})"
            ),
        ));
    }
    if check.send.is_empty() || check.expect.is_empty() {
        return Err(pos.at(span, "health_check needs a non-empty `send` and `expect`".into()));
    }
    policy.rise = check.rise.unwrap_or(2).max(1);
    policy.fall = check.fall.unwrap_or(3).max(1);
    let probe = Probe { send: check.send.into_bytes(), expect: check.expect.into_bytes(), interval, timeout };
    Ok((policy, Some(probe)))
}

/// A route's upstreams: present, distinct, not the relay itself, of the listen family, unicast.
fn check_upstreams(
    listen: SocketAddr,
    upstreams: &Spanned<Vec<SocketAddr>>,
    earlier: &[RouteSpec],
    pos: &Positions,
) -> Result<(), ConfigError> {
    let refuse = |message: String| Err(pos.at(upstreams.span(), message));
    let listed = upstreams.get_ref();
    if listed.is_empty() {
        return refuse("a route needs at least one upstream".into());
    }
    if let Some(twice) = listed.iter().enumerate().find_map(|(i, u)| listed[..i].contains(u).then_some(u)) {
        return refuse(format!("upstream {twice} is listed twice"));
    }
    for upstream in listed {
        if *upstream == listen || earlier.iter().any(|r| r.listen == *upstream) {
            return refuse(format!(
                "upstream {upstream} is one of the relay's own listen addresses: it would relay to itself"
            ));
        }
        if upstream.is_ipv4() != listen.is_ipv4() {
            return refuse(format!("upstream {upstream} is not of the same address family as listen address {listen}"));
        }
        if upstream.port() == 0 || upstream.ip().is_unspecified() || crate::wire::is_martian(upstream.ip()) {
            return refuse(format!("upstream {upstream} is not a usable unicast address and port"));
        }
    }
    Ok(())
}

fn resolve_neighbors(raws: Vec<RawNeighbor>, pos: &Positions) -> Result<Vec<StaticNeighbor>, ConfigError> {
    raws.into_iter()
        .map(|raw| {
            let mac = parse_mac(raw.mac.get_ref())
                .ok_or_else(|| pos.at(raw.mac.span(), format!("`{}` is not a MAC address", raw.mac.get_ref())))?;
            Ok(StaticNeighbor { ip: raw.ip, mac })
        })
        .collect()
}

/// The key file of a tunnel side: required with `encap = "oxtunnel"`, refused without it.
fn tunnel_key_file(
    encap: Option<Spanned<Encap>>,
    key_file: Option<Spanned<String>>,
    encap_key: &str,
    file_key: &str,
    pos: &Positions,
) -> Result<Option<String>, ConfigError> {
    match (encap.as_ref().map(|e| (*e.get_ref(), e.span())), key_file) {
        (Some((Encap::Oxtunnel, _)), Some(file)) => Ok(Some(file.into_inner())),
        (Some((Encap::Oxtunnel, span)), None) => {
            Err(pos.at(span, format!("{encap_key} = \"oxtunnel\" needs {file_key}")))
        }
        (_, Some(file)) => Err(pos.at(file.span(), format!("{file_key} is only used with {encap_key} = \"oxtunnel\""))),
        (_, None) => Ok(None),
    }
}

/// A count or duration of at least 1 named `key`, or `default` when absent.
fn at_least_one<T: Copy + PartialEq + From<u8> + fmt::Display>(
    value: Option<Spanned<T>>,
    default: T,
    key: &str,
    pos: &Positions,
) -> Result<T, ConfigError> {
    match value {
        Some(v) if *v.get_ref() == T::from(0) => Err(pos.at(v.span(), format!("{key} must be at least 1"))),
        Some(v) => Ok(v.into_inner()),
        None => Ok(default),
    }
}

/// Two listen addresses overlap when they share family and port and either is a wildcard or both are equal.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn parse_port_range(spec: &str) -> Result<(u16, u16), String> {
    let bad = || format!("NAT ports must look like \"20000-29999\" (1024..65535), not \"{spec}\"");
    let (first, last) = spec.split_once('-').ok_or_else(bad)?;
    let first: u16 = first.trim().parse().map_err(|_| bad())?;
    let last: u16 = last.trim().parse().map_err(|_| bad())?;
    if first < 1024 || first > last {
        return Err(bad());
    }
    Ok((first, last))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<MacAddr> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// 1-based line and column of byte `offset` in `source`.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[interface]]
name = "veth0"

[[route]]
listen = "10.0.0.1:5000"
upstreams = ["10.1.0.2:7000"]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(config.runtime.wait, WaitMode::Event);
        assert_eq!(config.runtime.batch_size, 64);
        assert_eq!(config.nat.ports, DEFAULT_NAT_PORTS);
        assert_eq!(config.interfaces[0].role, InterfaceRole::Both);
        assert_eq!(config.routes[0].upstreams, vec!["10.1.0.2:7000".parse::<SocketAddr>().expect("addr")]);
    }

    #[test]
    fn presets_set_defaults_that_keys_override() {
        let fast = Config::from_toml(&format!("preset = \"max_throughput\"\n{MINIMAL}")).expect("valid");
        assert_eq!(fast.runtime.wait, WaitMode::BusyPoll);
        let secure = Config::from_toml(&format!("preset = \"secure\"\n[runtime]\nwait = \"busy_poll\"\n{MINIMAL}"))
            .expect("valid");
        assert!(secure.security.verify_checksums);
        assert_eq!(secure.runtime.wait, WaitMode::BusyPoll);
        assert_eq!(secure.nat.max_sessions, 16_384);
    }

    #[test]
    fn quick_form_builds_a_one_arm_config() {
        let config =
            Config::quick("eth0", "10.0.0.1:5000".parse().expect("addr"), &["10.1.0.2:7".parse().expect("addr")])
                .expect("valid");
        assert_eq!(config.interfaces[0].name, "eth0");
        assert_eq!(config.routes.len(), 1);
    }

    #[test]
    fn errors_name_line_and_column() {
        let cases = [
            ("unknown key", format!("{MINIMAL}bogus = 1\n"), 8, "unknown field"),
            ("wrong type", MINIMAL.replace("name = \"veth0\"", "name = 5"), 3, "invalid type"),
            ("bad address", MINIMAL.replace("10.0.0.1:5000", "10.0.0.1"), 6, "invalid socket address"),
            ("family mismatch", MINIMAL.replace("10.1.0.2:7000", "[fd00::2]:7000"), 7, "same address family"),
            ("listen in NAT range", MINIMAL.replace("5000", "25000"), 6, "NAT port range"),
            ("bad NAT range", format!("{MINIMAL}[nat]\nports = \"30000-20000\"\n"), 9, "NAT ports"),
            ("bad batch", format!("[runtime]\nbatch_size = 1000\n{MINIMAL}"), 2, "batch_size"),
            (
                "bad prefix",
                MINIMAL.replace("upstreams", "allowed_clients = [\"10.0.0.0/40\"]\nupstreams"),
                7,
                "prefix length",
            ),
            ("bad mac", format!("{MINIMAL}[[neighbor]]\nip = \"10.1.0.2\"\nmac = \"zz:00\"\n"), 10, "MAC"),
            ("multicast listen", MINIMAL.replace("10.0.0.1:5000", "239.1.1.1:5000"), 6, "multicast"),
            ("upstream is the listen address", MINIMAL.replace("10.1.0.2:7000", "10.0.0.1:5000"), 7, "itself"),
            (
                "duplicate upstream",
                MINIMAL.replace("\"10.1.0.2:7000\"", "\"10.1.0.2:7000\", \"10.1.0.2:7000\""),
                7,
                "twice",
            ),
            (
                "IPv6 prefix on an IPv4 route",
                MINIMAL.replace("upstreams", "allowed_clients = [\"fd00::/8\"]\nupstreams"),
                7,
                "other family",
            ),
        ];
        for (name, source, line, needle) in cases {
            let error = Config::from_toml(&source).expect_err(name);
            assert_eq!(error.line, Some(line), "{name}: {error}");
            assert!(error.column.is_some(), "{name}");
            assert!(error.message.contains(needle), "{name}: {}", error.message);
        }
    }

    #[test]
    fn rate_limits_and_caps_parse() {
        let source = format!(
            "[security]\nglobal_packets_per_second = 100000\nmax_sessions_per_source = 8\n{}",
            MINIMAL.replace(
                "upstreams",
                "per_source_packets_per_second = 500\nper_session_bytes_per_second = 1000000\nupstreams"
            )
        );
        let config = Config::from_toml(&source).expect("valid");
        assert_eq!(config.security.global_limit.packets_per_second, Some(100_000));
        assert_eq!(config.security.max_sessions_per_source, 8);
        assert_eq!(config.routes[0].per_source.packets_per_second, Some(500));
        assert_eq!(config.routes[0].per_session.bytes_per_second, Some(1_000_000));
        assert!(config.routes[0].per_session.packets_per_second.is_none());
        let zero =
            Config::from_toml(&format!("[security]\nmax_sessions_per_source = 0\n{MINIMAL}")).expect_err("zero cap");
        assert_eq!(zero.line, Some(2));
    }

    #[test]
    fn tunnel_sides_need_their_key_files() {
        let edge = MINIMAL
            .replace("upstreams", "upstream_encap = \"oxtunnel\"\nupstream_key_file = \"/etc/hop.key\"\nupstreams");
        let config = Config::from_toml(&edge).expect("valid");
        assert_eq!(config.routes[0].upstream_key_file.as_deref(), Some("/etc/hop.key"));
        assert!(config.routes[0].listen_key_file.is_none());
        let missing =
            Config::from_toml(&MINIMAL.replace("upstreams", "encap = \"oxtunnel\"\nupstreams")).expect_err("no key");
        assert!(missing.message.contains("needs key_file") && missing.line == Some(7), "{missing}");
        let stray =
            Config::from_toml(&MINIMAL.replace("upstreams", "key_file = \"/k\"\nupstreams")).expect_err("stray");
        assert!(stray.message.contains("only used with encap"), "{stray}");
        assert!(Config::from_toml(&MINIMAL.replace("upstreams", "encap = \"gre\"\nupstreams")).is_err());
    }

    #[test]
    fn overlapping_routes_are_refused() {
        let source = format!("{MINIMAL}\n[[route]]\nlisten = \"0.0.0.0:5000\"\nupstreams = [\"10.1.0.3:7000\"]\n");
        let error = Config::from_toml(&source).expect_err("overlap");
        assert!(error.message.contains("overlaps"), "{error}");
        assert_eq!(error.line, Some(10));
    }

    #[test]
    fn structural_errors_without_position() {
        let no_interface = "[[route]]\nlisten = \"10.0.0.1:5000\"\nupstreams = [\"10.1.0.2:7000\"]\n";
        assert!(Config::from_toml(no_interface).expect_err("no interface").message.contains("interface"));
        let only_client = MINIMAL.replace("name = \"veth0\"", "name = \"veth0\"\nrole = \"client\"");
        assert!(Config::from_toml(&only_client).expect_err("one side").message.contains("upstream side"));
    }

    #[test]
    fn health_checks_parse_with_defaults_and_bounds() {
        let route = |extra: &str| MINIMAL.replace("upstreams = [", &format!("{extra}\nupstreams = ["));
        let plain = Config::from_toml(MINIMAL).expect("minimal");
        assert_eq!(plain.routes[0].health.unanswered_timeout, 0, "passive check off by default");
        assert!(plain.routes[0].probe.is_none());
        let checked = Config::from_toml(&route(
            "unanswered_timeout_secs = 5\nhealth_check = { send = \"ping\", expect = \"pong\", interval_ms = 500 }",
        ))
        .expect("health check");
        let probe = checked.routes[0].probe.as_ref().expect("probe");
        assert_eq!((probe.interval, probe.timeout, probe.expect.as_slice()), (500, 500, &b"pong"[..]));
        assert_eq!((checked.routes[0].health.unanswered_timeout, checked.routes[0].health.fall), (5_000, 3));
        let error = Config::from_toml(&route("health_check = { send = \"a\", expect = \"b\", interval_ms = 50 }"))
            .expect_err("too fast");
        assert_eq!(error.line, Some(7), "{error}");
        let unknown = Config::from_toml(&route("draining_upstreams = [\"10.9.9.9:1\"]")).expect_err("not listed");
        assert!(unknown.message.contains("not one of the route's upstreams"), "{unknown}");
    }

    #[test]
    fn proxy_protocol_is_per_route_and_not_for_tunnel_hops() {
        let route = |extra: &str| MINIMAL.replace("upstreams = [", &format!("{extra}\nupstreams = ["));
        let every = Config::from_toml(&route("proxy_protocol = \"v2\"")).expect("v2");
        assert_eq!(every.routes[0].proxy_header, Some(ProxyHeader::EveryDatagram));
        let first =
            Config::from_toml(&route("proxy_protocol = \"v2\"\nproxy_protocol_datagrams = \"first\"")).expect("first");
        assert_eq!(first.routes[0].proxy_header, Some(ProxyHeader::FirstDatagram));
        assert!(Config::from_toml(&route("proxy_protocol = \"v1\"")).is_err());
        let hop = route("proxy_protocol = \"v2\"\nupstream_encap = \"oxtunnel\"\nupstream_key_file = \"/k\"");
        assert!(Config::from_toml(&hop).expect_err("tunnel").message.contains("last relay"));
    }

    #[test]
    fn reload_tells_live_changes_from_restart_ones() {
        let base = Config::from_toml(MINIMAL).expect("minimal");
        let more =
            MINIMAL.replace("upstreams = [", "per_source_packets_per_second = 10\nupstreams = [\"10.1.0.9:7000\", ");
        let reloadable = Config::from_toml(&more).expect("reloadable");
        assert!(base.restart_needed(&reloadable, true).is_empty(), "upstreams and limits change live");
        let moved = Config::from_toml(&MINIMAL.replace("[[route]]", "[nat]\nports = \"30000-30999\"\n\n[[route]]"))
            .expect("nat");
        assert_eq!(base.restart_needed(&moved, false), vec!["[nat]"]);
        let relisten = Config::from_toml(&MINIMAL.replace(":5000", ":5001")).expect("listen");
        assert!(base.restart_needed(&relisten, false).is_empty(), "AF_XDP takes new listen addresses live");
        assert_eq!(base.restart_needed(&relisten, true).len(), 1, "the socket backend does not");
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("2:00:0a:ff:00:01"), None);
    }
}
