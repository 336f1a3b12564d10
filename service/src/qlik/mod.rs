//! Reconciliation with Qlik Sense's proxy API: the events drive the registry in real time, and
//! the proxies' own session lists, read every interval, bound its error.
//!
//! Why both: the UDP events are the only real-time source, but a datagram lost, a stop the
//! proxy never logged, or sessions that began before this service did leave the registry wrong
//! for as long as those sessions last. Each proxy node lists its live sessions per virtual proxy
//! (`GET /qps/{prefix}/session`); the repository lists the nodes and their virtual proxies
//! (`GET /qrs/proxyservice/full`). See the README, "Reconciling with the Qlik proxy API".
//!
//! Layout: [`settings`] (the validated section), [`api`] (pure: the Qlik bodies, Xrfkey, node
//! names), [`client`] (mutual TLS and HTTP), [`reconciler`] (the task: fetch everything, merge
//! each node, record the outcome). The merge itself is the registry's
//! ([`crate::registry::Registry::reconcile_host`]), pure and with time passed in.

pub mod api;
pub mod client;
pub mod reconciler;
pub use session_monitor_config::qlik as settings;
