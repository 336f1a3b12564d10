//! The service's Prometheus metrics: one registry, one struct of typed handles.
//!
//! Label values are closed sets known at start (formats, commands, reasons) plus proxy host
//! names, so the per-event path uses pre-resolved handles and never hashes a label. No metric
//! carries a user label: cardinality stays bounded by the number of proxies.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::parser::{Command, Format, Reject};
use crate::registry::{Expired, HostSummary, Outcome};

/// Declares a closed label set: the enum, `ALL`, and each variant's label value.
macro_rules! label_set {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// Every label, for exporting each at 0 from the start (not every set needs it).
            #[allow(dead_code)]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }
        }
    };
}
pub(crate) use label_set;

const PREFIX: &str = "session_monitor";

pub struct Metrics {
    registry: Registry,
    pub active_users: IntGauge,
    pub active_sessions: IntGauge,
    host_active_users: IntGaugeVec,
    host_active_sessions: IntGaugeVec,
    host_last_event: IntGaugeVec,
    pub datagrams_received: IntCounter,
    /// Indexed like [`Reject::ALL`].
    dropped: Vec<IntCounter>,
    /// Indexed by format then command, like [`Format::ALL`] × [`Command::ALL`].
    events: Vec<IntCounter>,
    pub excluded_events: IntCounter,
    pub unknown_session_stops: IntCounter,
    pub unknown_session_closes: IntCounter,
    pub sessions_recovered: IntCounter,
    expired_idle: IntCounter,
    expired_max_idle: IntCounter,
    pub udp_receive_buffer_bytes: IntGauge,
    pub ingest_spool_high_water_bytes: IntGauge,
    pub udp_kernel_drops: IntCounter,
    pub udp_oversized_filter: IntGauge,
    /// The kernel's count as last read, so concurrent scrapes add each drop once.
    kernel_drops_seen: std::sync::atomic::AtomicU64,
    pub mqtt_connected: IntGauge,
    pub mqtt_connections: IntCounter,
    pub mqtt_connection_errors: IntCounter,
    mqtt_publishes: IntCounterVec,
    mqtt_publish_failures: IntCounterVec,
    pub mqtt_events_dropped: IntCounter,
    pub mqtt_list_render: Histogram,
    checkpoint_writes: IntCounterVec,
    pub checkpoint_duration: Histogram,
    pub checkpoint_size_bytes: IntGauge,
    pub checkpoint_sessions: IntGauge,
    checkpoint_restores: IntCounterVec,
    pub checkpoint_restored_sessions: IntGauge,
    pub checkpoint_sessions_stopped_during_restore: IntCounter,
    /// 1 while this process holds the checkpoint Lease (or needs none), 0 while it waits.
    pub checkpoint_writer: IntGauge,
    pub checkpoint_takeovers: IntCounter,
    pub checkpoint_conflicts: IntCounter,
    pub checkpoint_shards: IntGauge,
    pub checkpoint_shards_wanted: IntGauge,
    pub checkpoint_shards_max: IntGauge,
    /// Changes of the configuration file seen while running, by what came of them
    /// (`settings_reload::Outcome`).
    pub config_reloads: IntCounterVec,
    pub ready: IntGauge,
    pub qlik: QlikMetrics,
}

