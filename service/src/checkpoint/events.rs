//! The checkpoint's events, each logged and counted in one function, so a log line and its
//! metric cannot drift apart (as Vector's internal events do).

use std::time::Duration;

use crate::metrics::{CheckpointRestore, CheckpointWrite, Metrics};

use super::StoreError;

/// A restore failed for a reason that may pass (the API server unreachable); retried.
pub fn restore_retrying(m: &Metrics, error: &StoreError, retry_in: Duration) {
    m.checkpoint_restores(CheckpointRestore::Failed).inc();
    tracing::warn!(
        %error,
        retry_in_ms = retry_in.as_millis() as u64,
        "checkpoint restore failed; retrying (not ready until it succeeds)"
    );
}

/// No checkpoint in the store: the first start.
pub fn restore_empty(m: &Metrics) {
    m.checkpoint_restores(CheckpointRestore::Empty).inc();
    tracing::info!("no checkpoint yet: first start with an empty registry");
}

/// What a restore brought back.
pub struct Restored {
    pub sessions: usize,
    /// Sessions in the checkpoint that were not restored (expired while the service was down).
    pub skipped: usize,
    pub saved_at_ms: u64,
    pub bytes: usize,
    pub history_minutes: usize,
    pub shards: usize,
}

pub fn restored(m: &Metrics, r: &Restored) {
    m.checkpoint_restores(CheckpointRestore::Restored).inc();
    m.checkpoint_restored_sessions.set(r.sessions as i64);
    m.checkpoint_shards.set(r.shards as i64);
    tracing::info!(
        restored = r.sessions,
        skipped = r.skipped,
        saved_at_ms = r.saved_at_ms,
        bytes = r.bytes,
        history_minutes = r.history_minutes,
        "restored sessions from checkpoint"
    );
}

/// An unreadable checkpoint; `kept_at` is where it was set aside (`None`: setting it aside
/// failed too, which the caller reports as the error it is).
pub fn corrupt(m: &Metrics, reason: &str, kept_at: Option<&str>) {
    m.checkpoint_restores(CheckpointRestore::Corrupt).inc();
    if let Some(kept_at) = kept_at {
        tracing::error!(
            reason,
            kept_at,
            "checkpoint unreadable: kept aside for inspection, starting with an empty registry"
        );
    }
}

/// A checkpoint write succeeded.
pub fn written(m: &Metrics, sessions: usize, bytes: usize, shards: usize, elapsed: Duration) {
    m.checkpoint_writes(CheckpointWrite::Success).inc();
    m.checkpoint_size_bytes.set(bytes as i64);
    m.checkpoint_sessions.set(sessions as i64);
    m.checkpoint_shards.set(shards as i64);
    tracing::debug!(
        sessions,
        bytes,
        elapsed_ms = elapsed.as_millis() as u64,
        "checkpoint written"
    );
}

/// A checkpoint write failed; the writer retries with back-off.
pub fn write_failed(m: &Metrics, error: &StoreError) {
    m.checkpoint_writes(CheckpointWrite::Failure).inc();
    tracing::warn!(%error, "checkpoint write failed; will retry");
}
