//! Datagrams as the network delivers them → the size cap and clean-up → the parser → the
//! registry, as the ingest applier does; after each, the registry's counts agree, and at the end
//! a checkpoint of it restores to the same users.
//!
//! Input: datagrams separated by 0x1E (a control character, which no datagram keeps after
//! clean-up); an empty one stands for 31 minutes of silence, enough for idle sessions to expire.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_monitor::history::Sample;
use session_monitor::parser::{self, Limits};
use session_monitor::registry::UnixMillis;
use session_monitor_fuzz::{START, check_counts, history, registry, round_trip};

const SEPARATOR: u8 = 0x1e;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let registry = registry();
    let mut history = history();
    let mut now = START;
    for datagram in data.split(|&b| b == SEPARATOR) {
        if datagram.is_empty() {
            now = UnixMillis(now.0 + 31 * 60 * 1000);
            registry.expire(now);
        } else {
            now = UnixMillis(now.0 + 1000);
            if let Ok(text) = parser::decode_datagram(datagram, &limits, parser::UTF_8)
                && let Ok(event) = parser::parse(&text, &limits)
            {
                registry.apply(&event, now);
            }
        }
        check_counts(&registry);
        let hosts = registry.hosts();
        history.record(
            now,
            Sample::new(registry.take_peak() as u32),
            hosts.iter().map(|h| (h.host.as_str(), h.active_users)),
        );
    }
    round_trip(&registry, &history, now);
});
