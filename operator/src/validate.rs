//! Validate: a `SessionMonitor` in, a [`Plan`] out, or an [`InvalidSpec`] that says which field
//! is wrong and why. Pure: the same checks run in unit tests, in the reconciler and nowhere else.
//!
//! The service's configuration is rendered here as the service's own [`Settings`] type and then
//! checked with the service's own [`Config::from_settings`], so the operator cannot hand the
//! service a configuration it would refuse at start-up.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use session_monitor_config::qlik::QlikConfig;
use session_monitor_config::{self as service_config, Config, ConfigError, Settings};

use crate::crd::{
    ApiAuthSpec, ImagePullPolicy, QlikSpec, ServiceMonitorSpec, ServiceSpec, SessionMonitor,
    SessionMonitorSpec,
};
use crate::spec_settings;

/// Where the pod finds what the operator mounts.
pub mod paths {
    pub const CONFIG_DIR: &str = "/etc/session-monitor/config";
    pub const CONFIG_FILE: &str = "/etc/session-monitor/config/session-monitor.toml";
    pub const CONFIG_KEY: &str = "session-monitor.toml";
    pub const MQTT_CREDENTIALS_DIR: &str = "/etc/session-monitor/mqtt";
    pub const MQTT_PASSWORD_FILE: &str = "/etc/session-monitor/mqtt/password";
    pub const MQTT_CA_DIR: &str = "/etc/session-monitor/mqtt-ca";
    pub const MQTT_CA_FILE: &str = "/etc/session-monitor/mqtt-ca/ca.crt";
    pub const MQTT_CLIENT_CERT_DIR: &str = "/etc/session-monitor/mqtt-client";
    pub const MQTT_CLIENT_CERT_FILE: &str = "/etc/session-monitor/mqtt-client/tls.crt";
    pub const MQTT_CLIENT_KEY_FILE: &str = "/etc/session-monitor/mqtt-client/tls.key";
    /// `spec.qlik.certificatesSecret`: the files the QMC exports, under their own names.
    pub const QLIK_CERTIFICATES_DIR: &str = "/etc/session-monitor/qlik";
    pub const QLIK_CLIENT_CERT_FILE: &str = "/etc/session-monitor/qlik/client.pem";
    pub const QLIK_CLIENT_KEY_FILE: &str = "/etc/session-monitor/qlik/client_key.pem";
    pub const QLIK_ROOT_CERT_FILE: &str = "/etc/session-monitor/qlik/root.pem";
    /// From the Secret's key `spec.qlik.certificatesSecret.passphraseKey`.
    pub const QLIK_PASSPHRASE_FILE: &str = "/etc/session-monitor/qlik/passphrase";
    pub const QLIK_PASSPHRASE: &str = "passphrase";
    /// `spec.apiAuth`: the token, from the generated Secret or the user's, as `token`.
    pub const API_TOKEN_DIR: &str = "/etc/session-monitor/api-token";
    pub const API_TOKEN_FILE: &str = "/etc/session-monitor/api-token/token";
    pub const API_TOKEN: &str = "token";
}

/// The key of the token in the Secret the operator generates (`spec.apiAuth.generateToken`).
pub const GENERATED_TOKEN_KEY: &str = "token";

/// The keys `spec.qlik.certificatesSecret` must hold: the files the QMC exports (Certificates →
/// Export, PEM format), mounted under the same names in [`paths::QLIK_CERTIFICATES_DIR`].
pub const QLIK_CERTIFICATE_KEYS: [&str; 3] = ["client.pem", "client_key.pem", "root.pem"];

/// The ports the service listens on inside the pod.
pub const CONTAINER_UDP_PORT: u16 = 9997;
pub const CONTAINER_HTTP_PORT: u16 = 9842;

/// Why a spec cannot be deployed; `message` names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidSpec {
    pub message: String,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> InvalidSpec {
    InvalidSpec {
        message: format!("{field}: {message}"),
    }
}

/// A key the pod reads from a Secret; the reconciler checks it exists before deploying.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretKey {
    pub secret: String,
    pub key: String,
}

/// Everything the build step needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub name: String,
    pub namespace: String,
    /// The monitor, as the owner of every child: they are deleted with it.
    pub owner: OwnerReference,
    pub image: String,
    pub pod: PodPlan,
    /// `spec.service`: how the UDP ingest is exposed.
    pub service: ServiceSpec,
    /// `spec.udp.port` and `spec.metrics.port`: the Services' ports.
    pub udp_port: u16,
    pub http_port: u16,
    /// `spec.metrics.serviceMonitor`, when enabled.
    pub service_monitor: Option<ServiceMonitorSpec>,
    /// The service's configuration, checked; mounted as [`Plan::config_toml`].
    pub settings: Settings,
    pub checkpoint_configmap: String,
    /// The shards `<name>-checkpoint-1` … `-N` granted (RBAC names each one): the spec's, or
    /// more where the autopilot raised them (`status.checkpointShards`).
    pub checkpoint_shards: u16,
    /// `spec.checkpoint.maxShards`: the most the autopilot may grant.
    pub max_checkpoint_shards: u16,
    /// Secrets the pod mounts, and keys it reads into its environment ([`Plan::secret_keys`]).
    pub secret_mounts: Vec<SecretMount>,
    pub secret_env: Vec<SecretEnv>,
    /// The API token's Secret, when `spec.apiAuth` asks for one; also among the mounts.
    pub api_token: Option<ApiToken>,
}

/// How long the pod stays on a node that stopped answering, unless the spec says otherwise:
/// the UDP listener and the counts are gone while it does, so not Kubernetes' five minutes.
pub const DEFAULT_NODE_LOST_TOLERATION_SECONDS: i64 = 30;

/// The taints the node lifecycle controller puts on a node that stopped answering.
const NODE_LOST_TAINTS: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// The spec's tolerations, and for each node-lost taint the spec does not tolerate itself one
/// that evicts the pod after `seconds` (instead of the 300 s Kubernetes' admission adds).
fn with_node_lost_tolerations(spec: &[Toleration], seconds: i64) -> Vec<Toleration> {
    let mut tolerations = spec.to_vec();
    for taint in NODE_LOST_TAINTS {
        if !spec.iter().any(|t| t.key.as_deref() == Some(taint)) {
            tolerations.push(Toleration {
                key: Some(taint.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some("NoExecute".to_owned()),
                toleration_seconds: Some(seconds),
                value: None,
            });
        }
    }
    tolerations
}

/// What the pod needs beyond its configuration, as the spec gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan {
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// `None`: the operator's default requests and limit.
    pub resources: Option<ResourceRequirements>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub affinity: Option<Affinity>,
    pub priority_class_name: Option<String>,
}

