//! The reconcile task: every interval, find the proxies (the repository, or the configured
//! list), fetch every node's virtual proxies in parallel, merge each node whose lists all
//! arrived, and record the outcome in metrics, the summary and the log.
//!
//! A node is merged only when every one of its virtual proxies answered: a partial list would
//! remove the sessions of the virtual proxy that did not answer. A node that fails keeps its
//! sessions as the events left them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::api;
use super::client::{QlikClient, RequestError, TlsSetupError};
use super::settings::{ApiAddress, ProxyTarget, QlikConfig, Sources};
use crate::metrics::label_set;
use crate::registry::{Pairing, Reconciled, UnixMillis};
use crate::shutdown::Stop;
use crate::state::State;

/// With reconciliation only at start (`qlik_reconcile_interval` 0s), a failed first round is
/// retried this often until one succeeds.
const RETRY: Duration = Duration::from_secs(10);
/// A node that stays down is logged again at most this often.
const REPEAT_DOWN_LOG: Duration = Duration::from_secs(600);

/// What `/api/v1/summary` shows as `qlik_api`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct QlikStatus {
    /// `discovery` (from the repository) or `static` (`qlik_proxies`).
    pub source: &'static str,
    /// The repository's address, with discovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository_up: Option<bool>,
    /// `None`: only at start.
    pub interval_seconds: Option<u64>,
    pub last_round: Option<UnixMillis>,
    /// The last round in which every node was reconciled.
    pub last_success: Option<UnixMillis>,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's API, as found or configured.
    pub node: String,
    /// The proxy's logged name its sessions are counted under.
    pub host: String,
    pub virtual_proxies: Vec<String>,
    pub up: bool,
    pub last_success: Option<UnixMillis>,
    pub last_error: Option<String>,
    /// Sessions the node listed at its last success, all virtual proxies together.
    pub listed_sessions: usize,
    /// What the last success did.
    pub added: usize,
    pub removed: usize,
    pub in_grace: usize,
    /// `count` until an event's session id has been seen in the node's list, then `id`.
    pub pairing: &'static str,
    /// Whether the session ids the node's events carry have proven equal to its API's (`false`:
    /// the proxy logs a salted hash, so its sessions are matched by count).
    pub event_ids_match_api: bool,
    /// The last event from the node's host (restored hosts: their newest session's activity).
    pub last_event: Option<UnixMillis>,
    /// Whether an event has arrived from the node since this service started.
    pub heard_since_start: bool,
    /// The API lists sessions on the node and not one event has arrived from it since this
    /// service started: its appender is not sending (see the Qlik README, "Nothing arrives").
    pub silent: bool,
}

/// Whether a node has been heard from, from its host's last event: pure, so the rule is tested
/// apart from the clock and the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Heard {
    since_start: bool,
    silent: bool,
}

impl Heard {
    fn of(
        last_event: Option<UnixMillis>,
        started: UnixMillis,
        listed_sessions: usize,
        now: UnixMillis,
        silent_after: Duration,
    ) -> Heard {
        let since_start = last_event.is_some_and(|at| at >= started);
        let waited = now.0.saturating_sub(started.0) >= silent_after.as_millis() as u64;
        Heard {
            since_start,
            // A node without sessions may just be quiet (a night, a standby node), and right
            // after a start the idle users of a working node have not made an event yet; one
            // whose users the API lists and that sent nothing for `silent_after` is not sending.
            silent: !since_start && listed_sessions > 0 && waited,
        }
    }
}

/// What one node remembers between rounds.
struct Node {
    status: NodeStatus,
    pairing: Pairing,
    /// When the node's failure was last logged, to repeat it only now and then.
    down_logged: Option<Instant>,
}

pub struct Reconciler {
    config: QlikConfig,
    client: QlikClient,
    state: Arc<State>,
    nodes: Mutex<BTreeMap<ApiAddress, Node>>,
    repository_down_logged: Mutex<Option<Instant>>,
    /// An event after this is one "since the service started".
    started: UnixMillis,
}

/// The outcome of one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// Every node reconciled.
    Ok,
    /// Some nodes failed.
    Partial,
    /// No node reconciled (or discovery failed).
    Failed,
}

