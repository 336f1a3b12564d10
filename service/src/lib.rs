//! session-monitor: active Qlik Sense users from the proxy's log4net UDP events.
//!
//! Data flows one way: socket (`ingest`) → [`parser`] (pure) → [`registry`] (pure, time passed
//! in) → change signal → publishers (`mqtt`, `checkpoint`, `http` read views).

pub mod config;
pub mod exclusions;
pub mod parser;
pub mod registry;
pub mod simulate;

pub mod cli {
    pub fn main() -> std::process::ExitCode {
        std::process::ExitCode::SUCCESS
    }
}
