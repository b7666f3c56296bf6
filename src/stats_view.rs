//! `oxidize-relay stats`: the metrics endpoint's numbers as tables for a human.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::metrics;

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("the endpoint `{0}` is not an http://host:port/path URL")]
    Url(String),
    #[error("fetching {url} failed")]
    Fetch {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} answered `{status}`")]
    Status { url: String, status: String },
}

/// GETs `url` (plain HTTP/1.0, so the body is never chunked) and parses the samples.
pub fn fetch(url: &str) -> Result<Vec<Sample>, StatsError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| StatsError::Url(url.to_owned()))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/"), |(a, p)| (a, &rest[a.len()..][..p.len() + 1]));
    let failed = |source| StatsError::Fetch { url: url.to_owned(), source };
    let address = authority.to_socket_addrs().map_err(failed)?.next().ok_or_else(|| StatsError::Url(url.to_owned()))?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3)).map_err(failed)?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(failed)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/plain\r\n\r\n").map_err(failed)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(failed)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        return Err(StatsError::Status { url: url.to_owned(), status: status.to_owned() });
    }
    Ok(parse(body))
}

/// Parses the Prometheus text exposition format (comments skipped, malformed lines ignored).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, parse_labels(labels.strip_suffix('}')?)),
                None => (series, BTreeMap::new()),
            };
            Some(Sample { name: name.to_owned(), labels, value })
        })
        .collect()
}

/// Renders the tables; with `previous` and `seconds`, adds per-second rates.
pub fn render(samples: &[Sample], previous: Option<(&[Sample], f64)>) -> String {
    let mut out = String::new();
    let label_of = |name: &str, label: &str| {
        samples.iter().find(|s| s.name == name).and_then(|s| s.labels.get(label).cloned()).unwrap_or_else(|| "?".into())
    };
    let _ = writeln!(
        out,
        "backend {}, version {}",
        label_of(metrics::INFO, "backend"),
        label_of(metrics::BUILD_INFO, "version")
    );

    let workers: Vec<String> = {
        let mut ids: Vec<String> = samples
            .iter()
            .filter(|s| s.name == metrics::RX_PACKETS)
            .filter_map(|s| s.labels.get("worker").cloned())
            .collect();
        ids.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
        ids
    };
    let per_worker = |set: &[Sample], name: &str, worker: &str| {
        set.iter()
            .filter(|s| s.name == name && s.labels.get("worker").map(String::as_str) == Some(worker))
            .map(|s| s.value)
            .sum::<f64>()
    };
    let rate_columns = previous.is_some();
    let _ = write!(
        out,
        "\n{:<8}{:>14}{:>16}{:>14}{:>16}{:>10}{:>12}",
        "worker", "rx packets", "rx bytes", "tx packets", "tx bytes", "sessions", "wakeups"
    );
    if rate_columns {
        let _ = write!(out, "{:>12}{:>12}", "rx pps", "tx pps");
    }
    out.push('\n');
    let mut rows: Vec<(String, [f64; 6], [f64; 2])> = Vec::new();
    for worker in &workers {
        let values = [
            metrics::RX_PACKETS,
            metrics::RX_BYTES,
            metrics::TX_PACKETS,
            metrics::TX_BYTES,
            metrics::SESSIONS_ACTIVE,
            metrics::WAKEUPS,
        ]
        .map(|name| per_worker(samples, name, worker));
        let rates = previous.map_or([0.0; 2], |(before, seconds)| {
            [metrics::RX_PACKETS, metrics::TX_PACKETS]
                .map(|name| (per_worker(samples, name, worker) - per_worker(before, name, worker)) / seconds.max(1e-9))
        });
        rows.push((worker.clone(), values, rates));
    }
    let total = rows.iter().fold(([0.0; 6], [0.0; 2]), |(mut v, mut r), (_, values, rates)| {
        v.iter_mut().zip(values).for_each(|(a, b)| *a += b);
        r.iter_mut().zip(rates).for_each(|(a, b)| *a += b);
        (v, r)
    });
    rows.push(("total".into(), total.0, total.1));
    for (name, v, r) in rows {
        let _ = write!(out, "{name:<8}{:>14}{:>16}{:>14}{:>16}{:>10}{:>12}", v[0], v[1], v[2], v[3], v[4], v[5]);
        if rate_columns {
            let _ = write!(out, "{:>12.0}{:>12.0}", r[0], r[1]);
        }
        out.push('\n');
    }

    let _ = writeln!(out, "\n{:<8}{:<8}{:>10}{:>10}", "pool", "worker", "in use", "frames");
    for s in samples.iter().filter(|s| s.name == metrics::POOL_FRAMES) {
        let worker = label(&s.labels, "worker");
        let pool = label(&s.labels, "pool");
        let in_use = samples
            .iter()
            .find(|u| u.name == metrics::POOL_FRAMES_IN_USE && u.labels == s.labels)
            .map_or(0.0, |u| u.value);
        let _ = writeln!(out, "{pool:<8}{worker:<8}{in_use:>10}{:>10}", s.value);
    }

    let mut drops: BTreeMap<String, f64> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == metrics::DROPS) {
        *drops.entry(label(&s.labels, "reason").to_owned()).or_default() += s.value;
    }
    let _ = writeln!(out, "\ndrops");
    let nonzero: Vec<_> = drops.into_iter().filter(|(_, n)| *n > 0.0).collect();
    if nonzero.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (reason, n) in nonzero {
        let _ = writeln!(out, "  {reason:<28}{n:>12}");
    }

    let sum = |name: &str| samples.iter().filter(|s| s.name == name).map(|s| s.value as u64).sum::<u64>();
    let _ = writeln!(
        out,
        "\ncross-queue (another worker's sessions): replies {}, client packets {}",
        sum(metrics::REPLIES_CROSS_QUEUE),
        sum(metrics::CLIENTS_CROSS_QUEUE)
    );
    nonzero_by_labels(
        &mut out,
        samples,
        metrics::AF_XDP_KERNEL,
        "AF_XDP socket events counted by the kernel",
        |labels| format!("worker {:<6}{:<24}", label(labels, "worker"), label(labels, "event")),
    );
    nonzero_by_labels(&mut out, samples, metrics::XDP_PACKETS, "XDP verdicts", |labels| {
        format!("{:<12}{:<24}", label(labels, "interface"), label(labels, "verdict"))
    });
    out
}