impl Round {
    fn as_str(self) -> &'static str {
        match self {
            Round::Ok => "ok",
            Round::Partial => "partial",
            Round::Failed => "failed",
        }
    }
}

impl Reconciler {
    /// Loads the certificates (an unreadable file stops the start, naming its setting).
    pub fn new(config: QlikConfig, state: Arc<State>) -> Result<Reconciler, TlsSetupError> {
        let client = QlikClient::new(&config)?;
        if !config.tls.verify {
            tracing::warn!(
                "qlik_insecure_skip_tls_verify is on: the Qlik services' certificates are not verified"
            );
        }
        // A stop must be remembered as long as a merge may look back: the grace before the
        // fetch plus the longest request.
        state
            .registry()
            .remember_stops(config.grace + config.request_timeout + Duration::from_secs(1));
        let status = QlikStatus {
            source: match config.sources {
                Sources::Discovery { .. } => "discovery",
                Sources::Static(_) => "static",
            },
            repository: match &config.sources {
                Sources::Discovery { repository } => Some(repository.to_string()),
                Sources::Static(_) => None,
            },
            interval_seconds: config.interval.map(|i| i.as_secs()),
            ..QlikStatus::default()
        };
        *state.qlik_status() = Some(status);
        Ok(Reconciler {
            config,
            client,
            state,
            nodes: Mutex::new(BTreeMap::new()),
            repository_down_logged: Mutex::new(None),
            started: UnixMillis::now(),
        })
    }

    /// Reconciles now, then every interval, until `stop`; `first` is told when the first
    /// round is over (readiness waits for it, within `qlik_startup_timeout`).
    pub async fn run(self: Arc<Self>, first: oneshot::Sender<Round>, mut stop: Stop) {
        let round = tokio::select! {
            round = self.round() => round,
            () = stop.requested() => return,
        };
        let _ = first.send(round);
        let mut succeeded = round == Round::Ok;
        loop {
            let wait = match self.config.interval {
                Some(interval) => interval,
                None if succeeded => return,
                None => RETRY,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.requested() => return,
            }
            let round = tokio::select! {
                round = self.round() => round,
                () = stop.requested() => return,
            };
            succeeded |= round == Round::Ok;
        }
    }

    /// One round over every node.
    pub async fn round(self: &Arc<Self>) -> Round {
        let started = UnixMillis::now();
        let targets = match &self.config.sources {
            Sources::Static(targets) => Some(targets.clone()),
            Sources::Discovery { repository } => self.discover(repository).await,
        };
        let round = match targets {
            None => Round::Failed,
            Some(targets) => {
                let mut by_node: BTreeMap<ApiAddress, Vec<String>> = BTreeMap::new();
                for ProxyTarget { node, prefix } in targets {
                    by_node.entry(node).or_default().push(prefix);
                }
                self.forget_nodes_not_in(&by_node);
                let mut nodes = JoinSet::new();
                for (node, prefixes) in by_node {
                    let me = self.clone();
                    nodes.spawn(async move { me.reconcile_node(node, prefixes).await });
                }
                let (mut ok, mut failed) = (0, 0);
                while let Some(done) = nodes.join_next().await {
                    match done {
                        Ok(true) => ok += 1,
                        _ => failed += 1,
                    }
                }
                match (ok, failed) {
                    (_, 0) => Round::Ok,
                    (0, _) => Round::Failed,
                    _ => Round::Partial,
                }
            }
        };
        self.state
            .metrics
            .qlik
            .reconciles
            .with_label_values(&[round.as_str()])
            .inc();
        self.publish_status(|status| {
            status.last_round = Some(started);
            if round == Round::Ok {
                status.last_success = Some(started);
            }
        });
        round
    }

