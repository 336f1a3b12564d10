//! Realistic registries: ~1.3 sessions per user, GUID session ids, 4 proxies, user names as a
//! directory service has them, sessions started over the last hour and active within the last
//! ten minutes.

use session_monitor::registry::{SessionRecord, UnixMillis};

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

pub fn users_for(sessions: usize) -> usize {
    (sessions as f64 / 1.3) as usize + 1
}

pub fn sessions(n: usize, now: UnixMillis) -> Vec<SessionRecord> {
    let mut rng = fastrand::Rng::with_seed(42);
    let users = users_for(n);
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
                // Active within the last 10 minutes: none has expired (idle_timeout is 30 min).
                last_seen: UnixMillis(started.max(now.0 - rng.u64(..600_000))),
                open_connections: rng.u32(..3),
            }
        })
        .collect()
}
