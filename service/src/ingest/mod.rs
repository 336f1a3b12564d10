//! UDP ingest: datagrams in, registry updated, every drop counted.
//!
//! Two OS threads with blocking IO, no async machinery on the hot path:
//! - the *receiver* drains the socket in batches (`recvmmsg`) into the [`spool`] and does
//!   nothing else, so the kernel's small buffer is emptied at the kernel's pace whatever the rest
//!   of the service is doing;
//! - the *applier* takes everything spooled at once, checks, parses and applies each datagram
//!   (one user's shard locked per event), and signals changes and counts metrics once per chunk
//!   rather than once per datagram.
//!
//! Stop order: the receiver stops reading and closes the spool; the applier applies what is left
//! and returns, so everything received is in the registry before the final checkpoint.

pub mod filter;
mod socket;
pub mod spool;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::mpsc;

pub use socket::{Bound, bind, kernel_drops};

use crate::config::UdpConfig;
use crate::metrics::Tally;
use crate::parser::{self, Command, Format, ProxyEvent, Reject};
use crate::ratelimit::{OncePer, RateLimiter};
use crate::registry::{Outcome, UnixMillis};
use crate::state::State;
use spool::{Batch, Spool, Taken};

/// Datagram bytes the spool holds before the receiver waits: about 80,000 proxy events, four
/// seconds at 20,000 events/s, far longer than any pause of the applier.
pub const SPOOL_BYTES: usize = 16 << 20;
/// Datagrams applied between two change signals: bounds how long a long batch (after a pause)
/// delays the publisher, without a signal per datagram.
const SIGNAL_EVERY: usize = 256;
/// Senders told once each about their encoding; a site has a few proxies.
const MAX_SENDERS_TOLD: usize = 1024;

/// One accepted event, owned, for the optional MQTT event topics (formatted by the publisher).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub at: UnixMillis,
    pub format: Format,
    pub command: Command,
    pub host: String,
    pub user_directory: String,
    pub user_id: String,
    pub origin: Option<String>,
    pub context: Option<String>,
    pub proxy_session_id: Option<String>,
    pub message: String,
}

impl EventRecord {
    fn new(event: &ProxyEvent<'_>, at: UnixMillis) -> EventRecord {
        EventRecord {
            at,
            format: event.format,
            command: event.command,
            host: event.host.to_owned(),
            user_directory: event.user_directory.to_owned(),
            user_id: event.user_id.to_owned(),
            origin: event.origin.map(str::to_owned),
            context: event.context.map(str::to_owned),
            proxy_session_id: event.proxy_session_id.map(str::to_owned),
            message: event.message.to_owned(),
        }
    }
}

/// The running ingest threads.
pub struct Ingest {
    stop: Arc<AtomicBool>,
    receiver: JoinHandle<()>,
    applier: JoinHandle<()>,
}

impl Ingest {
    /// Starts both threads on `socket`. `events`, when given, receives one record per accepted
    /// event; when its queue is full the record is dropped and counted rather than slowing ingest.
    pub fn start(
        socket: UdpSocket,
        config: UdpConfig,
        state: Arc<State>,
        events: Option<mpsc::Sender<EventRecord>>,
    ) -> std::io::Result<Ingest> {
        let stop = Arc::new(AtomicBool::new(false));
        let spool = Arc::new(Spool::new(SPOOL_BYTES));
        let receiver = {
            let (spool, state, stop) = (spool.clone(), state.clone(), stop.clone());
            // One byte more than the cap, so an oversize datagram is seen as such.
            let slot = config.limits.max_datagram_bytes + 1;
            std::thread::Builder::new()
                .name("udp-receive".to_owned())
                .spawn(move || receive(socket, slot, &spool, &state, &stop))?
        };
        let applier = std::thread::Builder::new()
            .name("udp-apply".to_owned())
            .spawn(move || apply(&spool, &config, &state, events.as_ref()))?;
        Ok(Ingest {
            stop,
            receiver,
            applier,
        })
    }

    /// Stops receiving, applies what was received, and returns once both threads are done.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.receiver.join();
        let _ = self.applier.join();
        tracing::info!("UDP ingest stopped");
    }
}

fn receive(socket: UdpSocket, slot: usize, spool: &Spool, state: &State, stop: &AtomicBool) {
    let mut slots = socket::Slots::new(slot);
    let mut errors = RateLimiter::new(Duration::from_secs(10));
    while !stop.load(Ordering::Relaxed) {
        match socket::recv_batch(&socket, &mut slots) {
            Ok(0) => {}
            Ok(n) => {
                state.metrics.datagrams_received.inc_by(n as u64);
                spool.push(slots.datagrams());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // ICMP errors and the like surface here on some platforms; never fatal.
                if let Some(suppressed) = errors.allow("recv_error") {
                    tracing::warn!(error = %e, suppressed, "UDP receive error");
                }
            }
        }
    }
    // The applier takes what is left and sets the high-water gauge as it does after every take.
    spool.close();
}

