//! The reconcile against kube-rs's mocked API server (`tower-test`), in the ApiServerVerifier
//! style of kube-rs/controller-rs. Each test lists the exact requests one reconcile must make, in
//! order: method, path, query, content type and the parts of the body that matter. The mocked
//! server answers each as a real API server does (the applied object back with a
//! resourceVersion, `metav1.Status` errors), and fails the test on a request out of order, a
//! missing one (the reconcile returned first) or an extra one.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{Method, Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::{
    Context, Error, MISSING_SECRET_RETRY, RESYNC, USAGE_REFRESH, backoff, error_policy, reconcile,
};
use crate::crd::{SessionMonitor, SessionMonitorStatus};
use crate::desired::{CHECKSUM_ANNOTATION, MANAGER, ROLE_LABEL, config_checksum};
use crate::metrics::Metrics;
use crate::status::{DEGRADED, USAGE_READ_FAILING, condition};
use crate::testing::{NAME, NAMESPACE, UID, monitor};
use crate::usage::{Source, Usage};
use crate::validate::{paths, validate};

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const IMAGE: &str = "example/session-monitor:test";
const SECRET: &str = "qlik-mqtt";
const SECRET_VERSION: &str = "77";
/// `spec.qlik.certificatesSecret` of [`with_qlik`].
const QLIK_SECRET: &str = "qlik-certificates";
const QLIK_SECRET_VERSION: &str = "88";
/// The query of every server-side apply, exactly as kube 5 writes it for
/// `PatchParams::apply(MANAGER).force()`: its query builder starts with `&`.
const APPLY_QUERY: &str = "&force=true&fieldManager=session-monitor-operator";
const APPLY: &str = "application/apply-patch+yaml";
const CORE: &str = "/api/v1";
const APPS: &str = "/apis/apps/v1";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1";
const MONITORING: &str = "/apis/monitoring.coreos.com/v1";
/// Reached only when the reconcile waits for an answer that never comes.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Scenarios: the API server's state when a reconcile starts, as the requests it must make.
// ---------------------------------------------------------------------------------------------

/// What the API server holds, as the exact requests a reconcile makes up to its status update.
/// Each test appends the Events and the status PATCH it expects, so those stay visible there.
enum Scenario {
    /// A valid spec: each Secret in `secrets` read once, every child applied in order (the
    /// Deployment answered as `deployment`), then the ServiceMonitor discovery.
    Applies {
        shards: u16,
        secrets: Vec<Value>,
        deployment: Rollout,
        monitoring: Monitoring,
    },
    /// As `Applies`, but the API server refuses the Deployment with 422 Invalid; the reconcile
    /// then reads the Deployment (absent) for the status.
    DeploymentRejected { shards: u16 },
    /// `spec.mqtt.credentialsSecret` names [`SECRET`], answered with `secret` (`None`: 404).
    /// Nothing is applied; the Deployment is read for the status.
    SecretUnusable {
        secret: Option<Value>,
        deployment: Rollout,
    },
    /// The spec fails validation: nothing applied, the Deployment read for the status.
    InvalidSpec { deployment: Rollout },
    /// The monitor is being deleted: no request at all.
    Deleted,
}

/// The Deployment as the API server returns it.
#[derive(Debug, Clone, Copy)]
enum Rollout {
    /// Does not exist.
    Absent,
    /// Just applied: the Deployment controller has not reported yet (no status).
    Pending,
    /// Its one pod updated and available for the current generation.
    Available,
}

/// Whether the Prometheus Operator's API is installed, and what the reconcile does with it.
enum Monitoring {
    /// Discovery answers 404: no ServiceMonitor request follows.
    NotInstalled,
    /// Installed and `serviceMonitor.enabled`: the ServiceMonitor is applied.
    Applied,
    /// Installed and not enabled: the ServiceMonitor is deleted (404: there was none).
    Deleted,
}

impl Scenario {
    /// The scenario's requests followed by `tail` (the Events and the status PATCH).
    fn then(self, tail: impl IntoIterator<Item = Call>) -> Vec<Call> {
        let mut calls = self.calls();
        calls.extend(tail);
        calls
    }

    fn calls(self) -> Vec<Call> {
        let deleted = matches!(self, Scenario::Deleted);
        let mut calls = self.calls_after_the_role();
        if !deleted {
            // First the grant as the Role has it (absent: a new monitor).
            calls.insert(0, read_role(None));
        }
        calls
    }

    /// The scenario's requests after the Role's read (for tests that put requests between).
    fn calls_after_the_role(self) -> Vec<Call> {
        match self {
            Scenario::Applies {
                shards,
                secrets,
                deployment,
                monitoring,
            } => {
                let mut calls: Vec<Call> = secrets.into_iter().map(read_secret).collect();
                calls.extend(children(shards));
                calls.push(apply_deployment().answering(stored(applied_deployment(deployment))));
                calls.push(discovery(!matches!(monitoring, Monitoring::NotInstalled)));
                match monitoring {
                    Monitoring::NotInstalled => {}
                    Monitoring::Applied => calls.push(apply_service_monitor()),
                    Monitoring::Deleted => calls.extend([
                        // Ours (controlled by this monitor), so it goes, with a uid precondition.
                        Call::new(Method::GET, path(MONITORING, "servicemonitors", NAME), "")
                            .answering(|_| {
                                Reply::Json(
                                    200,
                                    json!({
                                        "apiVersion": "monitoring.coreos.com/v1",
                                        "kind": "ServiceMonitor",
                                        "metadata": {
                                            "name": NAME, "namespace": NAMESPACE,
                                            "resourceVersion": "41",
                                            "uid": "0d6c0a57-0000-4000-8000-000000000041",
                                            "ownerReferences": [{
                                                "apiVersion": "sessionmonitor.io/v1alpha1",
                                                "kind": "SessionMonitor", "name": NAME,
                                                "uid": UID, "controller": true,
                                            }],
                                        },
                                        "spec": {"endpoints": [{"port": "http-metrics"}]},
                                    }),
                                )
                            }),
                        Call::new(
                            Method::DELETE,
                            path(MONITORING, "servicemonitors", NAME),
                            "",
                        )
                        .content_type("application/json")
                        .checking(|options| {
                            assert_eq!(
                                options["preconditions"]["uid"],
                                "0d6c0a57-0000-4000-8000-000000000041",
                                "{options}"
                            )
                        })
                        // Gone meanwhile: no failure.
                        .answering(not_found(
                            "monitoring.coreos.com",
                            "servicemonitors",
                            NAME,
                        )),
                    ]),
                }
                calls
            }
            Scenario::DeploymentRejected { shards } => {
                let mut calls = children(shards);
                calls.push(apply_deployment().answering(|_| {
                    failure(
                        422,
                        "Invalid",
                        &format!(
                            "Deployment.apps \"{NAME}\" is invalid: \
                             spec.template.spec.containers[0].image: Required value"
                        ),
                        json!({
                            "name": NAME, "group": "apps", "kind": "Deployment",
                            "causes": [{
                                "reason": "FieldValueRequired",
                                "message": "Required value",
                                "field": "spec.template.spec.containers[0].image"
                            }]
                        }),
                    )
                }));
                calls.push(read_deployment(Rollout::Absent));
                calls
            }
            Scenario::SecretUnusable { secret, deployment } => vec![
                match secret {
                    Some(secret) => read_secret(secret),
                    None => Call::new(Method::GET, path(CORE, "secrets", SECRET), "")
                        .answering(not_found("", "secrets", SECRET)),
                },
                read_deployment(deployment),
            ],
            Scenario::InvalidSpec { deployment } => vec![read_deployment(deployment)],
            Scenario::Deleted => Vec::new(),
        }
    }
}

/// Server-side applies of every child but the Deployment, in the order the reconcile must make
/// them: what the pod mounts and uses exists before the Deployment that starts it.
fn children(shards: u16) -> Vec<Call> {
    let checkpoints: Vec<String> = std::iter::once(format!("{NAME}-checkpoint"))
        .chain((1..=shards).map(|i| format!("{NAME}-checkpoint-{i}")))
        .collect();
    let resource_names = json!(checkpoints);
    let mut calls = vec![
        apply(CORE, "serviceaccounts", "ServiceAccount", NAME),
        apply(RBAC, "roles", "Role", NAME).checking(move |role| {
            // The service may read and replace its own checkpoints, and hold its checkpoint
            // writer's Lease, nothing else.
            assert_eq!(
                role["rules"],
                json!([{
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": resource_names,
                    "verbs": ["get", "update"],
                }, {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "resourceNames": [format!("{NAME}-writer")],
                    "verbs": ["get", "patch"],
                }, {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["create"],
                }])
            );
        }),
        apply(RBAC, "rolebindings", "RoleBinding", NAME).checking(|binding| {
            assert_eq!(
                binding["roleRef"],
                json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME})
            );
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}])
            );
        }),
        apply(CORE, "configmaps", "ConfigMap", &format!("{NAME}-config")).checking(move |cm| {
            assert_eq!(cm["metadata"]["labels"][ROLE_LABEL], "config");
            let toml = cm["data"][paths::CONFIG_KEY]
                .as_str()
                .expect("the service configuration");
            assert!(
                toml.contains(&format!("checkpoint_configmap = \"{NAME}-checkpoint\"")),
                "{toml}"
            );
            assert!(
                toml.contains(&format!("checkpoint_configmap_shards = {shards}")),
                "{toml}"
            );
        }),
    ];
    for name in &checkpoints {
        calls.push(apply(CORE, "configmaps", "ConfigMap", name).checking(|cm| {
            assert_eq!(cm["metadata"]["labels"][ROLE_LABEL], "checkpoint");
            // No data applied: the service's checkpoint stays untouched.
            assert_eq!(cm.get("data"), None);
            assert_eq!(cm.get("binaryData"), None);
        }));
    }
    calls.push(
        apply(CORE, "services", "Service", NAME)
            .checking(|service| {
                assert_eq!(service["spec"]["type"], "ClusterIP");
                assert_eq!(
                    service["spec"]["selector"],
                    json!({"app.kubernetes.io/name": "session-monitor", "app.kubernetes.io/instance": NAME})
                );
                assert_eq!(
                    service["spec"]["ports"],
                    json!([
                        {"name": "udp-ingest", "port": 9997, "targetPort": "udp-ingest", "protocol": "UDP"},
                    ])
                );
            })
            .answering(stored(json!({
                "spec": {
                    "clusterIP": "10.96.14.7", "clusterIPs": ["10.96.14.7"],
                    "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                    "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
                },
                "status": {"loadBalancer": {}},
            }))),
    );
    calls.push(
        apply(CORE, "services", "Service", &format!("{NAME}-http"))
            .checking(|service| {
                assert_eq!(service["spec"]["type"], "ClusterIP");
                assert_eq!(service["metadata"]["labels"][ROLE_LABEL], "http");
                assert_eq!(
                    service["spec"]["ports"],
                    json!([
                        {"name": "http-metrics", "port": 9842, "targetPort": "http-metrics", "protocol": "TCP"},
                    ])
                );
            })
            .answering(stored(json!({
                "spec": {"clusterIP": "10.96.14.8", "clusterIPs": ["10.96.14.8"]},
                "status": {"loadBalancer": {}},
            }))),
    );
    calls
}

