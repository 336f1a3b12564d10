//! What the fuzz targets share: the registry as the service builds it, and the properties every
//! registry must keep whatever came in. A failed property panics, which libFuzzer reports as a
//! crash with the input that caused it.

use std::time::Duration;

use session_monitor::checkpoint::codec;
use session_monitor::exclusions::Exclusions;
use session_monitor::history::History;
use session_monitor::registry::sharded::ShardedRegistry;
use session_monitor::registry::{ExpiryPolicy, UnixMillis};

/// 2026-11-30T00:00:00Z: a plausible "now" for every target.
pub const START: UnixMillis = UnixMillis(1_796_083_200_000);

/// A registry as the service builds one from its defaults, with an exclusion to exercise.
pub fn registry() -> ShardedRegistry {
    let exclusions = Exclusions::new(["INTERNAL\\sa_*"]).expect("a valid pattern");
    ShardedRegistry::new(ExpiryPolicy::default(), exclusions, 64, 4)
}

/// The registry's own counts agree with each other, however it got there.
pub fn check_counts(registry: &ShardedRegistry) {
    let users = registry.users();
    assert_eq!(
        users.len(),
        registry.active_users(),
        "users listed vs counted"
    );
    let sessions: usize = users.iter().map(|u| u.sessions).sum();
    assert_eq!(
        sessions,
        registry.active_sessions(),
        "sessions per user vs counted"
    );
    let per_host: usize = registry.hosts().iter().map(|h| h.active_sessions).sum();
    assert_eq!(
        per_host,
        registry.active_sessions(),
        "sessions per host vs counted"
    );
    assert!(
        registry.peak() >= registry.active_users(),
        "the peak is below the count"
    );
    assert!(
        users.iter().all(|u| u.sessions > 0),
        "a user without a session is listed"
    );
}

/// What a restore must give back exactly: who is active, with how many sessions and
/// connections on which hosts.
fn fingerprint(registry: &ShardedRegistry) -> Vec<(String, String, usize, u64, Vec<String>)> {
    let mut users: Vec<_> = registry
        .users()
        .into_iter()
        .map(|u| {
            let mut hosts: Vec<String> = u.hosts.iter().map(|h| h.to_lowercase()).collect();
            hosts.sort();
            (
                u.user_directory.to_lowercase(),
                u.user_id.to_lowercase(),
                u.sessions,
                u.open_connections,
                hosts,
            )
        })
        .collect();
    users.sort();
    users
}

/// Checkpoints `registry` (with `history`) as the service does, decodes the bytes and restores
/// them into a fresh registry: the same users and sessions come back.
pub fn round_trip(registry: &ShardedRegistry, history: &History, now: UnixMillis) {
    let (mut body, written) = registry.write_checkpoint(now);
    assert_eq!(written, registry.active_sessions(), "sessions written");
    body.history(history);
    let bytes = body.finish();
    let decoded = codec::decode_segments(&bytes).expect("a checkpoint we wrote decodes");
    let restored = registry_restored(&decoded, now);
    assert_eq!(
        fingerprint(&restored),
        fingerprint(registry),
        "restored registry differs"
    );
    let mut again = History::new(history.retention());
    again.restore(decoded.history_hosts, decoded.history, now);
    assert_eq!(
        again.minutes().len(),
        history.minutes().len(),
        "history minutes restored"
    );
}

/// A fresh registry holding what `decoded` holds (checked for consistency on the way).
pub fn registry_restored(decoded: &codec::Decoded, now: UnixMillis) -> ShardedRegistry {
    let registry = registry();
    let restored = registry.restore_decoded(decoded, now);
    assert_eq!(
        restored,
        registry.active_sessions(),
        "restored vs counted sessions"
    );
    check_counts(&registry);
    registry
}

/// The history as the service keeps it by default (14 days).
pub fn history() -> History {
    History::new(Duration::from_secs(14 * 24 * 3600))
}
