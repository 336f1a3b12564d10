//! HTTP on one port: Prometheus `/metrics`, the `/healthz` and `/readyz` probes, and the small
//! read API under `/api/v1`, described by `api/openapi.json` (served at `/api/v1/openapi.json`).
//! Read-only: nothing here changes the registry.

mod auth;
mod history;
mod json_stream;
mod stream;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::config::ApiToken;
use crate::qlik::reconciler::QlikStatus;
use crate::registry::{HostSummary, UnixMillis};
use crate::shutdown::Stop;
use crate::state::State;

#[derive(Clone)]
struct Http {
    state: Arc<State>,
    /// For the kernel's drop count at scrape time.
    udp: Arc<UdpSocket>,
    /// Ends the event streams at shutdown.
    stop: Stop,
}

/// The API's description, kept beside the code and checked against real answers by a test.
const OPENAPI: &str = include_str!("../../api/openapi.json");

pub fn router(
    state: Arc<State>,
    udp: Arc<UdpSocket>,
    stop: Stop,
    token: Option<ApiToken>,
) -> Router {
    let http = Http { state, udp, stop };
    // Open to all: Prometheus and the kubelet carry no token.
    let open = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(http.clone());
    let guarded = guarded(http).merge(crate::page::router());
    let guarded = match token {
        None => guarded,
        Some(token) => guarded
            .route(
                "/login",
                get(auth::login_form)
                    .post(auth::login)
                    .with_state(token.clone()),
            )
            .layer(axum::middleware::from_fn_with_state(
                token,
                auth::require_token,
            )),
    };
    open.merge(guarded)
}

/// What the token guards when one is set: the API (it lists user names) and the page.
fn guarded(http: Http) -> Router {
    Router::new()
        .route("/api/v1/summary", get(summary))
        .route("/api/v1/users", get(users))
        .route("/api/v1/status", get(status))
        .route("/api/v1/history", get(history::history))
        .route("/api/v1/peaks", get(history::peaks_view))
        .route("/api/v1/stream", get(stream::stream))
        .route(
            "/api/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .with_state(http)
}

/// A request the API cannot answer: 400 with `{"error": "…"}` naming what is wrong.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.message }));
        (self.status, body).into_response()
    }
}

async fn metrics(AxumState(http): AxumState<Http>) -> Response {
    let state = &http.state;
    // Gauges mirroring the registry are set at scrape time: always exact, and no work per event.
    let registry = state.registry();
    let (users, sessions, hosts) = (
        registry.active_users(),
        registry.active_sessions(),
        registry.hosts(),
    );
    state.metrics.set_counts(users, sessions, &hosts);
    if let Some(drops) = crate::ingest::kernel_drops(&http.udp) {
        state.metrics.set_kernel_drops(drops);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(AxumState(http): AxumState<Http>) -> Response {
    if http.state.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "restoring checkpoint\n").into_response()
    }
}

/// `/api/v1/summary` without its `users`, which are streamed after these fields.
#[derive(Serialize)]
struct Summary {
    active_users: usize,
    active_sessions: usize,
    /// Active users per host, for a quick look; `hosts` has the detail.
    active_users_per_host: BTreeMap<String, usize>,
    hosts: Vec<HostSummary>,
    /// Reconciliation with the Qlik proxy API; absent while it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    qlik_api: Option<QlikStatus>,
}

#[derive(Serialize)]
struct UserSummary {
    name: String,
    sessions: usize,
    first_seen: UnixMillis,
    last_seen: UnixMillis,
}

async fn summary(AxumState(http): AxumState<Http>) -> Response {
    // Views across shards are not one atomic picture; the counts are taken from the user list
    // so that the answer is consistent in itself.
    let registry = http.state.registry();
    let hosts = registry.hosts();
    let users = registry.users();
    let active_users = users.len();
    let active_sessions = users.iter().map(|u| u.sessions).sum();
    // The active users, sorted by name; `/api/v1/users` adds hosts and connections.
    let users: Vec<UserSummary> = users
        .into_iter()
        .map(|u| UserSummary {
            name: u.name,
            sessions: u.sessions,
            first_seen: u.first_seen,
            last_seen: u.last_seen,
        })
        .collect();
    let summary = Summary {
        active_users,
        active_sessions,
        active_users_per_host: hosts
            .iter()
            .map(|h| (h.host.clone(), h.active_users))
            .collect(),
        hosts,
        qlik_api: http.state.qlik_status().clone(),
    };
    json_stream::object_with_array(&summary, "users", users)
}

async fn users(AxumState(http): AxumState<Http>) -> Response {
    json_stream::response(Vec::new(), http.state.registry().users(), b"")
}

#[derive(Serialize)]
struct Status {
    version: &'static str,
    ready: bool,
    mqtt_connected: bool,
    datagrams_received: u64,
    datagrams_dropped: u64,
    udp_kernel_drops: u64,
    /// The last event from any proxy.
    last_event: Option<UnixMillis>,
    hosts: Vec<HostSummary>,
    history: HistoryStatus,
    /// The proxy nodes the Qlik API lists, each with whether it is heard from.
    qlik_nodes: Vec<crate::qlik::reconciler::NodeStatus>,
    /// Hosts of the nodes whose users the API lists and that send nothing.
    silent_nodes: Vec<String>,
}

#[derive(Serialize)]
struct HistoryStatus {
    retention_seconds: u64,
    minutes: usize,
}

/// What the page's health panel shows: is the service well, and is every proxy still sending.
async fn status(AxumState(http): AxumState<Http>) -> Json<Status> {
    let state = &http.state;
    let m = &state.metrics;
    if let Some(drops) = crate::ingest::kernel_drops(&http.udp) {
        m.set_kernel_drops(drops);
    }
    let hosts = state.registry().hosts();
    let history = {
        let h = state.history();
        HistoryStatus {
            retention_seconds: h.retention().as_secs(),
            minutes: h.minutes().len(),
        }
    };
    let qlik_nodes = state
        .qlik_status()
        .as_ref()
        .map(|q| q.nodes.clone())
        .unwrap_or_default();
    let silent_nodes = qlik_nodes
        .iter()
        .filter(|n| n.silent)
        .map(|n| n.host.clone())
        .collect();
    Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        ready: state.is_ready(),
        mqtt_connected: m.mqtt_connected.get() == 1,
        datagrams_received: m.datagrams_received.get(),
        datagrams_dropped: m.datagrams_dropped(),
        udp_kernel_drops: m.udp_kernel_drops.get(),
        last_event: hosts.iter().filter_map(|h| h.last_event).max(),
        hosts,
        history,
        qlik_nodes,
        silent_nodes,
    })
}
