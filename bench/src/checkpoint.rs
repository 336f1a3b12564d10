//! Checkpoint cost: encoded size, encode, file write (atomic: temp file, fsync, rename), read and
//! restore (decode + load into a fresh registry, as at start-up), and the ConfigMaps it needs.

use std::time::{Duration, Instant};

use session_monitor::checkpoint::codec;
use session_monitor::checkpoint::configmap::DEFAULT_SHARD_BYTES;
use session_monitor::checkpoint::file::FileStore;
use session_monitor::exclusions::Exclusions;
use session_monitor::registry::sharded::DEFAULT_SHARDS;
use session_monitor::registry::{DEFAULT_MAX_HOSTS, ExpiryPolicy, ShardedRegistry, UnixMillis};

use crate::realistic;

pub struct CheckpointCost {
    pub bytes: usize,
    pub encode: Duration,
    pub write: Duration,
    pub restore: Duration,
    /// `NAME` plus shards.
    pub config_maps: usize,
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..runs {
        let start = Instant::now();
        let value = f();
        best = best.min(start.elapsed());
        out = Some(value);
    }
    (best, out.expect("at least one run"))
}

fn registry() -> ShardedRegistry {
    ShardedRegistry::new(
        ExpiryPolicy::default(),
        Exclusions::default(),
        DEFAULT_MAX_HOSTS,
        DEFAULT_SHARDS,
    )
}

/// As the service does it: the registry written shard by shard into a body and compressed
/// (encode), the file store's atomic write (write), and at start the file read, decoded and
/// loaded into a fresh registry (restore).
pub fn run(n: usize) -> CheckpointCost {
    let dir = tempfile::tempdir().expect("temp dir");
    let now = UnixMillis::now();
    let live = registry();
    assert_eq!(live.restore(&realistic::sessions(n, now), now), n);
    let runs = if n > 200_000 { 3 } else { 5 };
    let (encode, bytes) = best_of(runs, || {
        let (body, written) = live.write_checkpoint(now);
        assert_eq!(written, n);
        body.finish()
    });
    let store = FileStore::new(dir.path().join("checkpoint"));
    let (write, ()) = best_of(runs, || store.save(&bytes).expect("write"));
    let (restore, restored) = best_of(runs, || {
        let loaded = store.load().expect("read").expect("present");
        let decoded = codec::decode_segments(&loaded).expect("decodes");
        registry().restore_decoded(&decoded, now)
    });
    assert_eq!(restored, n, "every session restored");
    CheckpointCost {
        bytes: bytes.len(),
        encode,
        write,
        restore,
        config_maps: bytes.len().div_ceil(DEFAULT_SHARD_BYTES),
    }
}
