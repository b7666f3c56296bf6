//! Host-side checks of a config that the pure core cannot make: tunnel key
//! files and the kernel's local port range. `check-config` and `run` share them,
//! so an operator hears about a bad key file before a restart, not after.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use oxidize_relay_core::config::{Config, ConfigError};
use oxidize_relay_core::oxtunnel::TunnelKey;

/// Where the kernel picks ephemeral ports for local sockets.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("OxTunnel key file {path}: cannot read it")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("OxTunnel key file {path}: {reason}")]
    Content { path: String, reason: &'static str },
}

/// A config file that cannot be used, with where it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("{}: cannot read", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}:{}", path.display(), position(error))]
    Invalid { path: PathBuf, error: ConfigError },
}

fn position(error: &ConfigError) -> String {
    match (error.line, error.column) {
        (Some(line), Some(column)) => format!("{line}:{column}: {}", error.message),
        _ => format!(" {}", error.message),
    }
}

/// Reads and validates a config file (`check-config`, `run` and every reload).
pub fn read_config(path: &Path) -> Result<Config, ConfigFileError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigFileError::Read { path: path.to_owned(), source })?;
    Config::from_toml(&text).map_err(|error| ConfigFileError::Invalid { path: path.to_owned(), error })
}

/// Reads every route's tunnel key files into the config (keys never live in the
/// config text). Returns warnings about files others may read.
pub fn load_tunnel_keys(config: &mut Config) -> Result<Vec<String>, KeyFileError> {
    let mut warnings = Vec::new();
    let mut read = |path: &String| -> Result<TunnelKey, KeyFileError> {
        let metadata = fs::metadata(path).map_err(|source| KeyFileError::Read { path: path.clone(), source })?;
        if metadata.is_dir() {
            return Err(KeyFileError::Content { path: path.clone(), reason: "is a directory" });
        }
        if metadata.permissions().mode() & 0o077 != 0 {
            warnings.push(format!(
                "OxTunnel key file {path} may be read by other users (mode {:o}); `chmod 600 {path}`",
                metadata.permissions().mode() & 0o777
            ));
        }
        let text = fs::read_to_string(path).map_err(|source| KeyFileError::Read { path: path.clone(), source })?;
        TunnelKey::from_key_file(&text).map_err(|reason| KeyFileError::Content { path: path.clone(), reason })
    };
    for route in &mut config.routes {
        route.listen_key = route.listen_key_file.as_ref().map(&mut read).transpose()?;
        route.upstream_key = route.upstream_key_file.as_ref().map(&mut read).transpose()?;
    }
    Ok(warnings)
}

/// A warning when the NAT port range overlaps the kernel's ephemeral port range
/// on this host: the relay takes replies to those ports, so local UDP clients
/// that happen to get one lose their replies.
pub fn local_port_overlap(config: &Config) -> Option<String> {
    let text = fs::read_to_string(LOCAL_PORT_RANGE).ok()?;
    let mut bounds = text.split_whitespace().filter_map(|n| n.parse::<u16>().ok());
    let (low, high) = (bounds.next()?, bounds.next()?);
    let (first, last) = config.nat.ports;
    (first <= high && low <= last).then(|| {
        format!(
            "the NAT port range {first}-{last} overlaps net.ipv4.ip_local_port_range ({low}-{high}): \
             local UDP sockets given one of those ports lose their replies to the relay. \
             Move one of them (e.g. `sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\"`)"
        )
    })
}