fn apply_deployment() -> Call {
    apply(APPS, "deployments", "Deployment", NAME).checking(|deployment| {
        let spec = &deployment["spec"];
        assert_eq!(spec["replicas"], 1);
        // A surge: the Services keep a ready endpoint through a rollout.
        assert_eq!(
            spec["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
        );
        assert_eq!(
            spec["selector"]["matchLabels"]["app.kubernetes.io/instance"],
            NAME
        );
        let checksum = spec["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION]
            .as_str()
            .expect("the configuration checksum on the pod template");
        assert_eq!(checksum.len(), 32, "{checksum}");
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], NAME);
        assert_eq!(pod["containers"][0]["image"], IMAGE);
        assert_eq!(
            pod["volumes"][0],
            json!({"name": "config", "configMap": {"name": format!("{NAME}-config")}})
        );
    })
}

fn apply_service_monitor() -> Call {
    apply(MONITORING, "servicemonitors", "ServiceMonitor", NAME)
        .checking(|sm| {
            assert_eq!(
                sm["spec"]["endpoints"],
                json!([{"port": "http-metrics", "path": "/metrics"}])
            );
            assert_eq!(
                sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
                NAME
            );
            assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
        })
        .answering(stored(json!({"metadata": {"generation": 1}})))
}

/// A forced server-side apply by [`MANAGER`] of `kind` `name`, owned by the monitor and labelled
/// as the operator's.
fn apply(api: &str, plural: &str, kind: &str, name: &str) -> Call {
    let api_version = api
        .trim_start_matches("/apis/")
        .trim_start_matches("/api/")
        .to_owned();
    let (kind, name) = (kind.to_owned(), name.to_owned());
    Call::new(Method::PATCH, path(api, plural, &name), APPLY_QUERY)
        .content_type(APPLY)
        .checking(move |object| {
            assert_eq!(object["apiVersion"], api_version.as_str());
            assert_eq!(object["kind"], kind.as_str());
            assert_eq!(object["metadata"]["name"], name.as_str());
            assert_eq!(object["metadata"]["namespace"], NAMESPACE);
            let owners = object["metadata"]["ownerReferences"]
                .as_array()
                .expect("owner references");
            assert_eq!(owners.len(), 1, "{owners:?}");
            assert_eq!(owners[0]["apiVersion"], "sessionmonitor.io/v1alpha1");
            assert_eq!(owners[0]["kind"], "SessionMonitor");
            assert_eq!(owners[0]["name"], NAME);
            assert_eq!(owners[0]["uid"], UID);
            assert_eq!(owners[0]["controller"], true);
            let labels = &object["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/instance"], NAME);
            assert_eq!(
                labels["app.kubernetes.io/managed-by"],
                "session-monitor-operator"
            );
        })
        .answering(stored(json!({})))
}

/// The reconcile reads the monitor's Role first: the record of the checkpoint shards granted.
/// `granted`: the shards it names (`None`: no Role yet).
fn read_role(granted: Option<u16>) -> Call {
    Call::new(Method::GET, path(RBAC, "roles", NAME), "").answering(move |_| match granted {
        None => not_found("rbac.authorization.k8s.io", "roles", NAME)(&Value::Null),
        Some(shards) => {
            let names: Vec<String> = std::iter::once(format!("{NAME}-checkpoint"))
                .chain((1..=shards).map(|i| format!("{NAME}-checkpoint-{i}")))
                .collect();
            Reply::Json(
                200,
                json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": NAME, "namespace": NAMESPACE, "resourceVersion": "7"},
                    "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                               "resourceNames": names, "verbs": ["get", "update"]}],
                }),
            )
        }
    })
}

fn read_secret(secret: Value) -> Call {
    let name = secret["metadata"]["name"]
        .as_str()
        .expect("a named Secret")
        .to_owned();
    Call::new(Method::GET, path(CORE, "secrets", &name), "")
        .answering(move |_| Reply::Json(200, secret))
}

fn read_deployment(rollout: Rollout) -> Call {
    let call = Call::new(Method::GET, path(APPS, "deployments", NAME), "");
    match rollout {
        Rollout::Absent => call.answering(not_found("apps", "deployments", NAME)),
        running => call.answering(move |_| Reply::Json(200, deployment(running))),
    }
}

/// The discovery of `monitoring.coreos.com/v1`: its resources, or 404 as the API server (1.24+)
/// answers for a group that is not installed.
fn discovery(installed: bool) -> Call {
    let call = Call::new(Method::GET, MONITORING, "");
    if installed {
        call.answering(|_| {
            let resource = |name: &str, singular: &str, kind: &str| {
                json!({
                    "name": name, "singularName": singular, "namespaced": true, "kind": kind,
                    "verbs": ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"],
                    "categories": ["prometheus-operator"],
                })
            };
            Reply::Json(
                200,
                json!({
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": "monitoring.coreos.com/v1",
                    "resources": [
                        resource("podmonitors", "podmonitor", "PodMonitor"),
                        resource("prometheuses", "prometheus", "Prometheus"),
                        resource("servicemonitors", "servicemonitor", "ServiceMonitor"),
                    ],
                }),
            )
        })
    } else {
        call.answering(|_| {
            failure(
                404,
                "NotFound",
                "the server could not find the requested resource",
                json!({}),
            )
        })
    }
}

/// An events.k8s.io/v1 Event about the monitor, as kube's `Recorder` creates it.
fn event(type_: &'static str, reason: &'static str) -> Call {
    Call::new(
        Method::POST,
        format!("/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"),
        "",
    )
    .content_type("application/json")
    .checking(move |event| {
        assert_eq!(event["apiVersion"], "events.k8s.io/v1");
        assert_eq!(event["kind"], "Event");
        assert_eq!(
            (event["type"].as_str(), event["reason"].as_str()),
            (Some(type_), Some(reason))
        );
        assert_eq!(event["action"], "Reconcile");
        assert_eq!(event["reportingController"], MANAGER);
        assert_eq!(event["reportingInstance"], MANAGER);
        assert!(
            event["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&format!("{NAME}."))),
            "{event}"
        );
        let regarding = &event["regarding"];
        assert_eq!(regarding["apiVersion"], "sessionmonitor.io/v1alpha1");
        assert_eq!(regarding["kind"], "SessionMonitor");
        assert_eq!(regarding["name"], NAME);
        assert_eq!(regarding["namespace"], NAMESPACE);
        assert_eq!(regarding["uid"], UID);
        assert!(!note(event).is_empty(), "{event}");
    })
    .answering(|request| match stored(json!({}))(request) {
        Reply::Json(_, object) => Reply::Json(201, object),
        text => text,
    })
}

fn note(event: &Value) -> &str {
    event["note"].as_str().unwrap_or_default()
}

/// The status written with server-side apply: only `status`, never the user's spec. Answered
/// with the whole monitor carrying it, as the API server does.
fn status_patch(monitor: &SessionMonitor) -> Call {
    let generation = monitor.metadata.generation;
    let mut current = serde_json::to_value(monitor).expect("a SessionMonitor serializes");
    Call::new(
        Method::PATCH,
        path(
            "/apis/sessionmonitor.io/v1alpha1",
            "sessionmonitors",
            &format!("{NAME}/status"),
        ),
        APPLY_QUERY,
    )
    .content_type(APPLY)
    .checking(move |patch| {
        let fields: Vec<&String> = patch.as_object().expect("an object").keys().collect();
        assert_eq!(fields, ["apiVersion", "kind", "status"]);
        assert_eq!(patch["apiVersion"], "sessionmonitor.io/v1alpha1");
        assert_eq!(patch["kind"], "SessionMonitor");
        assert_eq!(patch["status"]["observedGeneration"], json!(generation));
    })
    .answering(move |patch| {
        current["status"] = patch["status"].clone();
        current["metadata"]["resourceVersion"] = json!(next_resource_version());
        Reply::Json(200, current)
    })
}

// ---------------------------------------------------------------------------------------------
// Objects as the API server returns them.
// ---------------------------------------------------------------------------------------------

fn path(api: &str, plural: &str, name: &str) -> String {
    format!("{api}/namespaces/{NAMESPACE}/{plural}/{name}")
}

/// The MQTT credentials Secret [`SECRET`] with `keys`.
fn secret(keys: &[&str]) -> Value {
    named_secret(SECRET, SECRET_VERSION, "beef", keys)
}

/// The Qlik certificates Secret [`QLIK_SECRET`] with `keys`.
fn qlik_secret(keys: &[&str]) -> Value {
    named_secret(QLIK_SECRET, QLIK_SECRET_VERSION, "cafe", keys)
}

fn named_secret(name: &str, version: &str, uid: &str, keys: &[&str]) -> Value {
    let data: BTreeMap<&str, &str> = keys
        .iter()
        .map(|&key| {
            let value = match key {
                "username" => "c2Vzc2lvbi1tb25pdG9y",
                // "-----BEGIN CERTIFICATE-----\n…", as kubectl stores a PEM file.
                k if k.ends_with(".pem") => "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==",
                _ => "Y2hhbmdlLW1l",
            };
            (key, value)
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": name, "namespace": NAMESPACE,
            "uid": format!("5f1c3a2e-0000-4000-8000-00000000{uid}"),
            "resourceVersion": version,
            "creationTimestamp": "2026-11-01T08:00:00Z",
        },
        "data": data,
    })
}

fn available() -> Value {
    json!({
        "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
        "readyReplicas": 1, "availableReplicas": 1,
        "conditions": [{
            "type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
            "message": "Deployment has minimum availability.",
            "lastUpdateTime": "2026-11-02T10:00:30Z", "lastTransitionTime": "2026-11-02T10:00:30Z",
        }],
    })
}

/// What the API server adds to an applied Deployment: a generation, and a status once the
/// Deployment controller reported one.
fn applied_deployment(rollout: Rollout) -> Value {
    match rollout {
        Rollout::Absent => panic!("an applied Deployment exists"),
        Rollout::Pending => json!({"metadata": {"generation": 1}}),
        Rollout::Available => json!({"metadata": {"generation": 1}, "status": available()}),
    }
}

/// A Deployment a previous reconcile left running.
fn deployment(rollout: Rollout) -> Value {
    let labels =
        json!({"app.kubernetes.io/name": "session-monitor", "app.kubernetes.io/instance": NAME});
    let mut object = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": NAME, "namespace": NAMESPACE, "generation": 1, "resourceVersion": "900",
            "uid": "5f1c3a2e-0000-4000-8000-00000000d001",
            "creationTimestamp": "2026-11-02T10:00:00Z",
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "session-monitor", "image": IMAGE}]},
            },
        },
    });
    if let Rollout::Available = rollout {
        object["status"] = available();
    }
    object
}

static RESOURCE_VERSION: AtomicU64 = AtomicU64::new(1000);