/// A section listing the non-zero samples of `metric`, each under the row name `row` makes of its labels.
fn nonzero_by_labels(
    out: &mut String,
    samples: &[Sample],
    metric: &str,
    title: &str,
    row: impl Fn(&BTreeMap<String, String>) -> String,
) {
    let nonzero: Vec<_> = samples.iter().filter(|s| s.name == metric && s.value > 0.0).collect();
    if nonzero.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n{title}");
    for s in nonzero {
        let _ = writeln!(out, "  {}{:>12}", row(&s.labels), s.value);
    }
}

fn label<'a>(labels: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    labels.get(name).map_or("", String::as_str)
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    // Label values produced by the relay never contain `",`; a plain split is enough for them.
    text.split("\",")
        .filter_map(|pair| {
            let (key, value) = pair.split_once("=\"")?;
            Some((key.trim().to_owned(), value.trim_end_matches('"').to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# TYPE oxidize_relay_rx_packets_total counter
oxidize_relay_rx_packets_total{worker="0"} 40000
oxidize_relay_rx_packets_total{worker="1"} 2
oxidize_relay_tx_packets_total{worker="0"} 39990
oxidize_relay_drops_total{worker="0",reason="no_session"} 5
oxidize_relay_drops_total{worker="1",reason="no_session"} 1
oxidize_relay_drops_total{worker="0",reason="fragment"} 0
oxidize_relay_info{backend="af_xdp"} 1
oxidize_relay_build_info{version="0.1.0"} 1
oxidize_relay_pool_frames{worker="0",pool="umem"} 4096
oxidize_relay_pool_frames_in_use{worker="0",pool="umem"} 2048
oxidize_relay_xdp_packets_total{interface="rc0",verdict="redirect_listen"} 20000
oxidize_relay_replies_cross_queue_total{worker="1"} 7
oxidize_relay_af_xdp_kernel_total{worker="0",event="rx_ring_full"} 3
"#;

    #[test]
    fn parses_names_labels_and_values() {
        let samples = parse(SCRAPE);
        assert_eq!(samples.len(), 13);
        assert_eq!(samples[3].labels.get("reason").map(String::as_str), Some("no_session"));
        assert_eq!(samples[3].value, 5.0);
    }

    #[test]
    fn renders_workers_totals_pools_drops_and_xdp() {
        let text = render(&parse(SCRAPE), None);
        assert!(text.starts_with("backend af_xdp, version 0.1.0"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("total") && l.contains("40002") && l.contains("39990")), "{text}");
        assert!(text.contains("umem    0             2048      4096"), "{text}");
        assert!(text.contains("no_session") && text.contains("6") && !text.contains("fragment"), "{text}");
        assert!(text.contains("rc0         redirect_listen"), "{text}");
        assert!(text.contains("replies 7, client packets 0"), "{text}");
        assert!(text.contains("worker 0     rx_ring_full"), "{text}");
    }

    #[test]
    fn rates_come_from_the_previous_scrape() {
        let before = parse(SCRAPE);
        let after = parse(&SCRAPE.replace("} 40000", "} 50000"));
        let text = render(&after, Some((&before, 2.0)));
        assert!(text.lines().any(|l| l.starts_with("0 ") && l.trim_end().ends_with("5000           0")), "{text}");
    }
}
