//! Test harness shared by the workspace's opt-in tests against a real kube-apiserver
//! (`tests/tests/configmap_cluster.rs`, `operator/tests/cluster.rs`).
//!
//! It owns how those tests reach the cluster, isolate themselves in namespaces and clean up after
//! themselves; what they assert, and the objects of their own domain (checkpoints, CRDs,
//! SessionMonitors, Events), stay in the tests.

pub mod cluster;
