//! What a monitor's service says about its users, for `kubectl get sessionmonitors`.
//!
//! The operator reads the service's `/metrics` through the monitor's HTTP Service, the way
//! Prometheus does, rather than have the service write its own status: the service's Role then
//! stays what it is (its own checkpoint ConfigMaps, nothing else), and the operator needs no new
//! permission either, only the network path to a Service it created. `/metrics` is open even when
//! the API needs a token, and it carries no user names.
//!
//! A pure parser of the text exposition, and a small HTTP/1.0 client as the IO shell.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// How long one read of a service's `/metrics` may take; a reconcile waits for it. The answer
/// itself takes milliseconds, but a pod at its CPU limit on a busy node is throttled in 100 ms
/// periods, and a connection through kube-proxy to it may wait for a retransmitted SYN (1 s):
/// two seconds were too few on a loaded CI machine.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The numbers of one service, as its `/metrics` had them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub active_users: Option<u64>,
    pub active_sessions: Option<u64>,
    /// The newest event of any proxy.
    pub last_event: Option<Time>,
    pub checkpoint_bytes: Option<u64>,
    pub checkpoint_shards_in_use: Option<u64>,
    /// The `checkpoint_configmap_shards` the checkpoint's size calls for.
    pub checkpoint_shards_wanted: Option<u64>,
}

/// The samples [`Usage`] is made of, from a Prometheus text exposition; others are ignored.
pub fn parse(exposition: &str) -> Usage {
    let mut usage = Usage::default();
    let mut last_event: Option<f64> = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let count = (value >= 0.0 && value.is_finite()).then_some(value as u64);
        match name {
            "session_monitor_active_users" => usage.active_users = count,
            "session_monitor_active_sessions" => usage.active_sessions = count,
            "session_monitor_checkpoint_size_bytes" => usage.checkpoint_bytes = count,
            "session_monitor_checkpoint_shards" => usage.checkpoint_shards_in_use = count,
            "session_monitor_checkpoint_shards_wanted" => usage.checkpoint_shards_wanted = count,
            "session_monitor_host_last_event_timestamp_seconds" if value > 0.0 => {
                last_event = Some(last_event.map_or(value, |t| t.max(value)));
            }
            _ => {}
        }
    }
    usage.last_event = last_event
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s as i64).ok())
        .map(Time);
    usage
}

/// Where the reconciler gets a service's usage from: `(host, port)` → the numbers, or why the
/// service could not be read. Tests give a fixed one.
pub type Source = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = Result<Usage, String>> + Send>>
        + Send
        + Sync,
>;

/// Reads `http://HOST:PORT/metrics` within [`FETCH_TIMEOUT`].
pub fn over_http() -> Source {
    Arc::new(|host, port| {
        Box::pin(async move {
            match tokio::time::timeout(FETCH_TIMEOUT, get_metrics(&host, port)).await {
                Ok(Ok(text)) => Ok(parse(&text)),
                Ok(Err(error)) => Err(format!("http://{host}:{port}/metrics: {error}")),
                Err(_) => Err(format!(
                    "http://{host}:{port}/metrics did not answer within {}s",
                    FETCH_TIMEOUT.as_secs()
                )),
            }
        })
    })
}

/// When to read again after `failures` reads in a row failed: soon, then less often, never
/// later than the refresh of a healthy monitor (a failed read once waited for the 5-minute
/// resync, and the status and the shard autopilot saw nothing meanwhile).
pub fn retry_after(failures: u32, refresh: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(8);
    (Duration::from_secs(2) * factor).min(refresh)
}

/// `GET /metrics` in HTTP/1.0, so that the answer is the body up to the close (never chunked).
async fn get_metrics(host: &str, port: u16) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    // A service's exposition is tens of KiB; a cap keeps a wrong endpoint from costing memory.
    (&mut stream)
        .take(16 * 1024 * 1024)
        .read_to_end(&mut response)
        .await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
    match head.split(' ').nth(1) {
        Some("200") => Ok(body.to_owned()),
        status => Err(std::io::Error::other(format!(
            "answered {}",
            status.unwrap_or("nothing")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_read_is_retried_soon_then_at_the_refresh() {
        let refresh = Duration::from_secs(30);
        let delays: Vec<u64> = (1..=7).map(|n| retry_after(n, refresh).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_after(u32::MAX, refresh), refresh);
    }

    const EXPOSITION: &str = "\
# HELP session_monitor_active_users Distinct users with at least one active session.
# TYPE session_monitor_active_users gauge
session_monitor_active_users 42
session_monitor_active_sessions 57
session_monitor_host_active_users{host=\"qs1\"} 40
session_monitor_host_last_event_timestamp_seconds{host=\"qs1\"} 1764064800
session_monitor_host_last_event_timestamp_seconds{host=\"qs2\"} 1764065100
session_monitor_checkpoint_size_bytes 12345
session_monitor_checkpoint_shards 2
session_monitor_checkpoint_shards_wanted 5
process_resident_memory_bytes 1.2e7
";

    #[test]
    fn the_numbers_are_read_and_the_newest_event_of_any_proxy_wins() {
        let usage = parse(EXPOSITION);
        assert_eq!(usage.active_users, Some(42));
        assert_eq!(usage.active_sessions, Some(57));
        assert_eq!(usage.checkpoint_bytes, Some(12_345));
        assert_eq!(usage.checkpoint_shards_in_use, Some(2));
        assert_eq!(usage.checkpoint_shards_wanted, Some(5));
        assert_eq!(
            usage.last_event.unwrap().0.to_string(),
            "2025-11-25T10:05:00Z"
        );
    }

    #[test]
    fn what_is_missing_or_malformed_stays_unknown() {
        assert_eq!(parse(""), Usage::default());
        let usage =
            parse("session_monitor_active_users NaN\nsession_monitor_active_sessions -3\ngarbage");
        assert_eq!(usage, Usage::default());
    }

    #[tokio::test]
    async fn a_real_socket_is_read_and_a_closed_port_says_why() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await.unwrap();
            let answer = format!("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n{EXPOSITION}");
            socket.write_all(answer.as_bytes()).await.unwrap();
        });
        let source = over_http();
        let usage = source("127.0.0.1".into(), port).await.unwrap();
        assert_eq!(usage.active_users, Some(42));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let error = source("127.0.0.1".into(), closed_port).await.unwrap_err();
        assert!(
            error.contains(&format!("http://127.0.0.1:{closed_port}/metrics"))
                && error.contains("refused"),
            "{error}"
        );
    }
}
