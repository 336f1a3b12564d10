//! session-monitor: active Qlik Sense users from the proxy's log4net UDP events.
//!
//! Data flows one way: socket ([`ingest`]) → [`parser`] (pure) → [`registry`] (pure, time passed
//! in) → change signal ([`state`]) → publishers ([`mqtt`], [`checkpoint`], [`http`] read views).
//! [`service`] wires them together; [`cli`] is the binary's entry point.

pub use session_monitor_config as config;
pub use session_monitor_config::exclusions;

pub mod broker;
pub mod checkpoint;
pub mod cli;
pub mod history;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod mqtt;
pub mod page;
pub mod parser;
pub mod qlik;
pub mod ratelimit;
pub mod registry;
pub mod service;
pub mod settings_reload;
pub mod shutdown;
pub mod state;
