//! Build: the objects a [`Plan`] needs, as the operator will apply them. Pure and infallible:
//! no client, no clock, and nothing but the plan (validation put everything in it, the owner
//! and the Secrets the pod uses included); the reconciler applies exactly what these functions
//! return, and unit tests assert it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec as CoreServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::crd::{ExternalTrafficPolicy, ImagePullPolicy, ServiceType};
use crate::validate::{
    CONTAINER_HTTP_PORT, CONTAINER_UDP_PORT, Plan, SecretMount, config_map_name, paths,
};

pub const MANAGER: &str = "session-monitor-operator";
pub const CONTAINER: &str = "session-monitor";
pub const UDP_PORT_NAME: &str = "udp-ingest";
pub const HTTP_PORT_NAME: &str = "http-metrics";
/// On the pod template: a change of configuration (or of a referenced Secret) rolls the pod,
/// since the service reads both only at start.
pub const CHECKSUM_ANNOTATION: &str = "sessionmonitor.io/config-checksum";
/// Tells the config ConfigMap (watched) from the checkpoint ConfigMaps (written by the service
/// every few seconds, so not watched: each write would trigger a reconcile).
pub const ROLE_LABEL: &str = "sessionmonitor.io/role";
/// On the HTTP Service, which the ServiceMonitor selects.
pub const HTTP_ROLE: &str = "http";
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=session-monitor-operator";
/// Non-root user of the image (the distroless `nonroot` user).
const RUN_AS: i64 = 65532;

/// Every object a monitor needs; the ServiceMonitor only when requested.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub config_map: ConfigMap,
    pub checkpoint_config_maps: Vec<ConfigMap>,
    pub deployment: Deployment,
    /// The UDP ingest, of the type the spec asks for (often a LoadBalancer for the proxies).
    pub service: Service,
    /// `/metrics`, the probes and the read API (which lists user names): ClusterIP only, so
    /// exposing the UDP port to the proxies never exposes these.
    pub http_service: Service,
    pub service_monitor: Option<serde_json::Value>,
}

/// `secret_versions`: resourceVersion of each referenced Secret, so a rotated credential rolls
/// the pod too.
///
/// Infallible: everything it needs was checked by validation and is in the [`Plan`].
pub fn build(plan: &Plan, secret_versions: &BTreeMap<String, String>) -> Desired {
    let owner = &plan.owner;
    let checkpoint_config_maps = plan
        .checkpoint_configmaps()
        .iter()
        .map(|name| checkpoint_config_map(plan, owner, name))
        .collect();
    Desired {
        service_account: ServiceAccount {
            metadata: metadata(plan, owner, &plan.name),
            ..ServiceAccount::default()
        },
        role: role(plan, owner),
        role_binding: role_binding(plan, owner),
        config_map: config_map(plan, owner),
        checkpoint_config_maps,
        deployment: deployment(plan, owner, secret_versions),
        service: service(plan, owner),
        http_service: http_service(plan, owner),
        service_monitor: service_monitor(plan, owner),
    }
}

/// Labels on everything; the selector is the stable subset.
pub fn labels(plan: &Plan) -> BTreeMap<String, String> {
    let mut labels = selector_labels(plan);
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "session-monitor-operator".into(),
    );
    labels.insert(
        "app.kubernetes.io/component".into(),
        "session-tracking".into(),
    );
    labels
}

pub fn selector_labels(plan: &Plan) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "session-monitor".into()),
        ("app.kubernetes.io/instance".into(), plan.name.clone()),
    ])
}

fn metadata(plan: &Plan, owner: &OwnerReference, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(plan.namespace.clone()),
        labels: Some(labels(plan)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn role(plan: &Plan, owner: &OwnerReference) -> Role {
    Role {
        metadata: metadata(plan, owner, &plan.name),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".into()]),
                // Named objects only: the service can read and replace its checkpoints, nothing
                // else.
                resource_names: Some(plan.checkpoint_configmaps()),
                verbs: vec!["get".into(), "update".into()],
                ..PolicyRule::default()
            },
            // The checkpoint writer's Lease (kube-lease-manager reads it and applies it).
            PolicyRule {
                api_groups: Some(vec!["coordination.k8s.io".into()]),
                resources: Some(vec!["leases".into()]),
                resource_names: Some(vec![crate::validate::checkpoint_lease_name(&plan.name)]),
                verbs: vec!["get".into(), "patch".into()],
                ..PolicyRule::default()
            },
            // Its first creation: RBAC cannot limit `create` to a name.
            PolicyRule {
                api_groups: Some(vec!["coordination.k8s.io".into()]),
                resources: Some(vec!["leases".into()]),
                verbs: vec!["create".into()],
                ..PolicyRule::default()
            },
        ]),
    }
}

