//! Configuration: every setting as a flag, a `SESSION_MONITOR_*` environment variable and a key
//! in an optional TOML file, resolved into a validated [`Config`].
//!
//! One naming rule ties the three together, so the reference is one table: the file key
//! `mqtt_url` is the flag `--mqtt-url` and the variable `SESSION_MONITOR_MQTT_URL`. Precedence:
//! flag, then environment (clap resolves both), then file, then the built-in default.
//!
//! [`Settings`] is also the type the operator serializes into the service's config ConfigMap,
//! so it cannot render a configuration this module would reject without the error naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub mod exclusions;
mod limits;
pub mod logging;
pub mod qlik;

pub use limits::{ExpiryPolicy, Limits};

use crate::exclusions::Exclusions;
use crate::qlik::QlikConfig;

/// Raw settings as given: every field optional, so "not given" stays distinguishable from a
/// default and the layers can be merged.
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
#[command(next_help_heading = "Settings (flag, SESSION_MONITOR_* env var, or key in --config)")]
pub struct Settings {
    /// UDP address for the Qlik proxy's log4net events, IPv4 and IPv6 on "[::]" [default: [::]:9997]
    #[arg(long, env = "SESSION_MONITOR_UDP_LISTEN", value_name = "ADDR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_listen: Option<SocketAddr>,

    /// Only accept datagrams from these networks (comma-separated CIDRs) [default: any]
    #[arg(
        long,
        env = "SESSION_MONITOR_UDP_ALLOWED_SOURCES",
        value_name = "CIDRS",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_allowed_sources: Option<Vec<IpNet>>,

    /// Larger datagrams are dropped [default: 8192]
    #[arg(
        long,
        env = "SESSION_MONITOR_UDP_MAX_DATAGRAM_BYTES",
        value_name = "BYTES"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_max_datagram_bytes: Option<usize>,

    /// Longer host/directory/user/session-id fields are rejected, others truncated [default: 512]
    #[arg(
        long,
        env = "SESSION_MONITOR_UDP_MAX_FIELD_BYTES",
        value_name = "BYTES"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_max_field_bytes: Option<usize>,

    /// The text encoding the proxies' appenders send (their `encoding` parameter): a WHATWG label
    /// such as windows-1252 or shift_jis; UTF-16LE is recognised whatever is set [default: utf-8]
    #[arg(long, env = "SESSION_MONITOR_UDP_ENCODING", value_name = "LABEL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_encoding: Option<String>,

    /// Socket receive buffer, to absorb bursts (Linux caps it at net.core.rmem_max unless the
    /// process has CAP_NET_ADMIN) [default: 8388608]
    #[arg(
        long,
        env = "SESSION_MONITOR_UDP_RECEIVE_BUFFER_BYTES",
        value_name = "BYTES"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_receive_buffer_bytes: Option<usize>,

    /// HTTP address for /metrics, probes and the API [default: 0.0.0.0:9842]
    #[arg(long, env = "SESSION_MONITOR_HTTP_LISTEN", value_name = "ADDR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,

    /// A session with no open connection expires after this long without events [default: 30m]
    #[arg(long, env = "SESSION_MONITOR_IDLE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub idle_timeout: Option<Duration>,

    /// Any session expires after this long without events [default: 24h]
    #[arg(long, env = "SESSION_MONITOR_MAX_IDLE", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub max_idle: Option<Duration>,

    /// Users not counted, as DIRECTORY\userid patterns with * wildcards (comma-separated)
    #[arg(
        long,
        env = "SESSION_MONITOR_EXCLUDE_USERS",
        value_name = "PATTERNS",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_users: Option<Vec<String>>,

    /// Distinct proxy host names tracked at most; datagrams naming further hosts are dropped [default: 1000]
    #[arg(long, env = "SESSION_MONITOR_MAX_PROXY_HOSTS", value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_proxy_hosts: Option<usize>,

    /// Active sessions tracked at most; events that would start further ones are dropped [default: 1000000]
    #[arg(long, env = "SESSION_MONITOR_MAX_SESSIONS", value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,

    /// MQTT broker, mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; without it an embedded broker runs
    #[arg(long, env = "SESSION_MONITOR_MQTT_URL", value_name = "URL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_url: Option<String>,

    /// Where the embedded broker listens when no --mqtt-url is given [default: 127.0.0.1:1883]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_EMBEDDED_LISTEN",
        value_name = "ADDR"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_embedded_listen: Option<SocketAddr>,

    /// MQTT user name
    #[arg(long, env = "SESSION_MONITOR_MQTT_USERNAME", value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_username: Option<String>,

    /// File holding the MQTT password (or set SESSION_MONITOR_MQTT_PASSWORD; never a flag)
    #[arg(long, env = "SESSION_MONITOR_MQTT_PASSWORD_FILE", value_name = "PATH")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_password_file: Option<PathBuf>,

    /// MQTT client id [default: session-monitor-<hostname>]
    #[arg(long, env = "SESSION_MONITOR_MQTT_CLIENT_ID", value_name = "ID")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_client_id: Option<String>,

    /// QoS of state and event publishes, 0, 1 or 2 [default: 1]
    #[arg(long, env = "SESSION_MONITOR_MQTT_QOS", value_name = "QOS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_qos: Option<u8>,

    /// Publish state topics retained, so late subscribers see the current state [default: true]
    #[arg(long, env = "SESSION_MONITOR_MQTT_RETAIN", value_name = "BOOL", action = clap::ArgAction::Set)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_retain: Option<bool>,

    /// MQTT keep-alive interval [default: 30s]
    #[arg(long, env = "SESSION_MONITOR_MQTT_KEEP_ALIVE", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub mqtt_keep_alive: Option<Duration>,

    /// CA certificate(s), PEM, to verify an mqtts:// broker [default: the system's roots]
    #[arg(long, env = "SESSION_MONITOR_MQTT_CA_FILE", value_name = "PATH")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// Client certificate chain, PEM, for mutual TLS
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_CLIENT_CERT_FILE",
        value_name = "PATH"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_client_cert_file: Option<PathBuf>,

