//! Checkpoint cost for a realistic registry: encoded size, encode, file write, read and restore
//! times, and how many ConfigMaps it takes. Prints figures beside the SPEC §6 targets.
//!
//! `cargo bench -p session-monitor --bench checkpoint [-- SESSIONS...]` (default 100000).

use std::time::{Duration, Instant};

use session_monitor::checkpoint::codec::{self, Checkpoint};
use session_monitor::checkpoint::configmap::DEFAULT_SHARD_BYTES;
use session_monitor::checkpoint::file::FileStore;
use session_monitor::exclusions::Exclusions;
use session_monitor::registry::{ExpiryPolicy, Registry, SessionRecord, UnixMillis};

const DIRECTORIES: [&str; 4] = ["LAB", "CORP", "EMEA", "AMER"];
const FIRST: [&str; 12] = [
    "anna", "bjorn", "carla", "david", "elin", "farid", "greta", "hugo", "ines", "jonas", "karin",
    "lars",
];
const LAST: [&str; 10] = [
    "berg",
    "smith",
    "johansson",
    "garcia",
    "nilsson",
    "fischer",
    "rossi",
    "kowalski",
    "larsen",
    "meyer",
];

/// `n` sessions as a Qlik site has them: ~1.3 sessions per user, GUID session ids, 4 proxies,
/// start times spread over the last hour.
fn realistic(n: usize, now: UnixMillis) -> Vec<SessionRecord> {
    let mut rng = fastrand::Rng::with_seed(42);
    let users = (n as f64 / 1.3) as usize + 1;
    (0..n)
        .map(|i| {
            let u = if i < users { i } else { rng.usize(..users) };
            let guid = format!(
                "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                rng.u32(..),
                rng.u16(..),
                rng.u16(..0x1000),
                rng.u16(..) | 0x8000,
                rng.u64(..1 << 48)
            );
            let started = now.0 - rng.u64(..3_600_000);
            SessionRecord {
                proxy_session_id: Some(guid),
                host: format!("qs-proxy-{}.corp.example", 1 + rng.usize(..4)),
                user_directory: DIRECTORIES[u % 4].to_owned(),
                user_id: format!("{}.{}{}", FIRST[u % 12], LAST[(u / 12) % 10], u / 120),
                started: UnixMillis(started),
                last_seen: UnixMillis(started + rng.u64(..(now.0 - started).max(1))),
                open_connections: rng.u32(..3),
            }
        })
        .collect()
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

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100_000]
    } else {
        sizes
    };
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "checkpoint benchmark (best of 5 runs; SPEC §6: 100,000 sessions encoded and written < 200 ms, restored < 1 s)"
    );
    println!(
        "{:>10} {:>12} {:>9} {:>10} {:>10} {:>10} {:>10} {:>12} {:>11}",
        "sessions",
        "size",
        "B/session",
        "encode",
        "write",
        "enc+write",
        "read",
        "restore",
        "ConfigMaps"
    );
    for n in sizes {
        let now = UnixMillis::now();
        let sessions = realistic(n, now);
        let checkpoint = Checkpoint {
            saved_at: now,
            hosts: Vec::new(),
            sessions,
        };
        let (encode, bytes) = best_of(5, || codec::encode(&checkpoint));
        let store = FileStore::new(dir.path().join(format!("cp-{n}")));
        let (write, ()) = best_of(5, || store.save(&bytes).expect("write"));
        let (read, loaded) = best_of(5, || store.load().expect("read").expect("present"));
        // Restore = decode + load into a fresh registry, as at start-up.
        let (restore, restored) = best_of(5, || {
            let decoded = codec::decode(&loaded).expect("decodes");
            let mut registry = Registry::new(ExpiryPolicy::default(), Exclusions::default());
            registry.restore_hosts(&decoded.hosts);
            registry.restore(&decoded.sessions, now)
        });
        assert_eq!(restored, n, "every session restored");
        println!(
            "{:>10} {:>9.2} MB {:>9.1} {:>10} {:>10} {:>10} {:>10} {:>12} {:>11}",
            n,
            bytes.len() as f64 / 1e6,
            bytes.len() as f64 / n as f64,
            ms(encode),
            ms(write),
            ms(encode + write),
            ms(read),
            ms(restore),
            bytes.len().div_ceil(DEFAULT_SHARD_BYTES),
        );
    }
    println!(
        "(ConfigMaps: NAME plus shards at {} KiB each; the double-buffered layout needs checkpoint_configmap_shards of at least twice the shards)",
        DEFAULT_SHARD_BYTES / 1024
    );
}