    async fn discover(&self, repository: &ApiAddress) -> Option<Vec<ProxyTarget>> {
        let result = self
            .timed_get(QlikApi::Qrs, repository, api::PROXY_SERVICES_PATH, true)
            .await
            .and_then(|body| {
                api::parse_proxy_services(&body).map_err(|e| RequestError::Body(e.to_string()))
            });
        let metrics = &self.state.metrics.qlik;
        let node = repository.host.as_str();
        set_up(metrics, QlikApi::Qrs, node, result.is_ok());
        let mut logged = self
            .repository_down_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.publish_status(|s| s.repository_up = Some(result.is_ok()));
        match result {
            Ok(targets) => {
                if logged.take().is_some() {
                    tracing::info!(repository = %repository, "Qlik repository answers again");
                }
                Some(targets)
            }
            Err(error) => {
                metrics
                    .errors
                    .with_label_values(&[QlikApi::Qrs.label(), node, error.reason()])
                    .inc();
                if logged.is_none_or(|at| at.elapsed() >= REPEAT_DOWN_LOG) {
                    *logged = Some(Instant::now());
                    tracing::warn!(
                        repository = %repository,
                        %error,
                        "cannot list the proxies from the Qlik repository (qlik_repository_url); counting on events only"
                    );
                }
                None
            }
        }
    }

    /// Fetches and merges one node; `true` on success.
    async fn reconcile_node(self: Arc<Self>, node: ApiAddress, prefixes: Vec<String>) -> bool {
        let fetched_at = UnixMillis::now();
        let mut requests = JoinSet::new();
        for (i, prefix) in prefixes.iter().enumerate() {
            let (me, node, path) = (self.clone(), node.clone(), api::sessions_path(prefix));
            requests.spawn(async move {
                let body = me.timed_get(QlikApi::Qps, &node, &path, false).await;
                let sessions = body.and_then(|body| {
                    api::parse_sessions(&body).map_err(|e| RequestError::Body(e.to_string()))
                });
                (i, sessions)
            });
        }
        let mut lists: Vec<Vec<api::ApiSession>> = prefixes.iter().map(|_| Vec::new()).collect();
        let mut failure = None;
        while let Some(done) = requests.join_next().await {
            match done {
                Ok((i, Ok(sessions))) => lists[i] = sessions,
                Ok((i, Err(error))) => failure = Some((prefixes[i].clone(), error)),
                Err(join) => failure = Some((String::new(), RequestError::Http(join.to_string()))),
            }
        }
        let metrics = &self.state.metrics.qlik;
        set_up(metrics, QlikApi::Qps, &node.host, failure.is_none());
        if let Some((prefix, error)) = failure {
            metrics
                .errors
                .with_label_values(&[QlikApi::Qps.label(), &node.host, error.reason()])
                .inc();
            self.node_failed(&node, &prefixes, &prefix, &error);
            return false;
        }

        let listed = api::listed_users(lists);
        let listed_sessions = listed.iter().map(|u| u.session_ids.len()).sum();
        let host = api::logged_host_name(
            &node.host,
            &self.config.host_aliases,
            &self.state.registry().host_names(),
        );
        let pairing = self.pairing_of(&node);
        let grace = self.config.grace;
        let state = self.state.clone();
        let merge_host = host.clone();
        // Proportional to the registry (one shard at a time): off the async workers.
        let merged = tokio::task::spawn_blocking(move || {
            state
                .registry()
                .reconcile_host(&merge_host, &listed, fetched_at, grace, pairing)
        })
        .await;
        let Ok(done) = merged else {
            self.node_failed(
                &node,
                &prefixes,
                "",
                &RequestError::Http("merge failed".into()),
            );
            return false;
        };
        if done.added + done.removed > 0 {
            self.state.changed(true);
        } else if done.confirmed > 0 {
            self.state.changed(false);
        }
        metrics
            .sessions_added
            .with_label_values(&[&host])
            .inc_by(done.added as u64);
        metrics
            .sessions_removed
            .with_label_values(&[&host])
            .inc_by(done.removed as u64);
        metrics
            .drift
            .with_label_values(&[&host])
            .set((done.added + done.removed) as i64);
        metrics
            .listed_sessions
            .with_label_values(&[&host])
            .set(listed_sessions as i64);
        metrics
            .last_success
            .with_label_values(&[&host])
            .set((fetched_at.0 / 1000) as i64);
        self.node_succeeded(&node, &prefixes, &host, listed_sessions, done, fetched_at);
        true
    }

