//! Validate: a `SessionMonitor` in, a [`Plan`] out, or an [`InvalidSpec`] that says which field
//! is wrong and why. Pure: the same checks run in unit tests, in the reconciler and nowhere else.
//!
//! The service's configuration is rendered here as the service's own [`Settings`] type and then
//! checked with the service's own [`Config::from_settings`], so the operator cannot hand the
//! service a configuration it would refuse at start-up.

use std::time::Duration;

use ipnet::IpNet;
use kube::ResourceExt;
use session_monitor::config::{self as service_config, Config, ConfigError, Settings};

use crate::crd::{LogFormat, SessionMonitor, UserListFormat};

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
}

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
    pub image: String,
    /// The service's configuration file, as it will be mounted.
    pub config_toml: String,
    pub checkpoint_configmap: String,
    /// `<name>-checkpoint-1` …: the shards RBAC must name.
    pub checkpoint_shards: Vec<String>,
    /// Secret keys the pod mounts or reads into its environment.
    pub secret_keys: Vec<SecretKey>,
}

impl Plan {
    pub fn checkpoint_configmaps(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.checkpoint_configmap.as_str())
            .chain(self.checkpoint_shards.iter().map(String::as_str))
    }
}

pub fn config_map_name(monitor: &str) -> String {
    format!("{monitor}-config")
}

pub fn checkpoint_name(monitor: &str) -> String {
    format!("{monitor}-checkpoint")
}

