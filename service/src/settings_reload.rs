//! The one setting that changes without a restart: `checkpoint_configmap_shards`.
//!
//! When a checkpoint outgrows its shard ConfigMaps, the operator grants more (the Role and the
//! ConfigMaps first) and then raises the setting in the mounted configuration file, without
//! rolling the pod: a restart would leave the proxies' datagrams unheard for seconds. The kubelet
//! refreshes a mounted ConfigMap within a minute or two; this task reads the file every
//! [`INTERVAL`] and lets the store use the new shards from its next write. Every other setting
//! takes effect at the next start (the operator rolls the pod for those), which is logged.
//!
//! A pure [`decide`] and a thin polling shell ([`run`]).

use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::configmap::ConfigMapStore;
use crate::config::{CheckpointStoreConfig, ConfigError, Settings, checkpoint_store};
use crate::metrics::Metrics;
use crate::shutdown::Stop;
use crate::state::State;

/// How often the file is read: small against the kubelet's own refresh (a minute or two).
pub const INTERVAL: Duration = Duration::from_secs(10);

pub use crate::config::FileSource as Source;

/// What a changed file means for the running service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    RaiseShards {
        from: usize,
        to: usize,
    },
    /// A running store never gives up shards: the committed checkpoint may live in them.
    LowerShardsIgnored {
        from: usize,
        to: usize,
    },
    /// Settings other than the shards differ from those the service started with.
    RestartNeeded,
    Invalid(String),
}

crate::metrics::label_set! {
    /// The `outcome` label of `session_monitor_config_reloads_total`.
    Outcome {
        ShardsRaised => "shards_raised",
        LoweringIgnored => "lowering_ignored",
        RestartNeeded => "restart_needed",
        Invalid => "invalid",
    }
}

impl Change {
    pub fn outcome(&self) -> Outcome {
        match self {
            Change::RaiseShards { .. } => Outcome::ShardsRaised,
            Change::LowerShardsIgnored { .. } => Outcome::LoweringIgnored,
            Change::RestartNeeded => Outcome::RestartNeeded,
            Change::Invalid(_) => Outcome::Invalid,
        }
    }
}

/// What to do about the settings `now` (flags over the file as it is now), for a service that
/// started with `started` and whose store may use `shards` shard ConfigMaps.
pub fn decide(
    started: &Settings,
    shards: usize,
    now: Result<Settings, ConfigError>,
) -> Vec<Change> {
    let now = match now {
        Ok(now) => now,
        Err(error) => return vec![Change::Invalid(error.to_string())],
    };
    let mut changes = Vec::new();
    match checkpoint_store(&now) {
        Err(error) => return vec![Change::Invalid(error.to_string())],
        Ok(CheckpointStoreConfig::ConfigMap { max_shards, .. }) if max_shards > shards => {
            changes.push(Change::RaiseShards {
                from: shards,
                to: max_shards,
            });
        }
        Ok(CheckpointStoreConfig::ConfigMap { max_shards, .. }) if max_shards < shards => {
            changes.push(Change::LowerShardsIgnored {
                from: shards,
                to: max_shards,
            });
        }
        Ok(_) => {}
    }
    let others = Settings {
        checkpoint_configmap_shards: started.checkpoint_configmap_shards,
        ..now
    };
    if others != *started {
        changes.push(Change::RestartNeeded);
    }
    changes
}

/// Logs and counts one change (each happens once per change of the file, so no rate limit).
pub fn record(change: &Change, metrics: &Metrics) {
    metrics
        .config_reloads
        .with_label_values(&[change.outcome().label()])
        .inc();
    match change {
        Change::RaiseShards { from, to } => tracing::info!(
            from,
            to,
            "checkpoint_configmap_shards raised by the configuration file; the next checkpoint may use the new shards"
        ),
        Change::LowerShardsIgnored { from, to } => tracing::warn!(
            from,
            to,
            "checkpoint_configmap_shards lowered in the configuration file: ignored while running (the checkpoint may use the higher shards)"
        ),
        Change::RestartNeeded => tracing::info!(
            "the configuration file changed; settings other than checkpoint_configmap_shards take effect at the next start"
        ),
        Change::Invalid(error) => tracing::warn!(
            %error,
            "the configuration file changed and is invalid; running on as started"
        ),
    }
}