    async fn timed_get(
        &self,
        api: QlikApi,
        node: &ApiAddress,
        path: &str,
        as_repository_user: bool,
    ) -> Result<hyper::body::Bytes, RequestError> {
        let started = Instant::now();
        let result = self.client.get(node, path, as_repository_user).await;
        self.state
            .metrics
            .qlik
            .request_duration
            .with_label_values(&[api.label()])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    fn pairing_of(&self, node: &ApiAddress) -> Pairing {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.get(node).map_or(Pairing::ByCount, |n| n.pairing)
    }

    fn node_succeeded(
        &self,
        node: &ApiAddress,
        prefixes: &[String],
        host: &str,
        listed_sessions: usize,
        done: Reconciled,
        at: UnixMillis,
    ) {
        // Before the nodes' lock: the host list takes each registry shard's lock in turn.
        let last_event = self
            .state
            .registry()
            .hosts()
            .into_iter()
            .find(|h| h.host.eq_ignore_ascii_case(host))
            .and_then(|h| h.last_event);
        let heard = Heard::of(
            last_event,
            self.started,
            listed_sessions,
            at,
            self.config.silent_after,
        );
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let entry = nodes
            .entry(node.clone())
            .or_insert_with(|| Node::new(node, prefixes, host));
        if heard.silent && !entry.status.silent {
            tracing::warn!(
                node = %node,
                host,
                listed_sessions,
                "the Qlik API lists sessions on a proxy that has sent no event since this service started: its log4net appender is not sending (was remoteAddress resolvable when the proxy service started? see the Qlik README)"
            );
        } else if !heard.silent && entry.status.silent {
            tracing::info!(node = %node, host, "a silent proxy sends events again");
        }
        if entry.down_logged.take().is_some() {
            tracing::info!(node = %node, "Qlik proxy API answers again");
        }
        if done.matched_event_ids > 0 && entry.pairing == Pairing::ByCount {
            entry.pairing = Pairing::ById;
            tracing::info!(node = %node, host, "the proxy's session ids equal the events': sessions are now matched by id");
        }
        if done.added + done.removed > 0 {
            tracing::info!(
                node = %node,
                host,
                added = done.added,
                removed = done.removed,
                listed_sessions,
                "reconciled with the Qlik proxy API: the events had missed sessions"
            );
        } else {
            tracing::debug!(node = %node, host, listed_sessions, confirmed = done.confirmed, in_grace = done.in_grace, "reconciled: no drift");
        }
        let status = &mut entry.status;
        status.host = host.to_owned();
        status.virtual_proxies = prefixes.to_vec();
        status.up = true;
        status.last_success = Some(at);
        status.last_error = None;
        status.listed_sessions = listed_sessions;
        status.added = done.added;
        status.removed = done.removed;
        status.in_grace = done.in_grace;
        status.pairing = match entry.pairing {
            Pairing::ByCount => "count",
            Pairing::ById => "id",
        };
        status.event_ids_match_api = entry.pairing == Pairing::ById;
        status.last_event = last_event;
        status.heard_since_start = heard.since_start;
        status.silent = heard.silent;
        let metrics = &self.state.metrics.qlik;
        metrics
            .node_silent
            .with_label_values(&[host])
            .set(i64::from(heard.silent));
        metrics
            .event_ids_match
            .with_label_values(&[host])
            .set(i64::from(status.event_ids_match_api));
        drop(nodes);
        self.publish_nodes();
    }

    fn node_failed(
        &self,
        node: &ApiAddress,
        prefixes: &[String],
        prefix: &str,
        error: &RequestError,
    ) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let host = api::logged_host_name(&node.host, &self.config.host_aliases, &[]);
        let entry = nodes
            .entry(node.clone())
            .or_insert_with(|| Node::new(node, prefixes, &host));
        let message = format!("{}: {error}", api::sessions_path(prefix));
        if entry
            .down_logged
            .is_none_or(|at| at.elapsed() >= REPEAT_DOWN_LOG)
        {
            entry.down_logged = Some(Instant::now());
            tracing::warn!(
                node = %node,
                path = %api::sessions_path(prefix),
                reason = error.reason(),
                %error,
                "cannot read a Qlik proxy's sessions; its users are counted from events only until it answers"
            );
        }
        entry.status.up = false;
        entry.status.last_error = Some(message);
        entry.status.virtual_proxies = prefixes.to_vec();
        drop(nodes);
        self.publish_nodes();
    }

