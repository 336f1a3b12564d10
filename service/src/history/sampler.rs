//! The task that feeds the history: a sample at every change of the registry's membership (at
//! once, then at most every 50 ms while changes go on), and one at the start of every minute,
//! so that a minute without changes is recorded as what it was rather than as a gap. The total's
//! highest count is exact (the registry keeps the peak between samples); a host's is sampled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{MINUTE_MS, Sample};
use crate::registry::UnixMillis;
use crate::shutdown::Stop;
use crate::state::State;

/// Samples are at most this frequent: a host's count that rises and falls within it is a
/// login racing a logout, not a peak anyone plans for.
const COALESCE: Duration = Duration::from_millis(50);

pub async fn run(state: Arc<State>, mut stop: Stop) {
    let mut changes = state.subscribe_membership();
    let mut last: Option<Instant> = None;
    loop {
        // A change right after a sample waits out the rest of the 50 ms; others go at once.
        if let Some(wait) = last.map(|at| COALESCE.saturating_sub(at.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        changes.borrow_and_update();
        let now = UnixMillis::now();
        sample(&state, now);
        last = Some(Instant::now());
        let next_minute = Duration::from_millis(MINUTE_MS - now.0 % MINUTE_MS);
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(next_minute) => {}
            () = stop.requested() => return,
        }
    }
}

/// Records the registry's counts now. Locks each shard briefly for its per-host counts (work
/// in the number of shards and hosts, not sessions), then the history.
pub fn sample(state: &State, now: UnixMillis) {
    let registry = state.registry();
    let hosts = registry.hosts();
    let total = Sample {
        max: registry.take_peak() as u32,
        last: registry.active_users() as u32,
    };
    let new_minute = state.history().record(
        now,
        total,
        hosts.iter().map(|h| (h.host.as_str(), h.active_users)),
    );
    if new_minute {
        // The checkpoint carries the history: a new minute is a change worth saving.
        state.changed(false);
    }
}