/// Reads `source.path` every [`INTERVAL`] until `stop`, and applies what [`decide`] says
/// whenever the file's bytes change.
pub async fn run(source: Source, store: Arc<ConfigMapStore>, state: Arc<State>, mut stop: Stop) {
    let mut seen: Option<Vec<u8>> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(INTERVAL) => {}
            () = stop.requested() => return,
        }
        let bytes = match tokio::fs::read(&source.path).await {
            Ok(bytes) => bytes,
            Err(error) => {
                // A ConfigMap volume is swapped atomically; an error here is not a half file.
                tracing::debug!(%error, path = %source.path.display(), "cannot read the configuration file");
                continue;
            }
        };
        if seen.as_ref() == Some(&bytes) {
            continue;
        }
        let now = std::str::from_utf8(&bytes)
            .map_err(|e| e.to_string())
            .and_then(Settings::from_toml)
            .map(|file| source.flags.clone().or(file))
            .map_err(|message| ConfigError::File {
                path: source.path.clone(),
                message,
            });
        seen = Some(bytes);
        for change in decide(&source.started, store.max_shards(), now) {
            if let Change::RaiseShards { to, .. } = change {
                store.raise_max_shards(to);
            }
            record(&change, &state.metrics);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(shards: Option<usize>) -> Settings {
        Settings {
            checkpoint_configmap: Some("qlik-prod-checkpoint".into()),
            checkpoint_configmap_shards: shards,
            ..Settings::default()
        }
    }

    #[test]
    fn a_higher_shard_count_is_applied_and_nothing_else_is_said() {
        let started = settings(Some(16));
        assert_eq!(
            decide(&started, 16, Ok(settings(Some(18)))),
            vec![Change::RaiseShards { from: 16, to: 18 }]
        );
        // Once raised, the same file says nothing more.
        assert_eq!(decide(&started, 18, Ok(settings(Some(18)))), vec![]);
        // The default (8) counts as a setting.
        assert_eq!(
            decide(&settings(None), 8, Ok(settings(Some(9)))),
            vec![Change::RaiseShards { from: 8, to: 9 }]
        );
    }

    #[test]
    fn a_lower_shard_count_is_ignored_while_running() {
        assert_eq!(
            decide(&settings(Some(16)), 18, Ok(settings(Some(12)))),
            vec![Change::LowerShardsIgnored { from: 18, to: 12 }]
        );
    }

    #[test]
    fn other_settings_wait_for_the_next_start_and_shards_still_apply() {
        let started = settings(Some(16));
        let mut now = settings(Some(20));
        now.idle_timeout = Some(Duration::from_secs(45 * 60));
        assert_eq!(
            decide(&started, 16, Ok(now)),
            vec![
                Change::RaiseShards { from: 16, to: 20 },
                Change::RestartNeeded
            ]
        );
    }

    #[test]
    fn an_invalid_file_changes_nothing() {
        let error = ConfigError::File {
            path: "/etc/session-monitor/config.toml".into(),
            message: "expected `=`".into(),
        };
        let changes = decide(&settings(Some(16)), 16, Err(error));
        assert!(
            matches!(&changes[..], [Change::Invalid(m)] if m.contains("expected `=`")),
            "{changes:?}"
        );
        // Out of range: named, not applied.
        let changes = decide(&settings(Some(16)), 16, Ok(settings(Some(1000))));
        assert!(
            matches!(&changes[..], [Change::Invalid(m)] if m.contains("checkpoint_configmap_shards")),
            "{changes:?}"
        );
    }

    #[test]
    fn every_change_is_counted_under_its_outcome() {
        let metrics = Metrics::new();
        record(&Change::RaiseShards { from: 16, to: 18 }, &metrics);
        record(&Change::RestartNeeded, &metrics);
        let count = |o: Outcome| metrics.config_reloads.with_label_values(&[o.label()]).get();
        assert_eq!(count(Outcome::ShardsRaised), 1);
        assert_eq!(count(Outcome::RestartNeeded), 1);
        assert_eq!(count(Outcome::Invalid), 0);
    }
}
