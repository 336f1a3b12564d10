//! A checkpoint file as found on disk (anything: truncated, bit-flipped, crafted, a
//! decompression bomb) → the decoder → a restore into the registry and the history, as the
//! service does at start. Whatever decodes must restore to a consistent registry, checkpoint
//! again and restore to the same users; the history's read paths must answer.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use session_monitor::checkpoint::codec;
use session_monitor::history::peaks;
use session_monitor::registry::UnixMillis;
use session_monitor_fuzz::{START, history, registry_restored, round_trip};

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = codec::decode_segments(data) else {
        return;
    };
    let now = START;
    let registry = registry_restored(&decoded, now);
    let mut history = history();
    history.restore(decoded.history_hosts.clone(), decoded.history.clone(), now);
    let day = Duration::from_secs(24 * 3600);
    let _ = history.range(
        UnixMillis(now.0 - 14 * 86_400_000),
        now,
        Duration::from_secs(60),
    );
    let _ = history.range(UnixMillis(0), now, day);
    let _ = peaks(&history, now, 14);
    round_trip(&registry, &history, now);
});
