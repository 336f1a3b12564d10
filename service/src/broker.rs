//! The MQTT broker embedded in the process (rumqttd), used when no broker URL is configured, so
//! that one binary does the whole job on one machine.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest message the embedded broker accepts: the user list of ~500,000 users.
const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot start the embedded MQTT broker on {listen} (set mqtt_embedded_listen, or mqtt_url for an external broker): {source}"
)]
pub struct BrokerError {
    listen: SocketAddr,
    source: std::io::Error,
}

/// Starts the broker on its own threads. rumqttd has no shutdown: it lives as long as the
/// process, which is exactly as long as we need it.
pub fn start(listen: SocketAddr) -> Result<(), BrokerError> {
    // rumqttd reports a failed bind only in a log line from its own thread; probe the address
    // first so a busy port stops start-up with a clear message instead.
    std::net::TcpListener::bind(listen).map_err(|source| BrokerError { listen, source })?;

    let server = ServerSettings {
        name: "embedded".to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD_BYTES,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        router: RouterConfig {
            max_connections: 1_000,
            max_outgoing_packet_count: 200,
            // The router keeps a commit log per topic; our topics are few and their messages
            // are retained anyway, so keep the log small.
            max_segment_size: 2 * MAX_PAYLOAD_BYTES,
            max_segment_count: 2,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("embedded".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".to_owned())
        .spawn(move || {
            if let Err(error) = Broker::new(config).start() {
                tracing::error!(%error, "embedded MQTT broker stopped");
            }
        })
        .map_err(|source| BrokerError { listen, source })?;
    tracing::info!(%listen, "embedded MQTT broker started");
    Ok(())
}
