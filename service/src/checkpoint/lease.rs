//! One checkpoint writer at a time: the holder of a Lease beside the checkpoint ConfigMaps.
//!
//! A rollout with a surge runs the old pod and the new one side by side for a while, both
//! receiving datagrams. Only the Lease's holder writes the checkpoint, publishes to MQTT and
//! reconciles with Qlik; the other (the new pod) restores the checkpoint, counts the datagrams
//! that reach it and waits. The old pod writes its last checkpoint when it stops and then
//! releases the Lease; the new pod takes it and takes over that checkpoint
//! ([`crate::registry::ShardedRegistry::take_over`]). A holder that dies without releasing it
//! loses it when it expires.
//!
//! The Lease protocol is kube-lease-manager's (the operator's leader election uses it too).

use std::time::Duration;

use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Store;

/// How long a holder's claim lasts without renewal: a waiting pod sleeps until the claim it saw
/// expires, so this bounds a handover's gap when the release is missed, and a dead holder's.
const DURATION_SECONDS: u64 = 10;
/// Renewed this long before it expires.
const GRACE_SECONDS: u64 = 3;
/// A release at shutdown gets this long (the pod's grace period has the final checkpoint in it).
const RELEASE_DEADLINE: Duration = Duration::from_secs(5);

/// The Lease, held or waited for.
pub struct WriterLease {
    name: String,
    namespace: String,
    identity: String,
    client: kube::Client,
    /// `None` while another process holds the Lease and this one only watches it.
    manager: Option<Manager>,
}

/// kube-lease-manager's task, which holds (or takes) the Lease and renews it.
struct Manager {
    held: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("checkpoint_lease needs the ConfigMap store (checkpoint_configmap)")]
    NoConfigMapStore,
    #[error("checkpoint Lease {name}: {source}")]
    Api {
        name: String,
        source: LeaseManagerError,
    },
}

/// While another process holds the Lease, it is read this often: a release is seen within it
/// (kube-lease-manager alone would wait for the claim it saw to expire).
const WATCH_EVERY: Duration = Duration::from_secs(1);

impl WriterLease {
    /// Starts contending for `name` in the store's namespace as `identity` (the pod's name).
    pub async fn start(
        store: &Store,
        name: &str,
        identity: &str,
    ) -> Result<WriterLease, LeaseError> {
        let Store::ConfigMap(configmaps) = store else {
            return Err(LeaseError::NoConfigMapStore);
        };
        let (client, namespace) = configmaps.client_and_namespace();
        let mut lease = WriterLease {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            client,
            manager: None,
        };
        // Contend at once unless another process holds it now (read errors: contend, and let
        // the manager retry).
        if !lease.held_by_another().await {
            lease.contend().await?;
        }
        tracing::info!(
            lease = name,
            namespace,
            identity,
            "contending for the checkpoint Lease"
        );
        Ok(lease)
    }

    /// Whether the Lease exists with a holder other than this process and a claim that has not
    /// expired.
    async fn held_by_another(&self) -> bool {
        use k8s_openapi::api::coordination::v1::Lease;
        let api: kube::Api<Lease> = kube::Api::namespaced(self.client.clone(), &self.namespace);
        let Ok(Some(lease)) = api.get_opt(&self.name).await else {
            return false;
        };
        let Some(spec) = lease.spec else {
            return false;
        };
        let holder = spec.holder_identity.unwrap_or_default();
        if holder.is_empty() || holder == self.identity {
            return false;
        }
        let renewed = spec.renew_time.map(|t| t.0.as_second());
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        renewed.is_some_and(|at| at + duration > now)
    }

    async fn contend(&mut self) -> Result<(), LeaseError> {
        let manager = LeaseManagerBuilder::new(self.client.clone(), &self.name)
            .with_namespace(&self.namespace)
            .with_identity(&self.identity)
            .with_duration(DURATION_SECONDS)
            .with_grace(GRACE_SECONDS)
            .with_field_manager("session-monitor")
            .build()
            .await
            .map_err(|source| LeaseError::Api {
                name: self.name.clone(),
                source,
            })?;
        let (held, task) = manager.watch().await;
        self.manager = Some(Manager { held, task });
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this process holds the Lease now.
    pub fn held(&self) -> bool {
        self.manager.as_ref().is_some_and(|m| *m.held.borrow())
    }

    /// Resolves once this process holds the Lease: while another holds it, the Lease is read
    /// every second, and contended for as soon as it is released or its claim expired.
    pub async fn acquired(&mut self) {
        loop {
            if self.manager.is_none() {
                while self.held_by_another().await {
                    tokio::time::sleep(WATCH_EVERY).await;
                }
                if let Err(error) = self.contend().await {
                    tracing::warn!(lease = self.name, %error, "cannot contend for the checkpoint Lease; retrying");
                    tokio::time::sleep(WATCH_EVERY).await;
                    continue;
                }
            }
            let Some(manager) = self.manager.as_mut() else {
                continue;
            };
            if manager.held.wait_for(|held| *held).await.is_ok() {
                return;
            }
            // The manager's task ended: start over.
            self.manager = None;
        }
    }

    /// Resolves when this process, holding the Lease, loses it to another.
    pub async fn lost(&mut self) {
        let lost = match self.manager.as_mut() {
            Some(m) => m.held.wait_for(|held| !*held).await.is_ok(),
            None => false,
        };
        if !lost {
            std::future::pending::<()>().await;
        }
    }

    /// Releases the Lease (if held), so that a waiting process takes it at once.
    pub async fn release(self) {
        let Some(Manager { held, task }) = self.manager else {
            return;
        };
        let name = self.name;
        let was_held = *held.borrow();
        // Closing the channel makes the manager's task release the Lease and end.
        drop(held);
        match tokio::time::timeout(RELEASE_DEADLINE, task).await {
            Ok(Ok(Ok(_))) if was_held => {
                tracing::info!(lease = name, "released the checkpoint Lease")
            }
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(
                lease = name,
                %error,
                "could not release the checkpoint Lease; it expires by itself"
            ),
            Ok(Err(error)) => {
                tracing::warn!(lease = name, %error, "the checkpoint Lease's task failed")
            }
            Err(_) => tracing::warn!(
                lease = name,
                "releasing the checkpoint Lease timed out; it expires by itself"
            ),
        }
    }
}
