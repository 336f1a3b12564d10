//! Test harness shared by the workspace's tests and benchmarks.
//!
//! - [`poll`], [`http`], [`metrics`], [`mosquitto`], [`process`], [`certs`]: waiting with a
//!   deadline, a plain HTTP GET and free ports, one series of a `/metrics` exposition, a real
//!   broker, a child process with its log, certificates made with `openssl`. No heavy dependency:
//!   the benchmarks use these without the features below.
//! - [`cluster`] (feature `cluster`): how the opt-in tests against a real kube-apiserver or cluster
//!   (`tests/tests/configmap_cluster.rs`, `tests/tests/real_cluster.rs`,
//!   `operator/tests/cluster.rs`) reach it, isolate themselves in namespaces and clean up after
//!   themselves; what they assert, and the objects of their own domain (checkpoints, CRDs,
//!   SessionMonitors, Events), stay in the tests.
//! - [`qlik`] (feature `qlik`): a fake Qlik Sense site (the repository and proxy APIs, mutual TLS, the Xrfkey
//!   check), faithful to Qlik's documented behaviour, for the reconciliation tests and
//!   `session-monitor-simulate`.

pub mod certs;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod http;
pub mod metrics;
pub mod mosquitto;
pub mod poll;
pub mod process;
#[cfg(feature = "qlik")]
pub mod qlik;