fn next_resource_version() -> String {
    RESOURCE_VERSION.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The request's object as the API server stores it, with `extra` merged over it.
fn stored(extra: Value) -> impl FnOnce(&Value) -> Reply + Send + 'static {
    move |request| {
        let mut object = request.clone();
        let version = next_resource_version();
        let metadata = &mut object["metadata"];
        metadata["uid"] = json!(format!("5f1c3a2e-0000-4000-8000-{version:0>12}"));
        metadata["resourceVersion"] = json!(version);
        metadata["creationTimestamp"] = json!("2026-11-02T10:00:00Z");
        merge(&mut object, extra);
        Reply::Json(200, object)
    }
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

/// A `metav1.Status` error, as the API server sends it.
fn failure(code: u16, reason: &str, message: &str, details: Value) -> Reply {
    Reply::Json(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "details": details, "code": code,
        }),
    )
}

fn not_found(group: &str, plural: &str, name: &str) -> impl FnOnce(&Value) -> Reply + Send {
    let resource = if group.is_empty() {
        plural.to_owned()
    } else {
        format!("{plural}.{group}")
    };
    let message = format!("{resource} \"{name}\" not found");
    let mut details = json!({"name": name, "kind": plural});
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    move |_| failure(404, "NotFound", &message, details)
}

// ---------------------------------------------------------------------------------------------
// The verifier: a mocked API server that expects `Call`s in order.
// ---------------------------------------------------------------------------------------------

/// An API server's answer: JSON, or plain text where a real server (or a proxy) sends that.
enum Reply {
    Json(u16, Value),
    Text(u16, &'static str),
}

type Check = Box<dyn Fn(&Value) + Send>;
type Answer = Box<dyn FnOnce(&Value) -> Reply + Send>;

/// One request the reconcile must make next, and the answer it gets.
struct Call {
    method: Method,
    path: String,
    query: &'static str,
    content_type: Option<&'static str>,
    /// Assertions on the JSON body (`Null` when there is none).
    checks: Vec<Check>,
    answer: Answer,
}

impl Call {
    fn new(method: Method, path: impl Into<String>, query: &'static str) -> Call {
        Call {
            method,
            path: path.into(),
            query,
            content_type: None,
            checks: Vec::new(),
            answer: Box::new(|_| panic!("this call has no answer")),
        }
    }

    fn content_type(mut self, content_type: &'static str) -> Call {
        self.content_type = Some(content_type);
        self
    }

    fn checking(mut self, check: impl Fn(&Value) + Send + 'static) -> Call {
        self.checks.push(Box::new(check));
        self
    }

    fn answering(mut self, answer: impl FnOnce(&Value) -> Reply + Send + 'static) -> Call {
        self.answer = Box::new(answer);
        self
    }

    fn describe(&self) -> String {
        format!("{} {}?{}", self.method, self.path, self.query)
    }
}

/// A request the reconcile made.
struct Seen {
    request: String,
    body: Value,
}

/// What one reconcile returned, and every request it made in order.
struct Run {
    result: Result<Action, Error>,
    seen: Vec<Seen>,
}

impl Run {
    /// What the reconcile asked the controller to do next; panics on an error.
    fn action(&self) -> Action {
        match &self.result {
            Ok(action) => action.clone(),
            Err(e) => panic!("the reconcile failed: {e}"),
        }
    }

    /// `METHOD path` of every request, in order.
    fn requests(&self) -> Vec<&str> {
        self.seen
            .iter()
            .map(|s| {
                s.request
                    .split_once('?')
                    .map_or(s.request.as_str(), |r| r.0)
            })
            .collect()
    }

    fn body(&self, request: &str) -> &Value {
        let seen = self
            .seen
            .iter()
            .find(|s| s.request.starts_with(&format!("{request}?")))
            .unwrap_or_else(|| panic!("no {request} in {:?}", self.requests()));
        &seen.body
    }

    /// The status the reconcile wrote.
    fn status(&self) -> SessionMonitorStatus {
        let patch = self.body(&format!(
            "PATCH /apis/sessionmonitor.io/v1alpha1/namespaces/{NAMESPACE}/sessionmonitors/{NAME}/status"
        ));
        serde_json::from_value(patch["status"].clone()).expect("a SessionMonitorStatus")
    }
}

/// A reconciler [`Context`] whose client talks to the verifier; runs one reconcile at a time.
struct ApiServer {
    ctx: Arc<Context>,
    handle: Option<ApiServerHandle>,
}

impl ApiServer {
    fn new() -> ApiServer {
        ApiServer::reading_usage(Arc::new(|_, _| {
            Box::pin(async { Err("connection refused".to_owned()) })
        }))
    }

    /// An [`ApiServer`] whose reconciler reads a ready service's usage from `source`.
    fn reading_usage(source: Source) -> ApiServer {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NAMESPACE);
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "session-monitor-operator".into(),
                instance: None,
            },
        );
        let ctx = Context::new(client, IMAGE.into(), recorder, Arc::new(Metrics::new()))
            .with_usage(source);
        ApiServer {
            ctx: Arc::new(ctx),
            handle: Some(handle),
        }
    }

    /// Reconciles `monitor` while the verifier expects exactly `calls`.
    async fn reconcile(&mut self, monitor: &SessionMonitor, calls: Vec<Call>) -> Run {
        let handle = self.handle.take().expect("one reconcile at a time");
        let (returned, reconciled) = oneshot::channel();
        let verifier = tokio::spawn(verify(handle, calls, reconciled));
        let result = tokio::time::timeout(
            RECONCILE_TIMEOUT,
            reconcile(Arc::new(monitor.clone()), self.ctx.clone()),
        )
        .await;
        let _ = returned.send(());
        let (handle, seen) = match verifier.await {
            Ok(verified) => verified,
            Err(e) if e.is_panic() => resume_unwind(e.into_panic()),
            Err(e) => panic!("the verifier did not finish: {e}"),
        };
        self.handle = Some(handle);
        let result = result.expect("the reconcile waits for an answer that never comes");
        Run { result, seen }
    }

    fn reconciles(&self, result: &str) -> u64 {
        self.ctx
            .metrics
            .reconciles
            .with_label_values(&[result])
            .get()
    }
}

/// Answers `calls` in order, asserting each request; then fails on any further request until the
/// reconcile returned. A panic here drops the answer, so the reconcile fails fast.
async fn verify(
    mut handle: ApiServerHandle,
    calls: Vec<Call>,
    mut reconciled: oneshot::Receiver<()>,
) -> (ApiServerHandle, Vec<Seen>) {
    let total = calls.len();
    let mut seen: Vec<Seen> = Vec::new();
    let made = |seen: &[Seen]| seen.iter().map(|s| s.request.clone()).collect::<Vec<_>>();
    for (i, call) in calls.into_iter().enumerate() {
        let expected = call.describe();
        let number = i + 1;
        let (request, respond) = tokio::select! {
            biased;
            next = handle.next_request() => next.unwrap_or_else(|| {
                panic!("the client went away before request {number}/{total}: {expected}")
            }),
            _ = &mut reconciled => panic!(
                "missing request {number}/{total}: the reconcile returned without {expected}; \
                 it made {:#?}",
                made(&seen)
            ),
        };
        let method = request.method().clone();
        let actual = format!(
            "{method} {}?{}",
            request.uri().path(),
            request.uri().query().unwrap_or_default()
        );
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("a request body");
        assert_eq!(
            actual,
            expected,
            "request {number}/{total} after {:#?}",
            made(&seen)
        );
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON request body")
        };
        if let Some(expected) = call.content_type {
            assert_eq!(content_type.as_deref(), Some(expected), "{actual}");
        }
        for check in &call.checks {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&body))) {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a check failed");
                panic!("request {number}/{total} {actual}: {message}\nbody: {body:#}");
            }
        }
        let (code, content_type, bytes) = match (call.answer)(&body) {
            Reply::Json(code, value) => (
                code,
                "application/json",
                serde_json::to_vec(&value).expect("JSON"),
            ),
            Reply::Text(code, text) => (code, "text/plain; charset=utf-8", text.into()),
        };
        respond.send_response(
            Response::builder()
                .status(code)
                .header(CONTENT_TYPE, content_type)
                .body(Body::from(bytes))
                .expect("a response"),
        );
        seen.push(Seen {
            request: actual,
            body,
        });
    }
    tokio::select! {
        biased;
        next = handle.next_request() => {
            if let Some((request, _)) = next {
                panic!(
                    "unexpected request after the {total} expected: {} {}; it made {:#?}",
                    request.method(),
                    request.uri(),
                    made(&seen)
                );
            }
        }
        _ = &mut reconciled => {}
    }
    (handle, seen)
}

// ---------------------------------------------------------------------------------------------
// Assertions on the written status.
// ---------------------------------------------------------------------------------------------

/// `Type=Status/Reason` of every condition, in order.
fn summary(status: &SessionMonitorStatus) -> Vec<String> {
    status
        .conditions
        .iter()
        .map(|c| format!("{}={}/{}", c.type_, c.status, c.reason))
        .collect()
}

fn degraded_message(status: &SessionMonitorStatus) -> String {
    condition(Some(status), DEGRADED)
        .expect("a Degraded condition")
        .message
        .clone()
}

/// The smallest valid spec with 2 checkpoint shards, so the sequence stays readable.
fn new_monitor() -> SessionMonitor {
    monitor(json!({
        "mqtt": {"url": "mqtt://broker.mqtt.svc:1883"},
        "checkpoint": {"shards": 2},
    }))
}

fn with_credentials() -> SessionMonitor {
    monitor(json!({
        "mqtt": {"url": "mqtt://broker.mqtt.svc:1883", "credentialsSecret": {"name": SECRET}},
        "checkpoint": {"shards": 2},
    }))
}

/// MQTT credentials and `spec.qlik` with static proxies and a key passphrase.
fn with_qlik() -> SessionMonitor {
    monitor(json!({
        "mqtt": {"url": "mqtt://broker.mqtt.svc:1883", "credentialsSecret": {"name": SECRET}},
        "checkpoint": {"shards": 2},
        "qlik": {
            "proxies": ["https://qs-node1.corp.local:4243/", "https://qs-node1.corp.local:4243/sales"],
            "certificatesSecret": {"name": QLIK_SECRET, "passphraseKey": "passphrase"},
            "reconcileInterval": "2m",
            "hostAliases": {"qs-node1.corp.local": "PROXY1"},
            "resolve": [{"hostname": "qs-node1.corp.local", "ip": "10.20.0.11"}],
        },
    }))
}

/// `calls` with `check` added to the one request `METHOD path`.
fn also_checking(
    calls: Vec<Call>,
    request: &str,
    check: impl Fn(&Value) + Send + 'static,
) -> Vec<Call> {
    let mut check = Some(check);
    let calls: Vec<Call> = calls
        .into_iter()
        .map(
            |call| match format!("{} {}", call.method, call.path) == request {
                true => call.checking(check.take().expect("one such request")),
                false => call,
            },
        )
        .collect();
    assert!(check.is_none(), "no {request} among the calls");
    calls
}

fn applies(deployment: Rollout) -> Scenario {
    Scenario::Applies {
        shards: 2,
        secrets: Vec::new(),
        deployment,
        monitoring: Monitoring::NotInstalled,
    }
}

