//! The composition root: starts every task of the service in order, and stops them in order.
//!
//! Start: embedded broker (if any) → UDP ingest and HTTP (on sockets bound before, see
//! [`Sockets`]) → checkpoint restore (retried while the store is unreachable) → ready, MQTT
//! publisher and checkpoint writer. Stop (when the given future resolves; SIGTERM/SIGINT for the
//! command line): ingest stops first, then the final checkpoint is written and MQTT says
//! `offline`, so the checkpoint holds every event that was received.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::lease::WriterLease;
use crate::checkpoint::{self, Load, Store};
use crate::config::{CheckpointStoreConfig, Config, MqttBroker};
use crate::ingest::{self, Ingest};
use crate::metrics::Metrics;
use crate::qlik::client::TlsSetupError;
use crate::qlik::reconciler::Reconciler;
use crate::registry::{
    RestoreEnd, RestoreEnds, ShardedRegistry, UnixMillis, sharded::DEFAULT_SHARDS,
};
use crate::shutdown::{Phase, Shutdown, Stop};
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
    #[error("Qlik API certificates: {0}")]
    Qlik(#[from] TlsSetupError),
    #[error("cannot restore the checkpoint: {0}")]
    Checkpoint(#[from] checkpoint::StoreError),
    #[error(transparent)]
    Lease(#[from] checkpoint::lease::LeaseError),
    #[error(
        "lost the checkpoint Lease {0} to another pod, which writes the checkpoint now; exiting without a final checkpoint, so that this pod restarts and takes over cleanly"
    )]
    LeaseLost(String),
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

/// The sockets the service listens on, bound before it runs: by the command line from the
/// configuration ([`Sockets::bind`]), or by a test or benchmark on ports of its choosing.
pub struct Sockets {
    pub udp: UdpSocket,
    /// What the kernel granted for the UDP receive buffer (see [`ingest::bind`]).
    pub udp_receive_buffer_bytes: usize,
    /// Whether the kernel drops oversized datagrams (see [`ingest::filter`]), or why not.
    pub udp_oversized_filter: std::io::Result<()>,
    pub http: std::net::TcpListener,
}

impl Sockets {
    pub fn bind(config: &Config) -> Result<Sockets, StartError> {
        let bound = ingest::bind(&config.udp).map_err(|source| StartError::Udp {
            addr: config.udp.listen,
            source,
        })?;
        let http = std::net::TcpListener::bind(config.http_listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| StartError::Http {
                addr: config.http_listen,
                source,
            })?;
        Ok(Sockets {
            udp: bound.socket,
            udp_receive_buffer_bytes: bound.receive_buffer_bytes,
            udp_oversized_filter: bound.oversized_filter,
            http,
        })
    }
}

/// Runs the service on `sockets` until `shutdown` resolves, then stops it in order (see
/// [`crate::shutdown`]).
pub async fn run(
    config: Config,
    sockets: Sockets,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let registry = ShardedRegistry::new(
        config.expiry.clone(),
        config.exclusions.clone(),
        config.max_proxy_hosts,
        DEFAULT_SHARDS,
    )
    .with_max_sessions(config.max_sessions);
    let state = Arc::new(State::new(registry, Metrics::new()));
    *state.history() = crate::history::History::new(config.history_retention);
    if let MqttBroker::Embedded { listen } = config.mqtt.broker {
        broker::start(listen)?;
    }
    let mqtt_options = mqtt::options(&config.mqtt)?;
    let reconciler = match &config.qlik {
        Some(qlik) => Some(Arc::new(Reconciler::new(qlik.clone(), state.clone())?)),
        None => None,
    };
    let store = Store::open(&config.checkpoint.store).await?;
    store.check_writable().await?;
    // One writer at a time: with a Lease, this process writes (and publishes) only once it
    // holds it; until then it counts as a standby (see `checkpoint::lease`).
    let mut lease = match &config.checkpoint.store {
        CheckpointStoreConfig::ConfigMap {
            lease: Some(name), ..
        } => Some(WriterLease::start(&store, name, &lease_identity()).await?),
        _ => None,
    };
    // Stops writing checkpoints when the Lease went to another pod.
    let may_write = Arc::new(std::sync::atomic::AtomicBool::new(true));

    let Sockets {
        udp,
        udp_receive_buffer_bytes,
        udp_oversized_filter,
        http,
    } = sockets;
    let udp_error = |source| StartError::Udp {
        addr: config.udp.listen,
        source,
    };
    let udp_address = udp.local_addr().map_err(udp_error)?;
    state
        .metrics
        .udp_receive_buffer_bytes
        .set(udp_receive_buffer_bytes as i64);
    match udp_oversized_filter {
        Ok(()) => {
            state.metrics.udp_oversized_filter.set(1);
            tracing::info!(
                max_datagram_bytes = config.udp.limits.max_datagram_bytes,
                sample_one_in = ingest::filter::SAMPLE_ONE_IN,
                "the kernel drops oversized datagrams before they take receive buffer space"
            );
        }
        Err(error) => tracing::warn!(
            %error,
            "no kernel filter for oversized datagrams: a flood of them can crowd out the proxies' events"
        ),
    }
    let udp = Arc::new(udp);
    let http_error = |source| StartError::Http {
        addr: config.http_listen,
        source,
    };
    let http = tokio::net::TcpListener::from_std(http).map_err(http_error)?;
    let http_address = http.local_addr().map_err(http_error)?;

    let phases = Shutdown::default();
    let (events_tx, events_rx) = match mqtt::wants_events(&config.mqtt.topics) {
        true => {
            let (tx, rx) = mpsc::channel(EVENT_QUEUE);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    // Ingest and HTTP run from the start, also while a checkpoint store is unreachable: the
    // registry's restore lets sessions seen meanwhile win over the checkpoint's older copies.
    let ingest = Ingest::start(
        udp.try_clone().map_err(udp_error)?,
        config.udp.clone(),
        state.clone(),
        events_tx,
    )
    .map_err(udp_error)?;
    let http_server = tokio::spawn({
        let router = http::router(
            state.clone(),
            udp.clone(),
            phases.at(Phase::Saving),
            config.api_token.clone(),
        );
        let mut stop = phases.at(Phase::Saving);
        async move {
            let stopped = async move { stop.requested().await };
            if let Err(error) = axum::serve(http, router)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(%error, "HTTP server failed");
            }
        }
    });
    let sweep = (config.expiry.idle_timeout / 4).clamp(Duration::from_millis(50), EXPIRY_SWEEP_MAX);
    let expiry = tokio::spawn(sweep_expired(
        state.clone(),
        sweep,
        phases.at(Phase::Saving),
    ));
    tracing::info!(
        udp = %udp_address,
        udp_receive_buffer_bytes,
        http = %http_address,
        checkpoint = %store.describe(),
        mqtt = ?config.mqtt.broker,
        "session-monitor started"
    );

    // Until the checkpoint is back, the registry is partial: not ready, nothing published to
    // MQTT (a dashboard would see the count drop), nothing checkpointed (it would overwrite the
    // full checkpoint with the partial registry). A shutdown meanwhile just stops the retries.
    let mut shutdown = std::pin::pin!(shutdown);
    // A standby's restore stays open for the checkpoint it takes over when the Lease is its.
    let ends = match lease {
        Some(_) => RestoreEnds::AtTakeOver,
        None => RestoreEnds::Yes,
    };
    let restored = tokio::select! {
        result = checkpoint::load_with_retry(&store, &state, Load::Restore(ends)) => Some(result),
        () = &mut shutdown => None,
    };
    // However it ended (restored, no checkpoint, a corrupt one set aside, a permanent error, a
    // shutdown during the retries), the restore is over: the registry stops remembering stops
    // and closes of sessions it does not know, which only a restore still to come could use.
    // A standby keeps remembering them until it takes over.
    if lease.is_none() || !matches!(restored, Some(Ok(()))) {
        restore_ended(&state, state.registry().end_restore());
    }
    state
        .metrics
        .checkpoint_writer
        .set(i64::from(lease.is_none()));
    let mut checkpoint_writer = None;
    let mut publisher = None;
    let mut reconcile_task = None;
    let mut history_sampler = None;
    let mut settings_reloader = None;
    let failed = match restored {
        Some(Ok(())) => {
            let mut stop_requested = false;
            let mut took_over = Ok(());
            if let Some(lease) = lease.as_mut() {
                match standby_until_writer(lease, &store, &state, &mut shutdown).await {
                    Ok(true) => {}
                    Ok(false) => stop_requested = true,
                    Err(error) => {
                        // The registry is not the checkpoint's: never written over it.
                        may_write.store(false, std::sync::atomic::Ordering::SeqCst);
                        stop_requested = true;
                        took_over = Err(error);
                    }
                }
            }
            // One reconcile with the Qlik proxies before turning ready, so that the first count
            // published is exact; within a bound, since Qlik may not answer.
            if let Some(reconciler) = reconciler {
                let (first_tx, first_rx) = oneshot::channel();
                reconcile_task = Some(tokio::spawn(
                    reconciler.run(first_tx, phases.at(Phase::Saving)),
                ));
                let bound = config
                    .qlik
                    .as_ref()
                    .map_or(Duration::ZERO, |q| q.startup_timeout);
                tokio::select! {
                    first = tokio::time::timeout(bound, first_rx) => match first {
                        Ok(Ok(round)) => tracing::info!(?round, "first reconcile with the Qlik proxy API done"),
                        _ => tracing::warn!(
                            timeout = %humantime::format_duration(bound),
                            "the Qlik proxy API did not answer in time (qlik_startup_timeout); ready on events and the checkpoint, still trying"
                        ),
                    },
                    () = &mut shutdown => stop_requested = true,
                }
            }
            // Only the ConfigMap store's shard count changes while running.
            if let (Some(source), Store::ConfigMap(configmaps)) = (&config.reload, &store) {
                settings_reloader = Some(tokio::spawn(crate::settings_reload::run(
                    source.clone(),
                    configmaps.clone(),
                    state.clone(),
                    phases.at(Phase::Saving),
                )));
            }
            checkpoint_writer = Some(tokio::spawn(checkpoint::run(
                store,
                state.clone(),
                config.checkpoint.interval,
                FINAL_CHECKPOINT_DEADLINE,
                may_write.clone(),
                phases.at(Phase::Saving),
            )));
            // Sampled from here on: before, the registry was partial (restoring, reconciling).
            history_sampler = Some(tokio::spawn(crate::history::run(
                state.clone(),
                phases.at(Phase::Saving),
            )));
            publisher = Some(tokio::spawn(mqtt::run(
                config.mqtt.clone(),
                mqtt_options,
                state.clone(),
                events_rx,
                phases.at(Phase::Closing),
            )));
            if !stop_requested {
                state.set_ready();
                tracing::info!("ready");
                match lease.as_mut() {
                    Some(lease) => tokio::select! {
                        () = &mut shutdown => None,
                        () = lease.lost() => {
                            may_write.store(false, std::sync::atomic::Ordering::SeqCst);
                            state.metrics.checkpoint_writer.set(0);
                            Some(StartError::LeaseLost(lease.name().to_owned()))
                        }
                    },
                    None => {
                        shutdown.await;
                        None
                    }
                }
            } else {
                took_over.err()
            }
        }
        Some(Err(error)) => Some(error.into()),
        None => None,
    };

    tracing::info!("shutting down");
    let _ = tokio::task::spawn_blocking(move || ingest.stop()).await;
    // The final checkpoint sees every datagram received; then MQTT publishes the last state and
    // says offline.
    phases.enter(Phase::Saving);
    if let Some(writer) = checkpoint_writer {
        let _ = writer.await;
    }
    let _ = tokio::join!(http_server, expiry);
    for task in [reconcile_task, history_sampler, settings_reloader]
        .into_iter()
        .flatten()
    {
        let _ = task.await;
    }
    phases.enter(Phase::Closing);
    if let Some(publisher) = publisher {
        let _ = publisher.await;
    }
    // After the final checkpoint: the next writer takes over what it holds.
    if let Some(lease) = lease {
        lease.release().await;
    }
    tracing::info!("stopped");
    match failed {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Who holds the checkpoint Lease: the pod's name (`POD_NAME`, from the downward API), else the
/// host name and process id.
fn lease_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "session-monitor".to_owned());
            format!("{host}-{}", std::process::id())
        })
}