    /// Client private key, PEM, for mutual TLS
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_CLIENT_KEY_FILE",
        value_name = "PATH"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_client_key_file: Option<PathBuf>,

    /// Topic of the active user count [default: qliksense/users/active/count]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_TOPIC_USER_COUNT",
        value_name = "TOPIC"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_user_count: Option<String>,

    /// Topic of the active user list [default: qliksense/users/active/usernames]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_TOPIC_USER_LIST",
        value_name = "TOPIC"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_user_list: Option<String>,

    /// Per-host counts go to <prefix>/<host>/count [default: qliksense/users/activeperserver]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_TOPIC_HOST_PREFIX",
        value_name = "TOPIC"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_host_prefix: Option<String>,

    /// Status topic: `online`, and `offline` as Last Will [default: qliksense/session-monitor/status]
    #[arg(long, env = "SESSION_MONITOR_MQTT_TOPIC_STATUS", value_name = "TOPIC")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_status: Option<String>,

    /// Event topic for session starts, one JSON object per event (Butler: qliksense/session/start) [default: off]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_TOPIC_SESSION_START",
        value_name = "TOPIC"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_session_start: Option<String>,

    /// Event topic for session stops (Butler: qliksense/session/stop) [default: off]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_TOPIC_SESSION_STOP",
        value_name = "TOPIC"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_session_stop: Option<String>,

    /// Event topic for connection opens (Butler: qliksense/connection/open) [default: off]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_TOPIC_CONNECTION_OPEN",
        value_name = "TOPIC"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_connection_open: Option<String>,

    /// Event topic for connection closes (Butler: qliksense/connection/close) [default: off]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_TOPIC_CONNECTION_CLOSE",
        value_name = "TOPIC"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_connection_close: Option<String>,

    /// Retained topic with today's (UTC) peak of concurrent users, {"date","active_users","at"} [default: off]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_TOPIC_PEAK_TODAY",
        value_name = "TOPIC"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_topic_peak_today: Option<String>,

    /// User list entries: `directory-and-id` (DIR\userid) or `user-id` (Butler's) [default: directory-and-id]
    #[arg(
        long,
        env = "SESSION_MONITOR_MQTT_USER_LIST_FORMAT",
        value_name = "FORMAT"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_user_list_format: Option<UserListFormat>,

    /// A change of the user count or a per-proxy count is published at most this long after it [default: 10ms]
    #[arg(long, env = "SESSION_MONITOR_COUNT_PUBLISH_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub count_publish_interval: Option<Duration>,

    /// A change of the user list is published at most this long after it; bursts collapse into one publish [default: 250ms]
    #[arg(long, env = "SESSION_MONITOR_PUBLISH_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub publish_interval: Option<Duration>,

    /// Registry checkpoint file [default: data/session-monitor.checkpoint]
    #[arg(long, env = "SESSION_MONITOR_CHECKPOINT_FILE", value_name = "PATH")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_file: Option<PathBuf>,

    /// Checkpoint to this ConfigMap (and NAME-1.. for large registries) instead of a file
    #[arg(
        long,
        env = "SESSION_MONITOR_CHECKPOINT_CONFIGMAP",
        value_name = "NAME"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_configmap: Option<String>,

    /// One checkpoint writer at a time: hold this Lease (beside the ConfigMaps) to write them; a
    /// pod that starts while another holds it counts from the checkpoint and its own datagrams,
    /// and takes over the holder's last checkpoint when the holder stops (a rollout's handover)
    /// [default: none, this process is the only writer]
    #[arg(long, env = "SESSION_MONITOR_CHECKPOINT_LEASE", value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_lease: Option<String>,

    /// Namespace of the checkpoint ConfigMaps [default: the pod's, else the kubeconfig's]
    #[arg(
        long,
        env = "SESSION_MONITOR_CHECKPOINT_NAMESPACE",
        value_name = "NAMESPACE"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_namespace: Option<String>,

    /// Most shard ConfigMaps NAME-1..NAME-N a checkpoint may use; RBAC must allow them [default: 8]
    #[arg(
        long,
        env = "SESSION_MONITOR_CHECKPOINT_CONFIGMAP_SHARDS",
        value_name = "N"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_configmap_shards: Option<usize>,

    /// The registry is checkpointed at most this often when it changed [default: 5s]
    #[arg(long, env = "SESSION_MONITOR_CHECKPOINT_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub checkpoint_interval: Option<Duration>,

    /// Active users per minute are kept this long, for /api/v1/history, /api/v1/peaks and the page [default: 14d]
    #[arg(long, env = "SESSION_MONITOR_HISTORY_RETENTION", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub history_retention: Option<Duration>,

    /// Qlik Sense repository (QRS), https://CENTRAL:4242; its proxies and virtual proxies are found there and reconciled with the events
    #[arg(long, env = "SESSION_MONITOR_QLIK_REPOSITORY_URL", value_name = "URL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_repository_url: Option<String>,

    /// Instead of discovery: proxy APIs to reconcile with, https://NODE:4243/ for the default virtual proxy, https://NODE:4243/PREFIX for another (comma-separated)
    #[arg(
        long,
        env = "SESSION_MONITOR_QLIK_PROXIES",
        value_name = "URLS",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_proxies: Option<Vec<String>>,

    /// Client certificate exported from the QMC (client.pem)
    #[arg(
        long,
        env = "SESSION_MONITOR_QLIK_CLIENT_CERT_FILE",
        value_name = "PATH"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_client_cert_file: Option<PathBuf>,

    /// Its private key (client_key.pem)
    #[arg(
        long,
        env = "SESSION_MONITOR_QLIK_CLIENT_KEY_FILE",
        value_name = "PATH"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_client_key_file: Option<PathBuf>,

    /// File holding the key's passphrase, if it has one (or set SESSION_MONITOR_QLIK_CLIENT_KEY_PASSPHRASE; never a flag)
    #[arg(
        long,
        env = "SESSION_MONITOR_QLIK_CLIENT_KEY_PASSPHRASE_FILE",
        value_name = "PATH"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_client_key_passphrase_file: Option<PathBuf>,

