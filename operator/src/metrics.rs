//! The operator's own Prometheus metrics, prefixed `session_monitor_operator_`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::crd::SessionMonitorStatus;
use crate::status::{DEGRADED, PROGRESSING, READY};

pub struct Metrics {
    pub registry: Registry,
    /// `result`: `Reconciled`, `InvalidSpec`, `MissingSecret`, `ApplyFailed`, `ApiError`.
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// Monitors by condition and status, e.g. `{condition="Ready",status="True"}`.
    monitors: IntGaugeVec,
    pub leader: IntGauge,
    pub ready: IntGauge,
    /// The last known conditions per monitor (`namespace/name`), to recount `monitors`.
    conditions: Mutex<BTreeMap<String, Vec<(String, String)>>>,
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
            monitors,
            leader,
            ready,
            conditions: Mutex::default(),
        }
    }

    /// Records a monitor's conditions (`None`: it was deleted) and recounts the gauge.
    pub fn set_conditions(&self, key: &str, status: Option<&SessionMonitorStatus>) {
        let mut all = self.conditions.lock().expect("metrics lock");
        match status {
            Some(status) => {
                all.insert(
                    key.to_owned(),
                    status
                        .conditions
                        .iter()
                        .map(|c| (c.type_.clone(), c.status.clone()))
                        .collect(),
                );
            }
            None => {
                all.remove(key);
            }
        }
        self.monitors.reset();
        // Every combination is exported, zeros included, so alerts on e.g.
        // `{condition="Degraded",status="True"} > 0` have a series to evaluate.
        for condition in [READY, PROGRESSING, DEGRADED] {
            for value in ["True", "False"] {
                self.monitors.with_label_values(&[condition, value]).set(0);
            }
        }
        for (condition, value) in all.values().flatten() {
            self.monitors
                .with_label_values(&[condition.as_str(), value.as_str()])
                .inc();
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("text exposition is UTF-8")
    }
}
