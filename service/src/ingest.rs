//! The UDP socket loop: datagrams in, registry updated, drops counted.
//!
//! Runs on a dedicated OS thread with a blocking socket: one syscall and one short registry lock
//! per datagram, no async machinery on the hot path. Owns the per-datagram steps that need the
//! network (source allowlist) and hands the rest to the pure parser and registry.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;

use crate::config::UdpConfig;
use crate::parser::{self, Reject};
use crate::ratelimit::RateLimiter;
use crate::registry::{Outcome, UnixMillis};
use crate::state::State;

/// How often the blocking receive wakes up to check for shutdown.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// Binds the UDP socket with the configured receive buffer. Returns the socket and the buffer
/// size the kernel actually granted (Linux reports double the usable size and caps the request
/// at net.core.rmem_max unless we may force it).
pub fn bind(config: &UdpConfig) -> std::io::Result<(UdpSocket, usize)> {
    let socket = Socket::new(
        Domain::for_address(config.listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if config.listen.is_ipv6() {
        // Accept IPv4 too on "[::]", as administrators expect from a wildcard address.
        let _ = socket.set_only_v6(false);
    }
    // Needs CAP_NET_ADMIN; without it, fall back to the request net.core.rmem_max caps.
    if !force_recv_buffer_size(&socket, config.receive_buffer_bytes) {
        socket.set_recv_buffer_size(config.receive_buffer_bytes)?;
    }
    socket.bind(&config.listen.into())?;
    let granted = socket.recv_buffer_size()?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(SHUTDOWN_POLL))?;
    Ok((socket, granted))
}

/// SO_RCVBUFFORCE: the requested size even above net.core.rmem_max, for a privileged process.
#[cfg(target_os = "linux")]
fn force_recv_buffer_size(socket: &Socket, bytes: usize) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(size) = libc::c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its correct length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn force_recv_buffer_size(_: &Socket, _: usize) -> bool {
    false
}

/// One event, serialized for the optional MQTT event topics.
#[derive(Debug)]
pub struct EventMessage {
    pub command: parser::Command,
    pub payload: String,
}

/// Receives until `stop` is set. `events`, when given, receives one JSON message per accepted
/// event; when its queue is full the message is dropped and counted rather than slowing ingest.
pub fn run(
    socket: UdpSocket,
    config: UdpConfig,
    state: Arc<State>,
    events: Option<mpsc::Sender<EventMessage>>,
    stop: Arc<AtomicBool>,
) {
    // One byte more than the cap, so an oversize datagram is seen as such, not truncated.
    let mut buf = vec![0u8; config.limits.max_datagram_bytes + 1];
    let mut drop_log = RateLimiter::new(Duration::from_secs(10));
    let metrics = &state.metrics;
    while !stop.load(Ordering::Relaxed) {
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ICMP errors and the like surface here on some platforms; never fatal.
                if let Some(suppressed) = drop_log.allow("recv_error") {
                    tracing::warn!(error = %e, suppressed, "UDP receive error");
                }
                continue;
            }
        };
        metrics.datagrams_received.inc();
        let datagram = &buf[..len];
        if let Err(reason) = accept(datagram, peer, &config, &state, events.as_ref()) {
            metrics.dropped(reason);
            if let Some(suppressed) = drop_log.allow(reason.as_str()) {
                let sample = String::from_utf8_lossy(&datagram[..len.min(120)]).into_owned();
                tracing::warn!(reason = reason.as_str(), %peer, len, sample, suppressed, "dropped datagram");
            }
        }
    }
    tracing::info!("UDP ingest stopped");
}

fn accept(
    datagram: &[u8],
    peer: SocketAddr,
    config: &UdpConfig,
    state: &State,
    events: Option<&mpsc::Sender<EventMessage>>,
) -> Result<(), Reject> {
    if !source_allowed(&config.allowed_sources, peer.ip()) {
        return Err(Reject::SourceNotAllowed);
    }
    let text = parser::clean_datagram(datagram, &config.limits)?;
    let event = parser::parse(&text, &config.limits)?;
    let now = UnixMillis::now();
    let outcome = state.registry().apply(&event, now);
    if outcome == Outcome::HostLimitReached {
        return Err(Reject::TooManyHosts);
    }
    state.metrics.event(event.format, event.command, outcome);
    if let Some(membership) = outcome.changes_registry() {
        state.changed(membership);
    }
    if outcome != Outcome::Excluded
        && let Some(events) = events
    {
        let message = EventMessage {
            command: event.command,
            payload: crate::mqtt::event_payload(&event, now),
        };
        if events.try_send(message).is_err() {
            state.metrics.mqtt_events_dropped.inc();
        }
    }
    Ok(())
}

fn source_allowed(allowed: &[IpNet], ip: IpAddr) -> bool {
    // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    allowed.is_empty() || allowed.iter().any(|net| net.contains(&ip))
}

/// Datagrams the kernel dropped for this socket because its receive buffer was full, from the
/// `drops` column of /proc/net/udp{,6}. `None` where the OS does not report it.
pub fn kernel_drops(socket: &UdpSocket) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
            .ok()?
            .ino();
        ["/proc/net/udp", "/proc/net/udp6"]
            .iter()
            .find_map(|table| {
                let text = std::fs::read_to_string(table).ok()?;
                text.lines().skip(1).find_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ref pointer drops
                    (cols.get(9)?.parse::<u64>().ok()? == inode)
                        .then(|| cols.get(12)?.parse().ok())?
                })
            })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist() {
        let nets: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(source_allowed(&[], "1.2.3.4".parse().unwrap()));
        assert!(source_allowed(&nets, "10.1.2.3".parse().unwrap()));
        assert!(!source_allowed(&nets, "10.2.0.1".parse().unwrap()));
        assert!(source_allowed(&nets, "::ffff:10.1.0.9".parse().unwrap()));
        assert!(source_allowed(&nets, "fd12::1".parse().unwrap()));
        assert!(!source_allowed(&nets, "::1".parse().unwrap()));
    }

    #[test]
    fn kernel_drops_are_read_for_our_socket() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(kernel_drops(&socket), Some(0));
        }
    }
}