    /// The site's root certificate (root.pem), to verify the Qlik services
    #[arg(long, env = "SESSION_MONITOR_QLIK_CA_FILE", value_name = "PATH")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_ca_file: Option<PathBuf>,

    /// Do not verify the Qlik services' certificates (logged as a warning at start) [default: false]
    #[arg(long, env = "SESSION_MONITOR_QLIK_INSECURE_SKIP_TLS_VERIFY", value_name = "BOOL", action = clap::ArgAction::Set)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_insecure_skip_tls_verify: Option<bool>,

    /// How often the registry is reconciled with the proxies' session lists; 0s: only once, at start [default: 60s]
    #[arg(long, env = "SESSION_MONITOR_QLIK_RECONCILE_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub qlik_reconcile_interval: Option<Duration>,

    /// A session the API no longer lists is removed only once it has been silent this long, so events in flight are never undone [default: 30s]
    #[arg(long, env = "SESSION_MONITOR_QLIK_RECONCILE_GRACE", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub qlik_reconcile_grace: Option<Duration>,

    /// A proxy node the API lists sessions on is reported silent once this long has passed since start without one event from it (a node's idle users send nothing for a while) [default: 10m]
    #[arg(long, env = "SESSION_MONITOR_QLIK_SILENT_AFTER", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub qlik_silent_after: Option<Duration>,

    /// At start, readiness waits at most this long for the first reconcile [default: 10s]
    #[arg(long, env = "SESSION_MONITOR_QLIK_STARTUP_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub qlik_startup_timeout: Option<Duration>,

    /// Each request to a Qlik API gives up after this long [default: 10s]
    #[arg(long, env = "SESSION_MONITOR_QLIK_REQUEST_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub qlik_request_timeout: Option<Duration>,

    /// Proxy node names as the API gives them mapped to the names the proxies log, QLIK_NAME=LOGGED_NAME (comma-separated) [default: same first label, any case]
    #[arg(
        long,
        env = "SESSION_MONITOR_QLIK_HOST_ALIASES",
        value_name = "ALIASES",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_host_aliases: Option<Vec<String>>,

    /// Addresses for Qlik host names this machine cannot resolve, HOST=IP (comma-separated)
    #[arg(
        long,
        env = "SESSION_MONITOR_QLIK_RESOLVE",
        value_name = "ENTRIES",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_resolve: Option<Vec<String>>,

    /// File holding a token that /api/* and the page then require, as `Authorization: Bearer` or by signing in at /login (or set SESSION_MONITOR_API_TOKEN; never a flag) [default: none, open]
    #[arg(long, env = "SESSION_MONITOR_API_TOKEN_FILE", value_name = "PATH")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,

    /// Log filter, e.g. `info` or `session_monitor=debug,info` [default: info]
    #[arg(long, env = "SESSION_MONITOR_LOG_LEVEL", value_name = "FILTER")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,

    /// Log format: `text` or `json` [default: text]
    #[arg(long, env = "SESSION_MONITOR_LOG_FORMAT", value_name = "FORMAT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,

    /// The MQTT password. Only from the environment or the config file: never a flag, since
    /// flags show in process listings.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_password: Option<Secret>,

    /// The API token: from SESSION_MONITOR_API_TOKEN or the config file, never a flag.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<Secret>,

    /// The Qlik client key's passphrase: from SESSION_MONITOR_QLIK_CLIENT_KEY_PASSPHRASE or the
    /// config file, never a flag.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik_client_key_passphrase: Option<Secret>,
}

/// A secret string: serialized as is (settings files may hold it), never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum UserListFormat {
    /// `DIRECTORY\userid`: users of two directories are told apart.
    #[default]
    DirectoryAndId,
    /// The user id only, as Butler published it.
    UserId,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A setting that could not be used; names it in all three spellings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "invalid setting `{key}` (--{flag}, SESSION_MONITOR_{env}): {message}",
        flag = key.replace('_', "-"),
        env = key.to_uppercase()
    )]
    Invalid { key: &'static str, message: String },
    #[error("cannot read config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

pub(crate) fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl Settings {
    /// The keys that are never a flag (flags show in process listings): secrets, from the
    /// environment or the config file only.
    pub const NEVER_FLAGS: &[&str] = &["mqtt_password", "api_token", "qlik_client_key_passphrase"];

    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let file_error = |message: String| ConfigError::File {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        Settings::from_toml(&text).map_err(file_error)
    }

    /// Parses the text of a TOML config file (the file's name is the caller's to add).
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// `self` where set, else `fallback`.
    pub fn or(self, fallback: Settings) -> Settings {
        // Going through TOML tables merges field by field without listing the fields again
        // (unset fields are not serialized).
        let mut merged = toml::Table::try_from(&fallback).expect("settings serialize");
        merged.extend(toml::Table::try_from(&self).expect("settings serialize"));
        merged.try_into().expect("merged settings deserialize")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings serialize")
    }
}

/// Defaults that are also documented in the help texts above.
pub mod defaults {
    use super::*;
    /// Dual-stack: log4net sends to the first address its `remoteAddress` resolves to, which may
    /// be IPv6 (the socket falls back to IPv4 alone where the host has no IPv6).
    pub const UDP_LISTEN: &str = "[::]:9997";
    pub const HTTP_LISTEN: &str = "0.0.0.0:9842";
    pub const MQTT_EMBEDDED_LISTEN: &str = "127.0.0.1:1883";
    pub const UDP_RECEIVE_BUFFER_BYTES: usize = 8 * 1024 * 1024;
    pub const TOPIC_USER_COUNT: &str = "qliksense/users/active/count";
    pub const TOPIC_USER_LIST: &str = "qliksense/users/active/usernames";
    pub const TOPIC_HOST_PREFIX: &str = "qliksense/users/activeperserver";
    pub const TOPIC_STATUS: &str = "qliksense/session-monitor/status";
    pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);
    /// Short enough to be at once for a person watching, long enough that a burst of logins is
    /// not one publish each.
    pub const COUNT_PUBLISH_INTERVAL: Duration = Duration::from_millis(10);
    pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
    pub const CHECKPOINT_FILE: &str = "data/session-monitor.checkpoint";
    pub const MQTT_KEEP_ALIVE: Duration = Duration::from_secs(30);
    /// Proxy hosts a registry tracks at most unless configured otherwise; a Qlik site has a few.
    pub const MAX_PROXY_HOSTS: usize = 1000;
    /// Far above any Qlik site's concurrent sessions, and what one pod holds in its default
    /// memory limit, with a checkpoint well within the shard ConfigMaps' maximum.
    pub const MAX_SESSIONS: usize = 1_000_000;
    pub const HISTORY_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);
}