/// A Secret the pod mounts read-only: each key as a file in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMount {
    /// The volume's name in the pod.
    pub volume: &'static str,
    pub dir: &'static str,
    pub secret: String,
    /// Each key and the file it becomes.
    pub items: Vec<(String, String)>,
}

/// A Secret key the pod reads into an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEnv {
    pub name: &'static str,
    pub key: SecretKey,
}

/// Where the pod's API token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub secret: SecretKey,
    /// The operator creates the Secret when it is missing (and never overwrites it).
    pub generated: bool,
}

impl Plan {
    /// The service's configuration file, as it will be mounted.
    pub fn config_toml(&self) -> String {
        self.settings.to_toml()
    }

    /// The configuration without the shard count, for the pod's checksum: the service takes a
    /// raised count from the mounted file while running, so granting shards never rolls the pod
    /// (a restart would leave the proxies' datagrams unheard for seconds).
    pub fn config_toml_without_shards(&self) -> String {
        Settings {
            checkpoint_configmap_shards: None,
            ..self.settings.clone()
        }
        .to_toml()
    }

    /// Every Secret key the pod uses (its environment first, then its mounts), for the
    /// reconciler's check that they exist and for the pod's checksum; the order is the
    /// checksum's, so it must not change.
    pub fn secret_keys(&self) -> Vec<SecretKey> {
        let env = self.secret_env.iter().map(|e| e.key.clone());
        let mounted = self.secret_mounts.iter().flat_map(|m| {
            m.items.iter().map(|(key, _)| SecretKey {
                secret: m.secret.clone(),
                key: key.clone(),
            })
        });
        env.chain(mounted).collect()
    }

    /// `<name>-checkpoint` and its granted shards: the ConfigMaps RBAC names.
    pub fn checkpoint_configmaps(&self) -> Vec<String> {
        std::iter::once(self.checkpoint_configmap.clone())
            .chain(
                (1..=self.checkpoint_shards).map(|i| format!("{}-{i}", self.checkpoint_configmap)),
            )
            .collect()
    }

    /// This plan with `shards` granted (the autopilot's raise; never below the current grant).
    pub fn with_checkpoint_shards(mut self, shards: u16) -> Plan {
        self.checkpoint_shards = self.checkpoint_shards.max(shards);
        self.settings.checkpoint_configmap_shards = Some(usize::from(self.checkpoint_shards));
        self
    }
}

pub fn config_map_name(monitor: &str) -> String {
    format!("{monitor}-config")
}

pub fn checkpoint_name(monitor: &str) -> String {
    format!("{monitor}-checkpoint")
}

/// The Lease whose holder alone writes the checkpoint: during a rollout the old pod and the new
/// one run side by side, and the new one takes over when the old one stops.
pub fn checkpoint_lease_name(monitor: &str) -> String {
    format!("{monitor}-writer")
}

pub fn api_token_secret_name(monitor: &str) -> String {
    format!("{monitor}-api-token")
}

/// Checks `monitor` and renders the service configuration. `default_image` is the operator's.
/// The shards granted so far are taken from the monitor's status.
pub fn validate(monitor: &SessionMonitor, default_image: &str) -> Result<Plan, InvalidSpec> {
    let granted = monitor.status.as_ref().and_then(|s| s.checkpoint_shards);
    validate_granted(monitor, default_image, granted)
}

