//! The ConfigMap checkpoint store: the registry's home in Kubernetes, so the service itself
//! keeps no state and a restart, upgrade or node drain loses no session.
//!
//! Layout. The checkpoint bytes are cut into chunks of at most `shard_bytes` (a safe margin under
//! the API server's 1 MiB limit per ConfigMap). The main ConfigMap `NAME` holds chunk 0 and the
//! *manifest* (generation, length, CRC-32, and the names of the shard ConfigMaps holding the
//! other chunks, in order). Shards are named `NAME-1` … `NAME-<max_shards>`: a fixed set, so RBAC
//! can name every object the service may touch.
//!
//! Atomicity. A write puts its chunks into shards the current manifest does *not* use, and only
//! then replaces `NAME` — chunk 0 and the new manifest in one request, the commit point. Until
//! then the old manifest, its chunk 0 and its shards are untouched; after it, the new ones are
//! complete. A reader therefore sees the old or the new checkpoint, never a mix; each shard also
//! carries its generation, so a reader racing a writer notices and reads again.
//!
//! Concurrency. Every write replaces an object with the resourceVersion last seen; a 409 means
//! someone else wrote in between. The store then re-reads that object and reports a conflict,
//! and the caller writes the current registry again: the running service's state is the newest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::{Mutex, Notify};

use super::layout;

use super::layout::{Assembly, Corrupt, DATA_KEY, MANIFEST_FORMAT, Manifest};
pub use super::layout::{GENERATION_ANNOTATION, MANIFEST_ANNOTATION};
/// Set on `NAME` when a checkpoint could not be read and could not be copied aside, so that the
/// next write, which replaces it, leaves a trace.
pub const CORRUPT_ANNOTATION: &str = "sessionmonitor.io/corrupt-checkpoint";
/// The API server refuses ConfigMaps whose data and binaryData exceed 1 MiB together; the rest
/// of the object (metadata, the manifest) needs room as well.
pub const DEFAULT_SHARD_BYTES: usize = 900 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigMapError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("ConfigMap {0} was written by someone else since we read it (409 Conflict)")]
    Conflict(String),
    #[error(
        "a checkpoint of {bytes} bytes needs {needed} shard ConfigMaps, but only {free} of \
         checkpoint_configmap_shards={max} are free while the current checkpoint uses the others; \
         raise checkpoint_configmap_shards"
    )]
    TooLarge {
        bytes: usize,
        needed: usize,
        free: usize,
        max: usize,
    },
    #[error("checkpoint in ConfigMap {name} is unreadable: {reason}")]
    Corrupt { name: String, reason: String },
}

impl ConfigMapError {
    /// Whether trying again later may succeed (API outages, conflicts), as opposed to a
    /// checkpoint that will never fit or never decode.
    pub fn is_transient(&self) -> bool {
        matches!(self, ConfigMapError::Api(_) | ConfigMapError::Conflict(_))
    }
}

pub struct ConfigMapStore {
    client: kube::Client,
    api: Api<ConfigMap>,
    name: String,
    namespace: String,
    /// `checkpoint_configmap_shards`; only ever raised while running (see [`Self::raise_max_shards`]).
    max_shards: AtomicUsize,
    /// Wakes the writer when `max_shards` rose, so a write that failed for want of shards is
    /// retried now rather than at the end of its back-off.
    raised: Notify,
    shard_bytes: usize,
    inner: Mutex<Inner>,
}

/// What this store knows of the manifest committed in `NAME`.
#[derive(Default)]
enum Committed {
    /// Not read yet, or a commit's outcome is unknown: its answer was lost (an API server that
    /// died after writing to etcd, a connection reset), so it may or may not have taken effect.
    /// `NAME` is read before any shard is chosen: a write must never reuse the shards of a
    /// manifest it only believes is old.
    #[default]
    Unknown,
    /// As read or written; `None` when `NAME` holds no manifest (or an unreadable one).
    Known(Option<Manifest>),
}