// ---------------------------------------------------------------------------------------------
// The scenarios.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_new_monitor_applies_every_child_in_order_then_reports_the_rollout() {
    let m = new_monitor();
    let mut server = ApiServer::new();
    // A first rollout is no transition worth an Event: only the status is written.
    let calls = applies(Rollout::Pending).then([status_patch(&m)]);
    let run = server.reconcile(&m, calls).await;

    assert_eq!(run.action(), Action::requeue(RESYNC));
    // The order is part of the contract: the Deployment last, so that everything its pod
    // mounts and uses exists when it starts.
    assert_eq!(
        run.requests(),
        [
            "GET /apis/rbac.authorization.k8s.io/v1/namespaces/qlik/roles/qlik-prod",
            "PATCH /api/v1/namespaces/qlik/serviceaccounts/qlik-prod",
            "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/qlik/roles/qlik-prod",
            "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/qlik/rolebindings/qlik-prod",
            "PATCH /api/v1/namespaces/qlik/configmaps/qlik-prod-config",
            "PATCH /api/v1/namespaces/qlik/configmaps/qlik-prod-checkpoint",
            "PATCH /api/v1/namespaces/qlik/configmaps/qlik-prod-checkpoint-1",
            "PATCH /api/v1/namespaces/qlik/configmaps/qlik-prod-checkpoint-2",
            "PATCH /api/v1/namespaces/qlik/services/qlik-prod",
            "PATCH /api/v1/namespaces/qlik/services/qlik-prod-http",
            "PATCH /apis/apps/v1/namespaces/qlik/deployments/qlik-prod",
            "GET /apis/monitoring.coreos.com/v1",
            "PATCH /apis/sessionmonitor.io/v1alpha1/namespaces/qlik/sessionmonitors/qlik-prod/status",
        ]
    );
    let status = run.status();
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(
        summary(&status),
        [
            "Ready=False/Unavailable",
            "Progressing=True/RollingOut",
            "Degraded=False/Reconciled"
        ]
    );
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(3))
    );
    assert_eq!(status.endpoint.as_deref(), Some("qlik-prod.qlik.svc:9997"));
    assert_eq!(server.reconciles("Reconciled"), 1);
}

/// A serving monitor's users, sessions, newest event and checkpoint, read from its HTTP
/// Service, are in its status (for `kubectl get`'s USERS and SESSIONS), and read again sooner.
#[tokio::test]
async fn a_ready_monitor_shows_its_users_and_is_read_again_within_30_seconds() {
    let m = with_credentials();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let source: Source = {
        let asked = asked.clone();
        Arc::new(move |host, port| {
            asked.lock().unwrap().push((host, port));
            Box::pin(async {
                Ok(Usage {
                    active_users: Some(42),
                    active_sessions: Some(57),
                    last_event: Some(Time("2025-11-25T10:05:00Z".parse().unwrap())),
                    checkpoint_bytes: Some(12_345),
                    checkpoint_shards_in_use: Some(0),
                    checkpoint_shards_wanted: Some(0),
                })
            })
        })
    };
    let mut server = ApiServer::reading_usage(source);
    let scenario = Scenario::Applies {
        shards: 2,
        secrets: vec![secret(&["username", "password"])],
        deployment: Rollout::Available,
        monitoring: Monitoring::NotInstalled,
    };
    let run = server
        .reconcile(
            &m,
            scenario.then([event("Normal", "Ready"), status_patch(&m)]),
        )
        .await;
    assert_eq!(run.action(), Action::requeue(USAGE_REFRESH));
    assert_eq!(
        server
            .ctx
            .metrics
            .usage_reads(crate::metrics::UsageRead::Ok)
            .get(),
        1
    );
    // Through the HTTP Service's cluster IP, as the API server answered its apply: no DNS.
    assert_eq!(
        *asked.lock().unwrap(),
        [("10.96.14.8".to_owned(), m.spec.metrics.port)]
    );
    let status = run.status();
    assert_eq!(
        (status.active_users, status.active_sessions),
        (Some(42), Some(57))
    );
    assert_eq!(
        status.last_event_time.unwrap().0.to_string(),
        "2025-11-25T10:05:00Z"
    );
    assert_eq!(
        (status.checkpoint_bytes, status.checkpoint_shards_in_use),
        (Some(12_345), Some(0))
    );
}

/// A read of the service that fails is a status condition that says why, and is tried again
/// soon with back-off (once it waited for the 5-minute resync: a loaded CI machine saw the
/// shard autopilot blind for minutes); a read that succeeds clears it.
#[tokio::test]
async fn a_failing_usage_read_is_a_condition_and_is_retried_with_backoff() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let m = with_credentials();
    let answers = Arc::new(AtomicBool::new(false));
    let source: Source = {
        let answers = answers.clone();
        Arc::new(move |host, port| {
            let answers = answers.load(Ordering::SeqCst);
            Box::pin(async move {
                match answers {
                    true => Ok(Usage {
                        active_users: Some(7),
                        ..Usage::default()
                    }),
                    false => Err(format!(
                        "http://{host}:{port}/metrics did not answer within 5s"
                    )),
                }
            })
        })
    };
    let mut server = ApiServer::reading_usage(source);
    let scenario = || Scenario::Applies {
        shards: 2,
        secrets: vec![secret(&["username", "password"])],
        deployment: Rollout::Available,
        monitoring: Monitoring::NotInstalled,
    };
    let first = server
        .reconcile(
            &m,
            scenario().then([event("Normal", "Ready"), status_patch(&m)]),
        )
        .await;
    assert_eq!(first.action(), Action::requeue(Duration::from_secs(2)));
    let status = first.status();
    let failing = condition(Some(&status), USAGE_READ_FAILING).expect("the condition");
    assert_eq!(
        (failing.status.as_str(), failing.reason.as_str()),
        ("True", "ReadFailed")
    );
    assert_eq!(
        failing.message,
        "cannot read the service's /metrics: http://10.96.14.8:9842/metrics did not answer within 5s (1 reads in a row failed; next in 2s)"
    );
    assert_eq!(status.active_users, None, "unknown, not stale");

    // Again: the delay doubles, the condition keeps the time it became true.
    let mut again = m.clone();
    again.status = Some(status.clone());
    let second = server
        .reconcile(&again, scenario().then([status_patch(&again)]))
        .await;
    assert_eq!(second.action(), Action::requeue(Duration::from_secs(4)));
    let status = second.status();
    let still = condition(Some(&status), USAGE_READ_FAILING).expect("still failing");
    assert!(
        still
            .message
            .contains("(2 reads in a row failed; next in 4s)"),
        "{}",
        still.message
    );
    assert_eq!(still.last_transition_time, failing.last_transition_time);
    assert_eq!(
        server
            .ctx
            .metrics
            .usage_reads(crate::metrics::UsageRead::Failed)
            .get(),
        2
    );

    // It answers: the numbers, no condition, the normal refresh; a later failure starts at 2s.
    answers.store(true, Ordering::SeqCst);
    let mut failed_twice = m.clone();
    failed_twice.status = Some(status);
    let third = server
        .reconcile(
            &failed_twice,
            scenario().then([status_patch(&failed_twice)]),
        )
        .await;
    assert_eq!(third.action(), Action::requeue(USAGE_REFRESH));
    let status = third.status();
    assert!(
        condition(Some(&status), USAGE_READ_FAILING).is_none(),
        "{status:?}"
    );
    assert_eq!(status.active_users, Some(7));
}

#[tokio::test]
async fn an_available_deployment_makes_the_monitor_ready_and_the_secret_rolls_the_pod() {
    let m = with_credentials();
    let mut server = ApiServer::new();
    let scenario = Scenario::Applies {
        shards: 2,
        // Read once although two of its keys are used.
        secrets: vec![secret(&["username", "password"])],
        deployment: Rollout::Available,
        monitoring: Monitoring::NotInstalled,
    };
    let ready = event("Normal", "Ready").checking(|e| {
        assert!(note(e).contains("qlik-prod.qlik.svc:9997"), "{e}");
    });
    let run = server
        .reconcile(&m, scenario.then([ready, status_patch(&m)]))
        .await;

    // Its /metrics cannot be read (this verifier's source refuses): read again soon.
    assert_eq!(run.action(), Action::requeue(Duration::from_secs(2)));
    let status = run.status();
    assert_eq!(
        summary(&status),
        [
            "Ready=True/Available",
            "Progressing=False/Complete",
            "Degraded=False/Reconciled",
            "UsageReadFailing=True/ReadFailed"
        ]
    );
    // The Secret's resourceVersion is in the pod template's checksum: a rotated credential
    // restarts the pod, which reads it only at start.
    let deployment = run.body(&format!("PATCH {}", path(APPS, "deployments", NAME)));
    let plan = validate(&m, IMAGE).expect("a valid spec");
    let versions = BTreeMap::from([(SECRET.to_owned(), SECRET_VERSION.to_owned())]);
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION],
        config_checksum(&plan, &versions)
    );
    assert_ne!(
        config_checksum(&plan, &versions),
        config_checksum(&plan, &BTreeMap::new())
    );
}

#[tokio::test]
async fn a_missing_secret_applies_nothing_and_degrades() {
    let m = with_credentials();
    let mut server = ApiServer::new();
    let scenario = Scenario::SecretUnusable {
        secret: None,
        deployment: Rollout::Absent,
    };
    let warning = event("Warning", "MissingSecret").checking(|e| {
        assert!(note(e).contains("\"qlik-mqtt\""), "{e}");
    });
    let run = server
        .reconcile(&m, scenario.then([warning, status_patch(&m)]))
        .await;

    // A Secret is not watched: look again soon.
    assert_eq!(run.action(), Action::requeue(MISSING_SECRET_RETRY));
    assert_eq!(
        run.requests(),
        [
            "GET /apis/rbac.authorization.k8s.io/v1/namespaces/qlik/roles/qlik-prod",
            "GET /api/v1/namespaces/qlik/secrets/qlik-mqtt",
            "GET /apis/apps/v1/namespaces/qlik/deployments/qlik-prod",
            "POST /apis/events.k8s.io/v1/namespaces/qlik/events",
            "PATCH /apis/sessionmonitor.io/v1alpha1/namespaces/qlik/sessionmonitors/qlik-prod/status",
        ],
        "nothing applied"
    );
    let status = run.status();
    assert_eq!(
        summary(&status),
        [
            "Ready=False/NotDeployed",
            "Progressing=False/MissingSecret",
            "Degraded=True/MissingSecret"
        ]
    );
    assert_eq!(
        degraded_message(&status),
        "Secret \"qlik-mqtt\" does not exist in namespace \"qlik\""
    );
    assert_eq!(status.endpoint, None);
    assert_eq!(server.reconciles("MissingSecret"), 1);
}

