//! The `SessionMonitor` custom resource (`sessionmonitor.io/v1alpha1`): what a platform team
//! declares per Qlik Sense environment. The CRD YAML in `crds/` is generated from these types
//! (`session-monitor-operator crdgen`), so the schema, its defaults and its validation live here.
//!
//! Fields the service has a default for are optional and left out of the rendered configuration
//! when unset, so the service's own defaults (documented in its README) apply. Only what the
//! operator itself needs to build objects (ports, shard count, Service type) is defaulted here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
// The settings' own enums: the same names in the spec as in the service's configuration.
pub use session_monitor_config::{LogFormat, UserListFormat};

/// A Go-style duration as the service reads it: `250ms`, `30s`, `30m`, `24h`, `1h30m`.
const DURATION: &str = r"^([0-9]+(ns|us|ms|s|m|h|d))+$";
/// IPv4 or IPv6 network in CIDR notation; the operator parses it exactly.
const CIDR: &str = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$";
const MQTT_URL: &str = r"^(mqtt|mqtts)://[^/?#@]+/?$";
/// The repository's address: `https://HOST[:PORT]`, no path.
const QLIK_REPOSITORY_URL: &str = r"^https://[^/?#@]+/?$";
/// A proxy's API and virtual proxy: `https://HOST[:PORT]/` or `https://HOST[:PORT]/PREFIX`.
const QLIK_PROXY_URL: &str = r"^https://[^/?#@]+(/[A-Za-z0-9._-]*/?)?$";

// Each printcolumn repeats `type_`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "sessionmonitor.io",
    version = "v1alpha1",
    kind = "SessionMonitor",
    namespaced,
    shortname = "smon",
    status = "SessionMonitorStatus",
    doc = "A session-monitor service tracking the active users of one Qlik Sense environment",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(name = "Users", type_ = "integer", json_path = ".status.activeUsers"),
    printcolumn(
        name = "Sessions",
        type_ = "integer",
        json_path = ".status.activeSessions"
    ),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SessionMonitorSpec {
    /// Container image of the service; default: the image the operator was started with
    /// (`--default-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `Always`, `IfNotPresent` or `Never`; default: Kubernetes' rule for the tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// The UDP listener the Qlik proxies' log4net appenders send to.
    #[serde(default)]
    pub udp: UdpSpec,
    /// The Kubernetes Service in front of the UDP listener (HTTP gets its own ClusterIP
    /// Service, `<name>-http`, never exposed).
    #[serde(default)]
    pub service: ServiceSpec,
    /// Session expiry and excluded users.
    #[serde(default)]
    pub sessions: SessionsSpec,
    /// Active users per minute, for the history, the daily peaks and the page.
    #[serde(default, skip_serializing_if = "HistorySpec::is_empty")]
    pub history: HistorySpec,
    /// The MQTT broker and topics the active users are published to.
    pub mqtt: MqttSpec,
    /// Reconciliation with the Qlik Sense proxies' own session lists (their QPS API), which
    /// corrects sessions whose events were lost; default: off (events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlik: Option<QlikSpec>,
    /// Registry checkpoints (ConfigMaps `<name>-checkpoint`, `<name>-checkpoint-1`…).
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// A bearer token that the read API and the page, which list user names, then require
    /// (`/metrics` and the probes stay open); default: none, open to whoever reaches the
    /// ClusterIP Service `<name>-http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_auth: Option<ApiAuthSpec>,
    /// The HTTP port (`/metrics`, probes, API) and an optional ServiceMonitor.
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// A `tracing` filter, e.g. `info` or `info,session_monitor::mqtt=debug`; default `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub log_level: Option<String>,
    /// `text` or `json`; default `json` (for log collectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// CPU and memory of the service container; default: requests 50m CPU and 64Mi, limit 512Mi (README: "Sizing").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// How long the pod stays bound to a node that stopped answering (`not-ready`,
    /// `unreachable`) before it is evicted and started elsewhere; default 30. Kubernetes' own
    /// default is 300: five minutes without a listener and without counts. A toleration of
    /// either key in `tolerations` wins over this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub node_lost_toleration_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UdpSpec {
    /// UDP port of the listener and of the Service.
    #[serde(default = "default_udp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Networks (CIDRs) datagrams may come from; default: any. With a LoadBalancer or NodePort
    /// Service, set `service.externalTrafficPolicy: Local` so the proxies' addresses are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(CIDR)))]
    pub allowed_sources: Vec<String>,
    /// Socket receive buffer; default 8 MiB (capped by the node's `net.core.rmem_max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub receive_buffer_bytes: Option<u64>,
    /// Distinct proxy host names tracked at most; datagrams naming further hosts are dropped
    /// (host names come from the network: this bounds topics and metric series); default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_proxy_hosts: Option<u32>,
    /// The text encoding the proxies' appenders send (their `encoding` parameter), as a WHATWG
    /// label such as `windows-1252` or `shift_jis`; default `utf-8`. UTF-16LE is recognised
    /// whatever is set. A datagram not valid in it is dropped as `invalid_encoding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub encoding: Option<String>,
}