fn apply(
    spool: &Spool,
    config: &UdpConfig,
    state: &State,
    events: Option<&mpsc::Sender<EventRecord>>,
) {
    let mut batch = Batch::default();
    let mut drop_log = RateLimiter::new(Duration::from_secs(10));
    // A sender whose appender writes another encoding is told once, with the fix.
    let mut encoding_log = OncePer::new(MAX_SENDERS_TOLD);
    let mut tally = Tally::default();
    loop {
        match spool.take(&mut batch, socket::SHUTDOWN_POLL) {
            Taken::Closed => break,
            Taken::Idle => continue,
            Taken::Datagrams => {}
        }
        state
            .metrics
            .ingest_spool_high_water_bytes
            .set(spool.high_water_bytes() as i64);
        let mut changed = None;
        for (i, (datagram, peer)) in batch.iter().enumerate() {
            let now = UnixMillis::now();
            match accept(datagram, peer, config, state, now, events, &mut tally) {
                Ok(change) => changed = merge(changed, change),
                Err(reason) => {
                    tally.dropped(reason);
                    if matches!(reason, Reject::InvalidEncoding | Reject::ReplacedCharacters)
                        && encoding_log.first(peer.ip())
                    {
                        let sample =
                            parser::clean(&datagram[..datagram.len().min(120)]).into_owned();
                        tracing::warn!(
                            reason = reason.as_str(),
                            %peer,
                            encoding = config.encoding.name(),
                            sample,
                            fix = r#"<param name="encoding" value="utf-8" /> in both appenders of LocalLogConfig.xml, then restart the proxy service (or set udp_encoding to the encoding the proxy sends)"#,
                            "a proxy sends names this service cannot read: its datagrams are dropped, not counted under a garbled name"
                        );
                    } else if let Some(suppressed) = drop_log.allow(reason.as_str()) {
                        let sample = String::from_utf8_lossy(&datagram[..datagram.len().min(120)])
                            .into_owned();
                        tracing::warn!(reason = reason.as_str(), %peer, len = datagram.len(), sample, suppressed, "dropped datagram");
                    }
                }
            }
            if (i + 1) % SIGNAL_EVERY == 0 {
                flush(state, &mut changed, &mut tally);
            }
        }
        flush(state, &mut changed, &mut tally);
    }
}

/// Whether anything changed, and whether membership did, over several events.
fn merge(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(x), Some(y)) => Some(x || y),
    }
}

fn flush(state: &State, changed: &mut Option<bool>, tally: &mut Tally) {
    if let Some(membership) = changed.take() {
        state.changed(membership);
    }
    state.metrics.add(tally);
}

/// Checks, parses and applies one datagram. `Ok` says what it changed (see
/// [`Outcome::changes_registry`]).
fn accept(
    datagram: &[u8],
    peer: SocketAddr,
    config: &UdpConfig,
    state: &State,
    now: UnixMillis,
    events: Option<&mpsc::Sender<EventRecord>>,
    tally: &mut Tally,
) -> Result<Option<bool>, Reject> {
    if !source_allowed(&config.allowed_sources, peer.ip()) {
        return Err(Reject::SourceNotAllowed);
    }
    let text = parser::decode_datagram(datagram, &config.limits, config.encoding)?;
    let event = parser::parse(&text, &config.limits)?;
    let outcome = state.registry().apply(&event, now);
    match outcome {
        Outcome::HostLimitReached => return Err(Reject::TooManyHosts),
        Outcome::SessionOfAnotherUser => return Err(Reject::SessionOfAnotherUser),
        Outcome::SessionLimitReached => return Err(Reject::TooManySessions),
        _ => {}
    }
    tally.event(event.format, event.command, outcome);
    if outcome != Outcome::Excluded
        && let Some(events) = events
        && events.try_send(EventRecord::new(&event, now)).is_err()
    {
        tally.mqtt_event_dropped();
    }
    Ok(outcome.changes_registry())
}

fn source_allowed(allowed: &[IpNet], ip: IpAddr) -> bool {
    // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    allowed.is_empty() || allowed.iter().any(|net| net.contains(&ip))
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
    fn changes_merge_towards_membership() {
        assert_eq!(merge(None, None), None);
        assert_eq!(merge(None, Some(false)), Some(false));
        assert_eq!(merge(Some(false), Some(true)), Some(true));
        assert_eq!(merge(Some(true), None), Some(true));
    }
}
