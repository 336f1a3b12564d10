//! Test harness shared by the workspace's tests.
//!
//! - [`cluster`]: how the opt-in tests against a real kube-apiserver or cluster
//!   (`tests/tests/configmap_cluster.rs`, `tests/tests/real_cluster.rs`,
//!   `operator/tests/cluster.rs`) reach it, isolate themselves in namespaces and clean up after
//!   themselves; what they assert, and the objects of their own domain (checkpoints, CRDs,
//!   SessionMonitors, Events), stay in the tests.
//! - [`qlik`]: a fake Qlik Sense site (the repository and proxy APIs, mutual TLS, the Xrfkey
//!   check), faithful to Qlik's documented behaviour, for the reconciliation tests and
//!   `session-monitor-simulate`.

pub mod cluster;
pub mod qlik;
