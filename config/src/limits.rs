//! Limits of the pure cores (the parser's and the registry's), set by settings.

use std::time::Duration;

/// Per-datagram caps, from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Larger datagrams are dropped whole: a proxy event is a few hundred bytes.
    pub max_datagram_bytes: usize,
    /// Identity fields (host, directory, user id, session id) longer than this are rejected, since
    /// truncating them could merge two users; origin, context and message are truncated instead.
    pub max_field_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_datagram_bytes: 8 * 1024,
            max_field_bytes: 512,
        }
    }
}

/// How long silent sessions live.
#[derive(Clone, Debug)]
pub struct ExpiryPolicy {
    /// A session with no open connection expires after this long without events.
    pub idle_timeout: Duration,
    /// Any session expires after this long without events, open connections or not.
    pub max_idle: Duration,
}

impl Default for ExpiryPolicy {
    fn default() -> Self {
        ExpiryPolicy {
            // Qlik Sense's default session inactivity timeout.
            idle_timeout: Duration::from_secs(30 * 60),
            max_idle: Duration::from_secs(24 * 60 * 60),
        }
    }
}