/// Where the settings came from at start, to merge a changed file the same way.
#[derive(Clone, Debug)]
pub struct FileSource {
    pub path: PathBuf,
    /// Command-line flags and environment variables, which win over the file.
    pub flags: Settings,
    /// `flags` over the file as the service started with it.
    pub started: Settings,
}

/// The validated configuration the service runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub udp: UdpConfig,
    pub max_proxy_hosts: usize,
    pub max_sessions: usize,
    pub http_listen: SocketAddr,
    pub expiry: ExpiryPolicy,
    pub exclusions: Exclusions,
    pub mqtt: MqttConfig,
    pub checkpoint: CheckpointConfig,
    /// Reconciliation with the Qlik proxies' session lists; `None`: events only.
    pub qlik: Option<QlikConfig>,
    /// How long active users per minute are kept.
    pub history_retention: Duration,
    /// `None`: the API and the page are open.
    pub api_token: Option<ApiToken>,
    pub log_level: String,
    pub log_format: LogFormat,
    /// The configuration file to watch for a raised `checkpoint_configmap_shards`; set by the
    /// command line (`--config`), `None` without a file.
    pub reload: Option<FileSource>,
}

#[derive(Clone, Debug)]
pub struct UdpConfig {
    pub listen: SocketAddr,
    /// Empty: any source.
    pub allowed_sources: Vec<IpNet>,
    pub limits: Limits,
    /// What the appenders' bytes are decoded with (UTF-16LE is recognised by itself).
    pub encoding: &'static encoding_rs::Encoding,
    pub receive_buffer_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub broker: MqttBroker,
    pub client_id: String,
    pub credentials: Option<MqttCredentials>,
    pub qos: u8,
    pub retain: bool,
    pub keep_alive: Duration,
    pub topics: Topics,
    pub user_list_format: UserListFormat,
    /// For the user list.
    pub publish_interval: Duration,
    /// For the user count and the per-proxy counts.
    pub count_publish_interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MqttBroker {
    /// Run a broker inside this process and publish to it over loopback.
    Embedded { listen: SocketAddr },
    External {
        host: String,
        port: u16,
        tls: Option<MqttTls>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttTls {
    pub ca_file: Option<PathBuf>,
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone)]
pub struct MqttCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for MqttCredentials {
    // The password must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    pub user_count: String,
    pub user_list: String,
    pub host_prefix: String,
    pub status: String,
    pub session_start: Option<String>,
    pub session_stop: Option<String>,
    pub connection_open: Option<String>,
    pub connection_close: Option<String>,
    /// Retained: today's peak of concurrent users.
    pub peak_today: Option<String>,
}

#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    pub store: CheckpointStoreConfig,
    pub interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointStoreConfig {
    File(PathBuf),
    ConfigMap {
        name: String,
        /// `None`: the pod's namespace, else the kubeconfig's.
        namespace: Option<String>,
        /// Shards `name-1` … `name-<max_shards>`.
        max_shards: usize,
        /// The Lease whose holder alone writes the checkpoint (`checkpoint_lease`).
        lease: Option<String>,
    },
}

/// Upper bound for checkpoint_configmap_shards: 100 × 900 KiB is far beyond any Qlik site.
pub const MAX_CHECKPOINT_SHARDS: usize = 100;

impl Config {
    /// Validates settings and fills in defaults. `env_password` is SESSION_MONITOR_MQTT_PASSWORD.
    ///
    /// Each section checks its own settings beside its defaults; a new setting is a field of
    /// [`Settings`] and a line in its section.
    pub fn from_settings(s: Settings, env_password: Option<String>) -> Result<Config, ConfigError> {
        if let Some(level) = &s.log_level {
            logging::check_level(level).map_err(|e| invalid("log_level", e))?;
        }
        Ok(Config {
            udp: UdpConfig::from_settings(&s)?,
            max_proxy_hosts: positive("max_proxy_hosts", s.max_proxy_hosts)?
                .unwrap_or(defaults::MAX_PROXY_HOSTS),
            max_sessions: positive("max_sessions", s.max_sessions)?
                .unwrap_or(defaults::MAX_SESSIONS),
            http_listen: s
                .http_listen
                .unwrap_or_else(|| default_addr(defaults::HTTP_LISTEN)),
            expiry: expiry_policy(&s)?,
            exclusions: Exclusions::new(s.exclude_users.clone().unwrap_or_default())
                .map_err(|e| invalid("exclude_users", e.to_string()))?,
            mqtt: MqttConfig::from_settings(&s, env_password)?,
            checkpoint: CheckpointConfig::from_settings(&s)?,
            qlik: QlikConfig::from_settings(&s)?,
            history_retention: match s.history_retention {
                Some(r) if r < Duration::from_secs(3600) || r > LONGEST_TIMEOUT => {
                    return Err(invalid("history_retention", "must be from 1h to 90days"));
                }
                Some(r) => r,
                None => defaults::HISTORY_RETENTION,
            },
            api_token: api_token(&s)?,
            log_level: s.log_level.unwrap_or_else(|| "info".to_owned()),
            log_format: s.log_format.unwrap_or_default(),
            reload: None,
        })
    }
}

fn default_addr(text: &str) -> SocketAddr {
    text.parse().expect("a default address")
}

impl UdpConfig {
    fn from_settings(s: &Settings) -> Result<UdpConfig, ConfigError> {
        let default_limits = Limits::default();
        let limits = Limits {
            max_datagram_bytes: positive("udp_max_datagram_bytes", s.udp_max_datagram_bytes)?
                .unwrap_or(default_limits.max_datagram_bytes),
            max_field_bytes: positive("udp_max_field_bytes", s.udp_max_field_bytes)?
                .unwrap_or(default_limits.max_field_bytes),
        };
        if limits.max_datagram_bytes > 65_507 {
            return Err(invalid(
                "udp_max_datagram_bytes",
                "a UDP datagram carries at most 65507 bytes",
            ));
        }
        Ok(UdpConfig {
            listen: s
                .udp_listen
                .unwrap_or_else(|| default_addr(defaults::UDP_LISTEN)),
            allowed_sources: s.udp_allowed_sources.clone().unwrap_or_default(),
            limits,
            encoding: encoding(s.udp_encoding.as_deref())?,
            receive_buffer_bytes: positive("udp_receive_buffer_bytes", s.udp_receive_buffer_bytes)?
                .unwrap_or(defaults::UDP_RECEIVE_BUFFER_BYTES),
        })
    }
}

/// The appenders' encoding from its WHATWG label (as log4net's `encoding` parameter names it).
fn encoding(label: Option<&str>) -> Result<&'static encoding_rs::Encoding, ConfigError> {
    let Some(label) = label else {
        return Ok(encoding_rs::UTF_8);
    };
    match encoding_rs::Encoding::for_label(label.as_bytes()) {
        // The WHATWG "replacement" encoding decodes everything to U+FFFD; no appender writes it.
        Some(e) if e != encoding_rs::REPLACEMENT => Ok(e),
        _ => Err(invalid(
            "udp_encoding",
            format!(
                "{label:?} is not an encoding label (use the appender's encoding, e.g. utf-8, windows-1252 or shift_jis)"
            ),
        )),
    }
}

fn expiry_policy(s: &Settings) -> Result<ExpiryPolicy, ConfigError> {
    let default_expiry = ExpiryPolicy::default();
    let expiry = ExpiryPolicy {
        idle_timeout: positive("idle_timeout", s.idle_timeout)?
            .unwrap_or(default_expiry.idle_timeout),
        max_idle: positive("max_idle", s.max_idle)?.unwrap_or(default_expiry.max_idle),
    };
    if expiry.max_idle < expiry.idle_timeout {
        return Err(invalid(
            "max_idle",
            format!(
                "{} is shorter than idle_timeout ({})",
                humantime::format_duration(expiry.max_idle),
                humantime::format_duration(expiry.idle_timeout)
            ),
        ));
    }
    at_most("idle_timeout", s.idle_timeout, LONGEST_TIMEOUT)?;
    at_most("max_idle", s.max_idle, LONGEST_TIMEOUT)?;
    Ok(expiry)
}

impl MqttConfig {
    fn from_settings(
        s: &Settings,
        env_password: Option<String>,
    ) -> Result<MqttConfig, ConfigError> {
        let broker = match s.mqtt_url.as_deref() {
            None => MqttBroker::Embedded {
                listen: s
                    .mqtt_embedded_listen
                    .unwrap_or_else(|| default_addr(defaults::MQTT_EMBEDDED_LISTEN)),
            },
            Some(url) => parse_mqtt_url(url, s)?,
        };
        // The environment variable wins, as environment wins over files everywhere; then the
        // password file; then a password written in the config file itself.
        let password = match (env_password, &s.mqtt_password_file) {
            (Some(password), _) => Some(password),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| invalid("mqtt_password_file", format!("{}: {e}", path.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            (None, None) => s.mqtt_password.clone().map(|p| p.0),
        };
        let credentials = match (s.mqtt_username.clone(), password) {
            (Some(username), password) => Some(MqttCredentials {
                username,
                password: password.unwrap_or_default(),
            }),
            (None, Some(_)) => {
                return Err(invalid(
                    "mqtt_username",
                    "a password is set but no user name",
                ));
            }
            (None, None) => None,
        };
        let qos = s.mqtt_qos.unwrap_or(1);
        if qos > 2 {
            return Err(invalid("mqtt_qos", format!("{qos} is not 0, 1 or 2")));
        }
        let client_id = match &s.mqtt_client_id {
            Some(id) if id.trim().is_empty() => {
                return Err(invalid("mqtt_client_id", "must not be empty"));
            }
            Some(id) => id.clone(),
            None => format!("session-monitor-{}", local_hostname()),
        };
        at_most("publish_interval", s.publish_interval, LONGEST_INTERVAL)?;
        at_most(
            "count_publish_interval",
            s.count_publish_interval,
            LONGEST_INTERVAL,
        )?;
        // MQTT carries keep-alive in 16 bits of seconds.
        at_most(
            "mqtt_keep_alive",
            s.mqtt_keep_alive,
            Duration::from_secs(u64::from(u16::MAX)),
        )?;
        Ok(MqttConfig {
            broker,
            client_id,
            credentials,
            qos,
            retain: s.mqtt_retain.unwrap_or(true),
            keep_alive: at_least("mqtt_keep_alive", s.mqtt_keep_alive, Duration::from_secs(1))?
                .unwrap_or(defaults::MQTT_KEEP_ALIVE),
            topics: Topics::from_settings(s)?,
            user_list_format: s.mqtt_user_list_format.unwrap_or_default(),
            publish_interval: positive("publish_interval", s.publish_interval)?
                .unwrap_or(defaults::PUBLISH_INTERVAL),
            count_publish_interval: positive("count_publish_interval", s.count_publish_interval)?
                .unwrap_or(defaults::COUNT_PUBLISH_INTERVAL),
        })
    }
}

impl Topics {
    fn from_settings(s: &Settings) -> Result<Topics, ConfigError> {
        let topic = |key, value: &Option<String>, default| topic(key, value.clone(), default);
        let optional = |key, value: &Option<String>| optional_topic(key, value.clone());
        Ok(Topics {
            user_count: topic(
                "mqtt_topic_user_count",
                &s.mqtt_topic_user_count,
                defaults::TOPIC_USER_COUNT,
            )?,
            user_list: topic(
                "mqtt_topic_user_list",
                &s.mqtt_topic_user_list,
                defaults::TOPIC_USER_LIST,
            )?,
            host_prefix: topic(
                "mqtt_topic_host_prefix",
                &s.mqtt_topic_host_prefix,
                defaults::TOPIC_HOST_PREFIX,
            )?,
            status: topic(
                "mqtt_topic_status",
                &s.mqtt_topic_status,
                defaults::TOPIC_STATUS,
            )?,
            session_start: optional("mqtt_topic_session_start", &s.mqtt_topic_session_start)?,
            session_stop: optional("mqtt_topic_session_stop", &s.mqtt_topic_session_stop)?,
            connection_open: optional("mqtt_topic_connection_open", &s.mqtt_topic_connection_open)?,
            connection_close: optional(
                "mqtt_topic_connection_close",
                &s.mqtt_topic_connection_close,
            )?,
            peak_today: optional("mqtt_topic_peak_today", &s.mqtt_topic_peak_today)?,
        })
    }
}

impl CheckpointConfig {
    fn from_settings(s: &Settings) -> Result<CheckpointConfig, ConfigError> {
        at_most(
            "checkpoint_interval",
            s.checkpoint_interval,
            LONGEST_INTERVAL,
        )?;
        Ok(CheckpointConfig {
            store: checkpoint_store(s)?,
            interval: positive("checkpoint_interval", s.checkpoint_interval)?
                .unwrap_or(defaults::CHECKPOINT_INTERVAL),
        })
    }
}

/// A token the API and the page require; never shown by `Debug`.
#[derive(Clone)]
pub struct ApiToken(std::sync::Arc<str>);

impl ApiToken {
    /// Compares in time independent of where the two differ, so the answer's timing does not
    /// tell how much of a guess was right.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        let mut differ = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            differ |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
        }
        differ == 0
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// Long enough that guessing over HTTP is hopeless; the README shows how to make one.
const MIN_TOKEN_CHARS: usize = 16;

fn api_token(s: &Settings) -> Result<Option<ApiToken>, ConfigError> {
    let (key, token) = match (&s.api_token, &s.api_token_file) {
        (Some(token), _) => ("api_token_file", token.0.clone()),
        (None, Some(path)) => (
            "api_token_file",
            std::fs::read_to_string(path)
                .map_err(|e| invalid("api_token_file", format!("{}: {e}", path.display())))?
                .trim()
                .to_owned(),
        ),
        (None, None) => return Ok(None),
    };
    if token.chars().count() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            key,
            format!(
                "the token must be at least {MIN_TOKEN_CHARS} printable characters without spaces (e.g. openssl rand -hex 24)"
            ),
        ));
    }
    Ok(Some(ApiToken(token.into())))
}

