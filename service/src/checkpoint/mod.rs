//! Checkpointing the registry, so a restart or upgrade loses no active session.
//!
//! Owns when to save (on change, at most every `checkpoint_interval`, and at shutdown) and how
//! to restore at start. The byte format is [`codec`]'s; where the bytes live is a [`Store`].

pub mod codec;
pub mod configmap;
mod events;
#[cfg(test)]
mod fake_api;
pub mod file;
pub mod layout;
pub mod lease;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::CheckpointStoreConfig;
use crate::registry::{RestoreEnds, UnixMillis};
use crate::shutdown::Stop;
use crate::state::State;
use configmap::{ConfigMapError, ConfigMapStore};

/// Where checkpoints live. An enum rather than a trait object: the set of stores is closed and
/// known, and each variant's errors and set-aside behaviour stay explicit.
#[derive(Clone)]
pub enum Store {
    File(file::FileStore),
    ConfigMap(Arc<ConfigMapStore>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("checkpoint file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot reach Kubernetes for the checkpoint ConfigMap: {0}")]
    KubeConfig(String),
    #[error(transparent)]
    ConfigMap(#[from] ConfigMapError),
    #[error("{0}; run a build that understands it, or move the checkpoint away to start empty")]
    NewerFormat(String),
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::File { .. } | StoreError::KubeConfig(_) | StoreError::NewerFormat(_) => {
                false
            }
            StoreError::ConfigMap(e) => e.is_transient(),
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, StoreError::ConfigMap(ConfigMapError::Conflict(_)))
    }
}

/// What a load found.
enum Loaded {
    Nothing,
    Bytes(Vec<u8>),
    /// The store itself saw the checkpoint is unreadable (before decoding).
    Corrupt(String),
}