/// A standby: ready (so a rollout goes on), counting from the checkpoint and the datagrams that
/// reach this pod, but neither writing nor publishing, until the Lease is this process's; then
/// it takes over the checkpoint the previous holder wrote last. `false` when asked to stop first.
async fn standby_until_writer(
    lease: &mut WriterLease,
    store: &Store,
    state: &Arc<State>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<bool, StartError> {
    if !lease.held() {
        state.set_ready();
        tracing::info!(
            lease = lease.name(),
            "standby: another process writes the checkpoint; counting the datagrams that reach this one until its Lease is free"
        );
        tokio::select! {
            () = lease.acquired() => {}
            () = shutdown.as_mut() => return Ok(false),
        }
    }
    let took = tokio::select! {
        result = checkpoint::load_with_retry(store, state, Load::TakeOver) => result,
        () = shutdown.as_mut() => return Ok(false),
    };
    restore_ended(state, state.registry().end_restore());
    took?;
    state.metrics.checkpoint_writer.set(1);
    tracing::info!(
        lease = lease.name(),
        "holding the checkpoint Lease: writing the checkpoint and publishing"
    );
    Ok(true)
}

/// Counts and logs what the stops and closes seen while the checkpoint loaded did to the restore.
fn restore_ended(state: &State, ended: RestoreEnd) {
    let m = &state.metrics;
    m.checkpoint_sessions_stopped_during_restore
        .inc_by(ended.stopped as u64);
    if ended.stopped > 0 || ended.closed_connections > 0 {
        tracing::info!(
            stopped = ended.stopped,
            closed_connections = ended.closed_connections,
            "checkpoint restore over: sessions that stopped while it loaded were not restored, connections closed meanwhile were subtracted"
        );
    } else {
        tracing::debug!("checkpoint restore over: no session stopped while it loaded");
    }
    if ended.not_remembered > 0 {
        tracing::warn!(
            not_remembered = ended.not_remembered,
            "more sessions stopped or closed connections while the checkpoint loaded than are remembered; some may have been restored and stay counted until they expire"
        );
    }
}

async fn sweep_expired(state: Arc<State>, every: Duration, mut stop: Stop) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => state.expire(UnixMillis::now()),
            _ = stop.requested() => break,
        }
    }
}