/// Checks `monitor` and renders the service configuration. `default_image` is the operator's.
pub fn validate(monitor: &SessionMonitor, default_image: &str) -> Result<Plan, InvalidSpec> {
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
    let granted = monitor.status.as_ref().and_then(|s| s.checkpoint_shards);
    if let Some(granted) = granted.filter(|&g| spec.checkpoint.shards < g) {
        return Err(invalid(
            "spec.checkpoint.shards",
            format!(
                "cannot be lowered from {granted} to {}: the current checkpoint may use shards \
                 the service could then no longer read; set it back to {granted} or more \
                 (or recreate the monitor to start without a checkpoint)",
                spec.checkpoint.shards
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

    let checkpoint_configmap = checkpoint_name(&name);
    let credentials = spec.mqtt.credentials_secret.as_ref();
    let tls = spec.mqtt.tls.as_ref();
    let topics = &spec.mqtt.topics;
    let settings = Settings {
        // Fixed, unprivileged ports inside the pod (it runs as non-root without capabilities,
        // so a spec port under 1024 could not be bound); the Services map the spec's ports.
        udp_listen: Some(([0, 0, 0, 0], CONTAINER_UDP_PORT).into()),
        udp_allowed_sources: (!allowed_sources.is_empty()).then_some(allowed_sources),
        udp_receive_buffer_bytes: receive_buffer_bytes,
        http_listen: Some(([0, 0, 0, 0], CONTAINER_HTTP_PORT).into()),
        idle_timeout: optional_duration("spec.sessions.idleTimeout", &spec.sessions.idle_timeout)?,
        max_idle: optional_duration("spec.sessions.maxIdle", &spec.sessions.max_idle)?,
        exclude_users: (!spec.sessions.exclude_users.is_empty())
            .then(|| spec.sessions.exclude_users.clone()),
        mqtt_url: Some(spec.mqtt.url.clone()),
        // The user name comes from the Secret through SESSION_MONITOR_MQTT_USERNAME, so that no
        // credential is ever written into a ConfigMap.
        mqtt_password_file: credentials.map(|_| paths::MQTT_PASSWORD_FILE.into()),
        mqtt_client_id: spec.mqtt.client_id.clone(),
        mqtt_qos: spec.mqtt.qos,
        mqtt_retain: spec.mqtt.retain,
        mqtt_keep_alive: optional_duration("spec.mqtt.keepAlive", &spec.mqtt.keep_alive)?,
        mqtt_ca_file: tls
            .and_then(|t| t.ca_secret.as_ref())
            .map(|_| paths::MQTT_CA_FILE.into()),
        mqtt_client_cert_file: tls
            .and_then(|t| t.client_cert_secret.as_ref())
            .map(|_| paths::MQTT_CLIENT_CERT_FILE.into()),
        mqtt_client_key_file: tls
            .and_then(|t| t.client_cert_secret.as_ref())
            .map(|_| paths::MQTT_CLIENT_KEY_FILE.into()),
        mqtt_topic_user_count: topics.user_count.clone(),
        mqtt_topic_user_list: topics.user_list.clone(),
        mqtt_topic_host_prefix: topics.host_prefix.clone(),
        mqtt_topic_status: topics.status.clone(),
        mqtt_topic_session_start: topics.session_start.clone(),
        mqtt_topic_session_stop: topics.session_stop.clone(),
        mqtt_topic_connection_open: topics.connection_open.clone(),
        mqtt_topic_connection_close: topics.connection_close.clone(),
        mqtt_user_list_format: spec.mqtt.user_list_format.map(|f| match f {
            UserListFormat::DirectoryAndId => service_config::UserListFormat::DirectoryAndId,
            UserListFormat::UserId => service_config::UserListFormat::UserId,
        }),
        publish_interval: optional_duration(
            "spec.mqtt.publishInterval",
            &spec.mqtt.publish_interval,
        )?,
        count_publish_interval: optional_duration(
            "spec.mqtt.countPublishInterval",
            &spec.mqtt.count_publish_interval,
        )?,
        checkpoint_configmap: Some(checkpoint_configmap.clone()),
        checkpoint_configmap_shards: Some(usize::from(spec.checkpoint.shards)),
        checkpoint_interval: optional_duration(
            "spec.checkpoint.interval",
            &spec.checkpoint.interval,
        )?,
        log_level: spec.log_level.clone(),
        log_format: Some(match spec.log_format.unwrap_or(LogFormat::Json) {
            LogFormat::Text => service_config::LogFormat::Text,
            LogFormat::Json => service_config::LogFormat::Json,
        }),
        ..Settings::default()
    };
    check_with_service(&settings, credentials.is_some())?;

    let mut secret_keys = Vec::new();
    if let Some(c) = credentials {
        for key in [&c.username_key, &c.password_key] {
            secret_keys.push(SecretKey {
                secret: c.name.clone(),
                key: key.clone(),
            });
        }
    }
    if let Some(ca) = tls.and_then(|t| t.ca_secret.as_ref()) {
        secret_keys.push(SecretKey {
            secret: ca.name.clone(),
            key: ca.key.clone(),
        });
    }
    if let Some(client) = tls.and_then(|t| t.client_cert_secret.as_ref()) {
        for key in ["tls.crt", "tls.key"] {
            secret_keys.push(SecretKey {
                secret: client.name.clone(),
                key: key.to_owned(),
            });
        }
    }
    for key in &secret_keys {
        if !is_dns1123_subdomain(&key.secret) {
            return Err(invalid(
                "spec.mqtt",
                format!("{:?} is not a valid Secret name", key.secret),
            ));
        }
        if key.key.is_empty() {
            return Err(invalid(
                "spec.mqtt",
                format!("empty key for Secret {:?}", key.secret),
            ));
        }
    }

    Ok(Plan {
        config_toml: settings.to_toml(),
        checkpoint_shards: (1..=spec.checkpoint.shards)
            .map(|i| format!("{checkpoint_configmap}-{i}"))
            .collect(),
        checkpoint_configmap,
        name,
        namespace,
        image,
        secret_keys,
    })
}

/// Runs the service's own validation on the rendered settings. Files the pod will mount do not
/// exist here, so the password is stood in for (the username comes from the Secret too).
fn check_with_service(settings: &Settings, has_credentials: bool) -> Result<(), InvalidSpec> {
    let mut probe = settings.clone();
    probe.mqtt_password_file = None;
    if has_credentials {
        probe.mqtt_username = Some("from-secret".to_owned());
    }
    let stand_in_password = has_credentials.then(String::new);
    Config::from_settings(probe, stand_in_password)
        .map(drop)
        .map_err(|e| match e {
            ConfigError::Invalid { key, message } => invalid(spec_path(key), message),
            other => invalid("spec", other),
        })
}

/// The spec field a service setting comes from, so a message points at what the user wrote.
fn spec_path(key: &str) -> &'static str {
    match key {
        "udp_allowed_sources" => "spec.udp.allowedSources",
        "udp_receive_buffer_bytes" => "spec.udp.receiveBufferBytes",
        "idle_timeout" => "spec.sessions.idleTimeout",
        "max_idle" => "spec.sessions.maxIdle",
        "exclude_users" => "spec.sessions.excludeUsers",
        "mqtt_url" => "spec.mqtt.url",
        "mqtt_username" | "mqtt_password_file" => "spec.mqtt.credentialsSecret",
        "mqtt_client_id" => "spec.mqtt.clientId",
        "mqtt_qos" => "spec.mqtt.qos",
        "mqtt_keep_alive" => "spec.mqtt.keepAlive",
        "mqtt_ca_file" | "mqtt_client_cert_file" | "mqtt_client_key_file" => "spec.mqtt.tls",
        "mqtt_topic_user_count" => "spec.mqtt.topics.userCount",
        "mqtt_topic_user_list" => "spec.mqtt.topics.userList",
        "mqtt_topic_host_prefix" => "spec.mqtt.topics.hostPrefix",
        "mqtt_topic_status" => "spec.mqtt.topics.status",
        "mqtt_topic_session_start" => "spec.mqtt.topics.sessionStart",
        "mqtt_topic_session_stop" => "spec.mqtt.topics.sessionStop",
        "mqtt_topic_connection_open" => "spec.mqtt.topics.connectionOpen",
        "mqtt_topic_connection_close" => "spec.mqtt.topics.connectionClose",
        "publish_interval" => "spec.mqtt.publishInterval",
        "count_publish_interval" => "spec.mqtt.countPublishInterval",
        "checkpoint_interval" => "spec.checkpoint.interval",
        "checkpoint_configmap_shards" => "spec.checkpoint.shards",
        "log_level" => "spec.logLevel",
        _ => "spec",
    }
}

fn duration(field: &str, text: &str) -> Result<Duration, InvalidSpec> {
    humantime::parse_duration(text).map_err(|e| invalid(field, format!("{text:?}: {e}")))
}

fn optional_duration(field: &str, text: &Option<String>) -> Result<Option<Duration>, InvalidSpec> {
    text.as_deref().map(|t| duration(field, t)).transpose()
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
        let settings: Settings = toml::from_str(&plan.config_toml).unwrap();
        assert_eq!(settings.udp_listen, Some("0.0.0.0:9997".parse().unwrap()));
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
        assert!(!plan.config_toml.contains("change-me"));
        // The pod reads it with the service's own loader and the mounted password file.
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "secret\n").unwrap();
        let mut mounted = settings.clone();
        mounted.mqtt_password_file = Some(password);
        mounted.mqtt_username = Some("session-monitor".into());
        Config::from_settings(mounted, None).expect("the service accepts it");

        assert_eq!(plan.image, "default/image:1");
        assert_eq!(plan.checkpoint_shards.len(), 8);
        assert_eq!(plan.checkpoint_shards[7], "qlik-prod-checkpoint-8");
        assert_eq!(
            plan.secret_keys,
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
    fn a_minimal_spec_leaves_the_service_defaults_alone() {
        let plan = validate(&testing::minimal(), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml).unwrap();
        assert_eq!(settings.idle_timeout, None);
        assert_eq!(settings.mqtt_qos, None);
        assert_eq!(settings.mqtt_topic_user_count, None);
        assert_eq!(settings.publish_interval, None);
        assert_eq!(settings.log_format, Some(service_config::LogFormat::Json));
        assert!(plan.secret_keys.is_empty());
    }

    #[test]
    fn tls_secrets_are_mounted_files() {
        let spec = with_mqtt(json!({
            "url": "mqtts://broker:8883",
            "tls": {"caSecret": {"name": "ca"}, "clientCertSecret": {"name": "client"}}
        }));
        let plan = validate(&monitor(spec), "img").unwrap();
        let settings: Settings = toml::from_str(&plan.config_toml).unwrap();
        assert_eq!(
            settings.mqtt_ca_file.as_deref(),
            Some(std::path::Path::new(paths::MQTT_CA_FILE))
        );
        assert_eq!(
            settings.mqtt_client_key_file.as_deref(),
            Some(std::path::Path::new(paths::MQTT_CLIENT_KEY_FILE))
        );
        let keys: Vec<_> = plan
            .secret_keys
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
                json!({"mqtt": {"url": "mqtt://b"}, "udp": {"port": 9842}}),
                "spec.metrics.port: 9842 is also spec.udp.port",
            ),
            (
                json!({"mqtt": {"url": "mqtt://b"}, "checkpoint": {"shards": 101}}),
                "spec.checkpoint.shards: 101 is not from 1 to 100",
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

    #[test]
    fn checkpoint_shards_may_grow_but_not_shrink_below_what_is_granted() {
        let with = |shards: u16, granted: Option<u16>| {
            let mut m =
                monitor(json!({"mqtt": {"url": "mqtt://b"}, "checkpoint": {"shards": shards}}));
            m.status = Some(crate::crd::SessionMonitorStatus {
                checkpoint_shards: granted,
                ..Default::default()
            });
            validate(&m, "img")
        };
        assert!(with(8, None).is_ok(), "first apply");
        assert!(with(8, Some(8)).is_ok());
        assert!(with(16, Some(8)).is_ok(), "raising is fine");
        let message = with(4, Some(8)).unwrap_err().message;
        assert!(
            message.starts_with("spec.checkpoint.shards: cannot be lowered from 8 to 4"),
            "{message}"
        );
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
        assert!(validate(&m, "img").is_ok());
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
}
