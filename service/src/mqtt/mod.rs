//! Publishing to MQTT: retained state topics, the status topic with its Last Will, and the
//! optional event topics.
//!
//! Two tasks. The *link* task polls rumqttc's event loop forever (rumqttc only makes progress
//! while polled), reconnecting with exponential backoff and announcing each new connection. The
//! *publisher* task turns registry changes into publishes as [`schedule`] decides: the counts
//! within `count_publish_interval`, the user list within `publish_interval` (rendered on a
//! blocking thread, so a large list never delays a count), only topics whose payload changed,
//! and all of them after every (re)connect, since a clean session loses whatever was in flight.
//! Nothing is queued while the link is down: there is no backlog of stale states to drain after
//! an outage.

mod schedule;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use schedule::{Class, Retained, Schedule};

use crate::config::{MqttBroker, MqttConfig, MqttTls, Topics, UserListFormat};
use crate::ingest::EventRecord;
use crate::metrics::Publish;
use crate::parser::Command;
use crate::ratelimit::RateLimiter;
use crate::registry::ShardedRegistry;
use crate::shutdown::Stop;
use crate::state::State;

pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";
/// The MQTT maximum; the user list of a large site is far above rumqttc's 10 KiB default.
const MAX_OUTGOING_PACKET: usize = 268_435_455;
const MAX_INCOMING_PACKET: usize = 1024 * 1024;
/// Requests rumqttc may buffer between us and the socket; state publishes are a handful per
/// interval, the rest is room for event-topic bursts.
const REQUEST_CAPACITY: usize = 4096;
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("invalid TLS material: {0}")]
    Tls(String),
}

/// The count messages for the registry as it is: `(topic, payload)`, the user count first,
/// then one per proxy host. O(shards + hosts).
pub fn render_counts(registry: &ShardedRegistry, topics: &Topics) -> Vec<(String, String)> {
    let mut messages = vec![(
        topics.user_count.clone(),
        registry.active_users().to_string(),
    )];
    messages.extend(registry.hosts().into_iter().map(|h| {
        (
            format!("{}/{}/count", topics.host_prefix, topic_level(&h.host)),
            h.active_users.to_string(),
        )
    }));
    messages
}

/// The count messages plus, when its topic is set, today's peak (which can change only when a
/// count does).
fn with_peak_today(
    mut messages: Vec<(String, String)>,
    state: &State,
    topics: &Topics,
) -> Vec<(String, String)> {
    if let Some(topic) = &topics.peak_today {
        // Not yet in the history: the highest count since its last sample.
        let current = state.registry().peak();
        let payload = crate::history::today_payload(
            &state.history(),
            crate::registry::UnixMillis::now(),
            current,
        );
        messages.push((topic.clone(), payload));
    }
    messages
}

/// The user list payload. Proportional to the registry: each shard is locked only to copy its
/// names, the sort and the JSON happen outside the locks.
pub fn render_list(registry: &ShardedRegistry, format: UserListFormat) -> String {
    let names = match format {
        UserListFormat::DirectoryAndId => registry.user_names(),
        UserListFormat::UserId => registry.user_ids(),
    };
    serde_json::to_string(&names).expect("strings serialize")
}

/// Every retained state message: the count, the list, then the per-host counts.
pub fn render_state(
    registry: &ShardedRegistry,
    topics: &Topics,
    format: UserListFormat,
) -> Vec<(String, String)> {
    let mut messages = render_counts(registry, topics);
    messages.insert(1, (topics.user_list.clone(), render_list(registry, format)));
    messages
}

/// A host name as one topic level: the characters MQTT gives meaning to become `_`.
fn topic_level(name: &str) -> String {
    name.replace(['/', '+', '#'], "_")
}