/// Reconciliation with the Qlik proxy API. Every series is labelled, so none shows while
/// reconciliation is off. `node` is a node's name as the API gives it; `host` the proxy's
/// logged name (the `host` of the other per-proxy metrics).
pub struct QlikMetrics {
    pub api_up: IntGaugeVec,
    pub request_duration: prometheus::HistogramVec,
    pub errors: IntCounterVec,
    pub sessions_added: IntCounterVec,
    pub sessions_removed: IntCounterVec,
    pub drift: IntGaugeVec,
    pub listed_sessions: IntGaugeVec,
    pub last_success: IntGaugeVec,
    pub reconciles: IntCounterVec,
    pub node_silent: IntGaugeVec,
    pub event_ids_match: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let gauge = |name: &str, help: &str| register(r, IntGauge::with_opts(opts(name, help)));
        let counter = |name: &str, help: &str| register(r, IntCounter::with_opts(opts(name, help)));
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(r, IntGaugeVec::new(opts(name, help), labels))
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(r, IntCounterVec::new(opts(name, help), labels))
        };

        let dropped = counter_vec(
            "datagrams_dropped_total",
            "UDP datagrams dropped, by reason.",
            &["reason"],
        );
        let events = counter_vec(
            "events_total",
            "Proxy events accepted, by wire format and command.",
            &["format", "command"],
        );
        let expired = counter_vec(
            "sessions_expired_total",
            "Sessions removed for silence, by rule (idle: no connection for idle_timeout; max_idle: any session after max_idle).",
            &["rule"],
        );
        let build_info = gauge_vec("build_info", "Build information; always 1.", &["version"]);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let metrics = Metrics {
            active_users: gauge(
                "active_users",
                "Distinct users with at least one active session.",
            ),
            active_sessions: gauge("active_sessions", "Active proxy sessions."),
            host_active_users: gauge_vec(
                "host_active_users",
                "Distinct users with at least one active session on a proxy host.",
                &["host"],
            ),
            host_active_sessions: gauge_vec(
                "host_active_sessions",
                "Active sessions on a proxy host.",
                &["host"],
            ),
            host_last_event: gauge_vec(
                "host_last_event_timestamp_seconds",
                "When a proxy host last sent an event that named a session (Unix time); a host with users whose last event grows old has a broken appender.",
                &["host"],
            ),
            datagrams_received: counter("datagrams_received_total", "UDP datagrams received."),
            dropped: Reject::ALL
                .iter()
                .map(|r| dropped.with_label_values(&[r.as_str()]))
                .collect(),
            events: Format::ALL
                .iter()
                .flat_map(|f| Command::ALL.iter().map(move |c| (f, c)))
                .map(|(f, c)| events.with_label_values(&[f.as_str(), c.as_str()]))
                .collect(),
            excluded_events: counter(
                "excluded_events_total",
                "Events of users matching an exclusion pattern (not counted as active).",
            ),
            unknown_session_stops: counter(
                "unknown_session_stops_total",
                "Stop events for sessions that were not active (no-ops).",
            ),
            unknown_session_closes: counter(
                "unknown_session_closes_total",
                "Connection closes for sessions that were not active (no-ops).",
            ),
            sessions_recovered: counter(
                "sessions_recovered_total",
                "Sessions first seen through a connection event rather than a start.",
            ),
            expired_idle: expired.with_label_values(&["idle"]),
            expired_max_idle: expired.with_label_values(&["max_idle"]),
            udp_receive_buffer_bytes: gauge(
                "udp_receive_buffer_bytes",
                "Receive buffer size the kernel granted the UDP socket.",
            ),
            ingest_spool_high_water_bytes: gauge(
                "ingest_spool_high_water_bytes",
                "The most received datagram bytes ever waiting between the socket and the registry (the spool holds 16 MiB).",
            ),
            udp_kernel_drops: counter(
                "udp_kernel_drops_total",
                "Datagrams the kernel dropped: the socket's receive buffer was full, or they were over udp_max_datagram_bytes (see udp_oversized_filter).",
            ),
            udp_oversized_filter: gauge(
                "udp_oversized_filter",
                "1 when the kernel drops datagrams over udp_max_datagram_bytes before they take receive buffer space (they count in udp_kernel_drops_total; one in 64 is let through to be counted as too_large and logged).",
            ),
            kernel_drops_seen: std::sync::atomic::AtomicU64::new(0),
            mqtt_connected: gauge("mqtt_connected", "1 while connected to the MQTT broker."),
            mqtt_connections: counter(
                "mqtt_connections_total",
                "Successful MQTT connections (the first and every reconnect).",
            ),
            mqtt_connection_errors: counter(
                "mqtt_connection_errors_total",
                "MQTT connection failures and losses.",
            ),
            mqtt_publishes: counter_vec(
                "mqtt_publishes_total",
                "MQTT messages handed to the client, by kind (state, status, event).",
                &["kind"],
            ),
            mqtt_publish_failures: counter_vec(
                "mqtt_publish_failures_total",
                "MQTT messages that could not be queued, by kind (retried for state).",
                &["kind"],
            ),
            mqtt_events_dropped: counter(
                "mqtt_events_dropped_total",
                "Event-topic messages dropped because the broker link was down or too slow.",
            ),
            mqtt_list_render: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        format!("{PREFIX}_mqtt_list_render_seconds"),
                        "Time to render the user list payload (off the publishing task; grows with the number of users).",
                    )
                    .buckets(vec![
                        0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                ),
            ),
            checkpoint_writes: counter_vec(
                "checkpoint_writes_total",
                "Checkpoint writes, by result.",
                &["result"],
            ),
            checkpoint_duration: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        format!("{PREFIX}_checkpoint_duration_seconds"),
                        "Time to encode and write a checkpoint.",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                ),
            ),
            checkpoint_size_bytes: gauge(
                "checkpoint_size_bytes",
                "Size of the last checkpoint written.",
            ),
            checkpoint_sessions: gauge(
                "checkpoint_sessions",
                "Sessions in the last checkpoint written: what a restart would restore.",
            ),
            checkpoint_restores: counter_vec(
                "checkpoint_restores_total",
                "Checkpoint restore attempts at start, by result (restored, empty, corrupt, failed: retried).",
                &["result"],
            ),
            checkpoint_restored_sessions: gauge(
                "checkpoint_restored_sessions",
                "Sessions restored from the checkpoint at start.",
            ),
            checkpoint_sessions_stopped_during_restore: counter(
                "checkpoint_sessions_stopped_during_restore_total",
                "Checkpointed sessions not restored at start because their stop arrived while the checkpoint loaded.",
            ),
            checkpoint_writer: gauge(
                "checkpoint_writer",
                "1 while this process writes the checkpoint and publishes (it holds the checkpoint Lease, or none is configured), 0 while it waits for the Lease (a rollout's new pod).",
            ),
            checkpoint_takeovers: counter(
                "checkpoint_takeovers_total",
                "Checkpoints taken over from the pod that held the checkpoint Lease before (a rollout's handover).",
            ),
            checkpoint_conflicts: counter(
                "checkpoint_conflicts_total",
                "Checkpoint writes that found the store changed by someone else (409), resolved by writing again.",
            ),
            checkpoint_shards_wanted: gauge(
                "checkpoint_shards_wanted",
                "The checkpoint_configmap_shards the last checkpoint's size calls for: the shards it occupies, plus those a quarter larger one needs beside it (0 for a file).",
            ),
            checkpoint_shards_max: gauge(
                "checkpoint_shards_max",
                "checkpoint_configmap_shards: the shard ConfigMaps the checkpoint may use (0 for a file).",
            ),
            config_reloads: {
                let reloads = counter_vec(
                    "config_reloads_total",
                    "Changes of the configuration file seen while running, by outcome: shards_raised (checkpoint_configmap_shards applied), restart_needed (other settings, applied at the next start), lowering_ignored, invalid.",
                    &["outcome"],
                );
                for &outcome in crate::settings_reload::Outcome::ALL {
                    reloads.with_label_values(&[outcome.label()]);
                }
                reloads
            },
            checkpoint_shards: gauge(
                "checkpoint_shards",
                "Shard ConfigMaps the committed checkpoint uses beside the main one (0 for a file).",
            ),
            qlik: QlikMetrics {
                api_up: gauge_vec(
                    "qlik_api_up",
                    "1 if the last request to this Qlik API (qrs: the repository, qps: a proxy node) succeeded.",
                    &["api", "node"],
                ),
                request_duration: register(
                    r,
                    prometheus::HistogramVec::new(
                        HistogramOpts::new(
                            format!("{PREFIX}_qlik_api_request_duration_seconds"),
                            "Duration of requests to the Qlik APIs, failed ones included.",
                        )
                        .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                        &["api"],
                    ),
                ),
                errors: counter_vec(
                    "qlik_api_errors_total",
                    "Failed requests to the Qlik APIs, by reason (resolve, connect, tls, timeout, forbidden, status, http, body).",
                    &["api", "node", "reason"],
                ),
                sessions_added: counter_vec(
                    "qlik_reconcile_sessions_added_total",
                    "Sessions the proxy API listed that the events had not shown (recovered by reconciliation).",
                    &["host"],
                ),
                sessions_removed: counter_vec(
                    "qlik_reconcile_sessions_removed_total",
                    "Sessions removed because the proxy API no longer listed them (their stop event was lost).",
                    &["host"],
                ),
                drift: gauge_vec(
                    "qlik_reconcile_drift_sessions",
                    "Sessions added plus removed by the last reconcile of a proxy: how far the events had drifted from the API.",
                    &["host"],
                ),
                listed_sessions: gauge_vec(
                    "qlik_api_sessions",
                    "Sessions the proxy API listed at the last reconcile, all virtual proxies together.",
                    &["host"],
                ),
                last_success: gauge_vec(
                    "qlik_reconcile_last_success_timestamp_seconds",
                    "When a proxy was last reconciled successfully (Unix time).",
                    &["host"],
                ),
                reconciles: counter_vec(
                    "qlik_reconciles_total",
                    "Reconcile rounds, by result (ok, partial: some proxies failed, failed: none reconciled).",
                    &["result"],
                ),
                node_silent: gauge_vec(
                    "qlik_node_silent",
                    "1 when the proxy API lists sessions on a node that has sent no event since the service started (its appender is not sending).",
                    &["host"],
                ),
                event_ids_match: gauge_vec(
                    "qlik_event_ids_match",
                    "1 once a node's event session ids have proven equal to its API's (sessions matched by id), 0 while they differ (the proxy logs a salted hash: matched by count).",
                    &["host"],
                ),
            },
            ready: gauge(
                "ready",
                "1 once the checkpoint is restored and the UDP socket bound.",
            ),
            registry,
        };
        // Every label of the closed sets from the start, so rates and alerts see zeros.
        for &kind in Publish::ALL {
            metrics.mqtt_publishes(kind);
            metrics.mqtt_publish_failures(kind);
        }
        for &result in CheckpointWrite::ALL {
            metrics.checkpoint_writes(result);
        }
        for &result in CheckpointRestore::ALL {
            metrics.checkpoint_restores(result);
        }
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        metrics
    }

    /// `mqtt_publishes_total{kind}`: messages handed to the client.
    pub fn mqtt_publishes(&self, kind: Publish) -> IntCounter {
        self.mqtt_publishes.with_label_values(&[kind.label()])
    }

    /// `mqtt_publish_failures_total{kind}`: messages the client could not queue.
    pub fn mqtt_publish_failures(&self, kind: Publish) -> IntCounter {
        self.mqtt_publish_failures
            .with_label_values(&[kind.label()])
    }

    /// `checkpoint_writes_total{result}`.
    pub fn checkpoint_writes(&self, result: CheckpointWrite) -> IntCounter {
        self.checkpoint_writes.with_label_values(&[result.label()])
    }

    /// `checkpoint_restores_total{result}`.
    pub fn checkpoint_restores(&self, result: CheckpointRestore) -> IntCounter {
        self.checkpoint_restores
            .with_label_values(&[result.label()])
    }

    /// Adds what `tally` counted and resets it.
    pub fn add(&self, tally: &mut Tally) {
        let t = std::mem::take(tally);
        let add = |counter: &IntCounter, n: u64| {
            if n > 0 {
                counter.inc_by(n);
            }
        };
        for (counter, n) in self.dropped.iter().zip(t.dropped) {
            add(counter, n);
        }
        for (counter, n) in self.events.iter().zip(t.events) {
            add(counter, n);
        }
        add(&self.excluded_events, t.excluded);
        add(&self.unknown_session_stops, t.unknown_stops);
        add(&self.unknown_session_closes, t.unknown_closes);
        add(&self.sessions_recovered, t.recovered);
        add(&self.mqtt_events_dropped, t.mqtt_events_dropped);
    }

    pub fn expired(&self, expired: Expired) {
        self.expired_idle.inc_by(expired.idle as u64);
        self.expired_max_idle.inc_by(expired.max_idle as u64);
    }

    /// Brings `udp_kernel_drops_total` up to the kernel's own count.
    pub fn set_kernel_drops(&self, kernel_count: u64) {
        let seen = self
            .kernel_drops_seen
            .fetch_max(kernel_count, std::sync::atomic::Ordering::AcqRel);
        if kernel_count > seen {
            self.udp_kernel_drops.inc_by(kernel_count - seen);
        }
    }

    /// Datagrams dropped for any reason so far.
    pub fn datagrams_dropped(&self) -> u64 {
        self.dropped.iter().map(IntCounter::get).sum()
    }

    /// Sets the gauges that mirror the registry's counts.
    pub fn set_counts(&self, users: usize, sessions: usize, hosts: &[HostSummary]) {
        self.active_users.set(users as i64);
        self.active_sessions.set(sessions as i64);
        for h in hosts {
            self.host_active_users
                .with_label_values(&[h.host.as_str()])
                .set(h.active_users as i64);
            self.host_active_sessions
                .with_label_values(&[h.host.as_str()])
                .set(h.active_sessions as i64);
            if let Some(at) = h.last_event {
                self.host_last_event
                    .with_label_values(&[h.host.as_str()])
                    .set((at.0 / 1000) as i64);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("exposition is UTF-8")
    }
}

/// Per-event counts kept by the ingest thread in plain integers and added to the metrics once
/// per chunk of datagrams ([`Metrics::add`]): a handful of shared atomic increments per datagram
/// would cost more than parsing it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Indexed like [`Reject::ALL`].
    dropped: [u64; Reject::ALL.len()],
    /// Indexed by format then command, like [`Format::ALL`] × [`Command::ALL`].
    events: [u64; Format::ALL.len() * Command::ALL.len()],
    excluded: u64,
    unknown_stops: u64,
    unknown_closes: u64,
    recovered: u64,
    mqtt_events_dropped: u64,
}

