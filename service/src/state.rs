//! What the service's tasks share: the registry, change signals, metrics and readiness.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::registry::Registry;

pub struct State {
    registry: Mutex<Registry>,
    /// Bumped on every registry mutation (including a refreshed last-seen time).
    pub revision: AtomicU64,
    /// The revision the last successful checkpoint holds.
    pub saved_revision: AtomicU64,
    /// Bumped when the set of sessions changed, i.e. when published state may have; the MQTT
    /// publisher waits on it.
    membership: watch::Sender<u64>,
    pub metrics: Metrics,
    ready: AtomicBool,
}

impl State {
    pub fn new(registry: Registry, metrics: Metrics) -> State {
        State {
            registry: Mutex::new(registry),
            revision: AtomicU64::new(0),
            saved_revision: AtomicU64::new(0),
            membership: watch::Sender::new(0),
            metrics,
            ready: AtomicBool::new(false),
        }
    }

    /// Runs `f` with the registry locked. Keep `f` short: the ingest loop waits meanwhile.
    pub fn with_registry<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        // A panic while holding the lock cannot leave the registry half-updated in a way that
        // matters more than stopping would, so a poisoned lock is used as is.
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut registry)
    }

    /// Records that the registry changed; `membership` when sessions were added or removed.
    pub fn changed(&self, membership: bool) {
        self.revision.fetch_add(1, Ordering::AcqRel);
        if membership {
            self.membership.send_modify(|v| *v += 1);
        }
    }

    pub fn unsaved(&self) -> bool {
        self.revision.load(Ordering::Acquire) != self.saved_revision.load(Ordering::Acquire)
    }

    pub fn subscribe_membership(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.metrics.ready.set(1);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Resolves once `shutdown` says stop (or its sender is gone). A separate function so that the
/// `watch::Ref` it produces is never held in a caller's future, which would make it `!Send`.
pub async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
