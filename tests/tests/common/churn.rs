//! A registry that changes in known batches, for the tests that crash the service or its store
//! in the middle of checkpoint writes and then ask whether the checkpoint is whole.
//!
//! One session per user: user `LAB\k0000042` holds the session with id [`session_id`]`(42)` on
//! one of four proxies. Sessions start in increasing order and stop oldest first. After a
//! crash, the stored checkpoint is compared with the state accepted before the last batch, one
//! session at a time: each must be as it was before the batch or as the batch left it. A
//! session of the old state that the batch did not stop is missing only if a write lost it; a
//! session that is neither in the old state nor started by the batch comes from an older write
//! (a stop undone) — both are what "a mix" of two checkpoints looks like. A torn or mixed store
//! that does not decode fails earlier, in the caller's read.

use std::collections::BTreeSet;
use std::ops::Range;

use super::datagram::own;
use super::{Service, wait_for};

/// What one batch did: sessions `starts` started and `stops` stopped.
pub struct Batch {
    pub starts: Range<u64>,
    pub stops: Vec<u64>,
}

impl Batch {
    /// The batch's datagrams: its starts, then its stops.
    pub fn datagrams(&self) -> Vec<String> {
        let starts = self.starts.clone().map(|n| datagram("Start session", n));
        let stops = self.stops.iter().map(|&n| datagram("Stop session", n));
        starts.chain(stops).collect()
    }
}

#[derive(Default)]
pub struct Churn {
    next: u64,
    /// The accepted state: what the store held after the last check.
    held: BTreeSet<u64>,
}

impl Churn {
    /// A churn whose accepted state is `held`, with new sessions numbered from `next`.
    pub fn with_state(held: BTreeSet<u64>, next: u64) -> Churn {
        Churn { next, held }
    }

    /// Sessions in the accepted state.
    pub fn held(&self) -> &BTreeSet<u64> {
        &self.held
    }

    /// `starts` new sessions, and stops of the `stops` oldest held ones.
    pub fn batch(&mut self, starts: u64, stops: usize) -> Batch {
        let first = self.next;
        self.next += starts;
        Batch {
            starts: first..self.next,
            stops: self.held.iter().take(stops).copied().collect(),
        }
    }

    /// Checks what the store holds after `batch` against the accepted state, and accepts it.
    pub fn check(&mut self, batch: &Batch, stored: BTreeSet<u64>) -> Result<(), String> {
        let stopped: BTreeSet<u64> = batch.stops.iter().copied().collect();
        if let Some(lost) = self
            .held
            .iter()
            .find(|n| !stopped.contains(n) && !stored.contains(n))
        {
            return Err(format!(
                "session {lost} was held before the batch, not stopped by it, and is not in the checkpoint"
            ));
        }
        if let Some(stale) = stored
            .iter()
            .find(|n| !self.held.contains(n) && !batch.starts.contains(n))
        {
            return Err(format!(
                "session {stale} is in the checkpoint but was neither held before the batch nor started by it"
            ));
        }
        self.held = stored;
        Ok(())
    }
}

/// The session number of a checkpointed user id, `k0000042` → 42.
pub fn number(user_id: &str) -> u64 {
    user_id
        .strip_prefix('k')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{user_id:?} is not a churn user"))
}

pub fn datagram(command: &str, n: u64) -> String {
    own(
        command,
        &format!("qs-{}", n % 4),
        "LAB",
        &format!("k{n:07}"),
        &session_id(n),
    )
}

/// A proxy session id shaped like Qlik's (a UUID), different for every `n`, and as
/// incompressible as real ones, so a checkpoint has a realistic size.
pub fn session_id(n: u64) -> String {
    fn splitmix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    let (a, b) = (splitmix(2 * n), splitmix(2 * n + 1));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// The service's debug event at the start of each checkpoint write.
pub const WRITE_STARTED: &str = "checkpoint write started";

/// Whether a killed process's `log` ends inside a checkpoint write.
pub fn killed_in_a_write(log: &str) -> bool {
    let last = |what: &str| log.rfind(what);
    let ended = last("checkpoint written").max(last("checkpoint write failed"));
    last(WRITE_STARTED) > ended
}

/// Sends `batch` at full speed and returns once a checkpoint write has started after it, with the
/// log's length before, for [`kill_in_a_write`]: kills aimed at writes rather than at the idle
/// time between them.
pub fn send_until_a_write_starts(service: &Service, batch: &Batch) -> u64 {
    for d in batch.datagrams() {
        service.send(d);
    }
    let offset = service.log_len();
    wait_for("a checkpoint write to start", || {
        service
            .log_since(offset)
            .contains(WRITE_STARTED)
            .then_some(())
    });
    offset
}

/// SIGKILL after `delay`; whether it landed inside a checkpoint write (the log since `offset`
/// ends in one).
pub fn kill_in_a_write(service: &mut Service, offset: u64, delay: std::time::Duration) -> bool {
    std::thread::sleep(delay);
    service.signal(libc::SIGKILL);
    service.wait_exit();
    killed_in_a_write(&service.log_since(offset))
}