/// The JSON object published on an event topic.
pub fn event_payload(event: &EventRecord) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(event.at.0);
    serde_json::json!({
        "timestamp": humantime::format_rfc3339_millis(time).to_string(),
        "command": event.command.wire_name(),
        "host": event.host,
        "user": format!("{}\\{}", event.user_directory, event.user_id),
        "user_directory": event.user_directory,
        "user_id": event.user_id,
        "origin": event.origin,
        "context": event.context,
        "proxy_session_id": event.proxy_session_id,
        "message": event.message,
        "format": event.format.as_str(),
    })
    .to_string()
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// rumqttc options from the configuration; reads TLS files, so bad paths fail start-up.
pub fn options(config: &MqttConfig) -> Result<MqttOptions, SetupError> {
    let (host, port, tls) = match &config.broker {
        MqttBroker::Embedded { listen } => {
            let host = if listen.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                listen.ip().to_string()
            };
            (host, listen.port(), None)
        }
        MqttBroker::External { host, port, tls } => (host.clone(), *port, tls.as_ref()),
    };
    let mut options = MqttOptions::new(config.client_id.clone(), host, port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_last_will(LastWill::new(
            &config.topics.status,
            OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(credentials) = &config.credentials {
        options.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    if let Some(tls) = tls {
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(tls)?)),
        ));
    }
    Ok(options)
}

fn tls_config(tls: &MqttTls) -> Result<rustls::ClientConfig, SetupError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    fn read_error(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl Fn(rustls_pki_types::pem::Error) -> SetupError {
        let path = path.display().to_string();
        move |e| SetupError::File {
            what,
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).map_err(read_error("CA file", path))? {
                roots
                    .add(cert.map_err(read_error("CA file", path))?)
                    .map_err(|e| SetupError::Tls(format!("CA file {}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SetupError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    match &tls.client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_path, key_path)) => {
            let certs = CertificateDer::pem_file_iter(cert_path)
                .map_err(read_error("client certificate", cert_path))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read_error("client certificate", cert_path))?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(read_error("client key", key_path))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| SetupError::Tls(format!("client certificate/key: {e}")))
        }
    }
}

/// The link as the publisher sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Link {
    connected: bool,
    /// Counts connections, so the publisher notices a reconnect even if it missed the drop.
    generation: u64,
}

/// Runs both tasks until `stop`; then publishes the last state and `offline`, and disconnects
/// cleanly.
pub async fn run(
    config: MqttConfig,
    options: MqttOptions,
    state: Arc<State>,
    events: Option<mpsc::Receiver<EventRecord>>,
    stop: Stop,
) {
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let (link_tx, link_rx) = watch::channel(Link::default());
    let link = tokio::spawn(drive_link(eventloop, state.clone(), link_tx, stop.clone()));
    let mut retained = publish_loop(&config, &client, &state, link_rx.clone(), events, stop).await;

    if link_rx.borrow().connected {
        // The last changes before the stop, then `offline`.
        publish_final(&config, &client, &state, &mut retained).await;
        // A clean DISCONNECT does not fire the Last Will, so say it ourselves first.
        let _ = client.try_publish(&config.topics.status, QoS::AtLeastOnce, true, OFFLINE);
        let _ = client.try_disconnect();
    }
    // Give the link a moment to flush `offline` and DISCONNECT; it stops at either.
    if tokio::time::timeout(Duration::from_secs(3), link)
        .await
        .is_err()
    {
        tracing::warn!("MQTT link did not close within 3 s");
    }
}

