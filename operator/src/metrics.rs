//! The operator's own Prometheus metrics, prefixed `session_monitor_operator_`.

use std::sync::Mutex;

use kube::runtime::reflector::Store;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::crd::SessionMonitor;
use crate::status::{DEGRADED, PROGRESSING, READY};

pub struct Metrics {
    pub registry: Registry,
    /// `result`: `Reconciled`, `InvalidSpec`, `MissingSecret`, `ApplyFailed`, `ApiError`.
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// Reads of a ready service's `/metrics` for the status, by [`UsageRead`].
    usage_reads: IntCounterVec,
    /// The shard autopilot's grants, `decision`: `raised`, `raised_to_maximum`, `at_maximum`.
    pub checkpoint_autopilot: IntCounterVec,
    /// Monitors by condition and status, e.g. `{condition="Ready",status="True"}`.
    monitors: IntGaugeVec,
    pub leader: IntGauge,
    pub ready: IntGauge,
    /// The controllers' caches of SessionMonitors, which `monitors` is counted from.
    stores: Mutex<Vec<Store<SessionMonitor>>>,
}

/// `result` of `session_monitor_operator_usage_reads_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageRead {
    Ok,
    /// The operator cannot reach the monitor's HTTP Service (e.g. a NetworkPolicy).
    Failed,
}

impl UsageRead {
    pub fn label(self) -> &'static str {
        match self {
            UsageRead::Ok => "ok",
            UsageRead::Failed => "failed",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "session_monitor_operator_reconciles_total",
                "Reconciles of SessionMonitors by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "session_monitor_operator_reconcile_duration_seconds",
                "Time a reconcile took, API calls included",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        let usage_reads = IntCounterVec::new(
            Opts::new(
                "session_monitor_operator_usage_reads_total",
                "Reads of a ready service's /metrics for its status (users, sessions), by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        for result in [UsageRead::Ok, UsageRead::Failed] {
            usage_reads.with_label_values(&[result.label()]);
        }
        let checkpoint_autopilot = IntCounterVec::new(
            Opts::new(
                "session_monitor_operator_checkpoint_autopilot_total",
                "Checkpoint shard grants raised by the autopilot (raised, raised_to_maximum), and \
                 needs it could not meet (at_maximum: spec.checkpoint.maxShards reached)",
            ),
            &["decision"],
        )
        .expect("valid metric");
        for label in crate::autopilot::Label::ALL {
            checkpoint_autopilot.with_label_values(&[label.as_str()]);
        }
        let monitors = IntGaugeVec::new(
            Opts::new(
                "session_monitor_operator_monitors",
                "SessionMonitors by condition and status",
            ),
            &["condition", "status"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "session_monitor_operator_leader",
            "1 while this replica holds the leader Lease and reconciles",
        )
        .expect("valid metric");
        let ready = IntGauge::new(
            "session_monitor_operator_ready",
            "1 once the operator reached the API server and found the CRD",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("session_monitor_operator_build_info", "Build information"),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for metric in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_duration.clone()),
            Box::new(usage_reads.clone()),
            Box::new(checkpoint_autopilot.clone()),
            Box::new(monitors.clone()),
            Box::new(leader.clone()),
            Box::new(ready.clone()),
            Box::new(build_info),
        ] {
            registry.register(metric).expect("unique metric");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Metrics {
            registry,
            reconciles,
            reconcile_duration,
            usage_reads,
            checkpoint_autopilot,
            monitors,
            leader,
            ready,
            stores: Mutex::default(),
        }
    }

    /// `session_monitor_operator_usage_reads_total{result}`.
    pub fn usage_reads(&self, result: UsageRead) -> prometheus::IntCounter {
        self.usage_reads.with_label_values(&[result.label()])
    }

    /// Counts the monitors of `store` (a controller's cache) in `monitors` at every scrape, so
    /// the gauge follows the cluster, deletions included (a deleted monitor is never
    /// reconciled: its children go by garbage collection).
    pub fn count_monitors_of(&self, store: Store<SessionMonitor>) {
        self.stores.lock().expect("metrics lock").push(store);
    }

    fn count_monitors(&self) {
        self.monitors.reset();
        // Every combination is exported, zeros included, so alerts on e.g.
        // `{condition="Degraded",status="True"} > 0` have a series to evaluate.
        for condition in [READY, PROGRESSING, DEGRADED] {
            for value in ["True", "False"] {
                self.monitors.with_label_values(&[condition, value]).set(0);
            }
        }
        for store in self.stores.lock().expect("metrics lock").iter() {
            for monitor in store.state() {
                for c in monitor.status.iter().flat_map(|s| &s.conditions) {
                    self.monitors
                        .with_label_values(&[c.type_.as_str(), c.status.as_str()])
                        .inc();
                }
            }
        }
    }

    pub fn render(&self) -> String {
        self.count_monitors();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("text exposition is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::crd::SessionMonitorStatus;
    use crate::testing;

    fn with_ready(name: &str, ready: &str) -> SessionMonitor {
        let mut m = testing::minimal();
        m.metadata.name = Some(name.into());
        m.status = Some(SessionMonitorStatus {
            conditions: vec![Condition {
                type_: READY.into(),
                status: ready.into(),
                reason: "R".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            }],
            ..SessionMonitorStatus::default()
        });
        m
    }

    fn sample(metrics: &Metrics, condition: &str, status: &str) -> String {
        let text = metrics.render();
        let prefix = format!(
            "session_monitor_operator_monitors{{condition=\"{condition}\",status=\"{status}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .to_owned()
    }

    #[test]
    fn monitors_are_counted_from_the_cache_so_deleted_ones_disappear() {
        let metrics = Metrics::new();
        let (store, mut writer) = kube::runtime::reflector::store();
        metrics.count_monitors_of(store);
        let (a, b) = (with_ready("a", "True"), with_ready("b", "False"));
        writer.apply_watcher_event(&Event::Apply(a.clone()));
        writer.apply_watcher_event(&Event::Apply(b));
        assert_eq!(sample(&metrics, READY, "True"), "1");
        assert_eq!(sample(&metrics, READY, "False"), "1");
        assert_eq!(sample(&metrics, DEGRADED, "True"), "0");
        writer.apply_watcher_event(&Event::Delete(a));
        assert_eq!(sample(&metrics, READY, "True"), "0");
        assert_eq!(sample(&metrics, READY, "False"), "1");
    }
}