#[tokio::test]
async fn a_secret_without_the_password_key_degrades_but_the_running_pod_stays_ready() {
    let m = with_credentials();
    let mut server = ApiServer::new();
    let scenario = Scenario::SecretUnusable {
        secret: Some(secret(&["username"])),
        deployment: Rollout::Available,
    };
    let warning = event("Warning", "MissingSecret").checking(|e| {
        assert!(note(e).contains("no key \"password\""), "{e}");
    });
    let calls = scenario.then([warning, event("Normal", "Ready"), status_patch(&m)]);
    let run = server.reconcile(&m, calls).await;

    assert_eq!(run.action(), Action::requeue(MISSING_SECRET_RETRY));
    let status = run.status();
    assert_eq!(
        summary(&status),
        [
            "Ready=True/Available",
            "Progressing=False/MissingSecret",
            "Degraded=True/MissingSecret"
        ]
    );
    assert_eq!(
        degraded_message(&status),
        "Secret \"qlik-mqtt\" has no key \"password\""
    );
}

#[tokio::test]
async fn a_monitor_with_qlik_reads_its_certificates_renders_the_settings_and_mounts_the_secret() {
    let m = with_qlik();
    let mut server = ApiServer::new();
    let scenario = Scenario::Applies {
        shards: 2,
        // Each Secret read once, in the order the spec references them.
        secrets: vec![
            secret(&["username", "password"]),
            qlik_secret(&["client.pem", "client_key.pem", "root.pem", "passphrase"]),
        ],
        deployment: Rollout::Pending,
        monitoring: Monitoring::NotInstalled,
    };
    let calls = also_checking(
        scenario.calls(),
        &format!(
            "PATCH {}",
            path(CORE, "configmaps", &format!("{NAME}-config"))
        ),
        |cm| {
            let toml = cm["data"][paths::CONFIG_KEY].as_str().unwrap();
            let settings: session_monitor_config::Settings =
                toml::from_str(toml).expect("the service's settings");
            assert_eq!(
                settings.qlik_proxies,
                Some(vec![
                    "https://qs-node1.corp.local:4243/".to_owned(),
                    "https://qs-node1.corp.local:4243/sales".to_owned(),
                ])
            );
            assert_eq!(settings.qlik_repository_url, None);
            let file = |p: &str| Some(std::path::PathBuf::from(p));
            assert_eq!(
                settings.qlik_client_cert_file,
                file("/etc/session-monitor/qlik/client.pem")
            );
            assert_eq!(
                settings.qlik_client_key_file,
                file("/etc/session-monitor/qlik/client_key.pem")
            );
            assert_eq!(
                settings.qlik_ca_file,
                file("/etc/session-monitor/qlik/root.pem")
            );
            assert_eq!(
                settings.qlik_client_key_passphrase_file,
                file("/etc/session-monitor/qlik/passphrase")
            );
            assert_eq!(
                settings.qlik_reconcile_interval,
                Some(Duration::from_secs(120))
            );
            assert_eq!(
                settings.qlik_host_aliases,
                Some(vec!["qs-node1.corp.local=PROXY1".to_owned()])
            );
            assert_eq!(
                settings.qlik_resolve,
                Some(vec!["qs-node1.corp.local=10.20.0.11".to_owned()])
            );
            // Paths only: no certificate, key or passphrase in the ConfigMap.
            assert_eq!(settings.qlik_client_key_passphrase, None);
            assert!(!toml.contains("BEGIN"), "{toml}");
        },
    );
    let mut calls = also_checking(
        calls,
        &format!("PATCH {}", path(APPS, "deployments", NAME)),
        |deployment| {
            let pod = &deployment["spec"]["template"]["spec"];
            let volumes = pod["volumes"].as_array().unwrap();
            let qlik = volumes
                .iter()
                .find(|v| v["name"] == "qlik-certificates")
                .unwrap_or_else(|| panic!("no volume of the certificates Secret: {volumes:?}"));
            assert_eq!(
                qlik,
                &json!({
                    "name": "qlik-certificates",
                    "secret": {
                        "secretName": QLIK_SECRET,
                        "items": [
                            {"key": "client.pem", "path": "client.pem"},
                            {"key": "client_key.pem", "path": "client_key.pem"},
                            {"key": "root.pem", "path": "root.pem"},
                            {"key": "passphrase", "path": "passphrase"},
                        ],
                        "defaultMode": 0o440,
                    },
                })
            );
            let container = &pod["containers"][0];
            let mounts = container["volumeMounts"].as_array().unwrap();
            assert!(
                mounts.contains(&json!({
                    "name": "qlik-certificates",
                    "mountPath": "/etc/session-monitor/qlik",
                    "readOnly": true,
                })),
                "{mounts:?}"
            );
            assert!(mounts.iter().all(|m| m["readOnly"] == true), "{mounts:?}");
            // Mounted files only: nothing of the certificates Secret in the environment.
            assert!(
                !container["env"].to_string().contains(QLIK_SECRET),
                "{}",
                container["env"]
            );
        },
    );
    calls.push(status_patch(&m));
    let run = server.reconcile(&m, calls).await;

    assert_eq!(run.action(), Action::requeue(RESYNC));
    assert_eq!(
        run.requests()[1..4],
        [
            "GET /api/v1/namespaces/qlik/secrets/qlik-mqtt",
            "GET /api/v1/namespaces/qlik/secrets/qlik-certificates",
            "PATCH /api/v1/namespaces/qlik/serviceaccounts/qlik-prod",
        ]
    );
    // Both Secrets' resourceVersions are in the pod template's checksum: rotated certificates
    // restart the pod, which reads them only at start.
    let deployment = run.body(&format!("PATCH {}", path(APPS, "deployments", NAME)));
    let plan = validate(&m, IMAGE).expect("a valid spec");
    let versions = BTreeMap::from([
        (SECRET.to_owned(), SECRET_VERSION.to_owned()),
        (QLIK_SECRET.to_owned(), QLIK_SECRET_VERSION.to_owned()),
    ]);
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION],
        config_checksum(&plan, &versions)
    );
    let mut rotated = versions.clone();
    rotated.insert(QLIK_SECRET.to_owned(), "89".to_owned());
    assert_ne!(
        config_checksum(&plan, &versions),
        config_checksum(&plan, &rotated)
    );
    assert_eq!(summary(&run.status())[2], "Degraded=False/Reconciled");
}

#[tokio::test]
async fn a_certificates_secret_without_root_pem_applies_nothing_and_degrades() {
    let m = with_qlik();
    let mut server = ApiServer::new();
    // The MQTT Secret is complete; the certificates Secret lacks the QMC's root.pem.
    let calls = vec![
        read_role(None),
        read_secret(secret(&["username", "password"])),
        read_secret(qlik_secret(&["client.pem", "client_key.pem", "passphrase"])),
        read_deployment(Rollout::Absent),
        event("Warning", "MissingSecret").checking(|e| {
            assert!(
                note(e).contains("Secret \"qlik-certificates\" has no key \"root.pem\""),
                "{e}"
            );
        }),
        status_patch(&m),
    ];
    let run = server.reconcile(&m, calls).await;

    assert_eq!(run.action(), Action::requeue(MISSING_SECRET_RETRY));
    assert_eq!(
        run.requests(),
        [
            "GET /apis/rbac.authorization.k8s.io/v1/namespaces/qlik/roles/qlik-prod",
            "GET /api/v1/namespaces/qlik/secrets/qlik-mqtt",
            "GET /api/v1/namespaces/qlik/secrets/qlik-certificates",
            "GET /apis/apps/v1/namespaces/qlik/deployments/qlik-prod",
            "POST /apis/events.k8s.io/v1/namespaces/qlik/events",
            "PATCH /apis/sessionmonitor.io/v1alpha1/namespaces/qlik/sessionmonitors/qlik-prod/status",
        ],
        "nothing applied"
    );
    let status = run.status();
    assert_eq!(
        summary(&status),
        [
            "Ready=False/NotDeployed",
            "Progressing=False/MissingSecret",
            "Degraded=True/MissingSecret"
        ]
    );
    assert_eq!(
        degraded_message(&status),
        "Secret \"qlik-certificates\" has no key \"root.pem\""
    );
    assert_eq!(server.reconciles("MissingSecret"), 1);
}

#[tokio::test]
async fn an_invalid_spec_applies_nothing_and_waits_for_a_change() {
    let cases = [
        (
            json!({"mqtt": {"url": "mqtt://b"}, "udp": {"allowedSources": ["10.0.0.0/33"]}}),
            "spec.udp.allowedSources[0]: \"10.0.0.0/33\"",
        ),
        (
            json!({"mqtt": {"url": "mqtt://b", "qos": 5}}),
            "spec.mqtt.qos: 5 is not 0, 1 or 2",
        ),
        (
            json!({"mqtt": {"url": "mqtt://b"}, "qlik": {
                "proxies": ["https://qs-node1:4243/", "http://qs-node2:4243/"],
                "certificatesSecret": {"name": QLIK_SECRET},
            }}),
            "spec.qlik.proxies[1]: \"http://qs-node2:4243/\": the Qlik APIs speak https, not http",
        ),
        (
            json!({"mqtt": {"url": "mqtt://b"}, "qlik": {
                "repositoryUrl": "https://qs-central:4242",
                "certificatesSecret": {"name": QLIK_SECRET},
                "reconcileInterval": "48h",
            }}),
            "spec.qlik.reconcileInterval: must be at most 1day",
        ),
        (
            json!({"mqtt": {"url": "mqtt://b"}, "apiAuth": {
                "generateToken": true, "tokenSecret": {"name": "reader-token"},
            }}),
            "spec.apiAuth.tokenSecret: set either spec.apiAuth.generateToken or \
             spec.apiAuth.tokenSecret, not both",
        ),
        (
            json!({"mqtt": {"url": "mqtt://b"}, "apiAuth": {"generateToken": false}}),
            "spec.apiAuth.generateToken: set it to true",
        ),
    ];
    for (spec, field) in cases {
        let m = monitor(spec);
        let mut server = ApiServer::new();
        let warning = event("Warning", "InvalidSpec").checking(move |e| {
            assert!(note(e).starts_with(field), "{e}");
        });
        let scenario = Scenario::InvalidSpec {
            deployment: Rollout::Absent,
        };
        let calls = scenario.then([warning, status_patch(&m)]);
        let run = server.reconcile(&m, calls).await;

        // Retrying the same spec cannot help; the spec change that fixes it triggers the next.
        assert_eq!(run.action(), Action::await_change());
        let status = run.status();
        assert_eq!(
            summary(&status),
            [
                "Ready=False/NotDeployed",
                "Progressing=False/InvalidSpec",
                "Degraded=True/InvalidSpec"
            ]
        );
        let message = degraded_message(&status);
        assert!(message.starts_with(field), "{message:?} names {field:?}");
        assert_eq!(server.reconciles("InvalidSpec"), 1);
    }
}