async fn drive_link(
    mut eventloop: EventLoop,
    state: Arc<State>,
    link: watch::Sender<Link>,
    mut stop: Stop,
) {
    let metrics = &state.metrics;
    let mut backoff = MIN_BACKOFF;
    let mut errors = RateLimiter::new(Duration::from_secs(30));
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = MIN_BACKOFF;
                metrics.mqtt_connected.set(1);
                metrics.mqtt_connections.inc();
                link.send_modify(|l| {
                    l.connected = true;
                    l.generation += 1;
                });
                tracing::info!(broker = %broker_name(&eventloop), "MQTT connected");
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(error) => {
                let was_connected = link.borrow().connected;
                metrics.mqtt_connected.set(0);
                metrics.mqtt_connection_errors.inc();
                link.send_modify(|l| l.connected = false);
                if stop.is_requested() {
                    break;
                }
                if was_connected {
                    tracing::warn!(%error, "MQTT connection lost; reconnecting");
                } else if let Some(suppressed) = errors.allow(error_kind(&error)) {
                    tracing::warn!(%error, broker = %broker_name(&eventloop), retry_in_ms = backoff.as_millis() as u64, suppressed, "MQTT connection failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.requested() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    metrics.mqtt_connected.set(0);
}

fn broker_name(eventloop: &EventLoop) -> String {
    let (host, port) = eventloop.mqtt_options.broker_address();
    format!("{host}:{port}")
}

fn error_kind(error: &ConnectionError) -> &'static str {
    match error {
        ConnectionError::ConnectionRefused(_) => "refused",
        ConnectionError::Io(_) => "io",
        ConnectionError::Tls(_) => "tls",
        _ => "other",
    }
}

async fn publish_loop(
    config: &MqttConfig,
    client: &AsyncClient,
    state: &Arc<State>,
    mut link_rx: watch::Receiver<Link>,
    mut events: Option<mpsc::Receiver<EventRecord>>,
    mut stop: Stop,
) -> Retained {
    let metrics = &state.metrics;
    let mut membership = state.subscribe_membership();
    let mut schedule = Schedule::new(
        config.count_publish_interval,
        config.publish_interval,
        std::time::Instant::now(),
    );
    let mut retained = Retained::default();
    let mut link = Link::default();
    let mut list_render: Option<JoinHandle<String>> = None;
    loop {
        let wake = schedule.wake_at().map(Instant::from_std);
        tokio::select! {
            biased;
            _ = stop.requested() => break,
            Ok(()) = link_rx.changed() => {
                let now = *link_rx.borrow_and_update();
                if now.connected && now.generation != link.generation {
                    // New connection: the broker may have lost anything in flight, so announce
                    // ourselves and republish everything at once.
                    retained.forget();
                    schedule.connected(std::time::Instant::now());
                    match client.try_publish(&config.topics.status, QoS::AtLeastOnce, true, ONLINE) {
                        Ok(()) => metrics.mqtt_publishes(Publish::Status).inc(),
                        Err(_) => metrics.mqtt_publish_failures(Publish::Status).inc(),
                    }
                } else if !now.connected {
                    schedule.disconnected();
                }
                link = now;
            }
            Ok(()) = membership.changed() => {
                membership.borrow_and_update();
                schedule.changed();
            }
            Some(list) = finished(&mut list_render) => {
                let complete = list.is_some_and(|list| {
                    publish(config, client, metrics, &mut retained, [(config.topics.user_list.clone(), list)])
                });
                schedule.published(Class::List, std::time::Instant::now(), complete);
            }
            _ = sleep_until(wake), if wake.is_some() => {}
            Some(event) = recv_event(&mut events) => {
                let Some(topic) = event_topic(&config.topics, event.command) else { continue };
                if !link.connected || client.try_publish(topic, qos(config.qos), false, event_payload(&event)).is_err() {
                    metrics.mqtt_events_dropped.inc();
                } else {
                    metrics.mqtt_publishes(Publish::Event).inc();
                }
            }
        }
        let now = std::time::Instant::now();
        if schedule.take(Class::Counts, now) {
            let messages = with_peak_today(
                render_counts(state.registry(), &config.topics),
                state,
                &config.topics,
            );
            let complete = publish(config, client, metrics, &mut retained, messages);
            schedule.published(Class::Counts, std::time::Instant::now(), complete);
        }
        if schedule.take(Class::List, now) {
            // Off the loop: at a million users the list takes a while, and counts must not wait.
            let (state, format) = (state.clone(), config.user_list_format);
            list_render = Some(tokio::task::spawn_blocking(move || {
                let timer = state.metrics.mqtt_list_render.start_timer();
                let list = render_list(state.registry(), format);
                timer.observe_duration();
                list
            }));
        }
    }
    if let Some(render) = list_render {
        render.abort();
    }
    retained
}

/// The last state before a stop: counts and the list, rendered now.
async fn publish_final(
    config: &MqttConfig,
    client: &AsyncClient,
    state: &Arc<State>,
    retained: &mut Retained,
) {
    let mut messages = with_peak_today(
        render_counts(state.registry(), &config.topics),
        state,
        &config.topics,
    );
    let (registry_state, format) = (state.clone(), config.user_list_format);
    if let Ok(list) =
        tokio::task::spawn_blocking(move || render_list(registry_state.registry(), format)).await
    {
        messages.push((config.topics.user_list.clone(), list));
    }
    publish(config, client, &state.metrics, retained, messages);
}

/// The list render under way, once it is done: `Some(None)` if it failed (a panic), so that the
/// schedule counts the publish as incomplete and tries again rather than waiting on it forever.
async fn finished(render: &mut Option<JoinHandle<String>>) -> Option<Option<String>> {
    let handle = render.as_mut()?;
    let result = handle.await;
    *render = None;
    Some(result.ok())
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Queues every message whose payload differs from what the broker holds. Returns false if
/// some could not be queued (they are retried after the interval).
fn publish(
    config: &MqttConfig,
    client: &AsyncClient,
    metrics: &crate::metrics::Metrics,
    retained: &mut Retained,
    messages: impl IntoIterator<Item = (String, String)>,
) -> bool {
    let mut all_queued = true;
    for (topic, payload) in messages {
        if !retained.differs(&topic, &payload) {
            continue;
        }
        match client.try_publish(&topic, qos(config.qos), config.retain, payload.clone()) {
            Ok(()) => {
                metrics.mqtt_publishes(Publish::State).inc();
                retained.sent(topic, payload);
            }
            Err(error) => {
                // Queue full (broker slow, or the link just dropped): retried next interval.
                metrics.mqtt_publish_failures(Publish::State).inc();
                tracing::debug!(%error, topic, "state publish not queued; will retry");
                all_queued = false;
            }
        }
    }
    all_queued
}

async fn recv_event(events: &mut Option<mpsc::Receiver<EventRecord>>) -> Option<EventRecord> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn event_topic(topics: &Topics, command: Command) -> Option<&str> {
    match command {
        Command::StartSession => topics.session_start.as_deref(),
        Command::StopSession => topics.session_stop.as_deref(),
        Command::OpenConnection => topics.connection_open.as_deref(),
        Command::CloseConnection => topics.connection_close.as_deref(),
    }
}

/// Whether any event topic is configured (otherwise events are not even serialized).
pub fn wants_events(topics: &Topics) -> bool {
    Command::ALL
        .into_iter()
        .any(|c| event_topic(topics, c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Settings};
    use crate::exclusions::Exclusions;
    use crate::parser::{Format, ProxyEvent};
    use crate::registry::{ExpiryPolicy, UnixMillis};

    fn topics() -> Topics {
        Config::from_settings(Settings::default(), None)
            .unwrap()
            .mqtt
            .topics
    }

    fn event<'a>(command: Command, host: &'a str, user: &'a str) -> ProxyEvent<'a> {
        ProxyEvent {
            format: Format::Butler,
            host,
            command,
            user_directory: "LAB",
            user_id: user,
            origin: None,
            context: Some("/hub/"),
            proxy_session_id: None,
            message: "Start session for user",
        }
    }

    #[test]
    fn state_payloads_are_butler_compatible() {
        let r = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 10, 4);
        let now = UnixMillis(1);
        r.apply(&event(Command::StartSession, "qs1", "zoe"), now);
        r.apply(&event(Command::StartSession, "qs1", "Adam"), now);
        r.apply(&event(Command::StartSession, "qs/2", "zoe"), now);
        let messages = render_state(&r, &topics(), UserListFormat::DirectoryAndId);
        assert_eq!(
            messages,
            vec![
                ("qliksense/users/active/count".into(), "2".into()),
                (
                    "qliksense/users/active/usernames".into(),
                    r#"["LAB\\Adam","LAB\\zoe"]"#.into()
                ),
                // Hosts sorted by name: "qs/2" < "qs1".
                (
                    "qliksense/users/activeperserver/qs_2/count".into(),
                    "1".into()
                ),
                (
                    "qliksense/users/activeperserver/qs1/count".into(),
                    "2".into()
                ),
            ]
        );
        let ids = render_state(&r, &topics(), UserListFormat::UserId);
        assert_eq!(ids[1].1, r#"["Adam","zoe"]"#);
    }

    #[test]
    fn event_payload_is_one_json_object() {
        let payload = event_payload(&EventRecord {
            at: UnixMillis(1_700_000_000_123),
            format: Format::Butler,
            command: Command::StopSession,
            host: "qs1".into(),
            user_directory: "LAB".into(),
            user_id: "joe".into(),
            origin: None,
            context: Some("/hub/".into()),
            proxy_session_id: None,
            message: "Stop session for user".into(),
        });
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(v["command"], "Stop session");
        assert_eq!(v["user"], "LAB\\joe");
        assert_eq!(v["origin"], serde_json::Value::Null);
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn a_missing_ca_file_fails_setup() {
        let tls = MqttTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            client_auth: None,
        };
        let err = tls_config(&tls).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