impl Committed {
    fn manifest(&self) -> Option<&Manifest> {
        match self {
            Committed::Known(m) => m.as_ref(),
            Committed::Unknown => None,
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Metadata per object as last read or written (`None`: known not to exist). Replacing an
    /// object starts from it, which keeps its resourceVersion for optimistic concurrency and
    /// keeps labels and owner references that the operator set.
    objects: HashMap<String, Option<ObjectMeta>>,
    /// The committed manifest; its shards must not be overwritten.
    manifest: Committed,
    /// What the last load read, kept for setting it aside if it does not decode.
    last_loaded: Option<Vec<u8>>,
    /// A note for [`CORRUPT_ANNOTATION`], written with every later commit.
    corrupt_note: Option<String>,
}

impl ConfigMapStore {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        max_shards: usize,
        shard_bytes: usize,
    ) -> Self {
        ConfigMapStore {
            api: Api::namespaced(client.clone(), namespace),
            client,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            max_shards: AtomicUsize::new(max_shards),
            raised: Notify::new(),
            shard_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The client and namespace of the store, for its writer Lease beside it.
    pub fn client_and_namespace(&self) -> (kube::Client, &str) {
        (self.client.clone(), &self.namespace)
    }

    pub fn describe(&self) -> String {
        format!(
            "ConfigMap {}/{} (up to {} shards)",
            self.namespace,
            self.name,
            self.max_shards()
        )
    }

    /// The shard ConfigMaps this store may use (`checkpoint_configmap_shards`).
    pub fn max_shards(&self) -> usize {
        self.max_shards.load(Ordering::Relaxed)
    }

    /// Lets the next writes use shards up to `NAME-<max>`, once RBAC allows them (the operator
    /// grants them before it raises the setting). Never lowered while running: the committed
    /// checkpoint may live in the highest shards. Returns the previous limit when it rose.
    pub fn raise_max_shards(&self, max: usize) -> Option<usize> {
        let previous = self.max_shards.fetch_max(max, Ordering::Relaxed);
        if max <= previous {
            return None;
        }
        self.raised.notify_one();
        Some(previous)
    }

    /// Resolves once [`Self::raise_max_shards`] raised the limit (also if it did so before the
    /// call and nobody waited then).
    pub async fn shards_raised(&self) {
        self.raised.notified().await;
    }

    /// [`layout::shards_wanted`] for a checkpoint of `bytes` in this store.
    pub fn shards_wanted(&self, bytes: usize) -> usize {
        layout::shards_wanted(bytes, self.shard_bytes)
    }

    /// Shard ConfigMaps in use by the committed checkpoint.
    pub async fn shards_in_use(&self) -> usize {
        self.inner
            .lock()
            .await
            .manifest
            .manifest()
            .map_or(0, |m| m.shards.len())
    }

    fn shard_name(&self, index: usize) -> String {
        layout::shard_name(&self.name, index)
    }

    fn corrupt(&self, reason: impl Into<String>) -> ConfigMapError {
        ConfigMapError::Corrupt {
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Reads the checkpoint; `None` when there is none yet (no ConfigMap, or an empty one that
    /// the operator created in advance).
    pub async fn load(&self) -> Result<Option<Vec<u8>>, ConfigMapError> {
        let mut inner = self.inner.lock().await;
        // A writer elsewhere may replace shards between our reads; the generations tell.
        for _ in 0..3 {
            let Some(main) = self.get(&mut inner, &self.name).await? else {
                inner.manifest = Committed::Known(None);
                return Ok(None);
            };
            let manifest = self.manifest_of(&main)?;
            let mut shards = Vec::new();
            for shard in manifest.iter().flat_map(|m| &m.shards) {
                shards.push(self.get(&mut inner, shard).await?);
            }
            match layout::assemble(&main, manifest, &shards) {
                Ok(Assembly::Empty) => {
                    inner.manifest = Committed::Known(None);
                    return Ok(None);
                }
                Ok(Assembly::Mixed) => continue,
                Ok(Assembly::Complete { bytes, manifest }) => {
                    inner.manifest = Committed::Known(Some(manifest));
                    inner.last_loaded = Some(bytes.clone());
                    return Ok(Some(bytes));
                }
                Err(Corrupt { reason, bytes }) => {
                    inner.last_loaded = bytes;
                    return Err(self.corrupt(reason));
                }
            }
        }
        Err(self.corrupt("shards keep changing under the reader (another writer?)"))
    }

    /// Writes a checkpoint: free shards first, then `NAME` with chunk 0 and the manifest.
    pub async fn save(&self, bytes: &[u8]) -> Result<(), ConfigMapError> {
        let mut inner = self.inner.lock().await;
        if let Committed::Unknown = inner.manifest {
            let main = self.get(&mut inner, &self.name.clone()).await?;
            let manifest = main.and_then(|cm| self.manifest_of(&cm).ok().flatten());
            tracing::debug!(
                generation = manifest.as_ref().map(|m| m.generation),
                "read the committed checkpoint manifest before choosing shards"
            );
            inner.manifest = Committed::Known(manifest);
        }
        let chunks: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[]]
        } else {
            bytes.chunks(self.shard_bytes).collect()
        };
        let in_use: HashSet<&str> = inner
            .manifest
            .manifest()
            .iter()
            .flat_map(|m| m.shards.iter().map(String::as_str))
            .collect();
        let max_shards = self.max_shards();
        let free: Vec<String> = (1..=max_shards)
            .map(|i| self.shard_name(i))
            .filter(|n| !in_use.contains(n.as_str()))
            .collect();
        let needed = chunks.len() - 1;
        if needed > free.len() {
            return Err(ConfigMapError::TooLarge {
                bytes: bytes.len(),
                needed,
                free: free.len(),
                max: max_shards,
            });
        }
        let generation = inner.manifest.manifest().map_or(0, |m| m.generation) + 1;
        let shards: Vec<String> = free.into_iter().take(needed).collect();
        for (shard, chunk) in shards.iter().zip(&chunks[1..]) {
            let annotations =
                BTreeMap::from([(GENERATION_ANNOTATION.to_owned(), generation.to_string())]);
            self.put(&mut inner, shard, annotations, chunk).await?;
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            generation,
            bytes: bytes.len(),
            crc32: crc32fast::hash(bytes),
            shards,
        };
        let mut annotations = BTreeMap::from([(
            MANIFEST_ANNOTATION.to_owned(),
            serde_json::to_string(&manifest).expect("manifest serializes"),
        )]);
        if let Some(note) = &inner.corrupt_note {
            annotations.insert(CORRUPT_ANNOTATION.to_owned(), note.clone());
        }
        match self
            .put(&mut inner, &self.name.clone(), annotations, chunks[0])
            .await
        {
            Ok(()) => {
                inner.manifest = Committed::Known(Some(manifest));
                Ok(())
            }
            // A conflict already read what is committed; any other error may have been
            // applied all the same.
            Err(error @ ConfigMapError::Conflict(_)) => Err(error),
            Err(error) => {
                inner.manifest = Committed::Unknown;
                Err(error)
            }
        }
    }

    /// Keeps an unreadable checkpoint: copied to `NAME-corrupt-<unix time>` if RBAC allows
    /// creating it, else recorded in [`CORRUPT_ANNOTATION`] on `NAME` by every later write.
    /// Returns where the trace is.
    pub async fn set_aside(
        &self,
        now_unix_secs: u64,
        reason: &str,
    ) -> Result<String, ConfigMapError> {
        let mut inner = self.inner.lock().await;
        let copy_name = format!("{}-corrupt-{now_unix_secs}", self.name);
        let mut data = inner.last_loaded.take().unwrap_or_default();
        data.truncate(self.shard_bytes);
        let copy = ConfigMap {
            metadata: ObjectMeta {
                name: Some(copy_name.clone()),
                labels: Some(labels()),
                annotations: Some(BTreeMap::from([(
                    CORRUPT_ANNOTATION.to_owned(),
                    reason.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            binary_data: Some(BTreeMap::from([(DATA_KEY.to_owned(), ByteString(data))])),
            ..ConfigMap::default()
        };
        // Its shards are left alone by the bank rule only while the manifest names them; the
        // manifest is unreadable, so forget it and let the next write use any shard.
        inner.manifest = Committed::Known(None);
        match self.api.create(&PostParams::default(), &copy).await {
            Ok(_) => Ok(format!("ConfigMap {}/{copy_name}", self.namespace)),
            Err(error) => {
                inner.corrupt_note = Some(format!(
                    "unreadable checkpoint found at unix time {now_unix_secs}: {reason}"
                ));
                Ok(format!(
                    "annotation {CORRUPT_ANNOTATION} on ConfigMap {}/{} (a copy was refused: {error})",
                    self.namespace, self.name
                ))
            }
        }
    }

    fn manifest_of(&self, cm: &ConfigMap) -> Result<Option<Manifest>, ConfigMapError> {
        layout::manifest_of(&self.name, cm).map_err(|c| self.corrupt(c.reason))
    }

    async fn get(
        &self,
        inner: &mut Inner,
        name: &str,
    ) -> Result<Option<ConfigMap>, ConfigMapError> {
        let cm = self.api.get_opt(name).await?;
        inner
            .objects
            .insert(name.to_owned(), cm.as_ref().map(|cm| cm.metadata.clone()));
        Ok(cm)
    }

    /// Creates or replaces one object with our annotations and data.
    async fn put(
        &self,
        inner: &mut Inner,
        name: &str,
        annotations: BTreeMap<String, String>,
        data: &[u8],
    ) -> Result<(), ConfigMapError> {
        if !inner.objects.contains_key(name) {
            self.get(inner, name).await?;
        }
        let existing = inner.objects.get(name).cloned().flatten();
        let exists = existing.is_some();
        let mut metadata = existing.unwrap_or_else(|| ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        });
        let all = metadata.annotations.get_or_insert_with(BTreeMap::new);
        all.retain(|k, _| !k.starts_with("sessionmonitor.io/"));
        all.extend(annotations);
        metadata.managed_fields = None;
        let cm = ConfigMap {
            metadata,
            binary_data: Some(BTreeMap::from([(
                DATA_KEY.to_owned(),
                ByteString(data.to_vec()),
            )])),
            ..ConfigMap::default()
        };
        let result = if exists {
            self.api.replace(name, &PostParams::default(), &cm).await
        } else {
            self.api.create(&PostParams::default(), &cm).await
        };
        match result {
            Ok(written) => {
                inner
                    .objects
                    .insert(name.to_owned(), Some(written.metadata));
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.is_conflict() => {
                // Learn the current version (and, for NAME, the manifest really committed),
                // so the caller's next attempt can succeed.
                if let Some(current) = self.get(inner, name).await?
                    && name == self.name
                {
                    inner.manifest = Committed::Known(self.manifest_of(&current).ok().flatten());
                }
                Err(ConfigMapError::Conflict(name.to_owned()))
            }
            Err(error) => {
                // Deleted behind our back, or anything else: read afresh next time.
                inner.objects.remove(name);
                Err(error.into())
            }
        }
    }
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "session-monitor".to_owned(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            "checkpoint".to_owned(),
        ),
    ])
}