#[tokio::test]
async fn a_service_monitor_is_applied_where_the_monitoring_api_exists() {
    let m = monitor(json!({
        "mqtt": {"url": "mqtt://broker.mqtt.svc:1883"},
        "checkpoint": {"shards": 2},
        "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}}},
    }));
    let mut server = ApiServer::new();
    let scenario = Scenario::Applies {
        shards: 2,
        secrets: Vec::new(),
        deployment: Rollout::Pending,
        monitoring: Monitoring::Applied,
    };
    let run = server
        .reconcile(&m, scenario.then([status_patch(&m)]))
        .await;

    assert_eq!(run.action(), Action::requeue(RESYNC));
    assert_eq!(
        run.requests()[11..],
        [
            "GET /apis/monitoring.coreos.com/v1",
            "PATCH /apis/monitoring.coreos.com/v1/namespaces/qlik/servicemonitors/qlik-prod",
            "PATCH /apis/sessionmonitor.io/v1alpha1/namespaces/qlik/sessionmonitors/qlik-prod/status",
        ]
    );
}

#[tokio::test]
async fn a_switched_off_service_monitor_is_deleted_and_none_to_delete_is_fine() {
    let m = new_monitor();
    let mut server = ApiServer::new();
    let scenario = Scenario::Applies {
        shards: 2,
        secrets: Vec::new(),
        deployment: Rollout::Pending,
        monitoring: Monitoring::Deleted,
    };
    let run = server
        .reconcile(&m, scenario.then([status_patch(&m)]))
        .await;

    assert_eq!(run.action(), Action::requeue(RESYNC));
    assert_eq!(
        run.requests()[11..14],
        [
            "GET /apis/monitoring.coreos.com/v1",
            "GET /apis/monitoring.coreos.com/v1/namespaces/qlik/servicemonitors/qlik-prod",
            "DELETE /apis/monitoring.coreos.com/v1/namespaces/qlik/servicemonitors/qlik-prod",
        ]
    );
    assert_eq!(
        summary(&run.status())[2],
        "Degraded=False/Reconciled",
        "a 404 on the delete is no failure"
    );
}

#[tokio::test]
async fn a_requested_service_monitor_without_the_monitoring_api_is_reported_as_an_event() {
    let m = monitor(json!({
        "mqtt": {"url": "mqtt://broker.mqtt.svc:1883"},
        "checkpoint": {"shards": 2},
        "metrics": {"serviceMonitor": {"enabled": true}},
    }));
    let mut server = ApiServer::new();
    // The reason is the fix's to choose; the note must say what is missing.
    let warning = Call::new(
        Method::POST,
        format!("/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"),
        "",
    )
    .checking(|e| {
        assert_eq!(e["type"], "Warning");
        assert!(note(e).contains("monitoring.coreos.com"), "{e}");
    })
    .answering(stored(json!({})));
    let calls = applies(Rollout::Pending).then([warning, status_patch(&m)]);
    let run = server.reconcile(&m, calls).await;
    assert_eq!(run.action(), Action::requeue(RESYNC));
}

#[tokio::test]
async fn a_service_monitor_the_operator_does_not_own_is_never_deleted() {
    let m = new_monitor();
    let mut server = ApiServer::new();
    let mut calls = applies(Rollout::Pending).calls();
    calls.pop();
    calls.push(discovery(true));
    // One possible fix: read it, and delete only what this monitor controls (with a uid
    // precondition). Here it belongs to someone else: no DELETE may follow.
    calls.push(
        Call::new(Method::GET, path(MONITORING, "servicemonitors", NAME), "").answering(|_| {
            Reply::Json(
                200,
                json!({
                    "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                    "metadata": {
                        "name": NAME, "namespace": NAMESPACE, "resourceVersion": "42",
                        "uid": "0d6c0a57-0000-4000-8000-000000000042",
                        "labels": {"team": "qlik-platform"},
                    },
                    "spec": {
                        "selector": {"matchLabels": {"app": "qlik-proxy-exporter"}},
                        "endpoints": [{"port": "web"}],
                    },
                }),
            )
        }),
    );
    calls.push(status_patch(&m));
    let run = server.reconcile(&m, calls).await;
    assert_eq!(run.action(), Action::requeue(RESYNC));
}

#[tokio::test]
async fn a_plain_text_404_from_discovery_means_the_monitoring_api_is_absent() {
    let m = new_monitor();
    let mut server = ApiServer::new();
    let mut calls = applies(Rollout::Pending).calls();
    let discovery = calls.pop().expect("the discovery");
    calls.push(discovery.answering(|_| Reply::Text(404, "404 page not found\n")));
    calls.push(status_patch(&m));
    let run = server.reconcile(&m, calls).await;
    assert_eq!(run.action(), Action::requeue(RESYNC));
}

#[tokio::test]
async fn a_rejected_deployment_fails_the_reconcile_says_why_and_backs_off() {
    let m = new_monitor();
    let mut server = ApiServer::new();
    let warning = event("Warning", "ApplyFailed").checking(|e| {
        assert!(
            note(e).starts_with("applying Deployment qlik-prod: "),
            "{e}"
        );
    });
    let calls = Scenario::DeploymentRejected { shards: 2 }.then([warning, status_patch(&m)]);
    let run = server.reconcile(&m, calls).await;

    let error = run.result.as_ref().expect_err("the Deployment was refused");
    assert!(
        matches!(error, Error::Apply { kind, name, source: kube::Error::Api(status) }
            if kind == "Deployment" && name == NAME && status.is_invalid()),
        "{error:?}"
    );
    assert_eq!(error.metric_label(), "ApplyFailed");
    let status = run.status();
    assert_eq!(
        summary(&status),
        [
            "Ready=False/NotDeployed",
            "Progressing=False/ApplyFailed",
            "Degraded=True/ApplyFailed"
        ]
    );
    let message = degraded_message(&status);
    assert!(
        message.starts_with("applying Deployment qlik-prod: ")
            && message.contains("spec.template.spec.containers[0].image: Required value"),
        "{message}"
    );
    assert_eq!(server.reconciles("ApplyFailed"), 1);

    let failed = Arc::new(m.clone());
    for seconds in [5, 10, 20, 40] {
        assert_eq!(
            error_policy(failed.clone(), error, server.ctx.clone()),
            Action::requeue(Duration::from_secs(seconds))
        );
    }

    // The next reconcile sees the status the failed one wrote, as the watch delivers it; it
    // succeeds, says so, and a later failure backs off from the start again.
    let mut recovering = m.clone();
    recovering.status = Some(status);
    let calls = applies(Rollout::Available).then([
        event("Normal", "Recovered"),
        event("Normal", "Ready"),
        status_patch(&recovering),
    ]);
    let recovered = server.reconcile(&recovering, calls).await;
    // Its service cannot be read here: read again soon, not at the resync.
    assert_eq!(recovered.action(), Action::requeue(Duration::from_secs(2)));
    assert_eq!(summary(&recovered.status())[2], "Degraded=False/Reconciled");
    assert_eq!(
        error_policy(failed, error, server.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
}

#[tokio::test]
async fn a_failed_api_read_fails_the_reconcile_and_still_says_why() {
    let m = with_credentials();
    let mut server = ApiServer::new();
    let forbidden = Call::new(Method::GET, path(CORE, "secrets", SECRET), "").answering(|_| {
        failure(
            403,
            "Forbidden",
            "secrets \"qlik-mqtt\" is forbidden: User \"system:serviceaccount:session-monitor-system:\
             session-monitor-operator\" cannot get resource \"secrets\" in API group \"\" in the \
             namespace \"qlik\"",
            json!({"name": SECRET, "kind": "secrets"}),
        )
    });
    let calls = vec![
        read_role(None),
        forbidden,
        read_deployment(Rollout::Absent),
        event("Warning", "ApiError"),
        status_patch(&m),
    ];
    let run = server.reconcile(&m, calls).await;

    let error = run
        .result
        .as_ref()
        .expect_err("the Secret could not be read");
    assert!(
        matches!(error, Error::Kube(kube::Error::Api(status)) if status.is_forbidden()),
        "{error:?}"
    );
    assert_eq!(error.metric_label(), "ApiError");
    assert_eq!(server.reconciles("ApiError"), 1);
    let status = run.status();
    assert_eq!(summary(&status)[2], "Degraded=True/ApiError");
    let message = degraded_message(&status);
    assert!(
        message.starts_with("Kubernetes API: ") && message.contains("is forbidden"),
        "{message}"
    );
}

/// The metric the reconcile-errors alert watches counts a failed reconcile even when the
/// status that would say why cannot be written either.
#[tokio::test]
async fn a_failed_reconcile_is_counted_even_when_its_status_cannot_be_written() {
    let m = with_credentials();
    let mut server = ApiServer::new();
    let forbidden = Call::new(Method::GET, path(CORE, "secrets", SECRET), "")
        .answering(|_| failure(403, "Forbidden", "secrets is forbidden", json!({})));
    let unavailable = status_patch(&m).answering(|_| {
        failure(
            503,
            "ServiceUnavailable",
            "etcdserver: request timed out",
            json!({}),
        )
    });
    let calls = vec![
        read_role(None),
        forbidden,
        read_deployment(Rollout::Absent),
        event("Warning", "ApiError"),
        unavailable,
    ];
    let run = server.reconcile(&m, calls).await;
    assert!(run.result.is_err());
    assert_eq!(server.reconciles("ApiError"), 1);
}

#[tokio::test]
async fn an_unchanged_status_is_not_written_again() {
    let m = new_monitor();
    let mut server = ApiServer::new();
    let calls = applies(Rollout::Pending).then([status_patch(&m)]);
    let first = server.reconcile(&m, calls).await;
    first.action();

    // As the watch delivers it: with the status just written.
    let mut current = m.clone();
    current.status = Some(first.status());
    let again = server
        .reconcile(&current, applies(Rollout::Pending).calls())
        .await;
    assert_eq!(again.action(), Action::requeue(RESYNC));
    assert_eq!(server.reconciles("Reconciled"), 2);
}

#[tokio::test]
async fn a_monitor_being_deleted_is_left_to_the_garbage_collector() {
    let mut m = new_monitor();
    m.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let mut server = ApiServer::new();
    let run = server.reconcile(&m, Scenario::Deleted.calls()).await;
    assert_eq!(run.action(), Action::await_change());
}

// The API token (`spec.apiAuth`).

/// The generated token's Secret of [`with_generated_token`].
const TOKEN_SECRET: &str = "qlik-prod-api-token";
/// The resourceVersion the API server gives the Secret the reconcile creates.
const CREATED_TOKEN_VERSION: &str = "501";
/// The create of the generated token's Secret: a POST by [`MANAGER`], never an apply.
const CREATE_QUERY: &str = "&fieldManager=session-monitor-operator";

fn with_generated_token() -> SessionMonitor {
    monitor(json!({
        "mqtt": {"url": "mqtt://broker.mqtt.svc:1883"},
        "checkpoint": {"shards": 2},
        "apiAuth": {"generateToken": true},
    }))
}

fn read_token_secret(found: Option<Value>) -> Call {
    let call = Call::new(Method::GET, path(CORE, "secrets", TOKEN_SECRET), "");
    match found {
        Some(secret) => call.answering(move |_| Reply::Json(200, secret)),
        None => call.answering(not_found("", "secrets", TOKEN_SECRET)),
    }
}

/// The token's Secret as the reconcile must create it: named for the monitor, labelled and
/// owned as every child, with one key `token` of 64 hex characters.
fn create_token_secret() -> Call {
    Call::new(
        Method::POST,
        format!("{CORE}/namespaces/{NAMESPACE}/secrets"),
        CREATE_QUERY,
    )
    .content_type("application/json")
    .checking(|secret| {
        assert_eq!(secret["apiVersion"], "v1");
        assert_eq!(secret["kind"], "Secret");
        assert_eq!(secret["type"], "Opaque");
        let metadata = &secret["metadata"];
        assert_eq!(metadata["name"], TOKEN_SECRET);
        assert_eq!(metadata["namespace"], NAMESPACE);
        assert_eq!(
            metadata["labels"],
            json!({
                "app.kubernetes.io/name": "session-monitor",
                "app.kubernetes.io/instance": NAME,
                "app.kubernetes.io/managed-by": "session-monitor-operator",
                "app.kubernetes.io/component": "session-tracking",
            })
        );
        let owners = metadata["ownerReferences"].as_array().expect("an owner");
        assert_eq!(owners.len(), 1, "{owners:?}");
        assert_eq!(owners[0]["kind"], "SessionMonitor");
        assert_eq!(owners[0]["name"], NAME);
        assert_eq!(owners[0]["uid"], UID);
        assert_eq!(owners[0]["controller"], true);
        let data = secret["data"].as_object().expect("data");
        assert_eq!(data.keys().collect::<Vec<_>>(), ["token"]);
        let token = token_of(secret);
        assert_eq!(token.len(), 64, "{token:?}");
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{token:?}"
        );
        assert_eq!(secret.get("stringData"), None);
    })
    .answering(|request| {
        match stored(json!({"metadata": {"resourceVersion": CREATED_TOKEN_VERSION}}))(request) {
            Reply::Json(_, object) => Reply::Json(201, object),
            text => text,
        }
    })
}

/// The decoded `token` of a Secret as JSON.
fn token_of(secret: &Value) -> String {
    let encoded = secret["data"]["token"].as_str().expect("a token");
    String::from_utf8(base64_decode(encoded)).expect("an ASCII token")
}

/// Enough base64 for a test (the API server's standard alphabet, with padding).
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let digits: Vec<u32> = text
        .bytes()
        .filter(|&b| b != b'=')
        .map(|b| ALPHABET.iter().position(|&a| a == b).expect("base64") as u32)
        .collect();
    let mut bytes = Vec::new();
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (d << (18 - 6 * i)));
        bytes.extend(n.to_be_bytes()[1..chunk.len()].iter());
    }
    bytes
}

