//! Waiting by polling with a deadline: nothing in the tests sleeps a fixed time to "let things
//! settle", and a timeout says what it waited for and what it last saw.

use std::time::{Duration, Instant};

/// How long an awaited condition may take unless a test says otherwise.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// How often a condition is checked.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Ok`, or panics after [`DEADLINE`] with `what` and the last
/// state `check` described.
pub fn wait_for<T>(what: &str, check: impl FnMut() -> Result<T, String>) -> T {
    wait_for_within(what, DEADLINE, check)
}

/// [`wait_for`] with a deadline of its own (pods starting, images unpacking, large batches).
pub fn wait_for_within<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) => assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; last seen: {last}"
            ),
        }
        std::thread::sleep(POLL);
    }
}

/// [`wait_for_within`] for a check that has nothing to say while it waits.
pub fn until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    wait_for_within(what, limit, || check().ok_or_else(|| "not yet".to_owned()))
}
