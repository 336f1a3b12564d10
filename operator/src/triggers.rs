//! What starts a reconcile of a SessionMonitor: a change of what the reconcile reads from it.
//!
//! The status is the reconcile's own output, and it carries the service's live numbers (users,
//! sessions, the last event's time), which differ at almost every read on a busy site. Left
//! unfiltered, each status write would start the next reconcile at once, which reads the
//! numbers again and writes them again: a reconcile loop (a dozen API requests and a `/metrics`
//! read each) in place of one every 30 seconds. So only the spec (its `metadata.generation`),
//! the labels and the annotations start one; owned objects and the requeue timers still do, as
//! before. An annotation is how a person asks for a reconcile without changing the spec.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use kube::ResourceExt;

use crate::crd::SessionMonitor;

/// A hash of what a reconcile acts on, for kube-runtime's `predicate_filter`: the monitor passes
/// to the controller only when it differs from the last one seen for the same object (uid).
pub fn reconcile_inputs(monitor: &SessionMonitor) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    monitor.metadata.generation.hash(&mut hasher);
    monitor.labels().hash(&mut hasher);
    monitor.annotations().hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SessionMonitorStatus;
    use crate::testing;

    #[test]
    fn the_status_alone_starts_no_reconcile_and_the_spec_labels_and_annotations_do() {
        let monitor = testing::example();
        let inputs = reconcile_inputs(&monitor);

        let mut numbers = monitor.clone();
        numbers.status = Some(SessionMonitorStatus {
            active_users: Some(42),
            active_sessions: Some(57),
            ..SessionMonitorStatus::default()
        });
        numbers.metadata.resource_version = Some("101".into());
        assert_eq!(reconcile_inputs(&numbers), inputs, "a status write");

        let mut spec = monitor.clone();
        spec.metadata.generation = Some(2);
        let mut labelled = monitor.clone();
        labelled.labels_mut().insert("team".into(), "bi".into());
        let mut annotated = monitor.clone();
        annotated
            .annotations_mut()
            .insert("example.com/touched".into(), "1".into());
        for (what, changed) in [
            ("a spec change", spec),
            ("a label", labelled),
            ("an annotation", annotated),
        ] {
            assert_ne!(reconcile_inputs(&changed), inputs, "{what}");
        }
    }
}