/// The checkpoint store the settings name, alone: the service reads it again from a changed file.
pub fn checkpoint_store(s: &Settings) -> Result<CheckpointStoreConfig, ConfigError> {
    let Some(name) = &s.checkpoint_configmap else {
        if s.checkpoint_namespace.is_some()
            || s.checkpoint_configmap_shards.is_some()
            || s.checkpoint_lease.is_some()
        {
            return Err(invalid(
                "checkpoint_configmap",
                "checkpoint_namespace, checkpoint_configmap_shards and checkpoint_lease need it",
            ));
        }
        let path = s
            .checkpoint_file
            .clone()
            .unwrap_or_else(|| defaults::CHECKPOINT_FILE.into());
        return Ok(CheckpointStoreConfig::File(path));
    };
    if s.checkpoint_file.is_some() {
        return Err(invalid(
            "checkpoint_configmap",
            "set either checkpoint_file or checkpoint_configmap, not both",
        ));
    }
    let max_shards = s.checkpoint_configmap_shards.unwrap_or(8);
    if max_shards > MAX_CHECKPOINT_SHARDS {
        return Err(invalid(
            "checkpoint_configmap_shards",
            format!("{max_shards} is more than {MAX_CHECKPOINT_SHARDS}"),
        ));
    }
    // The longest name we derive, NAME-corrupt-<unix time>, must still be a valid object name.
    if !is_dns_subdomain(name) || name.len() > 253 - "-corrupt-9999999999".len() {
        return Err(invalid(
            "checkpoint_configmap",
            format!(
                "{name:?} is not a valid ConfigMap name (lower-case DNS subdomain of at most 234 characters)"
            ),
        ));
    }
    if let Some(ns) = &s.checkpoint_namespace
        && !is_dns_label(ns)
    {
        return Err(invalid(
            "checkpoint_namespace",
            format!("{ns:?} is not a valid namespace name"),
        ));
    }
    if let Some(lease) = &s.checkpoint_lease
        && !is_dns_subdomain(lease)
    {
        return Err(invalid(
            "checkpoint_lease",
            format!("{lease:?} is not a valid Lease name (lower-case DNS subdomain)"),
        ));
    }
    Ok(CheckpointStoreConfig::ConfigMap {
        name: name.clone(),
        namespace: s.checkpoint_namespace.clone(),
        max_shards,
        lease: s.checkpoint_lease.clone(),
    })
}