fn role_binding(plan: &Plan, owner: &OwnerReference) -> RoleBinding {
    RoleBinding {
        metadata: metadata(plan, owner, &plan.name),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: plan.name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: plan.name.clone(),
            namespace: Some(plan.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

fn config_map(plan: &Plan, owner: &OwnerReference) -> ConfigMap {
    let mut metadata = metadata(plan, owner, &config_map_name(&plan.name));
    metadata
        .labels
        .get_or_insert_default()
        .insert(ROLE_LABEL.into(), "config".into());
    ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(
            paths::CONFIG_KEY.into(),
            plan.config_toml(),
        )])),
        ..ConfigMap::default()
    }
}

/// Metadata only: the service owns the data. Applying no `data` field with server-side apply
/// leaves the service's checkpoint untouched, creates an empty object (a first start for the
/// service) where none exists, and lets least-privilege RBAC name every object.
fn checkpoint_config_map(plan: &Plan, owner: &OwnerReference, name: &str) -> ConfigMap {
    let mut metadata = metadata(plan, owner, name);
    metadata
        .labels
        .get_or_insert_default()
        .insert(ROLE_LABEL.into(), "checkpoint".into());
    ConfigMap {
        metadata,
        ..ConfigMap::default()
    }
}

pub fn config_checksum(plan: &Plan, secret_versions: &BTreeMap<String, String>) -> String {
    let mut hash = Sha256::new();
    hash.update(plan.config_toml_without_shards().as_bytes());
    for key in &plan.secret_keys() {
        hash.update(b"\0");
        hash.update(key.secret.as_bytes());
        hash.update(b"/");
        hash.update(key.key.as_bytes());
        hash.update(b"@");
        hash.update(
            secret_versions
                .get(&key.secret)
                .map(String::as_str)
                .unwrap_or("")
                .as_bytes(),
        );
    }
    hash.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn deployment(
    plan: &Plan,
    owner: &OwnerReference,
    secret_versions: &BTreeMap<String, String>,
) -> Deployment {
    let pod = &plan.pod;
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(&plan.name),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![mount("config", paths::CONFIG_DIR)];
    let from_field = |name: &str, field_path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    // The pod's name is who holds the checkpoint writer's Lease.
    let mut env = vec![
        from_field("POD_NAMESPACE", "metadata.namespace"),
        from_field("POD_NAME", "metadata.name"),
    ];
    for variable in &plan.secret_env {
        env.push(EnvVar {
            name: variable.name.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: variable.key.secret.clone(),
                    key: variable.key.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }
    for secret in &plan.secret_mounts {
        volumes.push(secret_volume(secret));
        mounts.push(mount(secret.volume, secret.dir));
    }
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(plan.image.clone()),
        image_pull_policy: pod.image_pull_policy.map(|p| {
            match p {
                ImagePullPolicy::Always => "Always",
                ImagePullPolicy::IfNotPresent => "IfNotPresent",
                ImagePullPolicy::Never => "Never",
            }
            .to_owned()
        }),
        args: Some(vec!["--config".into(), paths::CONFIG_FILE.into()]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some(UDP_PORT_NAME.into()),
                container_port: i32::from(CONTAINER_UDP_PORT),
                protocol: Some("UDP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(HTTP_PORT_NAME.into()),
                container_port: i32::from(CONTAINER_HTTP_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        // Ready once the checkpoint is restored and UDP is bound; it may take a while when the
        // API server is slow, which readiness (not liveness) is for.
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        resources: Some(pod.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let mut template_metadata = ObjectMeta {
        labels: Some(labels(plan)),
        annotations: Some(BTreeMap::from([(
            CHECKSUM_ANNOTATION.into(),
            config_checksum(plan, secret_versions),
        )])),
        ..ObjectMeta::default()
    };
    template_metadata.name = None;
    Deployment {
        metadata: metadata(plan, owner, &plan.name),
        spec: Some(DeploymentSpec {
            // One replica: the registry is one process's memory, and UDP events cannot be
            // split between replicas without losing the per-user view.
            replicas: Some(1),
            // A surge: the new pod is ready (restored, listening) before the old one stops, so
            // the Services always have an endpoint. Only the holder of the checkpoint Lease
            // writes; the old pod writes its last checkpoint when it stops, and the new one
            // takes it over (the service's `checkpoint::lease`).
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(plan)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(template_metadata),
                spec: Some(PodSpec {
                    service_account_name: Some(plan.name.clone()),
                    // The final checkpoint gets 20 s inside this.
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        // Mounted Secrets belong to this group, so the non-root user can read
                        // them (with mode 0440); without it they stay root's.
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(runtime_default()),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: (!pod.node_selector.is_empty())
                        .then(|| pod.node_selector.clone()),
                    tolerations: (!pod.tolerations.is_empty()).then(|| pod.tolerations.clone()),
                    affinity: pod.affinity.clone(),
                    priority_class_name: pod.priority_class_name.clone(),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The Secret of a generated API token (`spec.apiAuth.generateToken`), holding `token`. It is
/// created only where none exists and never applied again, so the token stays the same across
/// reconciles and operator restarts. `None` when the spec does not ask for a generated token.
pub fn generated_token_secret(plan: &Plan, token: String) -> Option<Secret> {
    let key = plan.api_token.as_ref().filter(|t| t.generated)?;
    Some(Secret {
        metadata: ObjectMeta {
            name: Some(key.secret.secret.clone()),
            namespace: Some(plan.namespace.clone()),
            labels: Some(labels(plan)),
            // Deleted with the monitor, as every other child.
            owner_references: Some(vec![plan.owner.clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            key.secret.key.clone(),
            ByteString(token.into_bytes()),
        )])),
        ..Secret::default()
    })
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("50m".into())),
            ("memory".into(), Quantity("64Mi".into())),
        ])),
        // 200,000 users take about 142 MB at rest, and serving the full user list
        // (`/api/v1/users`, `/api/v1/summary`) adds about 80 MB while it is answered (README,
        // "Sizing").
        limits: Some(BTreeMap::from([(
            "memory".into(),
            Quantity("512Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    }
}

fn mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn secret_volume(secret: &SecretMount) -> Volume {
    Volume {
        name: secret.volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.secret.clone()),
            items: Some(
                secret
                    .items
                    .iter()
                    .map(|(key, path)| KeyToPath {
                        key: key.clone(),
                        path: path.clone(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            // Readable by the owner and the pod's fsGroup (the service's group), nobody else.
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn service(plan: &Plan, owner: &OwnerReference) -> Service {
    let spec = &plan.service;
    let mut metadata = metadata(plan, owner, &plan.name);
    if !spec.annotations.is_empty() {
        metadata.annotations = Some(spec.annotations.clone());
    }
    let exposed = spec.type_ != ServiceType::ClusterIP;
    Service {
        metadata,
        spec: Some(CoreServiceSpec {
            type_: Some(
                match spec.type_ {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            selector: Some(selector_labels(plan)),
            // `protocol` is stated: Kubernetes 1.20's server-side apply needs it.
            ports: Some(vec![ServicePort {
                name: Some(UDP_PORT_NAME.into()),
                port: i32::from(plan.udp_port),
                target_port: Some(IntOrString::String(UDP_PORT_NAME.into())),
                protocol: Some("UDP".into()),
                ..ServicePort::default()
            }]),
            // Not-ready pods too. The service takes datagrams as soon as its socket is bound,
            // while its checkpoint loads; and after a pod deletion the replacement becomes an
            // endpoint before the old pod leaves, so the Service never has zero endpoints. That
            // matters for UDP: a proxy sends from one port, conntrack pins that flow, and a
            // datagram sent while a NodePort Service has no endpoint leaves an un-NATed entry
            // that kube-proxy before 1.21 never clears (kubernetes/kubernetes#98305): the
            // proxy's datagrams vanish for as long as it keeps sending. (Found in a real 1.20
            // cluster with this set to false: every datagram after a pod deletion was lost.)
            publish_not_ready_addresses: Some(true),
            external_traffic_policy: spec.external_traffic_policy.filter(|_| exposed).map(|p| {
                match p {
                    ExternalTrafficPolicy::Cluster => "Cluster",
                    ExternalTrafficPolicy::Local => "Local",
                }
                .into()
            }),
            ..CoreServiceSpec::default()
        }),
        status: None,
    }
}

pub fn http_service_name(monitor: &str) -> String {
    format!("{monitor}-http")
}

fn http_service(plan: &Plan, owner: &OwnerReference) -> Service {
    let mut metadata = metadata(plan, owner, &http_service_name(&plan.name));
    metadata
        .labels
        .get_or_insert_default()
        .insert(ROLE_LABEL.into(), HTTP_ROLE.into());
    Service {
        metadata,
        spec: Some(CoreServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(plan)),
            ports: Some(vec![ServicePort {
                name: Some(HTTP_PORT_NAME.into()),
                port: i32::from(plan.http_port),
                target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..CoreServiceSpec::default()
        }),
        status: None,
    }
}

pub const SERVICE_MONITOR_API_VERSION: &str = "monitoring.coreos.com/v1";

fn service_monitor(plan: &Plan, owner: &OwnerReference) -> Option<serde_json::Value> {
    let sm = plan.service_monitor.as_ref()?;
    let mut labels = labels(plan);
    labels.extend(sm.labels.clone());
    let mut http_selector = selector_labels(plan);
    http_selector.insert(ROLE_LABEL.into(), HTTP_ROLE.into());
    let mut endpoint = json!({"port": HTTP_PORT_NAME, "path": "/metrics"});
    if let Some(interval) = &sm.interval {
        endpoint["interval"] = json!(interval);
    }
    Some(json!({
        "apiVersion": SERVICE_MONITOR_API_VERSION,
        "kind": "ServiceMonitor",
        "metadata": {
            "name": plan.name,
            "namespace": plan.namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            // Prometheus's `job` is the monitor's name (not the Service's `NAME-http`), which
            // the Grafana dashboard selects by.
            "jobLabel": "app.kubernetes.io/instance",
            "selector": {"matchLabels": http_selector},
            "endpoints": [endpoint],
        }
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crd::SessionMonitor;
    use crate::testing::{self, NAME, NAMESPACE, UID, monitor};
    use crate::validate::validate;

    fn built(m: &SessionMonitor) -> (Plan, Desired) {
        let plan = validate(m, "example/session-monitor:1").unwrap();
        let desired = build(&plan, &BTreeMap::new());
        (plan, desired)
    }

    fn all_metadata(d: &Desired) -> Vec<&ObjectMeta> {
        let mut all = vec![
            &d.service_account.metadata,
            &d.role.metadata,
            &d.role_binding.metadata,
            &d.config_map.metadata,
            &d.deployment.metadata,
            &d.service.metadata,
            &d.http_service.metadata,
        ];
        all.extend(d.checkpoint_config_maps.iter().map(|c| &c.metadata));
        all
    }

    #[test]
    fn every_object_is_owned_labelled_and_named_for_the_monitor() {
        let (_, d) = built(&testing::example());
        let names: Vec<_> = all_metadata(&d)
            .iter()
            .map(|m| m.name.clone().unwrap())
            .collect();
        assert_eq!(
            names[..7],
            [
                NAME,
                NAME,
                NAME,
                "qlik-prod-config",
                NAME,
                NAME,
                "qlik-prod-http"
            ]
        );
        assert_eq!(names[7], "qlik-prod-checkpoint");
        assert_eq!(names[15], "qlik-prod-checkpoint-8");
        assert_eq!(names.len(), 7 + 9);
        for meta in all_metadata(&d) {
            assert_eq!(meta.namespace.as_deref(), Some(NAMESPACE));
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(owner.uid, UID);
            assert_eq!(owner.kind, "SessionMonitor");
            assert_eq!(owner.api_version, "sessionmonitor.io/v1alpha1");
            assert_eq!(owner.controller, Some(true));
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels["app.kubernetes.io/instance"], NAME);
            assert_eq!(labels["app.kubernetes.io/name"], "session-monitor");
            assert_eq!(
                labels["app.kubernetes.io/managed-by"],
                "session-monitor-operator"
            );
        }
    }

    #[test]
    fn the_service_may_only_read_and_replace_its_own_checkpoints() {
        let (plan, d) = built(&testing::example());
        let rules = d.role.rules.unwrap();
        assert_eq!(rules.len(), 3);
        // Its checkpoint writer's Lease: read and applied by name, created once.
        for lease in &rules[1..] {
            assert_eq!(
                lease.api_groups,
                Some(vec!["coordination.k8s.io".to_owned()])
            );
            assert_eq!(lease.resources, Some(vec!["leases".to_owned()]));
        }
        assert_eq!(
            rules[1].resource_names,
            Some(vec!["qlik-prod-writer".to_owned()])
        );
        assert_eq!(rules[1].verbs, ["get", "patch"]);
        assert_eq!(
            (rules[2].resource_names.as_ref(), rules[2].verbs.as_slice()),
            (None, &["create".to_owned()][..])
        );
        assert_eq!(rules[0].api_groups, Some(vec![String::new()]));
        assert_eq!(rules[0].resources, Some(vec!["configmaps".to_owned()]));
        assert_eq!(rules[0].verbs, ["get", "update"]);
        let names = rules[0].resource_names.clone().unwrap();
        assert_eq!(names.len(), 9);
        assert_eq!(names, plan.checkpoint_configmaps());
        assert!(!names.contains(&"qlik-prod-config".to_owned()));
        assert_eq!(d.role_binding.role_ref.name, NAME);
        let subject = &d.role_binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.kind.as_str(), subject.name.as_str()),
            ("ServiceAccount", NAME)
        );
        assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
    }

    #[test]
    fn checkpoint_config_maps_carry_no_data_so_the_service_keeps_its_own() {
        let (_, d) = built(&testing::minimal());
        for cm in &d.checkpoint_config_maps {
            assert_eq!(cm.data, None);
            assert_eq!(cm.binary_data, None);
            assert_eq!(
                cm.metadata.labels.as_ref().unwrap()[ROLE_LABEL],
                "checkpoint"
            );
        }
        assert_eq!(
            d.config_map.metadata.labels.as_ref().unwrap()[ROLE_LABEL],
            "config"
        );
        let data = d.config_map.data.unwrap();
        assert!(
            data[paths::CONFIG_KEY].contains("checkpoint_configmap = \"qlik-prod-checkpoint\"")
        );
    }

    #[test]
    fn the_deployment_runs_one_hardened_pod_with_probes() {
        let (_, d) = built(&testing::example());
        let spec = d.deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        let strategy = spec.strategy.unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let surge = strategy.rolling_update.unwrap();
        assert_eq!(
            (surge.max_surge, surge.max_unavailable),
            (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
        );
        assert_eq!(spec.selector.match_labels.unwrap().len(), 2);
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
        let pod_security = pod.security_context.unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        // The non-root user reads the mounted Secrets through the pod's group.
        assert_eq!(pod_security.fs_group, Some(RUN_AS));
        assert_eq!(
            pod_security.seccomp_profile.unwrap().type_,
            "RuntimeDefault"
        );
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("example/session-monitor:1"));
        assert_eq!(c.args.as_ref().unwrap(), &["--config", paths::CONFIG_FILE]);
        let security = c.security_context.clone().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let readiness = c.readiness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(readiness.path.as_deref(), Some("/readyz"));
        assert_eq!(readiness.port, IntOrString::String(HTTP_PORT_NAME.into()));
        let liveness = c.liveness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(liveness.path.as_deref(), Some("/healthz"));
        let ports: Vec<_> = c
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap(),
                    p.container_port,
                    p.protocol.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                (UDP_PORT_NAME.to_owned(), 9997, "UDP".to_owned()),
                (HTTP_PORT_NAME.to_owned(), 9842, "TCP".to_owned())
            ]
        );
        let env = c.env.clone().unwrap();
        let namespace = env.iter().find(|e| e.name == "POD_NAMESPACE").unwrap();
        assert_eq!(
            namespace
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.namespace"
        );
        let username = env
            .iter()
            .find(|e| e.name == "SESSION_MONITOR_MQTT_USERNAME")
            .unwrap();
        let secret_ref = username
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret_ref.name.as_str(), secret_ref.key.as_str()),
            ("qlik-mqtt", "username")
        );
        assert!(
            env.iter().all(|e| e.value.is_none()),
            "no literal values, no secrets in the spec"
        );
        let volumes = pod.volumes.unwrap();
        let password = volumes
            .iter()
            .find(|v| v.name == "mqtt-credentials")
            .unwrap();
        let secret = password.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("qlik-mqtt"));
        assert_eq!(secret.items.as_ref().unwrap()[0].key, "password");
        assert_eq!(secret.items.as_ref().unwrap()[0].path, "password");
        assert_eq!(secret.default_mode, Some(0o440));
        let mounts = c.volume_mounts.clone().unwrap();
        assert!(mounts.iter().all(|m| m.read_only == Some(true)));
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_path == paths::MQTT_CREDENTIALS_DIR)
        );
        let resources = c.resources.clone().unwrap();
        assert_eq!(
            resources.limits.unwrap()["memory"],
            Quantity("512Mi".into())
        );
    }

    #[test]
    fn the_checksum_rolls_the_pod_when_the_config_or_a_secret_changes() {
        let checksum = |m: &SessionMonitor, versions: &BTreeMap<String, String>| {
            let plan = validate(m, "img").unwrap();
            build(&plan, versions)
                .deployment
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[CHECKSUM_ANNOTATION]
                .clone()
        };
        let none = BTreeMap::new();
        let example = testing::example();
        let first = checksum(&example, &none);
        assert_eq!(first, checksum(&example, &none), "stable");
        assert_eq!(first.len(), 32);
        let mut changed = example.clone();
        changed.spec.sessions.idle_timeout = Some("45m".into());
        assert_ne!(first, checksum(&changed, &none));
        let rotated = BTreeMap::from([("qlik-mqtt".to_owned(), "42".to_owned())]);
        assert_ne!(first, checksum(&example, &rotated));
        // Scheduling is not configuration: no checksum change (the template changes anyway).
        let mut scheduled = example.clone();
        scheduled
            .spec
            .node_selector
            .insert("zone".into(), "a".into());
        assert_eq!(first, checksum(&scheduled, &none));
    }

    #[test]
    fn the_qlik_certificates_are_mounted_read_only_where_the_settings_point() {
        let (plan, d) = built(&testing::qlik_example());
        let pod = d.deployment.spec.unwrap().template.spec.unwrap();
        let volumes = pod.volumes.unwrap();
        let volume = volumes
            .iter()
            .find(|v| v.name == "qlik-certificates")
            .expect("a volume of the certificates Secret");
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("qlik-certificates"));
        let items: Vec<_> = secret
            .items
            .iter()
            .flatten()
            .map(|i| (i.key.as_str(), i.path.as_str()))
            .collect();
        assert_eq!(
            items,
            [
                ("client.pem", "client.pem"),
                ("client_key.pem", "client_key.pem"),
                ("root.pem", "root.pem")
            ]
        );
        assert_eq!(secret.default_mode, Some(0o440));
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "qlik-certificates")
            .unwrap();
        assert_eq!(mount.mount_path, "/etc/session-monitor/qlik");
        assert_eq!(mount.read_only, Some(true));
        // The files the settings name are the mounted items.
        let settings: session_monitor_config::Settings =
            toml::from_str(&plan.config_toml()).unwrap();
        for file in [
            settings.qlik_client_cert_file.unwrap(),
            settings.qlik_client_key_file.unwrap(),
            settings.qlik_ca_file.unwrap(),
        ] {
            assert_eq!(file.parent(), Some(std::path::Path::new(&mount.mount_path)));
            let name = file.file_name().unwrap().to_str().unwrap();
            assert!(items.iter().any(|(_, path)| *path == name), "{name}");
        }
        // Files only: nothing from the Secret in the environment, no Secret access for the pod.
        assert!(c.env.iter().flatten().all(|e| {
            e.value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .is_none_or(|r| r.name != "qlik-certificates")
        }));
        let rules = d.role.rules.unwrap();
        assert!(
            rules
                .iter()
                .all(|r| !r.resources.iter().flatten().any(|x| x == "secrets"))
        );
    }

    #[test]
    fn a_key_passphrase_is_mounted_beside_the_certificates() {
        let m = monitor(json!({
            "mqtt": {"url": "mqtt://b"},
            "qlik": {
                "proxies": ["https://qs-node1:4243/"],
                "certificatesSecret": {"name": "qlik-certificates", "passphraseKey": "key-password"},
            },
        }));
        let (plan, d) = built(&m);
        let pod = d.deployment.spec.unwrap().template.spec.unwrap();
        let volume = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "qlik-certificates")
            .unwrap();
        let items: Vec<_> = volume
            .secret
            .unwrap()
            .items
            .unwrap()
            .into_iter()
            .map(|i| (i.key, i.path))
            .collect();
        assert_eq!(
            items.last(),
            Some(&("key-password".to_owned(), "passphrase".to_owned()))
        );
        assert!(
            plan.config_toml().contains(&format!(
                "qlik_client_key_passphrase_file = \"{}\"",
                paths::QLIK_PASSPHRASE_FILE
            )),
            "{}",
            plan.config_toml()
        );
    }

    #[test]
    fn without_qlik_nothing_of_it_is_mounted() {
        let (_, d) = built(&testing::example());
        let pod = d.deployment.spec.unwrap().template.spec.unwrap();
        assert!(
            pod.volumes
                .unwrap()
                .iter()
                .all(|v| v.name != "qlik-certificates")
        );
        assert!(
            pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .all(|m| m.mount_path != paths::QLIK_CERTIFICATES_DIR)
        );
    }

    #[test]
    fn a_rotated_certificates_secret_rolls_the_pod() {
        let m = testing::qlik_example();
        let plan = validate(&m, "img").unwrap();
        let checksum = |versions: &[(&str, &str)]| {
            let versions = versions
                .iter()
                .map(|(s, v)| ((*s).to_owned(), (*v).to_owned()))
                .collect();
            config_checksum(&plan, &versions)
        };
        let before = checksum(&[("qlik-mqtt", "1"), ("qlik-certificates", "7")]);
        assert_ne!(
            before,
            checksum(&[("qlik-mqtt", "1"), ("qlik-certificates", "8")])
        );
        assert_eq!(
            before,
            checksum(&[("qlik-mqtt", "1"), ("qlik-certificates", "7")])
        );
    }

    fn ports(service: &Service) -> Vec<(String, i32, String)> {
        service
            .spec
            .clone()
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port, p.protocol.unwrap()))
            .collect()
    }

    #[test]
    fn udp_is_exposed_as_asked_and_http_stays_inside_the_cluster() {
        let (_, d) = built(&testing::example());
        assert_eq!(
            ports(&d.service),
            [("udp-ingest".to_owned(), 9997, "UDP".to_owned())]
        );
        let spec = d.service.spec.clone().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        // Datagrams reach the pod while it restores its checkpoint (bound, not yet ready), and
        // the Service keeps an endpoint while a deleted pod is replaced (see `service`).
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        // The read API lists user names: never on the load balancer.
        assert_eq!(
            ports(&d.http_service),
            [("http-metrics".to_owned(), 9842, "TCP".to_owned())]
        );
        let http = d.http_service.spec.clone().unwrap();
        assert_eq!(http.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(http.selector, spec.selector);
        assert_eq!(
            d.http_service.metadata.labels.unwrap()[ROLE_LABEL],
            HTTP_ROLE
        );
        // A ClusterIP Service cannot take an external traffic policy.
        let m = monitor(json!({
            "mqtt": {"url": "mqtt://b"},
            "service": {"externalTrafficPolicy": "Local"}
        }));
        let (_, d) = built(&m);
        let spec = d.service.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.external_traffic_policy, None);
    }

    #[test]
    fn spec_ports_are_service_ports_and_the_pod_keeps_unprivileged_ones() {
        let m = monitor(json!({
            "mqtt": {"url": "mqtt://b"},
            "udp": {"port": 514},
            "metrics": {"port": 80},
        }));
        let (plan, d) = built(&m);
        let settings: session_monitor_config::Settings =
            toml::from_str(&plan.config_toml()).unwrap();
        assert_eq!(settings.udp_listen, Some("[::]:9997".parse().unwrap()));
        assert_eq!(settings.http_listen, Some("0.0.0.0:9842".parse().unwrap()));
        let pod = d.deployment.spec.unwrap().template.spec.unwrap();
        let container_ports: Vec<_> = pod.containers[0]
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(container_ports, [9997, 9842]);
        assert_eq!(
            ports(&d.service),
            [("udp-ingest".to_owned(), 514, "UDP".to_owned())]
        );
        assert_eq!(
            ports(&d.http_service),
            [("http-metrics".to_owned(), 80, "TCP".to_owned())]
        );
    }

    #[test]
    fn a_service_monitor_only_when_enabled() {
        let (_, d) = built(&testing::minimal());
        assert_eq!(d.service_monitor, None);
        let (_, d) = built(&testing::example());
        let sm = d.service_monitor.unwrap();
        assert_eq!(sm["kind"], "ServiceMonitor");
        assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
        assert_eq!(sm["metadata"]["ownerReferences"][0]["uid"], UID);
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-metrics");
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
            NAME
        );
        // Only the HTTP Service has the port it scrapes; the job is named for the monitor.
        assert_eq!(sm["spec"]["selector"]["matchLabels"][ROLE_LABEL], HTTP_ROLE);
        assert_eq!(sm["spec"]["jobLabel"], "app.kubernetes.io/instance");
    }

    fn with_generated_token() -> SessionMonitor {
        monitor(json!({"mqtt": {"url": "mqtt://b"}, "apiAuth": {"generateToken": true}}))
    }

    #[test]
    fn the_api_token_is_mounted_read_only_where_the_setting_points() {
        let (plan, d) = built(&with_generated_token());
        let pod = d.deployment.spec.unwrap().template.spec.unwrap();
        let volume = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "api-token")
            .expect("a volume of the token Secret");
        let secret = volume.secret.unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("qlik-prod-api-token"));
        let items: Vec<_> = secret
            .items
            .unwrap()
            .into_iter()
            .map(|i| (i.key, i.path))
            .collect();
        assert_eq!(items, [("token".to_owned(), "token".to_owned())]);
        assert_eq!(secret.default_mode, Some(0o440));
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "api-token")
            .unwrap();
        assert_eq!(mount.mount_path, paths::API_TOKEN_DIR);
        assert_eq!(mount.read_only, Some(true));
        let settings: session_monitor_config::Settings =
            toml::from_str(&plan.config_toml()).unwrap();
        let file = settings.api_token_file.unwrap();
        assert_eq!(file.parent(), Some(std::path::Path::new(&mount.mount_path)));
        assert_eq!(file.file_name().unwrap(), "token");
        // A file only: not in the environment, and the pod gets no access to Secrets.
        assert!(c.env.iter().flatten().all(|e| !e.name.contains("TOKEN")));
        let rules = d.role.rules.unwrap();
        assert!(
            rules
                .iter()
                .all(|r| !r.resources.iter().flatten().any(|x| x == "secrets"))
        );
    }

    #[test]
    fn a_users_token_secret_is_mounted_from_its_key() {
        let m = monitor(json!({
            "mqtt": {"url": "mqtt://b"},
            "apiAuth": {"tokenSecret": {"name": "reader-token", "key": "bearer"}},
        }));
        let (_, d) = built(&m);
        let pod = d.deployment.spec.unwrap().template.spec.unwrap();
        let secret = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "api-token")
            .unwrap()
            .secret
            .unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("reader-token"));
        let item = &secret.items.unwrap()[0];
        assert_eq!((item.key.as_str(), item.path.as_str()), ("bearer", "token"));
    }

    #[test]
    fn without_api_auth_no_token_is_mounted() {
        let (_, d) = built(&testing::example());
        let pod = d.deployment.spec.unwrap().template.spec.unwrap();
        assert!(pod.volumes.unwrap().iter().all(|v| v.name != "api-token"));
    }

    #[test]
    fn a_recreated_token_secret_rolls_the_pod() {
        let m = with_generated_token();
        let plan = validate(&m, "img").unwrap();
        let checksum = |version: &str| {
            let versions = BTreeMap::from([("qlik-prod-api-token".to_owned(), version.to_owned())]);
            config_checksum(&plan, &versions)
        };
        assert_eq!(checksum("5"), checksum("5"), "stable while the Secret is");
        assert_ne!(checksum("5"), checksum("9"));
        // And it differs from the same spec without a token.
        let open = validate(&testing::minimal(), "img").unwrap();
        assert_ne!(checksum("5"), config_checksum(&open, &BTreeMap::new()));
    }

    #[test]
    fn the_generated_token_secret_is_owned_labelled_and_holds_only_the_token() {
        let m = with_generated_token();
        let plan = validate(&m, "img").unwrap();
        let secret = generated_token_secret(&plan, "ab".repeat(32)).unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("qlik-prod-api-token"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some(NAMESPACE));
        assert_eq!(secret.metadata.labels, Some(labels(&plan)));
        let owners = secret.metadata.owner_references.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].uid.as_str(), owners[0].controller),
            (UID, Some(true))
        );
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        let data = secret.data.unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["token"]);
        assert_eq!(data["token"].0, "ab".repeat(32).into_bytes());
        // Nothing to create when the user brings the Secret, or without apiAuth.
        let own = monitor(json!({
            "mqtt": {"url": "mqtt://b"},
            "apiAuth": {"tokenSecret": {"name": "reader-token"}},
        }));
        let own_plan = validate(&own, "img").unwrap();
        assert_eq!(generated_token_secret(&own_plan, "x".into()), None);
        let open = testing::minimal();
        let open_plan = validate(&open, "img").unwrap();
        assert_eq!(generated_token_secret(&open_plan, "x".into()), None);
    }
}
