//! Fixtures for the unit tests: monitors as the API server would hand them to the reconciler.

use serde_json::{Value, json};

use crate::crd::SessionMonitor;

pub const NAMESPACE: &str = "qlik";
pub const NAME: &str = "qlik-prod";
pub const UID: &str = "5f1c3a2e-0000-4000-8000-000000000001";

/// A monitor with `spec` (JSON as a user writes it), named [`NAME`] in [`NAMESPACE`].
pub fn monitor(spec: Value) -> SessionMonitor {
    serde_json::from_value(json!({
        "apiVersion": "sessionmonitor.io/v1alpha1",
        "kind": "SessionMonitor",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": UID,
            "generation": 3,
            "resourceVersion": "100",
        },
        "spec": spec,
    }))
    .expect("a valid SessionMonitor")
}

/// The smallest valid spec.
pub fn minimal() -> SessionMonitor {
    monitor(json!({"mqtt": {"url": "mqtt://broker.mqtt.svc:1883"}}))
}

/// The SessionMonitor of `examples/sessionmonitor.yaml` (the README's example).
pub fn example() -> SessionMonitor {
    from_example(include_str!("../../examples/sessionmonitor.yaml"))
}

/// The SessionMonitor of `examples/sessionmonitor-qlik.yaml` (with `spec.qlik`).
pub fn qlik_example() -> SessionMonitor {
    from_example(include_str!("../../examples/sessionmonitor-qlik.yaml"))
}

fn from_example(text: &str) -> SessionMonitor {
    let document = text
        .split("\n---\n")
        .find(|d| d.contains("kind: SessionMonitor"))
        .expect("the example has a SessionMonitor");
    let mut monitor: SessionMonitor = serde_saphyr::from_str(document).expect("the example parses");
    monitor.metadata.uid = Some(UID.into());
    monitor.metadata.generation = Some(1);
    monitor
}
