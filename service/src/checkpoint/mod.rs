//! Checkpointing the registry, so a restart or upgrade loses no active session.
//!
//! Owns when to save (on change, at most every `checkpoint_interval`, and at shutdown) and how
//! to restore at start. The byte format is [`codec`]'s; where the bytes live is a [`Store`].

pub mod codec;
pub mod file;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::CheckpointStoreConfig;
use crate::registry::UnixMillis;
use crate::state::State;
use codec::Checkpoint;

/// Where checkpoints live. An enum rather than a trait object: the set of stores is closed and
/// known, and each variant's errors and set-aside behaviour stay explicit.
#[derive(Clone, Debug)]
pub enum Store {
    File(file::FileStore),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("checkpoint file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

impl Store {
    pub fn from_config(config: &CheckpointStoreConfig) -> Store {
        match config {
            CheckpointStoreConfig::File(path) => Store::File(file::FileStore::new(path.clone())),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Store::File(f) => format!("file {}", f.path().display()),
        }
    }

    async fn load(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::File(f) => {
                let f = f.clone();
                blocking(move || f.load().map_err(|e| file_error(&f, e))).await
            }
        }
    }

    async fn save(&self, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Store::File(f) => {
                let f = f.clone();
                blocking(move || f.save(&bytes).map_err(|e| file_error(&f, e))).await
            }
        }
    }

    async fn set_aside(&self) -> Result<String, StoreError> {
        let now_secs = UnixMillis::now().0 / 1000;
        match self {
            Store::File(f) => {
                let f = f.clone();
                blocking(move || f.set_aside(now_secs).map_err(|e| file_error(&f, e))).await
            }
        }
    }
}

fn file_error(f: &file::FileStore, source: std::io::Error) -> StoreError {
    StoreError::File {
        path: f.path().display().to_string(),
        source,
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("checkpoint IO does not panic")
}

/// Loads the checkpoint into the registry at start. A corrupt checkpoint is set aside and
/// reported, and the service starts empty; only a store that cannot be read at all is an error.
#[tracing::instrument(name = "checkpoint_restore", skip_all, fields(store = %store.describe()))]
pub async fn restore(store: &Store, state: &State) -> Result<(), StoreError> {
    let Some(bytes) = store.load().await? else {
        tracing::info!("no checkpoint yet: first start with an empty registry");
        state
            .metrics
            .checkpoint_restores
            .with_label_values(&["empty"])
            .inc();
        return Ok(());
    };
    match codec::decode(&bytes) {
        Ok(checkpoint) => {
            let now = UnixMillis::now();
            let restored = state.with_registry(|r| r.restore(&checkpoint.sessions, now));
            state.changed(true);
            state
                .metrics
                .checkpoint_restores
                .with_label_values(&["restored"])
                .inc();
            state
                .metrics
                .checkpoint_restored_sessions
                .set(restored as i64);
            tracing::info!(
                restored,
                expired_meanwhile = checkpoint.sessions.len() - restored,
                saved_at_ms = checkpoint.saved_at.0,
                "restored sessions from checkpoint"
            );
        }
        Err(error) => {
            state
                .metrics
                .checkpoint_restores
                .with_label_values(&["corrupt"])
                .inc();
            let aside = store.set_aside().await?;
            tracing::error!(%error, set_aside_to = %aside, "checkpoint unreadable: kept aside for inspection, starting with an empty registry");
        }
    }
    Ok(())
}

/// Encodes and writes the registry now.
pub async fn save(store: &Store, state: &State) -> Result<(), StoreError> {
    let started = Instant::now();
    let revision = state.revision.load(Ordering::Acquire);
    let checkpoint = Checkpoint {
        saved_at: UnixMillis::now(),
        sessions: state.with_registry(|r| r.snapshot()),
    };
    let sessions = checkpoint.sessions.len();
    let bytes = blocking(move || codec::encode(&checkpoint)).await;
    let size = bytes.len();
    let result = store.save(bytes).await;
    let m = &state.metrics;
    m.checkpoint_duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(()) => {
            state.saved_revision.store(revision, Ordering::Release);
            m.checkpoint_writes.with_label_values(&["success"]).inc();
            m.checkpoint_size_bytes.set(size as i64);
            tracing::debug!(
                sessions,
                bytes = size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "checkpoint written"
            );
        }
        Err(error) => {
            m.checkpoint_writes.with_label_values(&["failure"]).inc();
            tracing::warn!(%error, "checkpoint write failed; will retry");
        }
    }
    result
}

/// Saves whenever the registry changed, at most every `interval`, until `shutdown` fires; then
/// saves once more if anything is unsaved.
pub async fn run(
    store: Store,
    state: Arc<State>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if state.unsaved() {
                    let _ = save(&store, &state).await;
                }
            }
            _ = crate::state::stop_requested(&mut shutdown) => break,
        }
    }
    if state.unsaved() {
        match save(&store, &state).await {
            Ok(()) => tracing::info!("final checkpoint written"),
            Err(error) => tracing::error!(%error, "final checkpoint failed"),
        }
    }
}
