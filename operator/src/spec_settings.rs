//! The one table between a `SessionMonitor` spec and the service's settings.
//!
//! Each row is a service setting, the spec field it comes from, and how its value is rendered.
//! The table drives both directions: [`render`] builds the service's [`Settings`] from the spec
//! (forward), and [`spec_path`] turns a setting the service's validation names back into the
//! spec field the user wrote (reverse). A setting is one row, so the two cannot drift apart; the
//! compiler refuses a setting rendered twice, and a test refuses a service setting that is in
//! neither the table nor [`LEFT_AT_DEFAULT`].
//!
//! Adding a setting the spec exposes: the field in the service's `Settings` (with its default
//! and check in its section of `session-monitor-config`), the field in the CRD type, and one
//! row here.

use ipnet::IpNet;
use session_monitor_config::Settings;

use crate::crd::{LogFormat, SessionMonitorSpec};
use crate::validate::{
    CONTAINER_HTTP_PORT, CONTAINER_UDP_PORT, InvalidSpec, optional_duration, paths,
};

/// What [`render`] needs beyond the spec, checked first where a message can name an entry of a
/// list or a map (`spec.udp.allowedSources[2]`) rather than the whole field.
pub(crate) struct Checked {
    pub allowed_sources: Vec<IpNet>,
    pub receive_buffer_bytes: Option<usize>,
    pub checkpoint_configmap: String,
    /// The monitor's name, which its checkpoint's objects are named after.
    pub name: String,
    /// Granted: the spec's, or more where the autopilot raised them.
    pub checkpoint_shards: u16,
    pub api_token: bool,
    /// `spec.qlik.hostAliases` as the service's `NAME=NAME` entries, sorted by the Qlik name.
    pub qlik_host_aliases: Vec<String>,
    /// `spec.qlik.resolve` as the service's `HOST=IP` entries.
    pub qlik_resolve: Vec<String>,
}

/// Declares the table: `key <- "spec.path" = value;`, where `value` may use `?` and the path
/// as `$at` (to name the field in its own message).
macro_rules! spec_settings {
    (
        fn $render:ident($($arg:ident: $ty:ty),*) naming $at:ident;
        $( $key:ident <- $path:literal = $value:expr; )*
    ) => {
        /// The service's settings for a spec (those not in the table keep the service's default).
        pub(crate) fn $render($($arg: $ty),*) -> Result<Settings, InvalidSpec> {
            Ok(Settings {
                $( $key: {
                    #[allow(unused_variables)]
                    let $at: &str = $path;
                    $value
                }, )*
                ..Settings::default()
            })
        }

        /// The spec field a service setting comes from, so that a message points at what the
        /// user wrote; `None` for a setting the operator leaves at the service's default.
        pub fn spec_path(key: &str) -> Option<&'static str> {
            match key {
                $( stringify!($key) => Some($path), )*
                _ => None,
            }
        }

        /// Every setting the table renders.
        pub const RENDERED: &[&str] = &[$(stringify!($key)),*];
    };
}

