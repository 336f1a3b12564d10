//! The operator process: HTTP (metrics and probes) at once, then leader election, then one
//! controller per watched namespace (or one for all), until SIGTERM/SIGINT or lost leadership.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::ListParams;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::crd::SessionMonitor;
use crate::desired::{MANAGED_BY_SELECTOR, MANAGER, ROLE_LABEL};
use crate::metrics::Metrics;
use crate::reconcile::{self, Context};
use crate::triggers;

pub struct Options {
    pub default_image: String,
    /// Empty: all namespaces.
    pub watch_namespaces: Vec<String>,
    pub http_listen: SocketAddr,
    pub leader_election: bool,
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
}

pub fn default_image() -> String {
    format!(
        "ghcr.io/session-monitor/session-monitor:{}",
        env!("CARGO_PKG_VERSION")
    )
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("no Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost the leader Lease; exiting so that a new leader takes over cleanly")]
    LostLeadership,
}

pub async fn run(options: Options) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(options.http_listen)
        .await
        .map_err(|e| RunError::Bind(options.http_listen, e))?;
    info!(address = %options.http_listen, "serving /metrics, /healthz and /readyz");
    let router = crate::http::router(metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(error = %e, "HTTP server stopped");
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let client = Client::try_default().await.map_err(RunError::Client)?;
    wait_for_crd(&client, &options, &metrics, stop_rx.clone()).await;
    if *stop_rx.borrow() {
        return Ok(());
    }

    if !options.leader_election {
        metrics.leader.set(1);
        let running = controllers(client, &options, metrics, stop_rx.clone());
        tokio::pin!(running);
        let mut stop = stop_rx;
        tokio::select! {
            _ = &mut running => {}
            _ = stop.wait_for(|s| *s) => finish(running).await,
        }
        return Ok(());
    }
    let manager = LeaseManagerBuilder::new(client.clone(), &options.lease_name)
        .with_namespace(&options.lease_namespace)
        .with_identity(&options.identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    info!(lease = %options.lease_name, namespace = %options.lease_namespace, identity = %options.identity, "waiting for the leader Lease");
    let mut stop = stop_rx.clone();
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|s| *s) => {
                drop(leader);
                let _ = lease_task.await;
                return Ok(());
            }
        }
    }
    info!("became leader; reconciling");
    metrics.leader.set(1);
    // Controllers stop when asked to, or when the lease is lost (another replica may be
    // reconciling already).
    let (controller_stop_tx, controller_stop_rx) = watch::channel(false);
    let running = controllers(client, &options, metrics.clone(), controller_stop_rx);
    tokio::pin!(running);
    let lost = tokio::select! {
        _ = &mut running => false,
        _ = stop.wait_for(|s| *s) => false,
        _ = leader.wait_for(|l| !*l) => true,
    };
    let _ = controller_stop_tx.send(true);
    finish(running).await;
    metrics.leader.set(0);
    // Closing the channel makes kube-lease-manager's task release the Lease and end.
    drop(leader);
    match lease_task.await {
        Ok(Ok(_)) => info!("released the leader Lease"),
        Ok(Err(e)) => warn!(error = %e, "could not release the leader Lease; it expires by itself"),
        Err(e) => warn!(error = %e, "leader election task panicked"),
    }
    if lost {
        return Err(RunError::LostLeadership);
    }
    Ok(())
}

/// How long controllers asked to stop get to finish their reconciles. kube-runtime's controller
/// never finishes when asked to stop before its first list of SessionMonitors completed, so the
/// process must not wait for it without a limit (the Lease would stay held until SIGKILL).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

async fn finish(running: std::pin::Pin<&mut impl std::future::Future<Output = ()>>) {
    if tokio::time::timeout(SHUTDOWN_GRACE, running).await.is_err() {
        warn!(grace = ?SHUTDOWN_GRACE, "controllers did not stop in time; stopping anyway");
    }
}

/// Ready once the SessionMonitor API answers: until the CRD is installed there is nothing to do.
async fn wait_for_crd(
    client: &Client,
    options: &Options,
    metrics: &Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<SessionMonitor> = match options.watch_namespaces.first() {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let mut delay = Duration::from_millis(500);
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(e) => {
                warn!(error = %e, retry_in = ?delay, "cannot list SessionMonitors (is the CRD installed?)")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
    metrics.ready.set(1);
}

async fn controllers(
    client: Client,
    options: &Options,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(options.identity.clone()),
        },
    );
    let context = Arc::new(Context::new(
        client.clone(),
        options.default_image.clone(),
        recorder,
        metrics,
    ));
    let namespaces: Vec<Option<&str>> = if options.watch_namespaces.is_empty() {
        vec![None]
    } else {
        options
            .watch_namespaces
            .iter()
            .map(|n| Some(n.as_str()))
            .collect()
    };
    let runs = namespaces.into_iter().map(|namespace| {
        // Children are watched by label, so the operator does not cache every object of the
        // cluster; checkpoint ConfigMaps are left out, since the service rewrites them every
        // few seconds (the periodic resync restores a deleted one).
        let children = watcher::Config::default().labels(MANAGED_BY_SELECTOR);
        let config_maps = watcher::Config::default()
            .labels(&format!("{MANAGED_BY_SELECTOR},{ROLE_LABEL}=config"));
        let mut stop = stop.clone();
        info!(
            namespace = namespace.unwrap_or("<all>"),
            "starting controller"
        );
        // The monitors themselves start a reconcile only when what it reads changed, not when
        // its own status write did (see `triggers`).
        let (monitors, writer) = reflector::store();
        context.metrics.count_monitors_of(monitors.clone());
        let changed = watcher(scoped(&client, namespace), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .applied_objects()
            .predicate_filter(triggers::reconcile_inputs, Default::default());
        let controller = Controller::<SessionMonitor>::for_stream(changed, monitors);
        controller
            .owns::<Deployment>(scoped(&client, namespace), children.clone())
            .owns::<Service>(scoped(&client, namespace), children.clone())
            .owns::<ServiceAccount>(scoped(&client, namespace), children.clone())
            .owns::<Role>(scoped(&client, namespace), children.clone())
            .owns::<RoleBinding>(scoped(&client, namespace), children)
            .owns::<ConfigMap>(scoped(&client, namespace), config_maps)
            .graceful_shutdown_on(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .run(
                reconcile::reconcile,
                reconcile::error_policy,
                context.clone(),
            )
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "controller event");
                }
            })
    });
    futures::future::join_all(runs).await;
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
