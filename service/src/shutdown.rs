//! One ordered shutdown for every task of the service.
//!
//! The order matters for exact counts: ingest stops first, so that the final checkpoint holds
//! every datagram that was received; then the checkpoint is written (HTTP and the expiry sweep
//! stop with it); then MQTT publishes the last state and `offline`. Each task is handed a
//! [`Stop`] for its own [`Phase`] and waits on nothing else; [`Shutdown`] moves through the
//! phases, in order, from one place ([`crate::service::run`]).

use tokio::sync::watch;

/// Phases of a shutdown, in the order they are entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Ingest has stopped: the checkpoint writer saves once more and returns; HTTP and the
    /// expiry sweep stop.
    Saving,
    /// The final checkpoint is written: MQTT publishes the last state and `offline`.
    Closing,
}

/// Moves the service through the phases.
pub struct Shutdown {
    phase: watch::Sender<Phase>,
}

/// What one task waits on: the phase at which it stops.
#[derive(Clone, Debug)]
pub struct Stop {
    phase: watch::Receiver<Phase>,
    at: Phase,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            phase: watch::Sender::new(Phase::Running),
        }
    }
}

impl Shutdown {
    /// A [`Stop`] that fires when `phase` is entered.
    pub fn at(&self, phase: Phase) -> Stop {
        Stop {
            phase: self.phase.subscribe(),
            at: phase,
        }
    }

    /// Enters `phase` (and every phase before it).
    pub fn enter(&self, phase: Phase) {
        self.phase.send_if_modified(|current| {
            let later = phase > *current;
            if later {
                *current = phase;
            }
            later
        });
    }
}

impl Stop {
    /// Resolves once this task's phase has been entered (or the service is gone).
    pub async fn requested(&mut self) {
        let at = self.at;
        // The borrowed value is dropped at once, so the future stays Send.
        let _ = self.phase.wait_for(|phase| *phase >= at).await;
    }

    pub fn is_requested(&self) -> bool {
        *self.phase.borrow() >= self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn each_stop_fires_at_its_phase_and_phases_only_advance() {
        let shutdown = Shutdown::default();
        let (mut saving, mut closing) = (shutdown.at(Phase::Saving), shutdown.at(Phase::Closing));
        assert!(!saving.is_requested());
        shutdown.enter(Phase::Saving);
        tokio::time::timeout(Duration::from_secs(1), saving.requested())
            .await
            .expect("saving fires");
        assert!(!closing.is_requested());
        shutdown.enter(Phase::Running); // never back
        assert!(saving.is_requested());
        shutdown.enter(Phase::Closing);
        closing.requested().await;
        assert!(
            shutdown.at(Phase::Saving).is_requested(),
            "a late subscriber sees it too"
        );
    }

    #[tokio::test]
    async fn a_dropped_shutdown_releases_every_stop() {
        let shutdown = Shutdown::default();
        let mut stop = shutdown.at(Phase::Closing);
        drop(shutdown);
        tokio::time::timeout(Duration::from_secs(1), stop.requested())
            .await
            .expect("released");
    }
}