/// RFC 1123 label: lower-case alphanumerics and '-', alphanumeric at both ends, at most 63.
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Zero would mean "never" or "always" for every numeric setting we have, so it is refused.
fn positive<T: Default + PartialEq>(
    key: &'static str,
    value: Option<T>,
) -> Result<Option<T>, ConfigError> {
    match value {
        Some(v) if v == T::default() => Err(invalid(key, "must be greater than zero")),
        v => Ok(v),
    }
}

/// Durations beyond these are surely mistakes (and would overflow timers).
const LONGEST_TIMEOUT: Duration = Duration::from_secs(90 * 24 * 3600);
const LONGEST_INTERVAL: Duration = Duration::from_secs(3600);

fn at_most(key: &'static str, value: Option<Duration>, max: Duration) -> Result<(), ConfigError> {
    match value {
        Some(v) if v > max => Err(invalid(
            key,
            format!("must be at most {}", humantime::format_duration(max)),
        )),
        _ => Ok(()),
    }
}

fn at_least(
    key: &'static str,
    value: Option<Duration>,
    min: Duration,
) -> Result<Option<Duration>, ConfigError> {
    match value {
        Some(v) if v < min => Err(invalid(
            key,
            format!("must be at least {}", humantime::format_duration(min)),
        )),
        v => Ok(v),
    }
}

