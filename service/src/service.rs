//! The composition root: starts every task of the service in order, and stops them in order.
//!
//! Start: embedded broker (if any) → UDP ingest and HTTP → checkpoint restore (retried while the
//! store is unreachable) → ready, MQTT publisher and checkpoint writer. Stop (SIGTERM/SIGINT): ingest stops first, then the final checkpoint is
//! written and MQTT says `offline`, so the checkpoint holds every event that was accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::checkpoint::{self, Store};
use crate::config::{Config, MqttBroker};
use crate::ingest::{self, Ingest};
use crate::metrics::Metrics;
use crate::registry::{ShardedRegistry, UnixMillis, sharded::DEFAULT_SHARDS};
use crate::state::State;
use crate::{broker, http, mqtt};

/// How often silent sessions are swept out, at most: a quarter of the idle timeout keeps expiry
/// within 25 % of it, and 5 s is plenty for the 30 min default.
const EXPIRY_SWEEP_MAX: Duration = Duration::from_secs(5);
/// The final checkpoint at SIGTERM must finish within a pod's default 30 s grace period.
const FINAL_CHECKPOINT_DEADLINE: Duration = Duration::from_secs(20);
/// Event-topic messages waiting for the MQTT publisher; beyond this they are dropped, counted.
const EVENT_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("MQTT: {0}")]
    Mqtt(#[from] mqtt::SetupError),
    #[error("cannot restore the checkpoint: {0}")]
    Checkpoint(#[from] checkpoint::StoreError),
    #[error("cannot listen for UDP on {addr} (udp_listen): {source}")]
    Udp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for HTTP on {addr} (http_listen): {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub async fn run(config: Config) -> Result<(), StartError> {
    let registry = ShardedRegistry::new(
        config.expiry.clone(),
        config.exclusions.clone(),
        config.max_proxy_hosts,
        DEFAULT_SHARDS,
    );
    let state = Arc::new(State::new(registry, Metrics::new()));
    if let MqttBroker::Embedded { listen } = config.mqtt.broker {
        broker::start(listen)?;
    }
    let mqtt_options = mqtt::options(&config.mqtt)?;
    let store = Store::open(&config.checkpoint.store).await?;
    store.check_writable().await?;

    let (udp, granted) = ingest::bind(&config.udp).map_err(|source| StartError::Udp {
        addr: config.udp.listen,
        source,
    })?;
    state.metrics.udp_receive_buffer_bytes.set(granted as i64);
    let udp = Arc::new(udp);
    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| StartError::Http {
            addr: config.http_listen,
            source,
        })?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let (events_tx, events_rx) = match mqtt::wants_events(&config.mqtt.topics) {
        true => {
            let (tx, rx) = mpsc::channel(EVENT_QUEUE);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    // Ingest and HTTP run from the start, also while a checkpoint store is unreachable: the
    // registry's restore lets sessions seen meanwhile win over the checkpoint's older copies.
    let ingest = {
        let socket = udp.try_clone().map_err(|source| StartError::Udp {
            addr: config.udp.listen,
            source,
        })?;
        Ingest::start(socket, config.udp.clone(), state.clone(), events_tx)
            .expect("spawning the ingest threads")
    };
    let http_server = tokio::spawn({
        let router = http::router(state.clone(), udp.clone());
        let mut shutdown = shutdown.clone();
        async move {
            let stopped = async move { crate::state::stop_requested(&mut shutdown).await };
            if let Err(error) = axum::serve(http_listener, router)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(%error, "HTTP server failed");
            }
        }
    });
    let sweep = (config.expiry.idle_timeout / 4).clamp(Duration::from_millis(50), EXPIRY_SWEEP_MAX);
    let expiry = tokio::spawn(sweep_expired(state.clone(), sweep, shutdown.clone()));
    tracing::info!(
        udp = %config.udp.listen,
        udp_receive_buffer_bytes = granted,
        http = %config.http_listen,
        checkpoint = %store.describe(),
        mqtt = ?config.mqtt.broker,
        "session-monitor started"
    );

    // Until the checkpoint is back, the registry is partial: not ready, nothing published to
    // MQTT (a dashboard would see the count drop), nothing checkpointed (it would overwrite the
    // full checkpoint with the partial registry).
    let (signal_tx, mut signal_rx) = watch::channel(false);
    let signals = tokio::spawn(async move {
        let signal = shutdown_signal().await;
        let _ = signal_tx.send(true);
        signal
    });
    let restored = match checkpoint::restore_with_retry(&store, &state, signal_rx.clone()).await {
        Ok(restored) => restored,
        Err(error) => {
            ingest.stop();
            return Err(error.into());
        }
    };
    let mut workers = Vec::new();
    let mut publisher = None;
    let (stop_mqtt_tx, stop_mqtt) = watch::channel(false);
    if restored {
        workers.push(tokio::spawn(checkpoint::run(
            store,
            state.clone(),
            config.checkpoint.interval,
            FINAL_CHECKPOINT_DEADLINE,
            shutdown.clone(),
        )));
        publisher = Some(tokio::spawn(mqtt::run(
            config.mqtt.clone(),
            mqtt_options,
            state.clone(),
            events_rx,
            stop_mqtt,
        )));
        state.set_ready();
        tracing::info!("ready");
        let _ = crate::state::stop_requested(&mut signal_rx).await;
    }
    let signal = signals.await.unwrap_or("unknown");
    tracing::info!(signal, "shutting down");
    let _ = tokio::task::spawn_blocking(move || ingest.stop()).await;
    // The final checkpoint sees every accepted datagram; then MQTT publishes the last state and
    // says offline.
    let _ = shutdown_tx.send(true);
    for worker in workers {
        let _ = worker.await;
    }
    let _ = stop_mqtt_tx.send(true);
    if let Some(publisher) = publisher {
        let _ = publisher.await;
    }
    let _ = tokio::join!(http_server, expiry);
    tracing::info!("stopped");
    Ok(())
}

async fn sweep_expired(state: Arc<State>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => state.expire(UnixMillis::now()),
            _ = crate::state::stop_requested(&mut shutdown) => break,
        }
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
