//! session-monitor: active Qlik Sense users from the proxy's log4net UDP events.
//!
//! Data flows one way: socket ([`ingest`]) → [`parser`] (pure) → [`registry`] (pure, time passed
//! in) → change signal ([`state`]) → publishers ([`mqtt`], [`checkpoint`], [`http`] read views).
//! [`service`] wires them together; [`cli`] is the binary's entry point.
//!
//! The `pub` modules are what the simulator, the benchmarks, the fuzzers and the end-to-end
//! tests drive (the pure cores, the checkpoint stores, socket binding); the rest is the
//! service's own and `pub(crate)`, so the compiler reports what nothing uses.

pub use session_monitor_config as config;
pub use session_monitor_config::exclusions;

pub(crate) mod broker;
pub mod checkpoint;
pub mod cli;
pub mod history;
pub(crate) mod http;
pub mod ingest;
pub(crate) mod metrics;
pub mod mqtt;
pub(crate) mod page;
pub mod parser;
pub(crate) mod qlik;
pub(crate) mod ratelimit;
pub mod registry;
pub(crate) mod service;
pub(crate) mod settings_reload;
pub(crate) mod shutdown;
pub(crate) mod state;