/// The Deployment mounts `secret`'s `key` as the token file the configuration names.
fn mounts_the_token(secret: &'static str, key: &'static str) -> impl Fn(&Value) + Send {
    move |deployment| {
        let pod = &deployment["spec"]["template"]["spec"];
        let volumes = pod["volumes"].as_array().unwrap();
        let volume = volumes
            .iter()
            .find(|v| v["name"] == "api-token")
            .unwrap_or_else(|| panic!("no volume of the token Secret: {volumes:?}"));
        assert_eq!(
            volume,
            &json!({
                "name": "api-token",
                "secret": {
                    "secretName": secret,
                    "items": [{"key": key, "path": "token"}],
                    "defaultMode": 0o440,
                },
            })
        );
        let container = &pod["containers"][0];
        assert!(
            container["volumeMounts"]
                .as_array()
                .unwrap()
                .contains(&json!({
                    "name": "api-token",
                    "mountPath": paths::API_TOKEN_DIR,
                    "readOnly": true,
                })),
            "{}",
            container["volumeMounts"]
        );
        assert!(
            !container["env"].to_string().contains(secret),
            "a file only, never the environment: {}",
            container["env"]
        );
    }
}

/// The rendered configuration points at the mounted token file.
fn configures_the_token_file(cm: &Value) {
    let toml = cm["data"][paths::CONFIG_KEY].as_str().unwrap();
    let settings: session_monitor_config::Settings = toml::from_str(toml).unwrap();
    assert_eq!(
        settings.api_token_file,
        Some(std::path::PathBuf::from(paths::API_TOKEN_FILE))
    );
    assert_eq!(settings.api_token, None, "no token in the ConfigMap");
}

/// `calls` with the token's mount and setting checked on the Deployment and the ConfigMap.
fn checking_the_token(calls: Vec<Call>, secret: &'static str, key: &'static str) -> Vec<Call> {
    let calls = also_checking(
        calls,
        &format!(
            "PATCH {}",
            path(CORE, "configmaps", &format!("{NAME}-config"))
        ),
        configures_the_token_file,
    );
    also_checking(
        calls,
        &format!("PATCH {}", path(APPS, "deployments", NAME)),
        mounts_the_token(secret, key),
    )
}

/// The pod-template checksum of a reconcile that saw the token's Secret at `version`.
fn token_checksum(m: &SessionMonitor, secret: &str, version: &str) -> String {
    let plan = validate(m, IMAGE).expect("a valid spec");
    config_checksum(
        &plan,
        &BTreeMap::from([(secret.to_owned(), version.to_owned())]),
    )
}

fn applied_checksum(run: &Run) -> Value {
    run.body(&format!("PATCH {}", path(APPS, "deployments", NAME)))["spec"]["template"]["metadata"]
        ["annotations"][CHECKSUM_ANNOTATION]
        .clone()
}

#[tokio::test]
async fn a_missing_token_secret_is_created_once_and_mounted() {
    let m = with_generated_token();
    let mut server = ApiServer::new();
    let mut calls = vec![
        read_role(None),
        read_token_secret(None),
        create_token_secret(),
        event("Normal", "ApiTokenCreated").checking(|e| {
            assert!(note(e).contains(TOKEN_SECRET), "{e}");
        }),
    ];
    calls.extend(checking_the_token(
        applies(Rollout::Pending).calls_after_the_role(),
        TOKEN_SECRET,
        "token",
    ));
    calls.push(status_patch(&m));
    let run = server.reconcile(&m, calls).await;

    assert_eq!(run.action(), Action::requeue(RESYNC));
    assert_eq!(
        run.requests()[1..5],
        [
            "GET /api/v1/namespaces/qlik/secrets/qlik-prod-api-token",
            "POST /api/v1/namespaces/qlik/secrets",
            "POST /apis/events.k8s.io/v1/namespaces/qlik/events",
            // The created Secret is not read again.
            "PATCH /api/v1/namespaces/qlik/serviceaccounts/qlik-prod",
        ]
    );
    // The new Secret's resourceVersion is in the checksum: a recreated token rolls the pod.
    assert_eq!(
        applied_checksum(&run),
        token_checksum(&m, TOKEN_SECRET, CREATED_TOKEN_VERSION)
    );
    // The token is in the Secret and nowhere else: not in the Event, the status or any other
    // object the reconcile wrote.
    let token = token_of(run.body(&format!("POST {CORE}/namespaces/{NAMESPACE}/secrets")));
    for seen in run
        .seen
        .iter()
        .filter(|s| !s.request.starts_with("POST /api/v1/"))
    {
        assert!(
            !seen.body.to_string().contains(&token),
            "{} carries the token",
            seen.request
        );
    }
    assert_eq!(summary(&run.status())[2], "Degraded=False/Reconciled");
}

#[tokio::test]
async fn an_existing_token_secret_is_used_and_never_written() {
    let m = with_generated_token();
    let mut server = ApiServer::new();
    let existing = named_secret(TOKEN_SECRET, "500", "7070", &["token"]);
    let mut calls = vec![read_role(None), read_token_secret(Some(existing))];
    calls.extend(checking_the_token(
        applies(Rollout::Pending).calls_after_the_role(),
        TOKEN_SECRET,
        "token",
    ));
    calls.push(status_patch(&m));
    let run = server.reconcile(&m, calls).await;

    assert_eq!(run.action(), Action::requeue(RESYNC));
    // Read once; no POST, PUT or PATCH of a Secret, and no Event.
    assert!(
        run.requests()
            .iter()
            .all(|r| !r.contains("/secrets") || r.starts_with("GET ")),
        "{:?}",
        run.requests()
    );
    assert_eq!(
        applied_checksum(&run),
        token_checksum(&m, TOKEN_SECRET, "500")
    );
}

#[tokio::test]
async fn a_token_secret_created_meanwhile_is_kept_not_replaced() {
    let m = with_generated_token();
    let mut server = ApiServer::new();
    // Missing at the GET, there at the POST: another writer was faster. Its token stays.
    let conflict = create_token_secret().answering(|_| {
        failure(
            409,
            "AlreadyExists",
            &format!("secrets \"{TOKEN_SECRET}\" already exists"),
            json!({"name": TOKEN_SECRET, "kind": "secrets"}),
        )
    });
    let theirs = named_secret(TOKEN_SECRET, "502", "7071", &["token"]);
    let mut calls = vec![
        read_role(None),
        read_token_secret(None),
        conflict,
        read_token_secret(Some(theirs)),
    ];
    calls.extend(checking_the_token(
        applies(Rollout::Pending).calls_after_the_role(),
        TOKEN_SECRET,
        "token",
    ));
    calls.push(status_patch(&m));
    let run = server.reconcile(&m, calls).await;

    assert_eq!(run.action(), Action::requeue(RESYNC));
    assert_eq!(
        applied_checksum(&run),
        token_checksum(&m, TOKEN_SECRET, "502")
    );
    assert_eq!(summary(&run.status())[2], "Degraded=False/Reconciled");
    assert_eq!(server.reconciles("Reconciled"), 1);
}

#[tokio::test]
async fn a_refused_token_secret_fails_the_reconcile_and_names_the_secret() {
    let m = with_generated_token();
    let mut server = ApiServer::new();
    let forbidden = create_token_secret().answering(|_| {
        failure(
            403,
            "Forbidden",
            "secrets is forbidden: User \"system:serviceaccount:session-monitor-system:\
             session-monitor-operator\" cannot create resource \"secrets\" in API group \"\" \
             in the namespace \"qlik\"",
            json!({"kind": "secrets"}),
        )
    });
    let calls = vec![
        read_role(None),
        read_token_secret(None),
        forbidden,
        read_deployment(Rollout::Absent),
        event("Warning", "ApplyFailed"),
        status_patch(&m),
    ];
    let run = server.reconcile(&m, calls).await;

    let error = run.result.as_ref().expect_err("the Secret was refused");
    assert!(
        matches!(error, Error::Apply { kind, name, source: kube::Error::Api(status) }
            if kind == "Secret" && name == TOKEN_SECRET && status.is_forbidden()),
        "{error:?}"
    );
    let message = degraded_message(&run.status());
    assert!(
        message.starts_with("applying Secret qlik-prod-api-token: "),
        "{message}"
    );
}