    /// Discovery no longer lists a node: it leaves the status (its sessions stay, as events
    /// and expiry leave them).
    fn forget_nodes_not_in(&self, current: &BTreeMap<ApiAddress, Vec<String>>) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<ApiAddress> = nodes
            .keys()
            .filter(|n| !current.contains_key(*n))
            .cloned()
            .collect();
        for node in gone {
            let host = nodes.remove(&node).map(|n| n.status.host);
            let metrics = &self.state.metrics.qlik;
            if let Some(host) = host {
                let _ = metrics.node_silent.remove_label_values(&[&host]);
                let _ = metrics.event_ids_match.remove_label_values(&[&host]);
            }
            let _ = metrics
                .api_up
                .remove_label_values(&[QlikApi::Qps.label(), &node.host]);
            for reason in RequestError::REASONS {
                let _ =
                    metrics
                        .errors
                        .remove_label_values(&[QlikApi::Qps.label(), &node.host, reason]);
            }
            tracing::info!(node = %node, "the Qlik repository no longer lists this proxy");
        }
    }

    fn publish_nodes(&self) {
        let nodes: Vec<NodeStatus> = {
            let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            nodes.values().map(|n| n.status.clone()).collect()
        };
        self.publish_status(|s| s.nodes = nodes);
    }

    fn publish_status(&self, update: impl FnOnce(&mut QlikStatus)) {
        if let Some(status) = self.state.qlik_status().as_mut() {
            update(status);
        }
    }
}

impl Node {
    fn new(node: &ApiAddress, prefixes: &[String], host: &str) -> Node {
        Node {
            status: NodeStatus {
                node: node.to_string(),
                host: host.to_owned(),
                virtual_proxies: prefixes.to_vec(),
                up: false,
                last_success: None,
                last_error: None,
                listed_sessions: 0,
                added: 0,
                removed: 0,
                in_grace: 0,
                pairing: "count",
                event_ids_match_api: false,
                last_event: None,
                heard_since_start: false,
                silent: false,
            },
            pairing: Pairing::ByCount,
            down_logged: None,
        }
    }
}

label_set! {
    /// Which Qlik API a request went to: the label `api` of the `qlik_*` metrics.
    QlikApi {
        Qrs => "qrs",
        Qps => "qps",
    }
}

/// Sets `qlik_api_up` for a node, and starts its `qlik_api_errors_total` at 0 for every reason:
/// a counter that appears only with its first error has no rate to show or alert on until the
/// second (the dashboard's errors panel was empty for a healthy site, found by the test that
/// evaluates it in a real Prometheus).
fn set_up(metrics: &crate::metrics::QlikMetrics, api: QlikApi, node: &str, up: bool) {
    let api = api.label();
    metrics
        .api_up
        .with_label_values(&[api, node])
        .set(i64::from(up));
    for reason in RequestError::REASONS {
        metrics.errors.with_label_values(&[api, node, reason]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_silent_when_the_api_lists_sessions_and_no_event_came_since_start() {
        let started = UnixMillis(1_000_000);
        let before = Some(UnixMillis(999_999));
        let after = Some(UnixMillis(1_000_001));
        let wait = Duration::from_secs(600);
        let later = UnixMillis(started.0 + 600_000);
        let soon = UnixMillis(started.0 + 599_999);
        let silent = Heard {
            since_start: false,
            silent: true,
        };
        let not_yet = Heard {
            since_start: false,
            silent: false,
        };
        // Listed sessions, and nothing (or only a restored host's old activity) since start.
        for last in [None, before] {
            let heard = |listed, now| Heard::of(last, started, listed, now, wait);
            assert_eq!(heard(3, later), silent);
            // Not before `silent_after`: idle users of a working node make no event at once.
            assert_eq!(heard(3, soon), not_yet);
            // No sessions listed: perhaps only quiet.
            assert_eq!(heard(0, later), not_yet);
        }
        assert_eq!(
            Heard::of(after, started, 3, later, wait),
            Heard {
                since_start: true,
                silent: false
            }
        );
    }
}