/// Where the service account's namespace is mounted in every pod.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl Store {
    /// Opens the configured store; for ConfigMaps this builds the Kubernetes client (in-cluster
    /// config, else KUBECONFIG) and settles the namespace.
    pub async fn open(config: &CheckpointStoreConfig) -> Result<Store, StoreError> {
        match config {
            CheckpointStoreConfig::File(path) => {
                Ok(Store::File(file::FileStore::new(path.clone())))
            }
            CheckpointStoreConfig::ConfigMap {
                name,
                namespace,
                max_shards,
                lease: _,
            } => {
                let client = kube::Client::try_default()
                    .await
                    .map_err(|e| StoreError::KubeConfig(e.to_string()))?;
                // The flag, else the pod's own namespace, else the kubeconfig's context.
                let namespace = namespace
                    .clone()
                    .or_else(|| {
                        std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                            .ok()
                            .map(|s| s.trim().to_owned())
                    })
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .filter(|ns| !ns.is_empty())
                    .unwrap_or_else(|| client.default_namespace().to_owned());
                Ok(Store::ConfigMap(Arc::new(ConfigMapStore::new(
                    client,
                    &namespace,
                    name,
                    *max_shards,
                    configmap::DEFAULT_SHARD_BYTES,
                ))))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Store::File(f) => format!("file {}", f.path().display()),
            Store::ConfigMap(c) => c.describe(),
        }
    }

    async fn load(&self) -> Result<Loaded, StoreError> {
        match self {
            Store::File(f) => {
                let f = f.clone();
                let bytes = blocking(move || {
                    // Loaded once, at start: the time to clear what a crash left behind.
                    match f.remove_partial_writes() {
                        Ok(removed) if removed.is_empty() => {}
                        Ok(removed) => tracing::warn!(
                            ?removed,
                            "removed partial checkpoint writes left by a process that did not finish them (killed mid-write)"
                        ),
                        Err(error) => tracing::warn!(%error, "could not clear partial checkpoint writes"),
                    }
                    f.load().map_err(|e| file_error(&f, e))
                })
                .await?;
                Ok(bytes.map_or(Loaded::Nothing, Loaded::Bytes))
            }
            Store::ConfigMap(c) => match c.load().await {
                Ok(bytes) => Ok(bytes.map_or(Loaded::Nothing, Loaded::Bytes)),
                Err(ConfigMapError::Corrupt { reason, .. }) => Ok(Loaded::Corrupt(reason)),
                Err(e) => Err(e.into()),
            },
        }
    }

    async fn save(&self, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Store::File(f) => {
                let f = f.clone();
                blocking(move || f.save(&bytes).map_err(|e| file_error(&f, e))).await
            }
            Store::ConfigMap(c) => Ok(c.save(&bytes).await?),
        }
    }

    async fn set_aside(&self, reason: &str) -> Result<String, StoreError> {
        let now_secs = UnixMillis::now().0 / 1000;
        match self {
            Store::File(f) => {
                let f = f.clone();
                blocking(move || f.set_aside(now_secs).map_err(|e| file_error(&f, e))).await
            }
            Store::ConfigMap(c) => Ok(c.set_aside(now_secs, reason).await?),
        }
    }

    /// Fails now, at start, if the store can never be written (e.g. a read-only directory for
    /// the file store), rather than warning every few seconds while the service looks ready.
    /// A ConfigMap store is checked by its first write: API faults there are transient.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        match self {
            Store::File(f) => {
                let f = f.clone();
                blocking(move || f.check_writable().map_err(|e| file_error(&f, e))).await
            }
            Store::ConfigMap(_) => Ok(()),
        }
    }

    /// `(shards wanted for a checkpoint of bytes, shards allowed)`; `None` for a file.
    fn shard_sizing(&self, bytes: usize) -> Option<(usize, usize)> {
        match self {
            Store::File(_) => None,
            Store::ConfigMap(c) => Some((c.shards_wanted(bytes), c.max_shards())),
        }
    }

    /// Resolves when the store may use more shards than before; never for a file.
    async fn shards_raised(&self) {
        match self {
            Store::ConfigMap(c) => c.shards_raised().await,
            Store::File(_) => std::future::pending().await,
        }
    }

    async fn shards_in_use(&self) -> usize {
        match self {
            Store::File(_) => 0,
            Store::ConfigMap(c) => c.shards_in_use().await,
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

/// Backoff between attempts after transient store errors.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// [`restore`], retrying transient errors (API server unreachable, 5xx) with backoff until it
/// succeeds. Permanent errors (an unreadable file) are returned. Cancel-safe: a shutdown during
/// the retries simply drops this future (a restore writes nothing to the store).
pub async fn restore_with_retry(store: &Store, state: &State) -> Result<(), StoreError> {
    load_with_retry(store, state, Load::Restore(RestoreEnds::Yes)).await
}

/// How a loaded checkpoint goes into the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// At start ([`ShardedRegistry::restore_decoded_as`]).
    Restore(RestoreEnds),
    /// From the pod that held the checkpoint Lease before ([`ShardedRegistry::take_over`]).
    TakeOver,
}

/// [`restore_with_retry`] for either kind of [`Load`].
pub async fn load_with_retry(store: &Store, state: &State, how: Load) -> Result<(), StoreError> {
    let mut backoff = MIN_BACKOFF;
    loop {
        match load(store, state, how).await {
            Ok(()) => return Ok(()),
            Err(error) if error.is_transient() => {
                events::restore_retrying(&state.metrics, &error, backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Loads the checkpoint into the registry at start. A corrupt checkpoint is set aside and
/// reported, and the service starts empty; only a store that cannot be read at all is an error.
pub async fn restore(store: &Store, state: &State) -> Result<(), StoreError> {
    load(store, state, Load::Restore(RestoreEnds::Yes)).await
}

/// [`restore`], or a take-over, as `how` says.
#[tracing::instrument(name = "checkpoint_restore", skip_all, fields(store = %store.describe(), ?how))]
pub async fn load(store: &Store, state: &State, how: Load) -> Result<(), StoreError> {
    let bytes = match store.load().await? {
        Loaded::Nothing => {
            events::restore_empty(&state.metrics);
            return Ok(());
        }
        Loaded::Corrupt(reason) => return set_aside(store, state, &reason).await,
        Loaded::Bytes(bytes) => bytes,
    };
    match codec::decode_segments(&bytes) {
        Ok(checkpoint) => {
            let now = UnixMillis::now();
            let restored = match how {
                Load::Restore(ends) => state.registry().restore_decoded_as(&checkpoint, now, ends),
                Load::TakeOver => {
                    let (dropped, loaded) = state.registry().take_over(&checkpoint, now);
                    state.metrics.checkpoint_takeovers.inc();
                    tracing::info!(
                        replaced = dropped,
                        loaded,
                        saved_at_ms = checkpoint.saved_at.0,
                        "took over the checkpoint the previous writer left: sessions it ended are gone, those it started are here, and those that reached this pod meanwhile are kept"
                    );
                    loaded
                }
            };
            let minutes = checkpoint.history.len();
            state.history().restore(
                checkpoint.history_hosts.clone(),
                checkpoint.history.clone(),
                now,
            );
            let sessions: usize = checkpoint.segments.iter().map(|s| s.sessions.len()).sum();
            state.changed(true);
            let report = events::Restored {
                sessions: restored,
                skipped: sessions - restored,
                saved_at_ms: checkpoint.saved_at.0,
                bytes: bytes.len(),
                history_minutes: minutes,
                shards: store.shards_in_use().await,
            };
            match how {
                Load::Restore(_) => events::restored(&state.metrics, &report),
                // Not a restore at start (restores_total counts those); logged above.
                Load::TakeOver => state.metrics.checkpoint_shards.set(report.shards as i64),
            }
            Ok(())
        }
        // Written by a newer build (a rollback after an upgrade): not corrupt, and not ours to
        // set aside. Stop with a clear message rather than silently start empty.
        Err(error @ codec::DecodeError::UnsupportedVersion(_)) => {
            Err(StoreError::NewerFormat(error.to_string()))
        }
        Err(error) => set_aside(store, state, &error.to_string()).await,
    }
}

async fn set_aside(store: &Store, state: &State, reason: &str) -> Result<(), StoreError> {
    let aside = store.set_aside(reason).await;
    events::corrupt(&state.metrics, reason, aside.as_deref().ok());
    aside.map(drop)
}

/// Encodes and writes the registry now, and returns the registry revision it holds. A conflict
/// (someone else wrote the store) is resolved by writing the current registry again, a few
/// times at most.
pub async fn save(store: &Store, state: &Arc<State>) -> Result<u64, StoreError> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        match save_once(store, state).await {
            Err(error) if error.is_conflict() && attempt < ATTEMPTS => {
                state.metrics.checkpoint_conflicts.inc();
                tracing::warn!(%error, attempt, "checkpoint conflict; writing the current registry again");
                attempt += 1;
            }
            Err(error) if error.is_conflict() => {
                state.metrics.checkpoint_conflicts.inc();
                return Err(error);
            }
            result => return result,
        }
    }
}

async fn save_once(store: &Store, state: &Arc<State>) -> Result<u64, StoreError> {
    let started = Instant::now();
    let revision = state.revision();
    // With "checkpoint written" (or "checkpoint write failed") it brackets each write in the
    // log, which tells a crash mid-write from one between writes.
    tracing::debug!(revision, "checkpoint write started");
    // Written shard by shard from the registry's own tables, then compressed, all on a blocking
    // thread: each shard is locked only while its part is written.
    let (bytes, sessions) = {
        let state = state.clone();
        blocking(move || {
            let (mut body, sessions) = state.registry().write_checkpoint(UnixMillis::now());
            body.history(&state.history());
            (body.finish(), sessions)
        })
        .await
    };
    let size = bytes.len();
    let m = &state.metrics;
    // Known before the write, and whether it succeeds: the warning comes while writes still do.
    if let Some((wanted, max)) = store.shard_sizing(size) {
        m.checkpoint_shards_wanted.set(wanted as i64);
        m.checkpoint_shards_max.set(max as i64);
        let allowed = (wanted > max)
            .then(|| {
                let mut limits = state
                    .checkpoint_warnings
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                limits.allow("shards_wanted")
            })
            .flatten();
        if let Some(suppressed) = allowed {
            tracing::warn!(
                wanted,
                checkpoint_configmap_shards = max,
                bytes = size,
                suppressed,
                "the checkpoint is growing out of its shard ConfigMaps: raise checkpoint_configmap_shards (spec.checkpoint.shards) before writes fail"
            );
        }
    }
    let result = store.save(bytes).await;
    m.checkpoint_duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(()) => {
            let shards = store.shards_in_use().await;
            events::written(m, sessions, size, shards, started.elapsed());
        }
        Err(error) => events::write_failed(m, error),
    }
    result.map(|()| revision)
}

/// Saves whenever the registry changed, at most every `interval` (backing off while the store
/// fails), until `stop`; then saves once more if anything is unsaved, within
/// `final_deadline` so that it fits a pod's termination grace period.
pub async fn run(
    store: Store,
    state: Arc<State>,
    interval: Duration,
    final_deadline: Duration,
    may_write: Arc<std::sync::atomic::AtomicBool>,
    mut stop: Stop,
) {
    let may = || may_write.load(std::sync::atomic::Ordering::SeqCst);
    // The registry revision the store holds; revision 0 is the registry before any change.
    let mut saved = 0;
    let mut next = tokio::time::Instant::now() + interval;
    let mut backoff = interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if state.revision() != saved && may() {
                    match save(&store, &state).await {
                        Ok(revision) => {
                            saved = revision;
                            backoff = interval;
                        }
                        Err(_) => backoff = (backoff * 2).min(MAX_BACKOFF.max(interval)),
                    }
                }
                next = tokio::time::Instant::now() + backoff;
            }
            () = store.shards_raised() => {
                // The failed write may fit now: retry at once, with the back-off reset.
                backoff = interval;
                next = tokio::time::Instant::now();
            }
            _ = stop.requested() => break,
        }
    }
    if state.revision() != saved && may() {
        match tokio::time::timeout(final_deadline, save(&store, &state)).await {
            Ok(Ok(_)) => tracing::info!("final checkpoint written"),
            Ok(Err(error)) => tracing::error!(%error, "final checkpoint failed"),
            Err(_) => tracing::error!(
                deadline_s = final_deadline.as_secs(),
                "final checkpoint timed out"
            ),
        }
    }
}