#[tokio::test]
async fn a_users_token_secret_is_checked_and_mounted_never_created() {
    let m = monitor(json!({
        "mqtt": {"url": "mqtt://broker.mqtt.svc:1883"},
        "checkpoint": {"shards": 2},
        "apiAuth": {"tokenSecret": {"name": "reader-token", "key": "bearer"}},
    }));
    let mut server = ApiServer::new();
    let scenario = Scenario::Applies {
        shards: 2,
        secrets: vec![named_secret("reader-token", "600", "7072", &["bearer"])],
        deployment: Rollout::Pending,
        monitoring: Monitoring::NotInstalled,
    };
    let mut calls = checking_the_token(scenario.calls(), "reader-token", "bearer");
    calls.push(status_patch(&m));
    let run = server.reconcile(&m, calls).await;

    assert_eq!(run.action(), Action::requeue(RESYNC));
    assert_eq!(
        run.requests()[1],
        "GET /api/v1/namespaces/qlik/secrets/reader-token"
    );
    assert_eq!(
        applied_checksum(&run),
        token_checksum(&m, "reader-token", "600")
    );
}

// The verifier itself: a test whose requests differ from the reconcile's must fail.

#[tokio::test]
#[should_panic(
    expected = "unexpected request after the 12 expected: PATCH /apis/sessionmonitor.io/"
)]
async fn the_verifier_fails_on_an_extra_request() {
    // The status PATCH left out.
    ApiServer::new()
        .reconcile(&new_monitor(), applies(Rollout::Pending).calls())
        .await;
}

#[tokio::test]
#[should_panic(
    expected = "missing request 14/14: the reconcile returned without POST /apis/events"
)]
async fn the_verifier_fails_on_a_missing_request() {
    let m = new_monitor();
    let calls = applies(Rollout::Pending).then([status_patch(&m), event("Normal", "Ready")]);
    ApiServer::new().reconcile(&m, calls).await;
}

#[tokio::test]
#[should_panic(expected = "request 1/12 after")]
async fn the_verifier_fails_on_a_request_out_of_order() {
    let m = new_monitor();
    let mut calls = applies(Rollout::Pending).then([status_patch(&m)]);
    calls.remove(0);
    ApiServer::new().reconcile(&m, calls).await;
}

#[tokio::test]
#[should_panic(
    expected = "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/qlik/roles/qlik-prod"
)]
async fn the_verifier_fails_on_a_wrong_body() {
    // Three shards expected, two applied: the Role names the wrong ConfigMaps.
    let m = new_monitor();
    let scenario = Scenario::Applies {
        shards: 3,
        secrets: Vec::new(),
        deployment: Rollout::Pending,
        monitoring: Monitoring::NotInstalled,
    };
    ApiServer::new()
        .reconcile(&m, scenario.then([status_patch(&m)]))
        .await;
}

#[test]
fn backoff_doubles_from_5_seconds_up_to_5_minutes() {
    let seconds: Vec<u64> = (0..=8).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(seconds, [5, 5, 10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
}

#[test]
fn event_notes_are_cut_at_a_character_boundary() {
    assert_eq!(super::truncate("short", 1000), "short");
    let long = "é".repeat(1500);
    let cut = super::truncate(&long, 1000);
    assert_eq!(cut.chars().count(), 1001);
    assert!(cut.ends_with("é…"));
}

#[test]
fn ready_going_away_is_a_warning_event_and_coming_back_a_normal_one() {
    use crate::reconcile::transitions;
    use crate::status::{Outcome, compute};
    use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
    let at = || Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let deployment = |available| Deployment {
        status: Some(DeploymentStatus {
            available_replicas: Some(available),
            ..DeploymentStatus::default()
        }),
        ..Deployment::default()
    };
    let up = compute(
        &Outcome::Applied,
        Some(1),
        Some(&deployment(1)),
        None,
        None,
        at(),
    );
    let down = compute(
        &Outcome::Applied,
        Some(1),
        Some(&deployment(0)),
        None,
        Some(&up),
        at(),
    );
    let reasons = |events: Vec<kube::runtime::events::Event>| {
        events
            .into_iter()
            .map(|e| (format!("{:?}", e.type_), e.reason))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        reasons(transitions(Some(&up), &down)),
        [("Warning".to_owned(), "NotReady".to_owned())]
    );
    assert_eq!(
        reasons(transitions(Some(&down), &up)),
        [("Normal".to_owned(), "Ready".to_owned())]
    );
    assert!(transitions(Some(&up), &up).is_empty());
}

// ---------------------------------------------------------------------------------------------
// The checkpoint shard autopilot.
// ---------------------------------------------------------------------------------------------

/// A ready service whose checkpoint calls for `wanted` shards (`checkpoint_shards_wanted`).
fn wanting(wanted: u64) -> Source {
    Arc::new(move |_, _| {
        Box::pin(async move {
            Ok(Usage {
                active_users: Some(100_000),
                active_sessions: Some(200_000),
                checkpoint_shards_wanted: Some(wanted),
                ..Usage::default()
            })
        })
    })
}

fn ready_with_shards(shards: u16) -> Scenario {
    Scenario::Applies {
        shards,
        secrets: Vec::new(),
        deployment: Rollout::Available,
        monitoring: Monitoring::NotInstalled,
    }
}

/// The raise: the Role naming shards 1 … `to`, the ConfigMaps `from + 1` … `to`, then the
/// configuration with the new count (what the service reads while running).
fn grant(from: u16, to: u16) -> Vec<Call> {
    let names: Vec<String> = std::iter::once(format!("{NAME}-checkpoint"))
        .chain((1..=to).map(|i| format!("{NAME}-checkpoint-{i}")))
        .collect();
    let mut calls = vec![apply(RBAC, "roles", "Role", NAME).checking(move |role| {
        assert_eq!(role["rules"][0]["resourceNames"], json!(names));
        assert_eq!(role["rules"][0]["verbs"], json!(["get", "update"]));
    })];
    for i in from + 1..=to {
        let name = format!("{NAME}-checkpoint-{i}");
        calls.push(
            apply(CORE, "configmaps", "ConfigMap", &name).checking(|cm| {
                assert_eq!(cm["metadata"]["labels"][ROLE_LABEL], "checkpoint");
                assert_eq!(cm.get("data"), None);
            }),
        );
    }
    calls.push(
        apply(CORE, "configmaps", "ConfigMap", &format!("{NAME}-config")).checking(move |cm| {
            let toml = cm["data"][paths::CONFIG_KEY].as_str().unwrap();
            assert!(
                toml.contains(&format!("checkpoint_configmap_shards = {to}")),
                "{toml}"
            );
        }),
    );
    calls
}

fn autopilot(server: &ApiServer, decision: &str) -> u64 {
    server
        .ctx
        .metrics
        .checkpoint_autopilot
        .with_label_values(&[decision])
        .get()
}

fn checksum(run: &Run) -> String {
    let deployment = run.body(&format!("PATCH {}", path(APPS, "deployments", NAME)));
    deployment["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION]
        .as_str()
        .expect("a checksum")
        .to_owned()
}

/// The service says its checkpoint calls for 4 shards where 2 are granted: the operator grants
/// them (Role, ConfigMaps, then the setting), records why, and the pod is not rolled: the
/// Deployment's checksum is the same before and after.
#[tokio::test]
async fn a_checkpoint_that_needs_more_shards_gets_them_without_rolling_the_pod() {
    let m = new_monitor();
    let mut server = ApiServer::reading_usage(wanting(4));
    let raised = event("Normal", "CheckpointShardsRaised").checking(|e| {
        assert!(
            note(e).starts_with("the checkpoint calls for 4 shard ConfigMaps: granted 4 (was 2)"),
            "{}",
            note(e)
        );
    });
    let mut calls = ready_with_shards(2).calls();
    calls.extend(grant(2, 4));
    calls.extend([raised, event("Normal", "Ready"), status_patch(&m)]);
    let run = server.reconcile(&m, calls).await;
    assert_eq!(run.action(), Action::requeue(USAGE_REFRESH));
    let status = run.status();
    assert_eq!(status.checkpoint_shards, Some(4));
    assert_eq!(status.checkpoint_shards_wanted, Some(4));
    assert_eq!(autopilot(&server, "raised"), 1);

    // The next reconcile, from the status just written, applies the 4 shards as granted (the
    // spec still says 2) and raises nothing.
    let mut current = m.clone();
    current.status = Some(status);
    let again = server
        .reconcile(&current, ready_with_shards(4).calls())
        .await;
    assert_eq!(again.action(), Action::requeue(USAGE_REFRESH));
    assert_eq!(checksum(&run), checksum(&again), "the pod is not rolled");
    assert_eq!(autopilot(&server, "raised"), 1);

    // A reconcile woken by the Role's own change may be handed the monitor as it was before the
    // status write: the Role read first keeps the grant (applying 2 shards would take 3 and 4
    // back from a service that may already write to them).
    let mut calls = vec![read_role(Some(4))];
    calls.extend(ready_with_shards(4).calls_after_the_role());
    calls.extend([event("Normal", "Ready"), status_patch(&m)]);
    // (A new operator process: its Event recorder has not seen Ready before.)
    let mut server = ApiServer::reading_usage(wanting(4));
    let stale = server.reconcile(&m, calls).await;
    assert_eq!(stale.status().checkpoint_shards, Some(4));
    assert_eq!(autopilot(&server, "raised"), 0);
}

/// `spec.checkpoint.maxShards` stops the raise: granted up to it (a Warning says what is
/// missing), and once all are granted, a need that grows further is said once per figure.
#[tokio::test]
async fn a_checkpoint_beyond_the_maximum_gets_the_maximum_and_a_warning() {
    let m = monitor(json!({
        "mqtt": {"url": "mqtt://broker.mqtt.svc:1883"},
        "checkpoint": {"shards": 2, "maxShards": 3},
    }));
    let mut server = ApiServer::reading_usage(wanting(5));
    let capped = event("Warning", "CheckpointShardsRaised").checking(|e| {
        assert!(
            note(e).contains(
                "granted 3 (was 2); spec.checkpoint.maxShards (3) stops it below the 5 wanted"
            ),
            "{}",
            note(e)
        );
    });
    let mut calls = ready_with_shards(2).calls();
    calls.extend(grant(2, 3));
    calls.extend([capped, event("Normal", "Ready"), status_patch(&m)]);
    let run = server.reconcile(&m, calls).await;
    let status = run.status();
    assert_eq!(status.checkpoint_shards, Some(3));

    // The same figure again: nothing more to grant or say, and the status is unchanged.
    let mut current = m.clone();
    current.status = Some(status.clone());
    server
        .reconcile(&current, ready_with_shards(3).calls())
        .await
        .action();

    // The need grows to 6: all 3 are granted, so a Warning, once.
    let mut server = ApiServer::reading_usage(wanting(6));
    let full = event("Warning", "CheckpointShardsAtMaximum").checking(|e| {
        assert!(
            note(e).starts_with("the checkpoint calls for 6 shard ConfigMaps and all 3 allowed"),
            "{}",
            note(e)
        );
    });
    let run = server
        .reconcile(
            &current,
            ready_with_shards(3).then([full, status_patch(&m)]),
        )
        .await;
    assert_eq!(run.status().checkpoint_shards_wanted, Some(6));
    assert_eq!(autopilot(&server, "at_maximum"), 1);
    current.status = Some(run.status());
    server
        .reconcile(&current, ready_with_shards(3).calls())
        .await
        .action();
    assert_eq!(autopilot(&server, "at_maximum"), 1, "said once");
}
