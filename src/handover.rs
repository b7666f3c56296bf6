//! Sessions handed from a relay that stops cleanly (SIGTERM: a restart or an upgrade)
//! to the next one: a versioned JSON file in the state directory, written after the
//! workers stop and consumed (deleted) by the next start. A relay killed outright
//! writes none, so its successor starts empty, as before. A file of another format or
//! version is refused with a log line, and the relay starts empty.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oxidize_relay_core::config::parse_mac;
use oxidize_relay_core::relay::{HandedOver, TakeOverRefused};
use oxidize_relay_core::time::Millis;
use oxidize_relay_core::{IfaceId, Relay};
use serde_json::{Value, json};

use crate::nexthop::format_mac;

/// The file's name in the state directory.
pub const FILE_NAME: &str = "sessions.json";
const FORMAT: &str = "oxidize-relay sessions";
/// Bump when a field changes meaning; a relay refuses versions it does not know.
const VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("reading {path} failed")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path} failed")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is not JSON")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path} is not a session file of version {VERSION} (found format {format:?}, version {version:?})")]
    Version { path: PathBuf, format: Option<String>, version: Option<u64> },
    #[error("{path}: session {index} is malformed")]
    Session { path: PathBuf, index: usize },
}

/// Sessions read from a predecessor's file.
#[derive(Debug)]
pub struct Inherited {
    /// How long ago they were written.
    pub age: Duration,
    /// With the name of the interface each client came in on.
    pub sessions: Vec<(String, HandedOver)>,
}

/// Writes every relay's live sessions (idle times as of `now`, the workers' clock);
/// `interfaces` names the workers' interfaces by [`IfaceId`]. Returns how many were written.
pub fn save(path: &Path, relays: &[Relay], interfaces: &[String], now: Millis) -> Result<usize, HandoverError> {
    let sessions: Vec<Value> = relays
        .iter()
        .flat_map(|relay| relay.hand_over(now))
        .map(|s| {
            json!({
                "client": s.client.to_string(),
                "listen": s.listen.to_string(),
                "upstream": s.upstream.to_string(),
                "nat": s.nat.to_string(),
                "interface": interfaces.get(usize::from(s.client_iface.0)),
                "client_mac": format_mac(&s.client_mac),
                "peer_flow": s.peer_flow,
                "idle_ms": s.idle,
                "established": s.established,
            })
        })
        .collect();
    let count = sessions.len();
    let document = json!({ "format": FORMAT, "version": VERSION, "saved_unix_ms": unix_ms(), "sessions": sessions });
    crate::control::write_atomically(path, &document.to_string())
        .map_err(|source| HandoverError::Write { path: path.to_owned(), source })?;
    Ok(count)
}

/// Reads and deletes the predecessor's file; `None` when there is none.
pub fn take(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(HandoverError::Read { path: path.to_owned(), source }),
    };
    // Consumed whatever it holds: a file this relay refuses now it would refuse at every start.
    if let Err(source) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), %source, "could not delete the session file after reading it");
    }
    let document: Value =
        serde_json::from_str(&text).map_err(|source| HandoverError::Json { path: path.to_owned(), source })?;
    let format = document["format"].as_str();
    let version = document["version"].as_u64();
    if format != Some(FORMAT) || version != Some(VERSION) {
        return Err(HandoverError::Version { path: path.to_owned(), format: format.map(str::to_owned), version });
    }
    let saved = document["saved_unix_ms"].as_u64().unwrap_or(0);
    let age = Duration::from_millis(unix_ms().saturating_sub(saved));
    let entries = document["sessions"].as_array().map(Vec::as_slice).unwrap_or_default();
    let sessions = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| parse_session(entry).ok_or(HandoverError::Session { path: path.to_owned(), index }))
        .collect::<Result<_, _>>()?;
    Ok(Some(Inherited { age, sessions }))
}