fn topic(key: &'static str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let value = value.unwrap_or_else(|| default.to_owned());
    if value.is_empty() || value.contains(['+', '#', '\0']) {
        return Err(invalid(
            key,
            format!("{value:?} is not a valid MQTT topic to publish to"),
        ));
    }
    Ok(value)
}

fn optional_topic(key: &'static str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    value.map(|v| topic(key, Some(v), "")).transpose()
}

/// What is wrong with a URL's `host[:port]`.
pub(crate) enum AuthorityError {
    /// The text after the last `:`, which is not a port.
    Port(String),
    EmptyHost,
}

/// A URL's `host[:port]` (`[::1]:1883` too; a bare IPv6 address takes `default_port`), the
/// host without its brackets.
pub(crate) fn split_authority(
    authority: &str,
    default_port: u16,
) -> Result<(&str, u16), AuthorityError> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            let number = port.parse::<u16>().ok().filter(|p| *p != 0);
            (
                host,
                number.ok_or_else(|| AuthorityError::Port(port.to_owned()))?,
            )
        }
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(AuthorityError::EmptyHost);
    }
    Ok((host, port))
}

fn parse_mqtt_url(url: &str, s: &Settings) -> Result<MqttBroker, ConfigError> {
    const KEY: &str = "mqtt_url";
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid(KEY, format!("{url:?} is not a URL like mqtt://broker:1883")))?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => (false, 1883),
        "mqtts" | "ssl" => (true, 8883),
        other => {
            return Err(invalid(
                KEY,
                format!("scheme {other:?} is not mqtt or mqtts"),
            ));
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(invalid(KEY, "a broker URL has no path or query"));
    }
    if authority.contains('@') {
        return Err(invalid(
            KEY,
            "credentials do not belong in the URL; use mqtt_username and mqtt_password_file",
        ));
    }
    let (host, port) = split_authority(authority, default_port).map_err(|e| match e {
        AuthorityError::Port(port) => invalid(
            KEY,
            format!("port {port:?} is not a number from 1 to 65535"),
        ),
        AuthorityError::EmptyHost => invalid(KEY, "the broker host is empty"),
    })?;
    let client_auth = match (&s.mqtt_client_cert_file, &s.mqtt_client_key_file) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                "mqtt_client_key_file",
                "a client certificate needs its key",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "mqtt_client_cert_file",
                "a client key needs its certificate",
            ));
        }
    };
    let tls = match tls {
        true => Some(MqttTls {
            ca_file: s.mqtt_ca_file.clone(),
            client_auth,
        }),
        false if s.mqtt_ca_file.is_some() || client_auth.is_some() => {
            return Err(invalid(
                KEY,
                "TLS files are set but the URL is not mqtts://",
            ));
        }
        false => None,
    };
    Ok(MqttBroker::External {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// The machine's host name (the pod name in Kubernetes), for default identities.
pub fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(s: Settings) -> Result<Config, ConfigError> {
        Config::from_settings(s, None)
    }

    #[test]
    fn the_api_token_matches_only_itself() {
        let token = ApiToken("0123456789abcdef".into());
        assert!(token.matches("0123456789abcdef"));
        for other in [
            "",
            "0123456789abcde",
            "0123456789abcdeF",
            "0123456789abcdef0",
        ] {
            assert!(!token.matches(other), "{other}");
        }
        assert_eq!(format!("{token:?}"), "ApiToken(<redacted>)");
        let s = Settings {
            api_token: Some(Secret("has a space in it!!".into())),
            ..Settings::default()
        };
        assert!(
            config(s)
                .unwrap_err()
                .to_string()
                .contains("api_token_file")
        );
    }

    #[test]
    fn the_appenders_encoding_is_a_whatwg_label() {
        let with = |label: &str| {
            config(Settings {
                udp_encoding: Some(label.to_owned()),
                ..Settings::default()
            })
        };
        assert_eq!(
            with("windows-1252").unwrap().udp.encoding,
            encoding_rs::WINDOWS_1252
        );
        assert_eq!(
            with("Shift_JIS").unwrap().udp.encoding,
            encoding_rs::SHIFT_JIS
        );
        assert_eq!(with("utf-16").unwrap().udp.encoding, encoding_rs::UTF_16LE);
        for bad in ["latin-9000", "", "iso-2022-kr"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.contains("udp_encoding") && e.contains("not an encoding label"),
                "{e}"
            );
        }
    }

    #[test]
    fn nothing_is_required() {
        let c = config(Settings::default()).unwrap();
        assert_eq!(c.udp.listen, "[::]:9997".parse().unwrap());
        assert_eq!(c.udp.encoding, encoding_rs::UTF_8);
        assert_eq!(c.http_listen, "0.0.0.0:9842".parse().unwrap());
        assert_eq!(
            c.mqtt.broker,
            MqttBroker::Embedded {
                listen: "127.0.0.1:1883".parse().unwrap()
            }
        );
        assert_eq!(c.mqtt.qos, 1);
        assert!(c.mqtt.retain);
        assert_eq!(c.mqtt.topics.user_count, "qliksense/users/active/count");
        assert_eq!(c.mqtt.topics.session_start, None);
        assert_eq!(c.expiry.idle_timeout, Duration::from_secs(1800));
        assert_eq!(
            c.checkpoint.store,
            CheckpointStoreConfig::File("data/session-monitor.checkpoint".into())
        );
    }

    #[test]
    fn flags_override_the_file() {
        let file: Settings = toml::from_str(
            "mqtt_qos = 0\nidle_timeout = \"10m\"\nexclude_users = ['INTERNAL\\sa_*']",
        )
        .unwrap();
        let cli = Settings {
            mqtt_qos: Some(2),
            ..Settings::default()
        };
        let merged = cli.or(file);
        assert_eq!(merged.mqtt_qos, Some(2));
        assert_eq!(merged.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            merged.exclude_users,
            Some(vec!["INTERNAL\\sa_*".to_owned()])
        );
    }

    #[test]
    fn settings_round_trip_through_toml() {
        let s = Settings {
            udp_listen: Some("127.0.0.1:1".parse().unwrap()),
            udp_allowed_sources: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            publish_interval: Some(Duration::from_millis(100)),
            mqtt_user_list_format: Some(UserListFormat::UserId),
            log_format: Some(LogFormat::Json),
            ..Settings::default()
        };
        let back: Settings = toml::from_str(&s.to_toml()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(
            toml::from_str::<Settings>("mqtt_urll = 'x'")
                .unwrap_err()
                .to_string()
                .contains("mqtt_urll")
        );
    }

    #[test]
    fn errors_name_the_setting_three_ways() {
        let e = config(Settings {
            mqtt_qos: Some(3),
            ..Settings::default()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid setting `mqtt_qos` (--mqtt-qos, SESSION_MONITOR_MQTT_QOS): 3 is not 0, 1 or 2"
        );
        let e = config(Settings {
            publish_interval: Some(Duration::ZERO),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid setting `publish_interval`"),
            "{e}"
        );
        let e = config(Settings {
            exclude_users: Some(vec!["sa_*".into()]),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(
            e.to_string().starts_with("invalid setting `exclude_users`"),
            "{e}"
        );
        let e = config(Settings {
            idle_timeout: Some(Duration::from_secs(25 * 3600)),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("`max_idle`"), "{e}");
        let e = config(Settings {
            mqtt_topic_status: Some("a/#".into()),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("`mqtt_topic_status`"), "{e}");
        let e = config(Settings {
            log_level: Some("info,=x=y".into()),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("`log_level`"), "{e}");
    }

    #[test]
    fn checkpoint_store_choice() {
        let cm = |name: &str| Settings {
            checkpoint_configmap: Some(name.into()),
            ..Settings::default()
        };
        assert_eq!(
            config(cm("smon-checkpoint")).unwrap().checkpoint.store,
            CheckpointStoreConfig::ConfigMap {
                name: "smon-checkpoint".into(),
                namespace: None,
                max_shards: 8,
                lease: None,
            }
        );
        let with_lease = |lease: &str| Settings {
            checkpoint_lease: Some(lease.into()),
            ..cm("smon-checkpoint")
        };
        assert!(matches!(
            config(with_lease("smon-writer")).unwrap().checkpoint.store,
            CheckpointStoreConfig::ConfigMap { lease: Some(l), .. } if l == "smon-writer"
        ));
        let e = config(with_lease("Bad_Name")).unwrap_err().to_string();
        assert!(e.contains("`checkpoint_lease`"), "{e}");
        let e = config(Settings {
            checkpoint_lease: Some("x".into()),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("checkpoint_lease need"), "{e}");
        for bad in ["Upper", "-x", "a_b", ""] {
            let e = config(cm(bad)).unwrap_err().to_string();
            assert!(e.contains("`checkpoint_configmap`"), "{bad}: {e}");
        }
        let both = Settings {
            checkpoint_file: Some("x".into()),
            ..cm("a")
        };
        assert!(config(both).unwrap_err().to_string().contains("not both"));
        let orphan = Settings {
            checkpoint_namespace: Some("ns".into()),
            ..Settings::default()
        };
        assert!(
            config(orphan)
                .unwrap_err()
                .to_string()
                .contains("`checkpoint_configmap`")
        );
        let too_many = Settings {
            checkpoint_configmap_shards: Some(101),
            ..cm("a")
        };
        assert!(
            config(too_many)
                .unwrap_err()
                .to_string()
                .contains("`checkpoint_configmap_shards`")
        );
        let bad_ns = Settings {
            checkpoint_namespace: Some("Bad_NS".into()),
            ..cm("a")
        };
        assert!(
            config(bad_ns)
                .unwrap_err()
                .to_string()
                .contains("`checkpoint_namespace`")
        );
    }

    #[test]
    fn mqtt_urls() {
        let url = |u: &str| parse_mqtt_url(u, &Settings::default());
        assert_eq!(
            url("mqtt://broker").unwrap(),
            MqttBroker::External {
                host: "broker".into(),
                port: 1883,
                tls: None
            }
        );
        assert_eq!(
            url("mqtt://10.0.0.1:1884/").unwrap(),
            MqttBroker::External {
                host: "10.0.0.1".into(),
                port: 1884,
                tls: None
            }
        );
        assert_eq!(
            url("mqtt://[::1]:1885").unwrap(),
            MqttBroker::External {
                host: "::1".into(),
                port: 1885,
                tls: None
            }
        );
        assert_eq!(
            url("MQTTS://broker.example").unwrap(),
            MqttBroker::External {
                host: "broker.example".into(),
                port: 8883,
                tls: Some(MqttTls {
                    ca_file: None,
                    client_auth: None
                })
            }
        );
        for bad in [
            "broker:1883",
            "http://broker",
            "mqtt://",
            "mqtt://b:0",
            "mqtt://b:x",
            "mqtt://u:p@b",
            "mqtt://b/topic",
        ] {
            assert!(
                matches!(
                    url(bad),
                    Err(ConfigError::Invalid {
                        key: "mqtt_url",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        let with_ca = Settings {
            mqtt_ca_file: Some("ca.pem".into()),
            ..Settings::default()
        };
        assert!(
            parse_mqtt_url("mqtt://b", &with_ca).is_err(),
            "TLS files with a plain URL are a mistake"
        );
    }

    #[test]
    fn password_comes_from_file_or_env_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let s = Settings {
            mqtt_url: Some("mqtt://b".into()),
            mqtt_username: Some("svc".into()),
            mqtt_password_file: Some(file),
            ..Settings::default()
        };
        let c = config(s).unwrap();
        let creds = c.mqtt.credentials.unwrap();
        assert_eq!(creds.password, "s3cret");
        assert!(!format!("{creds:?}").contains("s3cret"));

        let s = Settings {
            mqtt_username: Some("svc".into()),
            ..Settings::default()
        };
        let c = Config::from_settings(s, Some("envpw".into())).unwrap();
        assert_eq!(c.mqtt.credentials.unwrap().password, "envpw");

        let e = Config::from_settings(Settings::default(), Some("pw".into())).unwrap_err();
        assert!(e.to_string().contains("`mqtt_username`"));
    }
}
