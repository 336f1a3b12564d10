//! session-monitor-operator: reconciles `SessionMonitor` resources into everything a
//! session-monitor service needs in Kubernetes.
//!
//! The reconcile is a pipeline of small modules: [`validate`] (spec → plan, pure) →
//! [`desired`] (plan → objects, pure) → [`reconcile`] (Secrets checked, objects applied with
//! server-side apply) → [`status`] (conditions, pure); [`usage`] reads a ready service's numbers
//! and [`autopilot`] grants its checkpoint more shards from them. [`run`] is the process around
//! it.

pub mod autopilot;
pub mod cli;
pub mod crd;
pub mod crdgen;
pub mod desired;
pub mod http;
pub mod metrics;
pub mod rbac;
pub mod reconcile;
pub mod run;
pub mod spec_settings;
pub mod status;
pub mod triggers;
pub mod usage;
pub mod validate;

#[cfg(test)]
mod testing;