impl Default for UdpSpec {
    fn default() -> Self {
        UdpSpec {
            port: default_udp_port(),
            allowed_sources: Vec::new(),
            receive_buffer_bytes: None,
            max_proxy_hosts: None,
            encoding: None,
        }
    }
}

fn default_udp_port() -> u16 {
    9997
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (default), `NodePort` or `LoadBalancer`. Qlik proxies outside the cluster
    /// need `LoadBalancer` or `NodePort`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// `Cluster` or `Local`; `Local` keeps the proxies' source addresses (for `udp.allowedSources`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<ExternalTrafficPolicy>,
    /// Annotations for the Service, e.g. for a cloud load balancer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum ExternalTrafficPolicy {
    Cluster,
    Local,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionsSpec {
    /// A session without open connections expires after this long without events; default `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub idle_timeout: Option<String>,
    /// Any session expires after this long without events; default `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub max_idle: Option<String>,
    /// `DIRECTORY\userid` patterns with `*` wildcards that are not counted, e.g. `INTERNAL\sa_*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1)))]
    pub exclude_users: Vec<String>,
    /// Active sessions tracked at most; events that would start further ones are dropped
    /// (session ids come from the network: this bounds the pod's memory and its checkpoint);
    /// default 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_sessions: Option<u32>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    /// How long active users per minute are kept (1h to 90d); default `14d`. Kept in the
    /// checkpoint: longer retention, larger checkpoints (about 20 KB per day and proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub retention: Option<String>,
}

impl HistorySpec {
    fn is_empty(&self) -> bool {
        self.retention.is_none()
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttSpec {
    /// `mqtt://HOST[:1883]` or `mqtts://HOST[:8883]`.
    #[schemars(pattern(MQTT_URL))]
    pub url: String,
    /// A Secret in the monitor's namespace holding the user name and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<CredentialsSecret>,
    /// TLS material for `mqtts://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MqttTlsSpec>,
    /// MQTT client id; default `session-monitor-<pod name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub client_id: Option<String>,
    /// QoS of state and event publishes; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 2))]
    pub qos: Option<u8>,
    /// Publish state topics retained; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<bool>,
    /// MQTT keep-alive; default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub keep_alive: Option<String>,
    /// `directory-and-id` (`LAB\joe`, default) or `user-id` (`joe`, Butler's payload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_list_format: Option<UserListFormat>,
    /// A change of the user list is published at most this long after it; default `250ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub publish_interval: Option<String>,
    /// A change of the user count or a per-proxy count is published at most this long after
    /// it; default `10ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub count_publish_interval: Option<String>,
    #[serde(default)]
    pub topics: TopicsSpec,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecret {
    pub name: String,
    /// Key of the user name; default `username`.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key of the password; default `password`.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".to_owned()
}

fn default_password_key() -> String {
    "password".to_owned()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttTlsSpec {
    /// A Secret with the PEM CA bundle that signs the broker's certificate; default: system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<CaSecret>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret: Option<SecretName>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaSecret {
    pub name: String,
    /// Key of the CA bundle; default `ca.crt`.
    #[serde(default = "default_ca_key")]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct SecretName {
    pub name: String,
}

/// Where the Qlik APIs are (exactly one of `repositoryUrl` and `proxies`), the certificates
/// to call them with, and how often the registry is reconciled with them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["repositoryUrl"]}, {"required": ["proxies"]}]))]
pub struct QlikSpec {
    /// The repository (QRS) of the central node, `https://CENTRAL[:4242]`: the proxies and their
    /// virtual proxies are found there at every reconcile. Either this or `proxies`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(QLIK_REPOSITORY_URL))]
    pub repository_url: Option<String>,
    /// Instead of discovery: the proxy APIs, `https://NODE[:4243]/` for the default virtual
    /// proxy and `https://NODE[:4243]/PREFIX` for another. Either this or `repositoryUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), inner(pattern(QLIK_PROXY_URL)))]
    pub proxies: Option<Vec<String>>,
    /// A Secret in the monitor's namespace with the certificates exported from the QMC
    /// (`client.pem`, `client_key.pem`, `root.pem`), mounted read-only into the pod.
    pub certificates_secret: QlikCertificatesSecret,
    /// Do not verify the Qlik services' certificates against `root.pem`; default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_tls_verify: Option<bool>,
    /// How often the registry is reconciled with the proxies' session lists (1s to 24h, or
    /// `0s`: only once, at start); default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub reconcile_interval: Option<String>,
    /// A session the API no longer lists is removed only after this long without events, so
    /// events in flight are never undone (at most 1h); default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub reconcile_grace: Option<String>,
    /// A proxy node the API lists sessions on is reported silent (its appender sends nothing)
    /// once this long has passed since the service started without one event from it (at most
    /// 1h); default `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub silent_after: Option<String>,
    /// At start, readiness waits at most this long for the first reconcile (at most 1h);
    /// default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub startup_timeout: Option<String>,
    /// Each request to a Qlik API gives up after this long (1ms to 1h); default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub request_timeout: Option<String>,
    /// Proxy node names as the Qlik API gives them → the names the proxies log (their
    /// `%hostname`), where the two differ by more than case and domain; e.g.
    /// `qs-node1.corp.local: PROXY1`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_aliases: BTreeMap<String, String>,
    /// Addresses for Qlik host names the pod cannot resolve (the service resolves them itself;
    /// the pod's `/etc/hosts` is left alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolve: Vec<QlikResolve>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QlikCertificatesSecret {
    /// The Secret with the keys `client.pem`, `client_key.pem` and `root.pem`.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key in the same Secret holding `client_key.pem`'s passphrase, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub passphrase_key: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QlikResolve {
    /// A host name as the Qlik API gives it (or as written in `repositoryUrl`/`proxies`).
    #[schemars(length(min = 1))]
    pub hostname: String,
    /// Its IPv4 or IPv6 address.
    #[schemars(length(min = 1))]
    pub ip: String,
}

/// Where the API token comes from: exactly one of `generateToken: true` and `tokenSecret`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["generateToken"]}, {"required": ["tokenSecret"]}]))]
pub struct ApiAuthSpec {
    /// `true`: the operator creates the Secret `<name>-api-token` (key `token`, 64 random hex
    /// characters), owned by the monitor, once, and never overwrites it. Delete the Secret to
    /// rotate the token: a new one is created and the pod restarts. Either this or
    /// `tokenSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_token: Option<bool>,
    /// A Secret of your own in the monitor's namespace holding the token (16 or more printable
    /// characters without spaces), mounted read-only into the pod. Either this or
    /// `generateToken`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<ApiTokenSecret>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiTokenSecret {
    /// The Secret's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key of the token in the Secret; default `token`.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn default_token_key() -> String {
    "token".to_owned()
}

/// Topic names; unset ones keep the service's Butler-compatible defaults. Event topics are off
/// unless named.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicsSpec {
    /// Default `qliksense/users/active/count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub user_count: Option<String>,
    /// Default `qliksense/users/active/usernames`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub user_list: Option<String>,
    /// Default `qliksense/users/activeperserver` (counts at `<prefix>/<host>/count`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub host_prefix: Option<String>,
    /// Default `qliksense/session-monitor/status` (`online` / `offline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub session_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub session_stop: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub connection_open: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub connection_close: Option<String>,
    /// Retained topic with today's (UTC) peak of concurrent users; off unless named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub peak_today: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// The registry is saved at most this often when it changed; default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub interval: Option<String>,
    /// Shard ConfigMaps `<name>-checkpoint-1`…`-N` a checkpoint may use (RBAC names each one),
    /// at least. A checkpoint uses at most about half of them; 200,000 sessions of distinct users
    /// take about 8 shards of 900 KiB. When the service reports that its checkpoint needs more,
    /// the operator raises the grant up to `maxShards` (`status.checkpointShards`).
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 100))]
    pub shards: u16,
    /// The most shards the operator grants on its own when the checkpoint grows (the shard
    /// autopilot); default 100, the service's limit. Set it to `shards` to switch the autopilot
    /// off. It cannot be lowered below what is already granted.
    #[serde(default = "default_max_shards")]
    #[schemars(range(min = 1, max = 100))]
    pub max_shards: u16,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            interval: None,
            shards: default_shards(),
            max_shards: default_max_shards(),
        }
    }
}