/// [`validate`] with the shards granted so far given (the reconciler reads them from the Role).
pub fn validate_granted(
    monitor: &SessionMonitor,
    default_image: &str,
    granted: Option<u16>,
) -> Result<Plan, InvalidSpec> {
    let name = monitor.name_any();
    let namespace = monitor
        .namespace()
        .ok_or_else(|| invalid("metadata.namespace", "a SessionMonitor is namespaced"))?;
    // The Service gets the monitor's name, and Service names are DNS-1035 labels.
    if !is_dns1035_label(&name) || name.len() > 52 {
        return Err(invalid(
            "metadata.name",
            format!(
                "{name:?} must be a DNS-1035 label of at most 52 characters (lower-case letters, \
                 digits and '-', starting with a letter), since it names the Service and \
                 the ConfigMaps `{name}-checkpoint-N`"
            ),
        ));
    }
    let spec = &monitor.spec;
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| default_image.to_owned());
    if image.trim().is_empty() {
        return Err(invalid(
            "spec.image",
            "no image given and the operator has no --default-image",
        ));
    }
    if spec.udp.port == 0 {
        return Err(invalid("spec.udp.port", "must be from 1 to 65535"));
    }
    if spec.metrics.port == 0 {
        return Err(invalid("spec.metrics.port", "must be from 1 to 65535"));
    }
    if spec.udp.port == spec.metrics.port {
        // Different protocols could share a number, but one Service port name per number keeps
        // dashboards and firewall rules unambiguous.
        return Err(invalid(
            "spec.metrics.port",
            format!("{} is also spec.udp.port", spec.metrics.port),
        ));
    }
    if !(1..=service_config::MAX_CHECKPOINT_SHARDS).contains(&usize::from(spec.checkpoint.shards)) {
        return Err(invalid(
            "spec.checkpoint.shards",
            format!(
                "{} is not from 1 to {}",
                spec.checkpoint.shards,
                service_config::MAX_CHECKPOINT_SHARDS
            ),
        ));
    }
    // What the Role grants never shrinks: the checkpoint may live in the higher shards. A spec
    // below the grant (the autopilot's, or an earlier spec's) keeps the grant.
    let checkpoint_shards = granted.unwrap_or(0).max(spec.checkpoint.shards);
    let max_checkpoint_shards = spec.checkpoint.max_shards;
    if !(1..=service_config::MAX_CHECKPOINT_SHARDS).contains(&usize::from(max_checkpoint_shards)) {
        return Err(invalid(
            "spec.checkpoint.maxShards",
            format!(
                "{max_checkpoint_shards} is not from 1 to {}",
                service_config::MAX_CHECKPOINT_SHARDS
            ),
        ));
    }
    if max_checkpoint_shards < checkpoint_shards {
        let what = match granted {
            Some(g) if g > spec.checkpoint.shards => format!("the {g} shards already granted"),
            _ => format!("spec.checkpoint.shards ({})", spec.checkpoint.shards),
        };
        return Err(invalid(
            "spec.checkpoint.maxShards",
            format!(
                "{max_checkpoint_shards} is below {what}; a grant is never lowered, since the \
                 checkpoint may use the higher shards"
            ),
        ));
    }
    if let Some(interval) = &spec.metrics.service_monitor.interval {
        duration("spec.metrics.serviceMonitor.interval", interval)?;
    }

    let allowed_sources = spec
        .udp
        .allowed_sources
        .iter()
        .enumerate()
        .map(|(i, cidr)| {
            cidr.parse::<IpNet>().map_err(|e| {
                invalid(
                    &format!("spec.udp.allowedSources[{i}]"),
                    format!("{cidr:?}: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let receive_buffer_bytes = spec
        .udp
        .receive_buffer_bytes
        .map(|b| {
            usize::try_from(b).map_err(|_| invalid("spec.udp.receiveBufferBytes", "too large"))
        })
        .transpose()?;

    let qlik = spec
        .qlik
        .as_ref()
        .map(check_qlik)
        .transpose()?
        .unwrap_or_default();
    let api_token = spec
        .api_auth
        .as_ref()
        .map(|auth| api_token(auth, &name))
        .transpose()?;

    let checkpoint_configmap = checkpoint_name(&name);
    let credentials = spec.mqtt.credentials_secret.as_ref();
    let checked = spec_settings::Checked {
        allowed_sources,
        receive_buffer_bytes,
        checkpoint_configmap: checkpoint_configmap.clone(),
        name: name.clone(),
        checkpoint_shards,
        api_token: api_token.is_some(),
        qlik_host_aliases: qlik.host_aliases,
        qlik_resolve: qlik.resolve,
    };
    let settings = spec_settings::render(spec, &checked)?;
    check_with_service(&settings, credentials.is_some(), api_token.is_some())?;

    let secrets = secret_uses(spec, api_token.as_ref());
    let referenced = &secrets.named;
    for (field, key) in referenced {
        if !is_dns1123_subdomain(&key.secret) {
            return Err(invalid(
                field,
                format!("{:?} is not a valid Secret name", key.secret),
            ));
        }
        if key.key.is_empty() {
            return Err(invalid(
                field,
                format!("empty key for Secret {:?}", key.secret),
            ));
        }
        if !is_plain_name(&key.key) {
            return Err(invalid(
                field,
                format!(
                    "{:?} is not a valid Secret key (letters, digits, '-', '_', '.')",
                    key.key
                ),
            ));
        }
    }

    let owner = monitor.controller_owner_ref(&()).ok_or_else(|| {
        invalid(
            "metadata.uid",
            "missing; a SessionMonitor read from the API server has one, and its children \
             name it as their owner",
        )
    })?;
    Ok(Plan {
        settings,
        checkpoint_shards,
        max_checkpoint_shards,
        checkpoint_configmap,
        name,
        namespace,
        owner,
        image,
        pod: PodPlan {
            image_pull_policy: spec.image_pull_policy,
            resources: spec.resources.clone(),
            node_selector: spec.node_selector.clone(),
            tolerations: with_node_lost_tolerations(
                &spec.tolerations,
                spec.node_lost_toleration_seconds
                    .unwrap_or(DEFAULT_NODE_LOST_TOLERATION_SECONDS),
            ),
            affinity: spec.affinity.clone(),
            priority_class_name: spec.priority_class_name.clone(),
        },
        service: spec.service.clone(),
        udp_port: spec.udp.port,
        http_port: spec.metrics.port,
        service_monitor: spec
            .metrics
            .service_monitor
            .enabled
            .then(|| spec.metrics.service_monitor.clone()),
        secret_mounts: secrets.mounts,
        secret_env: secrets.env,
        api_token,
    })
}

/// The Secrets a spec makes the pod use: mounted as files, or read into the environment.
struct SecretUses {
    mounts: Vec<SecretMount>,
    env: Vec<SecretEnv>,
    /// Every key, with the spec field that names it, for the messages of the checks.
    named: Vec<(&'static str, SecretKey)>,
}

/// One list for what the pod mounts, what the reconciler checks exists and what the checksum
/// covers, so the three cannot differ.
fn secret_uses(spec: &SessionMonitorSpec, api_token: Option<&ApiToken>) -> SecretUses {
    let key = |secret: &str, key: &str| SecretKey {
        secret: secret.to_owned(),
        key: key.to_owned(),
    };
    let credentials = spec.mqtt.credentials_secret.as_ref();
    let tls = spec.mqtt.tls.as_ref();
    let mut uses = SecretUses {
        mounts: Vec::new(),
        env: Vec::new(),
        named: Vec::new(),
    };
    if let Some(c) = credentials {
        // The user name through SESSION_MONITOR_MQTT_USERNAME and the password as a file (below):
        // no credential is ever written into a ConfigMap. The user name first, the order the
        // checksum has always taken them in (another order would roll every pod once when the
        // operator is upgraded).
        uses.named
            .push(("spec.mqtt", key(&c.name, &c.username_key)));
        uses.env.push(SecretEnv {
            name: "SESSION_MONITOR_MQTT_USERNAME",
            key: key(&c.name, &c.username_key),
        });
    }
    // (spec field, Secret key, file name) for each item of a mount.
    let mut mount = |volume, dir, secret: &str, items: Vec<(&'static str, &str, &str)>| {
        let mut files = Vec::new();
        for (field, k, file) in items {
            uses.named.push((field, key(secret, k)));
            files.push((k.to_owned(), file.to_owned()));
        }
        uses.mounts.push(SecretMount {
            volume,
            dir,
            secret: secret.to_owned(),
            items: files,
        });
    };
    if let Some(c) = credentials {
        mount(
            "mqtt-credentials",
            paths::MQTT_CREDENTIALS_DIR,
            &c.name,
            vec![("spec.mqtt", &c.password_key, "password")],
        );
    }
    if let Some(ca) = tls.and_then(|t| t.ca_secret.as_ref()) {
        mount(
            "mqtt-ca",
            paths::MQTT_CA_DIR,
            &ca.name,
            vec![("spec.mqtt", &ca.key, "ca.crt")],
        );
    }
    if let Some(client) = tls.and_then(|t| t.client_cert_secret.as_ref()) {
        mount(
            "mqtt-client-cert",
            paths::MQTT_CLIENT_CERT_DIR,
            &client.name,
            vec![
                ("spec.mqtt", "tls.crt", "tls.crt"),
                ("spec.mqtt", "tls.key", "tls.key"),
            ],
        );
    }
    if let Some(qlik) = &spec.qlik {
        // The QMC's files under their own names; the passphrase, if any, as `passphrase`.
        let certificates = &qlik.certificates_secret;
        let mut items: Vec<(&'static str, &str, &str)> = QLIK_CERTIFICATE_KEYS
            .iter()
            .map(|k| ("spec.qlik.certificatesSecret.name", *k, *k))
            .collect();
        if let Some(k) = &certificates.passphrase_key {
            items.push((
                "spec.qlik.certificatesSecret.passphraseKey",
                k,
                paths::QLIK_PASSPHRASE,
            ));
        }
        mount(
            "qlik-certificates",
            paths::QLIK_CERTIFICATES_DIR,
            &certificates.name,
            items,
        );
    }
    if let Some(token) = api_token {
        // A file, as the service's `api_token_file` reads it: never an environment variable,
        // which `kubectl describe pod` and crash dumps show.
        let field = if token.generated {
            "spec.apiAuth.generateToken"
        } else {
            "spec.apiAuth.tokenSecret"
        };
        mount(
            "api-token",
            paths::API_TOKEN_DIR,
            &token.secret.secret,
            vec![(field, &token.secret.key, paths::API_TOKEN)],
        );
    }
    uses
}

/// `spec.apiAuth`: exactly one source, as the CRD's `oneOf` says (checked here too, since a
/// client can skip the schema, and to name the field in the status).
fn api_token(auth: &ApiAuthSpec, monitor: &str) -> Result<ApiToken, InvalidSpec> {
    match (auth.generate_token, &auth.token_secret) {
        (Some(_), Some(_)) => Err(invalid(
            "spec.apiAuth.tokenSecret",
            "set either spec.apiAuth.generateToken or spec.apiAuth.tokenSecret, not both",
        )),
        (Some(true), None) => Ok(ApiToken {
            secret: SecretKey {
                secret: api_token_secret_name(monitor),
                key: GENERATED_TOKEN_KEY.to_owned(),
            },
            generated: true,
        }),
        (None, Some(secret)) => Ok(ApiToken {
            secret: SecretKey {
                secret: secret.name.clone(),
                key: secret.key.clone(),
            },
            generated: false,
        }),
        (Some(false) | None, None) => Err(invalid(
            "spec.apiAuth.generateToken",
            "set it to true (the operator creates the token) or set spec.apiAuth.tokenSecret; \
             remove spec.apiAuth to leave the API open",
        )),
    }
}

/// `spec.qlik`'s lists and maps as the service's entries.
#[derive(Default)]
struct QlikEntries {
    host_aliases: Vec<String>,
    resolve: Vec<String>,
}

/// `spec.qlik`, checked where the spec can name the field more exactly than the service's
/// setting: an entry of a list or a map.
fn check_qlik(qlik: &QlikSpec) -> Result<QlikEntries, InvalidSpec> {
    match (&qlik.repository_url, &qlik.proxies) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "spec.qlik.proxies",
                "set either spec.qlik.repositoryUrl (discovery) or spec.qlik.proxies, not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "spec.qlik.repositoryUrl",
                "set it (the proxies are then discovered) or spec.qlik.proxies",
            ));
        }
        (None, Some(proxies)) if proxies.is_empty() => {
            return Err(invalid("spec.qlik.proxies", "the list is empty"));
        }
        (None, Some(proxies)) => {
            // The service's own check, one more URL at a time: the first list it refuses ends
            // with the URL that is wrong, on its own or as a repeat of an earlier one.
            for i in 0..proxies.len() {
                let probe = Settings {
                    qlik_proxies: Some(proxies[..=i].to_vec()),
                    ..Settings::default()
                };
                if let Err(ConfigError::Invalid {
                    key: "qlik_proxies",
                    message,
                }) = QlikConfig::from_settings(&probe)
                {
                    return Err(invalid(&format!("spec.qlik.proxies[{i}]"), message));
                }
            }
        }
        (Some(_), None) => {}
    }

    let mut host_aliases: Vec<(&str, &str)> = Vec::new();
    for (from, to) in &qlik.host_aliases {
        let field = format!("spec.qlik.hostAliases[{from}]");
        let (from, to) = (from.trim(), to.trim());
        for name in [from, to] {
            if !is_plain_name(name) {
                return Err(invalid(&field, format!("{name:?} is not a host name")));
            }
        }
        // The service looks a node up in any case: two such keys would be ambiguous.
        if let Some((other, _)) = host_aliases
            .iter()
            .find(|(other, _)| other.eq_ignore_ascii_case(from))
        {
            return Err(invalid(
                &field,
                format!("the same node as {other:?} (names are compared in any case)"),
            ));
        }
        host_aliases.push((from, to));
    }
    let mut resolve: Vec<(&str, IpAddr)> = Vec::new();
    for (i, entry) in qlik.resolve.iter().enumerate() {
        let hostname = entry.hostname.trim();
        if !is_plain_name(hostname) {
            return Err(invalid(
                &format!("spec.qlik.resolve[{i}].hostname"),
                format!("{:?} is not a host name", entry.hostname),
            ));
        }
        if resolve
            .iter()
            .any(|(other, _)| other.eq_ignore_ascii_case(hostname))
        {
            return Err(invalid(
                &format!("spec.qlik.resolve[{i}].hostname"),
                format!("{hostname:?} is listed twice"),
            ));
        }
        let ip = entry.ip.trim().parse::<IpAddr>().map_err(|_| {
            invalid(
                &format!("spec.qlik.resolve[{i}].ip"),
                format!("{:?} is not an IPv4 or IPv6 address", entry.ip),
            )
        })?;
        resolve.push((hostname, ip));
    }

    Ok(QlikEntries {
        // Sorted by the Qlik name (a map's order), so the rendered file is stable.
        host_aliases: host_aliases
            .iter()
            .map(|(from, to)| format!("{from}={to}"))
            .collect(),
        resolve: resolve
            .iter()
            .map(|(hostname, ip)| format!("{hostname}={ip}"))
            .collect(),
    })
}

/// Runs the service's own validation on the rendered settings. Files the pod will mount do not
/// exist here, so the password and the API token are stood in for (the username comes from the
/// Secret too).
fn check_with_service(
    settings: &Settings,
    has_credentials: bool,
    has_api_token: bool,
) -> Result<(), InvalidSpec> {
    let mut probe = settings.clone();
    probe.mqtt_password_file = None;
    probe.api_token_file = None;
    if has_api_token {
        probe.api_token = Some(service_config::Secret(
            "stand-in-for-the-mounted-token".into(),
        ));
    }
    if has_credentials {
        probe.mqtt_username = Some("from-secret".to_owned());
    }
    let stand_in_password = has_credentials.then(String::new);
    Config::from_settings(probe, stand_in_password)
        .map(drop)
        .map_err(|e| match e {
            // A setting left at the service's default cannot be invalid (a test checks that each
            // setting is rendered by the table or left at its default).
            ConfigError::Invalid { key, message } => {
                invalid(spec_settings::spec_path(key).unwrap_or("spec"), message)
            }
            other => invalid("spec", other),
        })
}

fn duration(field: &str, text: &str) -> Result<Duration, InvalidSpec> {
    humantime::parse_duration(text).map_err(|e| invalid(field, format!("{text:?}: {e}")))
}

pub(crate) fn optional_duration(
    field: &str,
    text: &Option<String>,
) -> Result<Option<Duration>, InvalidSpec> {
    text.as_deref().map(|t| duration(field, t)).transpose()
}

/// Letters, digits, `-`, `.` and `_`: a Secret key as the API server allows it, and a host name
/// as a Qlik node or a proxy's log spells it (so no `=`, the service's `NAME=VALUE` separator).
fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn is_dns1035_label(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::{self, monitor};

    fn error(spec: serde_json::Value) -> String {
        validate(&monitor(spec), "img")
            .expect_err("invalid")
            .message
    }

    fn with_mqtt(mqtt: serde_json::Value) -> serde_json::Value {
        let mut base = json!({"url": "mqtt://broker:1883"});
        base.as_object_mut()
            .unwrap()
            .extend(mqtt.as_object().unwrap().clone());
        json!({ "mqtt": base })
    }

    #[test]
    fn the_example_renders_a_configuration_the_service_accepts() {
        let plan = validate(&testing::example(), "default/image:1").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(settings.udp_listen, Some("[::]:9997".parse().unwrap()));
        assert_eq!(settings.http_listen, Some("0.0.0.0:9842".parse().unwrap()));
        assert_eq!(
            settings.checkpoint_configmap.as_deref(),
            Some("qlik-prod-checkpoint")
        );
        assert_eq!(settings.checkpoint_configmap_shards, Some(8));
        assert_eq!(
            settings.exclude_users,
            Some(vec![r"INTERNAL\sa_*".to_owned()])
        );
        assert_eq!(settings.idle_timeout, Some(Duration::from_secs(1800)));
        assert_eq!(
            settings.mqtt_password_file.as_deref(),
            Some(std::path::Path::new(paths::MQTT_PASSWORD_FILE))
        );
        assert_eq!(
            settings.mqtt_topic_session_start.as_deref(),
            Some("qliksense/session/start")
        );
        // No credential is ever written into the ConfigMap.
        assert_eq!(settings.mqtt_username, None);
        assert_eq!(settings.mqtt_password, None);
        assert!(!plan.config_toml().contains("change-me"));
        // The pod reads it with the service's own loader and the mounted password file.
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "secret\n").unwrap();
        let mut mounted = settings.clone();
        mounted.mqtt_password_file = Some(password);
        mounted.mqtt_username = Some("session-monitor".into());
        Config::from_settings(mounted, None).expect("the service accepts it");

        assert_eq!(plan.image, "default/image:1");
        assert_eq!(plan.checkpoint_shards, 8);
        assert_eq!(
            plan.checkpoint_configmaps().last().map(String::as_str),
            Some("qlik-prod-checkpoint-8")
        );
        assert_eq!(
            plan.secret_keys(),
            vec![
                SecretKey {
                    secret: "qlik-mqtt".into(),
                    key: "username".into()
                },
                SecretKey {
                    secret: "qlik-mqtt".into(),
                    key: "password".into()
                },
            ]
        );
    }

    #[test]
    fn the_proxy_host_bound_is_rendered_from_the_spec() {
        let spec = json!({"mqtt": {"url": "mqtt://b"}, "udp": {"maxProxyHosts": 50}});
        let plan = validate(&monitor(spec), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(settings.max_proxy_hosts, Some(50));
        let plan = validate(&testing::minimal(), "img").unwrap();
        assert!(!plan.config_toml().contains("max_proxy_hosts"));
    }

    #[test]
    fn a_lost_node_evicts_the_pod_after_30_seconds_unless_the_spec_says_otherwise() {
        let seconds = |plan: &Plan| -> Vec<(Option<String>, Option<i64>)> {
            plan.pod
                .tolerations
                .iter()
                .map(|t| (t.key.clone(), t.toleration_seconds))
                .collect()
        };
        let plan = validate(&testing::minimal(), "img").unwrap();
        assert_eq!(
            seconds(&plan),
            [
                (Some("node.kubernetes.io/not-ready".into()), Some(30)),
                (Some("node.kubernetes.io/unreachable".into()), Some(30)),
            ]
        );
        assert!(
            plan.pod
                .tolerations
                .iter()
                .all(|t| t.effect.as_deref() == Some("NoExecute")
                    && t.operator.as_deref() == Some("Exists"))
        );
        let spec = json!({"mqtt": {"url": "mqtt://b"}, "nodeLostTolerationSeconds": 120,
            "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 600},
                            {"key": "dedicated", "operator": "Equal", "value": "qlik", "effect": "NoSchedule"}]});
        let plan = validate(&monitor(spec), "img").unwrap();
        // The spec's own toleration of a key wins; the other key takes the spec's seconds.
        assert_eq!(
            seconds(&plan),
            [
                (Some("node.kubernetes.io/unreachable".into()), Some(600)),
                (Some("dedicated".into()), None),
                (Some("node.kubernetes.io/not-ready".into()), Some(120)),
            ]
        );
    }

    #[test]
    fn the_appenders_encoding_is_rendered_from_the_spec() {
        let spec = json!({"mqtt": {"url": "mqtt://b"}, "udp": {"encoding": "windows-1252"}});
        let plan = validate(&monitor(spec), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(settings.udp_encoding.as_deref(), Some("windows-1252"));
        let plan = validate(&testing::minimal(), "img").unwrap();
        assert!(!plan.config_toml().contains("udp_encoding"));
    }

    #[test]
    fn the_session_bound_is_rendered_from_the_spec() {
        let spec = json!({"mqtt": {"url": "mqtt://b"}, "sessions": {"maxSessions": 250000}});
        let plan = validate(&monitor(spec), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(settings.max_sessions, Some(250_000));
        let plan = validate(&testing::minimal(), "img").unwrap();
        assert!(!plan.config_toml().contains("max_sessions"));
    }

    #[test]
    fn a_minimal_spec_leaves_the_service_defaults_alone() {
        let plan = validate(&testing::minimal(), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(settings.idle_timeout, None);
        assert_eq!(settings.mqtt_qos, None);
        assert_eq!(settings.mqtt_topic_user_count, None);
        assert_eq!(settings.publish_interval, None);
        assert_eq!(settings.log_format, Some(service_config::LogFormat::Json));
        assert!(plan.secret_keys().is_empty());
    }

    #[test]
    fn tls_secrets_are_mounted_files() {
        let spec = with_mqtt(json!({
            "url": "mqtts://broker:8883",
            "tls": {"caSecret": {"name": "ca"}, "clientCertSecret": {"name": "client"}}
        }));
        let plan = validate(&monitor(spec), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(
            settings.mqtt_ca_file.as_deref(),
            Some(std::path::Path::new(paths::MQTT_CA_FILE))
        );
        assert_eq!(
            settings.mqtt_client_key_file.as_deref(),
            Some(std::path::Path::new(paths::MQTT_CLIENT_KEY_FILE))
        );
        let keys: Vec<_> = plan
            .secret_keys()
            .iter()
            .map(|k| format!("{}/{}", k.secret, k.key))
            .collect();
        assert_eq!(keys, ["ca/ca.crt", "client/tls.crt", "client/tls.key"]);
    }

    #[test]
    fn invalid_specs_name_the_field_and_the_reason() {
        let cases = [
            (
                json!({"mqtt": {"url": "mqtt://b"}, "udp": {"allowedSources": ["10.0.0.0/8", "10.0.0.0/33"]}}),
                "spec.udp.allowedSources[1]: \"10.0.0.0/33\"",
            ),
            (
                with_mqtt(json!({"qos": 5})),
                "spec.mqtt.qos: 5 is not 0, 1 or 2",
            ),
            (
                with_mqtt(json!({"url": "http://broker"})),
                "spec.mqtt.url: scheme \"http\" is not mqtt or mqtts",
            ),
            (
                with_mqtt(json!({"url": "mqtt://user:pw@broker"})),
                "spec.mqtt.url: credentials do not belong in the URL",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "sessions": {"idleTimeout": "5x"}}),
                "spec.sessions.idleTimeout: \"5x\"",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "sessions": {"idleTimeout": "2h", "maxIdle": "1h"}}),
                "spec.sessions.maxIdle: 1h is shorter than idle_timeout (2h)",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "sessions": {"excludeUsers": ["nobackslash"]}}),
                "spec.sessions.excludeUsers: exclusion pattern \"nobackslash\"",
            ),
            (
                with_mqtt(json!({"topics": {"userCount": ""}})),
                "spec.mqtt.topics.userCount:",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "logLevel": "info,[bad"}),
                "spec.logLevel:",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "udp": {"maxProxyHosts": 0}}),
                "spec.udp.maxProxyHosts:",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "udp": {"encoding": "latin-9000"}}),
                "spec.udp.encoding: \"latin-9000\" is not an encoding label",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "sessions": {"maxSessions": 0}}),
                "spec.sessions.maxSessions:",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "udp": {"port": 9842}}),
                "spec.metrics.port: 9842 is also spec.udp.port",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "checkpoint": {"shards": 101}}),
                "spec.checkpoint.shards: 101 is not from 1 to 100",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "history": {"retention": "10m"}}),
                "spec.history.retention: must be from 1h to 90days",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "checkpoint": {"interval": "0s"}}),
                "spec.checkpoint.interval:",
            ),
            (
                with_mqtt(json!({"credentialsSecret": {"name": "Not_A_Name"}})),
                "spec.mqtt: \"Not_A_Name\" is not a valid Secret name",
            ),
        ];
        for (spec, expected) in cases {
            let message = error(spec.clone());
            assert!(
                message.starts_with(expected),
                "{spec}: got {message:?}, expected it to start with {expected:?}"
            );
        }
    }

    fn with_qlik(qlik: serde_json::Value) -> serde_json::Value {
        let mut base = json!({"certificatesSecret": {"name": "qlik-certificates"}});
        base.as_object_mut()
            .unwrap()
            .extend(qlik.as_object().unwrap().clone());
        json!({"mqtt": {"url": "mqtt://b"}, "qlik": base})
    }

    fn path(p: &str) -> Option<std::path::PathBuf> {
        Some(p.into())
    }

    #[test]
    fn the_qlik_example_renders_the_qlik_settings_and_mounted_files() {
        let plan = validate(&testing::qlik_example(), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(
            settings.qlik_repository_url.as_deref(),
            Some("https://qs-central.corp.local:4242")
        );
        assert_eq!(settings.qlik_proxies, None);
        assert_eq!(
            settings.qlik_client_cert_file,
            path("/etc/session-monitor/qlik/client.pem")
        );
        assert_eq!(
            settings.qlik_client_key_file,
            path("/etc/session-monitor/qlik/client_key.pem")
        );
        assert_eq!(
            settings.qlik_ca_file,
            path("/etc/session-monitor/qlik/root.pem")
        );
        assert_eq!(settings.qlik_client_key_passphrase_file, None);
        assert_eq!(settings.qlik_client_key_passphrase, None);
        assert_eq!(settings.qlik_insecure_skip_tls_verify, None);
        assert_eq!(
            settings.qlik_reconcile_interval,
            Some(Duration::from_secs(60))
        );
        assert_eq!(settings.qlik_reconcile_grace, Some(Duration::from_secs(30)));
        assert_eq!(settings.qlik_startup_timeout, None);
        assert_eq!(settings.qlik_request_timeout, None);
        assert_eq!(
            settings.qlik_host_aliases,
            Some(vec!["qs-node1.corp.local=PROXY1".to_owned()])
        );
        assert_eq!(
            settings.qlik_resolve,
            Some(vec![
                "qs-central.corp.local=10.20.0.10".to_owned(),
                "qs-node1.corp.local=10.20.0.11".to_owned(),
            ])
        );
        // The service reads it as discovery, with the mounted files.
        let qlik = QlikConfig::from_settings(&settings).unwrap().unwrap();
        assert!(
            matches!(&qlik.sources, session_monitor_config::qlik::Sources::Discovery { repository }
                if repository.host == "qs-central.corp.local" && repository.port == 4242),
            "{:?}",
            qlik.sources
        );
        assert_eq!(qlik.host_aliases.get("QS-NODE1.corp.local"), Some("PROXY1"));
        assert!(qlik.tls.verify);
        let keys: Vec<_> = plan
            .secret_keys()
            .iter()
            .map(|k| format!("{}/{}", k.secret, k.key))
            .collect();
        assert_eq!(
            keys,
            [
                "qlik-mqtt/username",
                "qlik-mqtt/password",
                "qlik-certificates/client.pem",
                "qlik-certificates/client_key.pem",
                "qlik-certificates/root.pem",
            ]
        );
    }

    #[test]
    fn static_proxies_a_passphrase_and_every_setting_render() {
        let spec = with_qlik(json!({
            "proxies": ["https://qs-node2:4243/", "https://qs-node1:4243/", "https://qs-node1:4243/sales"],
            "certificatesSecret": {"name": "qlik-certificates", "passphraseKey": "key-password"},
            "insecureSkipTlsVerify": true,
            "reconcileInterval": "0s",
            "reconcileGrace": "1m",
            "startupTimeout": "20s",
            "requestTimeout": "2500ms",
            // Sorted by the Qlik name when rendered.
            "hostAliases": {"qs-node2.corp.local": "PROXY2", "qs-node1.corp.local": " PROXY1 "},
            "resolve": [{"hostname": "qs-node2", "ip": "10.20.0.12"}, {"hostname": "qs-node1", "ip": "fd00::11"}],
        }));
        let plan = validate(&monitor(spec), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(settings.qlik_repository_url, None);
        assert_eq!(
            settings.qlik_proxies,
            Some(vec![
                "https://qs-node2:4243/".to_owned(),
                "https://qs-node1:4243/".to_owned(),
                "https://qs-node1:4243/sales".to_owned(),
            ])
        );
        assert_eq!(
            settings.qlik_client_key_passphrase_file,
            path(paths::QLIK_PASSPHRASE_FILE)
        );
        assert_eq!(settings.qlik_insecure_skip_tls_verify, Some(true));
        assert_eq!(settings.qlik_reconcile_interval, Some(Duration::ZERO));
        assert_eq!(settings.qlik_reconcile_grace, Some(Duration::from_secs(60)));
        assert_eq!(settings.qlik_startup_timeout, Some(Duration::from_secs(20)));
        assert_eq!(
            settings.qlik_request_timeout,
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            settings.qlik_host_aliases,
            Some(vec![
                "qs-node1.corp.local=PROXY1".to_owned(),
                "qs-node2.corp.local=PROXY2".to_owned(),
            ])
        );
        assert_eq!(
            settings.qlik_resolve,
            Some(vec![
                "qs-node2=10.20.0.12".to_owned(),
                "qs-node1=fd00::11".to_owned()
            ])
        );
        // No passphrase (nor any other secret) is written into the ConfigMap.
        assert!(!plan.config_toml().contains("qlik_client_key_passphrase ="));
        let secret_keys = plan.secret_keys();
        let keys: Vec<_> = secret_keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(
            keys,
            ["client.pem", "client_key.pem", "root.pem", "key-password"]
        );
        let qlik = QlikConfig::from_settings(&settings).unwrap().unwrap();
        assert_eq!(qlik.interval, None, "0s: once, at start");
        assert!(!qlik.tls.verify);
    }

    #[test]
    fn without_qlik_no_qlik_setting_is_rendered() {
        let plan = validate(&testing::minimal(), "img").unwrap();
        assert!(
            !plan.config_toml().contains("qlik_"),
            "{}",
            plan.config_toml()
        );
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(QlikConfig::from_settings(&settings).unwrap(), None);
    }

    #[test]
    fn invalid_qlik_specs_name_the_field_and_the_reason() {
        let cases = [
            (
                json!({"mqtt": {"url": "mqtt://b"}, "qlik": {"certificatesSecret": {"name": "c"}}}),
                "spec.qlik.repositoryUrl: set it (the proxies are then discovered) or spec.qlik.proxies",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://central", "proxies": ["https://n"]})),
                "spec.qlik.proxies: set either spec.qlik.repositoryUrl (discovery) or spec.qlik.proxies, not both",
            ),
            (
                with_qlik(json!({"proxies": []})),
                "spec.qlik.proxies: the list is empty",
            ),
            (
                with_qlik(json!({"repositoryUrl": "http://central:4242"})),
                "spec.qlik.repositoryUrl: \"http://central:4242\": the Qlik APIs speak https, not http",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://central:4242/qrs"})),
                "spec.qlik.repositoryUrl: \"https://central:4242/qrs\": give the repository's address only",
            ),
            (
                with_qlik(json!({"proxies": ["https://n1:4243/", "https://n2:0/"]})),
                "spec.qlik.proxies[1]: \"https://n2:0/\": port \"0\" is not a number from 1 to 65535",
            ),
            (
                with_qlik(json!({"proxies": ["https://n1:4243/a/b"]})),
                "spec.qlik.proxies[0]: \"https://n1:4243/a/b\": \"a/b\" is not a virtual proxy prefix",
            ),
            (
                // The same proxy as the first: the default port.
                with_qlik(json!({"proxies": ["https://n1:4243/", "https://n2", "https://n1"]})),
                "spec.qlik.proxies[2]: \"https://n1\" is listed twice",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://c", "reconcileInterval": "10ms"})),
                "spec.qlik.reconcileInterval: must be at least 1s (or 0s: only at start)",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://c", "reconcileInterval": "soon"})),
                "spec.qlik.reconcileInterval: \"soon\"",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://c", "reconcileGrace": "2h"})),
                "spec.qlik.reconcileGrace: must be from 0s to 1h",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://c", "startupTimeout": "2h"})),
                "spec.qlik.startupTimeout: must be from 0s to 1h",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://c", "requestTimeout": "0s"})),
                "spec.qlik.requestTimeout: must be from 1ms to 1h",
            ),
            (
                with_qlik(
                    json!({"repositoryUrl": "https://c", "hostAliases": {"qs-node1": "PROXY 1"}}),
                ),
                "spec.qlik.hostAliases[qs-node1]: \"PROXY 1\" is not a host name",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://c", "hostAliases": {"a=b": "PROXY1"}})),
                "spec.qlik.hostAliases[a=b]: \"a=b\" is not a host name",
            ),
            (
                with_qlik(
                    json!({"repositoryUrl": "https://c", "hostAliases": {"QS-NODE1": "P1", "qs-node1": "P2"}}),
                ),
                "spec.qlik.hostAliases[qs-node1]: the same node as \"QS-NODE1\"",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://c", "resolve": [
                    {"hostname": "c", "ip": "10.0.0.1"}, {"hostname": "n1", "ip": "10.0.0.300"}
                ]})),
                "spec.qlik.resolve[1].ip: \"10.0.0.300\" is not an IPv4 or IPv6 address",
            ),
            (
                with_qlik(
                    json!({"repositoryUrl": "https://c", "resolve": [{"hostname": "", "ip": "10.0.0.1"}]}),
                ),
                "spec.qlik.resolve[0].hostname: \"\" is not a host name",
            ),
            (
                with_qlik(json!({"repositoryUrl": "https://c", "resolve": [
                    {"hostname": "c", "ip": "10.0.0.1"}, {"hostname": "C", "ip": "10.0.0.2"}
                ]})),
                "spec.qlik.resolve[1].hostname: \"C\" is listed twice",
            ),
            (
                with_qlik(
                    json!({"repositoryUrl": "https://c", "certificatesSecret": {"name": "Qlik_Certs"}}),
                ),
                "spec.qlik.certificatesSecret.name: \"Qlik_Certs\" is not a valid Secret name",
            ),
            (
                with_qlik(
                    json!({"repositoryUrl": "https://c", "certificatesSecret": {"name": "c", "passphraseKey": "a/b"}}),
                ),
                "spec.qlik.certificatesSecret.passphraseKey: \"a/b\" is not a valid Secret key",
            ),
        ];
        for (spec, expected) in cases {
            let message = error(spec.clone());
            assert!(
                message.starts_with(expected),
                "{spec}: got {message:?}, expected it to start with {expected:?}"
            );
        }
    }

    #[test]
    fn the_granted_shards_never_shrink_and_stay_within_the_maximum() {
        let with = |checkpoint: serde_json::Value, granted: Option<u16>| {
            let mut m = monitor(json!({"mqtt": {"url": "mqtt://b"}, "checkpoint": checkpoint}));
            m.status = Some(crate::crd::SessionMonitorStatus {
                checkpoint_shards: granted,
                ..Default::default()
            });
            validate(&m, "img")
        };
        let shards = |plan: Result<Plan, InvalidSpec>| {
            let plan = plan.unwrap();
            let setting = plan.settings.checkpoint_configmap_shards;
            assert_eq!(setting, Some(usize::from(plan.checkpoint_shards)));
            (plan.checkpoint_shards, plan.max_checkpoint_shards)
        };
        assert_eq!(
            shards(with(json!({"shards": 8}), None)),
            (8, 100),
            "first apply"
        );
        assert_eq!(
            shards(with(json!({"shards": 16}), Some(8))),
            (16, 100),
            "raised"
        );
        // Below the grant (the autopilot's, or an earlier spec's): the grant stays.
        assert_eq!(shards(with(json!({"shards": 4}), Some(18))), (18, 100));
        assert_eq!(
            shards(with(json!({"shards": 16, "maxShards": 18}), Some(18))),
            (18, 18)
        );
        let message = with(json!({"shards": 16, "maxShards": 17}), Some(18))
            .unwrap_err()
            .message;
        assert_eq!(
            message,
            "spec.checkpoint.maxShards: 17 is below the 18 shards already granted; a grant is \
             never lowered, since the checkpoint may use the higher shards"
        );
        let message = with(json!({"shards": 16, "maxShards": 8}), None)
            .unwrap_err()
            .message;
        assert!(
            message
                .starts_with("spec.checkpoint.maxShards: 8 is below spec.checkpoint.shards (16)"),
            "{message}"
        );
        let message = with(json!({"maxShards": 101}), None).unwrap_err().message;
        assert_eq!(
            message,
            "spec.checkpoint.maxShards: 101 is not from 1 to 100"
        );
    }

    #[test]
    fn a_raise_renders_the_setting_and_the_names_and_keeps_the_checksum_input() {
        let plan = validate(&testing::example(), "img").unwrap();
        let raised = plan.clone().with_checkpoint_shards(20);
        assert_eq!(raised.checkpoint_shards, 20);
        assert_eq!(raised.checkpoint_configmaps().len(), 21);
        assert!(
            raised
                .config_toml()
                .contains("checkpoint_configmap_shards = 20")
        );
        assert_ne!(plan.config_toml(), raised.config_toml());
        assert_eq!(
            plan.config_toml_without_shards(),
            raised.config_toml_without_shards()
        );
        // Never lowered.
        assert_eq!(raised.clone().with_checkpoint_shards(4), raised);
    }

    #[test]
    fn the_name_must_fit_a_service_and_the_shard_names() {
        let mut m = testing::minimal();
        m.metadata.name = Some("qlik.prod".into());
        let message = validate(&m, "img").unwrap_err().message;
        assert!(message.starts_with("metadata.name: \"qlik.prod\" must be a DNS-1035 label"));
        m.metadata.name = Some("a".repeat(53));
        assert!(validate(&m, "img").is_err());
        m.metadata.name = Some("a".repeat(52));
        let plan = validate(&m, "img");
        assert!(plan.is_ok(), "{:?}", plan.err());
    }

    #[test]
    fn an_image_is_needed_from_the_spec_or_the_operator() {
        assert!(
            validate(&testing::minimal(), "")
                .unwrap_err()
                .message
                .starts_with("spec.image")
        );
        let m = monitor(json!({"image": "mine:2", "mqtt": {"url": "mqtt://b"}}));
        assert_eq!(validate(&m, "").unwrap().image, "mine:2");
    }

    #[test]
    fn a_monitor_without_a_uid_is_refused_rather_than_built_without_an_owner() {
        let mut m = testing::minimal();
        m.metadata.uid = None;
        let message = validate(&m, "img").unwrap_err().message;
        assert!(message.starts_with("metadata.uid: missing"), "{message}");
        let plan = validate(&testing::minimal(), "img").unwrap();
        assert_eq!(plan.owner.uid, testing::UID);
    }

    fn with_api_auth(auth: serde_json::Value) -> serde_json::Value {
        json!({"mqtt": {"url": "mqtt://broker:1883"}, "apiAuth": auth})
    }

    #[test]
    fn a_generated_api_token_is_a_mounted_file_from_the_monitors_secret() {
        let plan = validate(
            &monitor(with_api_auth(json!({"generateToken": true}))),
            "img",
        )
        .unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(
            settings.api_token_file.as_deref(),
            Some(std::path::Path::new(paths::API_TOKEN_FILE))
        );
        // The path only: no token in the ConfigMap.
        assert_eq!(settings.api_token, None);
        let token = SecretKey {
            secret: "qlik-prod-api-token".into(),
            key: "token".into(),
        };
        assert_eq!(
            plan.api_token,
            Some(ApiToken {
                secret: token.clone(),
                generated: true
            })
        );
        // Checked before deploying, and its resourceVersion is in the checksum.
        assert_eq!(plan.secret_keys(), [token]);
    }

    #[test]
    fn a_users_token_secret_is_referenced_with_its_key() {
        let spec = with_api_auth(json!({"tokenSecret": {"name": "api-token", "key": "bearer"}}));
        let plan = validate(&monitor(spec), "img").unwrap();
        let key = SecretKey {
            secret: "api-token".into(),
            key: "bearer".into(),
        };
        assert_eq!(
            plan.api_token,
            Some(ApiToken {
                secret: key.clone(),
                generated: false
            })
        );
        assert_eq!(plan.secret_keys(), [key]);
        let default_key = with_api_auth(json!({"tokenSecret": {"name": "api-token"}}));
        let plan = validate(&monitor(default_key), "img").unwrap();
        assert_eq!(plan.api_token.unwrap().secret.key, "token");
    }

    #[test]
    fn without_api_auth_the_api_stays_open() {
        let plan = validate(&testing::minimal(), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(settings.api_token_file, None);
        assert_eq!(plan.api_token, None);
    }

    #[test]
    fn an_api_auth_without_exactly_one_source_names_the_field() {
        let cases = [
            (
                with_api_auth(json!({"generateToken": true, "tokenSecret": {"name": "t"}})),
                "spec.apiAuth.tokenSecret: set either spec.apiAuth.generateToken or \
                 spec.apiAuth.tokenSecret, not both",
            ),
            (
                with_api_auth(json!({})),
                "spec.apiAuth.generateToken: set it to true",
            ),
            (
                with_api_auth(json!({"generateToken": false})),
                "spec.apiAuth.generateToken: set it to true",
            ),
            (
                with_api_auth(json!({"tokenSecret": {"name": "Api_Token"}})),
                "spec.apiAuth.tokenSecret: \"Api_Token\" is not a valid Secret name",
            ),
            (
                with_api_auth(json!({"tokenSecret": {"name": "t", "key": "a/b"}})),
                "spec.apiAuth.tokenSecret: \"a/b\" is not a valid Secret key",
            ),
        ];
        for (spec, expected) in cases {
            let message = error(spec.clone());
            assert!(
                message.starts_with(expected),
                "{spec}: got {message:?}, expected it to start with {expected:?}"
            );
        }
    }
}