/// Gives each inherited session to the worker owning its NAT port; `interfaces` are this
/// relay's by [`IfaceId`]. Logs what was taken over and why the rest was not.
pub fn restore(inherited: &Inherited, relays: &mut [&mut Relay], interfaces: &[String], now: Millis) -> usize {
    let since = inherited.age.as_millis() as Millis;
    let mut taken = 0;
    let mut refused: Vec<(TakeOverRefused, usize)> = Vec::new();
    for (interface, session) in &inherited.sessions {
        let iface = interfaces.iter().position(|name| name == interface);
        let outcome = match (iface, relays.iter_mut().find(|r| r.owns_port(session.nat.port()))) {
            (Some(index), Some(relay)) => {
                relay.take_over(now, since, &HandedOver { client_iface: IfaceId(index as u8), ..*session })
            }
            (None, _) => Err(TakeOverRefused::InterfaceGone),
            (_, None) => Err(TakeOverRefused::PortTaken),
        };
        match outcome {
            Ok(()) => taken += 1,
            Err(reason) => match refused.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, count)) => *count += 1,
                None => refused.push((reason, 1)),
            },
        }
    }
    tracing::info!(
        taken_over = taken,
        refused = ?refused,
        age_ms = inherited.age.as_millis() as u64,
        "sessions inherited from the previous relay process"
    );
    taken
}

fn parse_session(entry: &Value) -> Option<(String, HandedOver)> {
    let address = |key: &str| entry[key].as_str()?.parse::<SocketAddr>().ok();
    let session = HandedOver {
        client: address("client")?,
        listen: address("listen")?,
        upstream: address("upstream")?,
        nat: address("nat")?,
        client_iface: IfaceId(0),
        client_mac: parse_mac(entry["client_mac"].as_str()?)?,
        peer_flow: u32::try_from(entry["peer_flow"].as_u64()?).ok()?,
        idle: entry["idle_ms"].as_u64()?,
        established: entry["established"].as_bool()?,
    };
    Some((entry["interface"].as_str()?.to_owned(), session))
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use oxidize_relay_core::counters::Counters;
    use oxidize_relay_core::route::{RouteSpec, RouteTable, UpstreamId};
    use oxidize_relay_core::wire::build::udp_frame;
    use oxidize_relay_core::{NextHop, RelaySettings, Verdict};

    use super::*;

    const RELAY_MACS: [[u8; 6]; 2] = [[2, 0, 0, 0, 0, 0xa1], [2, 0, 0, 0, 0, 0xa2]];

    fn relay() -> Relay {
        let spec = RouteSpec::new("10.0.0.1:5000".parse().expect("listen"), vec!["10.1.0.2:7000".parse().expect("up")]);
        let settings = RelaySettings::unlimited(RELAY_MACS.to_vec(), (20000, 20999), 100, 30_000, 3);
        let mut relay = Relay::new(Arc::new(RouteTable::new(&[spec])), settings, Arc::new(Counters::default()));
        let hop =
            NextHop { iface: IfaceId(1), src_ip: "10.1.0.1".parse().expect("ip"), dst_mac: [2, 0, 0, 0, 0, 0xd1] };
        relay.set_next_hop(UpstreamId(0), Ok(hop));
        relay
    }

    fn scratch_file(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("oxr-handover-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_saved_session_is_taken_over_once_and_the_file_consumed() {
        let mut old = relay();
        let client = "10.0.0.2:40000".parse().expect("client");
        let mut frame =
            udp_frame([2, 0, 0, 0, 0, 0xc1], RELAY_MACS[0], client, "10.0.0.1:5000".parse().expect("listen"), b"x");
        assert_eq!(old.relay_whole_frame(1, IfaceId(0), &mut frame), Verdict::Forward(IfaceId(1)));
        let path = scratch_file("roundtrip");
        let interfaces = ["rc0".to_owned(), "ru0".to_owned()];
        assert_eq!(save(&path, &[old], &interfaces, 5).expect("saved"), 1);

        let inherited = take(&path).expect("readable").expect("present");
        assert!(!path.exists(), "the file is consumed");
        assert_eq!(inherited.sessions[0].0, "rc0");
        assert_eq!(inherited.sessions[0].1.client, client);
        let mut new = relay();
        assert_eq!(restore(&inherited, &mut [&mut new], &interfaces, 0), 1);
        assert_eq!(new.session_count(), 1);
        assert!(take(&path).expect("no file").is_none(), "nothing to take twice");
    }

    #[test]
    fn a_file_of_another_version_is_refused() {
        let path = scratch_file("version");
        fs::write(&path, r#"{"format": "oxidize-relay sessions", "version": 99, "sessions": []}"#).expect("write");
        assert!(matches!(take(&path), Err(HandoverError::Version { version: Some(99), .. })));
        assert!(!path.exists(), "refused once, not at every start");
    }
}