spec_settings! {
    fn render(spec: &SessionMonitorSpec, checked: &Checked) naming at;

    // Fixed, unprivileged ports inside the pod (it runs as non-root without capabilities, so a
    // spec port under 1024 could not be bound); the Services map the spec's ports.
    // Dual-stack: a proxy whose remoteAddress resolves to IPv6 first sends over IPv6.
    udp_listen <- "spec.udp.port" =
        Some((std::net::Ipv6Addr::UNSPECIFIED, CONTAINER_UDP_PORT).into());
    udp_allowed_sources <- "spec.udp.allowedSources" =
        (!checked.allowed_sources.is_empty()).then(|| checked.allowed_sources.clone());
    udp_receive_buffer_bytes <- "spec.udp.receiveBufferBytes" = checked.receive_buffer_bytes;
    max_proxy_hosts <- "spec.udp.maxProxyHosts" = spec.udp.max_proxy_hosts.map(|n| n as usize);
    udp_encoding <- "spec.udp.encoding" = spec.udp.encoding.clone();
    http_listen <- "spec.metrics.port" = Some(([0, 0, 0, 0], CONTAINER_HTTP_PORT).into());
    idle_timeout <- "spec.sessions.idleTimeout" =
        optional_duration(at, &spec.sessions.idle_timeout)?;
    max_idle <- "spec.sessions.maxIdle" = optional_duration(at, &spec.sessions.max_idle)?;
    exclude_users <- "spec.sessions.excludeUsers" =
        (!spec.sessions.exclude_users.is_empty()).then(|| spec.sessions.exclude_users.clone());
    max_sessions <- "spec.sessions.maxSessions" = spec.sessions.max_sessions.map(|n| n as usize);
    history_retention <- "spec.history.retention" =
        optional_duration(at, &spec.history.retention)?;

    mqtt_url <- "spec.mqtt.url" = Some(spec.mqtt.url.clone());
    // The user name comes from the Secret through SESSION_MONITOR_MQTT_USERNAME and the
    // password is a mounted file, so that no credential is ever written into a ConfigMap.
    mqtt_username <- "spec.mqtt.credentialsSecret" = None;
    mqtt_password <- "spec.mqtt.credentialsSecret" = None;
    mqtt_password_file <- "spec.mqtt.credentialsSecret" =
        spec.mqtt.credentials_secret.as_ref().map(|_| paths::MQTT_PASSWORD_FILE.into());
    mqtt_client_id <- "spec.mqtt.clientId" = spec.mqtt.client_id.clone();
    mqtt_qos <- "spec.mqtt.qos" = spec.mqtt.qos;
    mqtt_retain <- "spec.mqtt.retain" = spec.mqtt.retain;
    mqtt_keep_alive <- "spec.mqtt.keepAlive" = optional_duration(at, &spec.mqtt.keep_alive)?;
    mqtt_ca_file <- "spec.mqtt.tls" = spec
        .mqtt
        .tls
        .as_ref()
        .and_then(|t| t.ca_secret.as_ref())
        .map(|_| paths::MQTT_CA_FILE.into());
    mqtt_client_cert_file <- "spec.mqtt.tls" = spec
        .mqtt
        .tls
        .as_ref()
        .and_then(|t| t.client_cert_secret.as_ref())
        .map(|_| paths::MQTT_CLIENT_CERT_FILE.into());
    mqtt_client_key_file <- "spec.mqtt.tls" = spec
        .mqtt
        .tls
        .as_ref()
        .and_then(|t| t.client_cert_secret.as_ref())
        .map(|_| paths::MQTT_CLIENT_KEY_FILE.into());
    mqtt_topic_user_count <- "spec.mqtt.topics.userCount" = spec.mqtt.topics.user_count.clone();
    mqtt_topic_user_list <- "spec.mqtt.topics.userList" = spec.mqtt.topics.user_list.clone();
    mqtt_topic_host_prefix <- "spec.mqtt.topics.hostPrefix" =
        spec.mqtt.topics.host_prefix.clone();
    mqtt_topic_status <- "spec.mqtt.topics.status" = spec.mqtt.topics.status.clone();
    mqtt_topic_session_start <- "spec.mqtt.topics.sessionStart" =
        spec.mqtt.topics.session_start.clone();
    mqtt_topic_session_stop <- "spec.mqtt.topics.sessionStop" =
        spec.mqtt.topics.session_stop.clone();
    mqtt_topic_connection_open <- "spec.mqtt.topics.connectionOpen" =
        spec.mqtt.topics.connection_open.clone();
    mqtt_topic_connection_close <- "spec.mqtt.topics.connectionClose" =
        spec.mqtt.topics.connection_close.clone();
    mqtt_topic_peak_today <- "spec.mqtt.topics.peakToday" = spec.mqtt.topics.peak_today.clone();
    mqtt_user_list_format <- "spec.mqtt.userListFormat" = spec.mqtt.user_list_format;
    publish_interval <- "spec.mqtt.publishInterval" =
        optional_duration(at, &spec.mqtt.publish_interval)?;
    count_publish_interval <- "spec.mqtt.countPublishInterval" =
        optional_duration(at, &spec.mqtt.count_publish_interval)?;

    // Named after the monitor: `<name>-checkpoint` and its shards `-1` … `-N`.
    checkpoint_configmap <- "metadata.name" = Some(checked.checkpoint_configmap.clone());
    // One writer at a time: the rollout's new pod waits for the old one's last checkpoint.
    checkpoint_lease <- "metadata.name" =
        Some(crate::validate::checkpoint_lease_name(&checked.name));
    checkpoint_configmap_shards <- "spec.checkpoint.shards" =
        Some(usize::from(checked.checkpoint_shards));
    checkpoint_interval <- "spec.checkpoint.interval" =
        optional_duration(at, &spec.checkpoint.interval)?;

    // A mounted file; the token itself never reaches a ConfigMap.
    api_token_file <- "spec.apiAuth" = checked.api_token.then(|| paths::API_TOKEN_FILE.into());
    api_token <- "spec.apiAuth" = None;
    log_level <- "spec.logLevel" = spec.log_level.clone();
    // JSON by default in a cluster, for log collectors (the service's own default is text).
    log_format <- "spec.logFormat" = Some(spec.log_format.unwrap_or(LogFormat::Json));

    qlik_repository_url <- "spec.qlik.repositoryUrl" =
        spec.qlik.as_ref().and_then(|q| q.repository_url.clone());
    qlik_proxies <- "spec.qlik.proxies" = spec.qlik.as_ref().and_then(|q| q.proxies.clone());
    // The files the QMC exports, mounted from `spec.qlik.certificatesSecret`.
    qlik_client_cert_file <- "spec.qlik.certificatesSecret" =
        spec.qlik.as_ref().map(|_| paths::QLIK_CLIENT_CERT_FILE.into());
    qlik_client_key_file <- "spec.qlik.certificatesSecret" =
        spec.qlik.as_ref().map(|_| paths::QLIK_CLIENT_KEY_FILE.into());
    qlik_ca_file <- "spec.qlik.certificatesSecret" =
        spec.qlik.as_ref().map(|_| paths::QLIK_ROOT_CERT_FILE.into());
    qlik_client_key_passphrase_file <- "spec.qlik.certificatesSecret.passphraseKey" = spec
        .qlik
        .as_ref()
        .and_then(|q| q.certificates_secret.passphrase_key.as_ref())
        .map(|_| paths::QLIK_PASSPHRASE_FILE.into());
    qlik_client_key_passphrase <- "spec.qlik.certificatesSecret.passphraseKey" = None;
    qlik_insecure_skip_tls_verify <- "spec.qlik.insecureSkipTlsVerify" =
        spec.qlik.as_ref().and_then(|q| q.insecure_skip_tls_verify);
    qlik_reconcile_interval <- "spec.qlik.reconcileInterval" =
        optional_duration(at, &spec.qlik.as_ref().and_then(|q| q.reconcile_interval.clone()))?;
    qlik_reconcile_grace <- "spec.qlik.reconcileGrace" =
        optional_duration(at, &spec.qlik.as_ref().and_then(|q| q.reconcile_grace.clone()))?;
    qlik_silent_after <- "spec.qlik.silentAfter" =
        optional_duration(at, &spec.qlik.as_ref().and_then(|q| q.silent_after.clone()))?;
    qlik_startup_timeout <- "spec.qlik.startupTimeout" =
        optional_duration(at, &spec.qlik.as_ref().and_then(|q| q.startup_timeout.clone()))?;
    qlik_request_timeout <- "spec.qlik.requestTimeout" =
        optional_duration(at, &spec.qlik.as_ref().and_then(|q| q.request_timeout.clone()))?;
    qlik_host_aliases <- "spec.qlik.hostAliases" =
        (!checked.qlik_host_aliases.is_empty()).then(|| checked.qlik_host_aliases.clone());
    qlik_resolve <- "spec.qlik.resolve" =
        (!checked.qlik_resolve.is_empty()).then(|| checked.qlik_resolve.clone());
}