/// Resolves at SIGTERM or SIGINT, saying which.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    tracing::info!(signal, "stop requested");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// The service in-process on sockets bound by the caller: what it received before the
    /// shutdown future resolved is in the final checkpoint, and a second run restores it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_on_given_sockets_and_stops_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let settings = || Settings {
            udp_listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            // Nothing listens there: this test is about ingest and the checkpoint.
            mqtt_url: Some("mqtt://127.0.0.1:9".into()),
            checkpoint_file: Some(dir.path().join("checkpoint")),
            checkpoint_interval: Some(Duration::from_secs(3600)),
            ..Settings::default()
        };
        let config = Config::from_settings(settings(), None).unwrap();
        let sockets = Sockets::bind(&config).unwrap();
        let (udp, http) = (
            sockets.udp.local_addr().unwrap(),
            sockets.http.local_addr().unwrap(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = tokio::spawn(run(config, sockets, async move {
            let _ = stopped.await;
        }));
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..500 {
            let datagram =
                format!("/proxy-session/;qs1;Start session;LAB;u{i};;/hub/;Start session");
            sender.send_to(datagram.as_bytes(), udp).unwrap();
        }
        // Stop at once: the datagrams may still be in the socket, the spool or the applier.
        let ready = || async {
            let mut stream = tokio::net::TcpStream::connect(http).await.ok()?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(b"GET /readyz HTTP/1.0\r\n\r\n")
                .await
                .ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.ok()?;
            answer.contains("200 OK").then_some(())
        };
        while ready().await.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let received = || {
            // Every datagram has left the kernel's buffer once the socket reports none queued.
            std::fs::read_to_string("/proc/net/udp").map_or(true, |t| {
                let port = format!(":{:04X} ", udp.port());
                t.lines()
                    .filter(|l| l.contains(&port))
                    .all(|l| l.split_whitespace().nth(4) == Some("00000000:00000000"))
            })
        };
        while !received() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.send(()).unwrap();
        service.await.unwrap().unwrap();

        let bytes = std::fs::read(dir.path().join("checkpoint")).unwrap();
        let checkpoint = crate::checkpoint::codec::decode(&bytes).unwrap();
        assert_eq!(
            checkpoint.sessions.len(),
            500,
            "every datagram received is saved"
        );
    }
}