fn default_shards() -> u16 {
    16
}

fn default_max_shards() -> u16 {
    100
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// HTTP port of `/metrics`, `/healthz`, `/readyz` and the API (port `http-metrics` of the
    /// ClusterIP Service `<name>-http`).
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// A Prometheus Operator ServiceMonitor, created only where its CRD is installed.
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        MetricsSpec {
            port: default_http_port(),
            service_monitor: ServiceMonitorSpec::default(),
        }
    }
}

fn default_http_port() -> u16 {
    9842
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval; default: Prometheus's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION))]
    pub interval: Option<String>,
    /// Extra labels, e.g. the `release` label a Prometheus selects ServiceMonitors by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionMonitorStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// `HOST:PORT` the Qlik proxies' UDP appenders must send to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The checkpoint shards the service's Role grants: `spec.checkpoint.shards`, or more where
    /// the shard autopilot raised it (up to `spec.checkpoint.maxShards`). Never lowered: a
    /// checkpoint may live in the higher shards, and the pod could no longer read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_shards: Option<u16>,
    /// The shards the service says its checkpoint calls for (what it occupies, plus what a
    /// quarter larger one needs beside it), read with `activeUsers`; the autopilot grants it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_shards_wanted: Option<u64>,
    /// Distinct users with an active session, as the service counted them at the last read of
    /// its metrics (at most every 30 s while it is ready); absent when it cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_users: Option<u64>,
    /// Active proxy sessions, read with `activeUsers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_sessions: Option<u64>,
    /// When the newest event from any proxy arrived, read with `activeUsers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<Time>,
    /// Size of the last checkpoint written, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_bytes: Option<u64>,
    /// Shard ConfigMaps the committed checkpoint uses beside the main one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_shards_in_use: Option<u64>,
}