/// Service settings the spec does not expose: the operator leaves them at the service's
/// defaults, so the service's validation never names them for a rendered configuration.
pub const LEFT_AT_DEFAULT: &[&str] = &[
    "udp_max_datagram_bytes",
    "udp_max_field_bytes",
    "mqtt_embedded_listen",
    "checkpoint_file",
    "checkpoint_namespace",
];

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Args;

    /// Every key of the service's `Settings`: its flags, and those that are never a flag.
    fn service_keys() -> Vec<String> {
        let command = Settings::augment_args(clap::Command::new("session-monitor"));
        let mut keys: Vec<String> = command
            .get_arguments()
            .map(|a| a.get_id().as_str().to_owned())
            .collect();
        keys.extend(Settings::NEVER_FLAGS.iter().map(|k| (*k).to_owned()));
        keys
    }

    #[test]
    fn every_service_setting_is_in_the_table_or_left_at_its_default() {
        let keys = service_keys();
        assert!(keys.len() >= 50, "{keys:?}");
        for key in &keys {
            let rendered = RENDERED.contains(&key.as_str());
            let left = LEFT_AT_DEFAULT.contains(&key.as_str());
            assert!(
                rendered != left,
                "{key}: add a row to the table, or to LEFT_AT_DEFAULT (rendered {rendered}, left {left})"
            );
        }
        for key in RENDERED.iter().chain(LEFT_AT_DEFAULT) {
            assert!(
                keys.iter().any(|k| k == key),
                "{key} is not a service setting"
            );
        }
    }

    #[test]
    fn every_rendered_setting_names_a_spec_field() {
        for key in RENDERED {
            let path = spec_path(key).unwrap();
            assert!(
                path.starts_with("spec.") || path == "metadata.name",
                "{key} maps to {path:?}"
            );
        }
        for key in LEFT_AT_DEFAULT {
            assert_eq!(spec_path(key), None, "{key}");
        }
        // Each Qlik setting points into spec.qlik.
        for key in RENDERED.iter().filter(|k| k.starts_with("qlik_")) {
            assert!(spec_path(key).unwrap().starts_with("spec.qlik."), "{key}");
        }
    }
}
