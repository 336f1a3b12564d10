//! What the service's tasks share: the registry, change signals, metrics and readiness.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use crate::history::History;
use crate::metrics::Metrics;
use crate::qlik::reconciler::QlikStatus;
use crate::registry::{ShardedRegistry, UnixMillis};

pub struct State {
    registry: ShardedRegistry,
    /// Bumped on every registry mutation (including a refreshed last-seen time).
    revision: AtomicU64,
    /// Bumped when the set of sessions changed, i.e. when published state may have; the MQTT
    /// publisher waits on it.
    membership: watch::Sender<u64>,
    pub metrics: Metrics,
    ready: AtomicBool,
    /// Reconciliation with the Qlik proxy API, for the summary; `None` while it is off.
    qlik: Mutex<Option<QlikStatus>>,
    /// Active users per minute (its own lock: a sample or a view never waits for a shard).
    history: Mutex<History>,
    /// Warnings the checkpoint task repeats while a condition lasts, once per 10 minutes.
    pub checkpoint_warnings: Mutex<crate::ratelimit::RateLimiter>,
}

impl State {
    pub fn new(registry: ShardedRegistry, metrics: Metrics) -> State {
        State {
            registry,
            revision: AtomicU64::new(0),
            membership: watch::Sender::new(0),
            metrics,
            ready: AtomicBool::new(false),
            qlik: Mutex::new(None),
            history: Mutex::new(History::new(crate::history::DEFAULT_RETENTION)),
            checkpoint_warnings: Mutex::new(crate::ratelimit::RateLimiter::new(
                std::time::Duration::from_secs(600),
            )),
        }
    }

    /// The registry, for reading. Each call locks one shard at a time (see [`ShardedRegistry`]);
    /// changes go through the methods below, which also signal them.
    pub fn registry(&self) -> &ShardedRegistry {
        &self.registry
    }

    /// Removes silent sessions, counts them, and signals the change.
    pub fn expire(&self, now: UnixMillis) {
        let expired = self.registry.expire(now);
        if expired.idle + expired.max_idle > 0 {
            self.metrics.expired(expired);
            self.changed(true);
            tracing::debug!(
                idle = expired.idle,
                max_idle = expired.max_idle,
                "expired silent sessions"
            );
        }
    }

    /// Records that the registry changed; `membership` when sessions were added or removed.
    pub fn changed(&self, membership: bool) {
        self.revision.fetch_add(1, Ordering::AcqRel);
        if membership {
            self.membership.send_modify(|v| *v += 1);
        }
    }

    /// The registry's revision: the checkpoint writer compares it with the one it saved.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    pub fn subscribe_membership(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.metrics.ready.set(1);
    }

    pub fn qlik_status(&self) -> MutexGuard<'_, Option<QlikStatus>> {
        self.qlik.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