impl Tally {
    pub fn dropped(&mut self, reason: Reject) {
        self.dropped[reason as usize] += 1;
    }

    pub fn event(&mut self, format: Format, command: Command, outcome: Outcome) {
        self.events[format as usize * Command::ALL.len() + command as usize] += 1;
        match outcome {
            Outcome::Excluded => self.excluded += 1,
            Outcome::UnknownSessionStopped => self.unknown_stops += 1,
            Outcome::UnknownSessionClosed => self.unknown_closes += 1,
            Outcome::SessionRecovered => self.recovered += 1,
            Outcome::SessionStarted
            | Outcome::SessionRefreshed
            | Outcome::SessionStopped
            | Outcome::HostLimitReached
            | Outcome::SessionLimitReached
            | Outcome::SessionOfAnotherUser => {}
        }
    }

    pub fn mqtt_event_dropped(&mut self) {
        self.mqtt_events_dropped += 1;
    }
}

label_set! {
    /// `kind` of `mqtt_publishes_total` and `mqtt_publish_failures_total`.
    Publish { State => "state", Status => "status", Event => "event" }
}

label_set! {
    /// `result` of `checkpoint_writes_total`.
    CheckpointWrite { Success => "success", Failure => "failure" }
}

label_set! {
    /// `result` of `checkpoint_restores_total`; `Failed` is a transient error, retried.
    CheckpointRestore {
        Restored => "restored",
        Empty => "empty",
        Corrupt => "corrupt",
        Failed => "failed",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("{PREFIX}_{name}"), help)
}

fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("metric definitions are static and valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric registers once");
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_of_a_closed_set_is_exported_from_the_start() {
        let text = Metrics::new().render();
        let mut expected = Vec::new();
        for &kind in Publish::ALL {
            let label = kind.label();
            expected.push(format!(
                "session_monitor_mqtt_publishes_total{{kind=\"{label}\"}} 0"
            ));
            expected.push(format!(
                "session_monitor_mqtt_publish_failures_total{{kind=\"{label}\"}} 0"
            ));
        }
        for &result in CheckpointWrite::ALL {
            let label = result.label();
            expected.push(format!(
                "session_monitor_checkpoint_writes_total{{result=\"{label}\"}} 0"
            ));
        }
        for &result in CheckpointRestore::ALL {
            let label = result.label();
            expected.push(format!(
                "session_monitor_checkpoint_restores_total{{result=\"{label}\"}} 0"
            ));
        }
        for &outcome in crate::settings_reload::Outcome::ALL {
            let label = outcome.label();
            expected.push(format!(
                "session_monitor_config_reloads_total{{outcome=\"{label}\"}} 0"
            ));
        }
        let missing: Vec<&String> = expected
            .iter()
            .filter(|e| !text.contains(e.as_str()))
            .collect();
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(expected.len(), 3 * 2 + 2 + 4 + 4);
    }

    #[test]
    fn tally_indexes_follow_the_all_lists() {
        // Tally indexes by discriminant; the metric handles are built from the ALL lists.
        assert!(
            Reject::ALL
                .iter()
                .enumerate()
                .all(|(i, r)| *r as usize == i)
        );
        assert!(
            Format::ALL
                .iter()
                .enumerate()
                .all(|(i, f)| *f as usize == i)
        );
        assert!(
            Command::ALL
                .iter()
                .enumerate()
                .all(|(i, c)| *c as usize == i)
        );
    }

    #[test]
    fn exposition_names_follow_conventions() {
        let m = Metrics::new();
        let mut tally = Tally::default();
        tally.dropped(Reject::UnknownPrefix);
        tally.event(
            Format::Butler,
            Command::StartSession,
            Outcome::SessionStarted,
        );
        m.add(&mut tally);
        assert_eq!(tally, Tally::default(), "added and reset");
        let text = m.render();
        assert!(
            text.contains("session_monitor_datagrams_dropped_total{reason=\"unknown_prefix\"} 1")
        );
        assert!(text.contains(
            "session_monitor_events_total{command=\"start_session\",format=\"butler\"} 1"
        ));
        assert!(text.contains("session_monitor_build_info{version="));
        for line in text
            .lines()
            .filter(|l| l.starts_with("# TYPE") && l.ends_with("counter"))
        {
            let name = line.split(' ').nth(2).unwrap();
            assert!(name.ends_with("_total"), "counter {name} lacks _total");
        }
    }
}
