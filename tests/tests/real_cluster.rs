//! The product as its users run it, in a real single-node cluster (kubelet, containerd,
//! controller-manager, scheduler, kube-proxy, cluster DNS): the image built by `image/build`,
//! the Helm chart installed with Helm's own engine, the operator and service pods, datagrams from
//! outside the cluster to a NodePort, MQTT through a broker in the cluster.
//!
//! Opt-in: `SESSION_MONITOR_TEST_CLUSTER=DIR` names the cluster's state directory (`kube-cluster
//! start DIR`), with the images loaded (`.ci/run` does all of it; the README says how by hand).
//! `SESSION_MONITOR_TEST_IMAGE` is the service image's reference (what `image/build` printed;
//! default `ghcr.io/session-monitor/session-monitor:<version>`), `SESSION_MONITOR_TEST_MQTT_IMAGE`
//! the broker's (what `tests/cluster/mosquitto-image` printed; default `k8s.local/mosquitto:test`).
//!
//! One test, scenarios in order, as a user meets them; each part in a namespace of its own.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use session_monitor_testkit::cluster::{
    Cluster, TestNamespace, http_get_at, http_get_with, wait_for_within,
};
use session_monitor_testkit::qlik::{Casing, FakeQlik, FakeSession, NodeSpec, QlikCerts, Site};

use common::Subscriber;

const RELEASE: &str = "smon";
const OPERATOR: &str = "smon-session-monitor-operator";
const CRD: &str = "sessionmonitors.sessionmonitor.io";
const MONITOR: &str = "qlik-prod";
const MQTT_USER: &str = "session-monitor";
const MQTT_PASSWORD: &str = "e2e-s3cret";
/// Pods start in seconds here; images unpack and the scheduler retries within this.
const POD_DEADLINE: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn image() -> (String, String) {
    let reference = std::env::var("SESSION_MONITOR_TEST_IMAGE").unwrap_or_else(|_| {
        format!(
            "ghcr.io/session-monitor/session-monitor:{}",
            env!("CARGO_PKG_VERSION")
        )
    });
    let (repository, tag) = reference
        .rsplit_once(':')
        .expect("an image reference with a tag");
    (repository.to_owned(), tag.to_owned())
}

/// A second tag of the same image, for `helm upgrade` (`SESSION_MONITOR_TEST_IMAGE_NEXT`).
fn next_image() -> (String, String) {
    let reference = std::env::var("SESSION_MONITOR_TEST_IMAGE_NEXT").unwrap_or_else(|_| {
        let (repository, tag) = image();
        format!("{repository}:{tag}-next")
    });
    let (repository, tag) = reference
        .rsplit_once(':')
        .expect("an image reference with a tag");
    (repository.to_owned(), tag.to_owned())
}

fn mqtt_image() -> String {
    std::env::var("SESSION_MONITOR_TEST_MQTT_IMAGE")
        .unwrap_or_else(|_| "k8s.local/mosquitto:test".into())
}

/// `helm ARGS` with Helm's engine (tests/cluster/helm_release.py); its output, or the test fails
/// with Helm's error.
fn helm(cluster: &Cluster, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("tests/cluster/helm_release.py")
        .args(args)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .current_dir(repo_root())
        .output()
        .expect("run python3 tests/cluster/helm_release.py (pip install helm-python-sdk)");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Uninstalls the release if the test stops before it does (its ClusterRole would block the
/// next install) and deletes the CRD, with the monitors: the cluster is left as found.
struct Release<'c> {
    cluster: &'c Cluster,
    namespace: String,
    uninstalled: bool,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if self.uninstalled {
            return;
        }
        let _ = Command::new("python3")
            .arg("tests/cluster/helm_release.py")
            .args(["uninstall", RELEASE, &self.namespace])
            .arg("--kubeconfig")
            .arg(self.cluster.kubeconfig())
            .current_dir(repo_root())
            .output();
        let crds: Api<CustomResourceDefinition> = Api::all(self.cluster.client().clone());
        let _ = self
            .cluster
            .run("delete the CRD", crds.delete(CRD, &DeleteParams::default()));
    }
}

fn monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("sessionmonitor.io", "v1alpha1", "SessionMonitor"),
        "sessionmonitors",
    )
}

fn monitors(ns: &TestNamespace<'_>) -> Api<DynamicObject> {
    Api::namespaced_with(
        ns.cluster().client().clone(),
        ns.name(),
        &monitor_resource(),
    )
}

fn condition(monitor: &DynamicObject, kind: &str) -> Option<(String, String)> {
    monitor.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

fn ready_pods(ns: &TestNamespace<'_>, selector: &str) -> Vec<Pod> {
    let api: Api<Pod> = ns.api();
    let pods = ns
        .cluster()
        .request("pods", api.list(&ListParams::default().labels(selector)));
    pods.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect()
}

fn node_port(service: &Service) -> u16 {
    service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
        .node_port
        .expect("a NodePort") as u16
}

/// A sample of the service's /metrics through the HTTP Service (0 when absent).
fn metric(ip: &str, sample: &str) -> Option<f64> {
    let (_, body) = http_get_at(ip, 9842, "/metrics")?;
    Some(session_monitor_testkit::metrics::sample(&body, sample).unwrap_or(0.0))
}

/// [`metric`] from the first answer: a pod that just turned ready is reachable through its
/// Service only once kube-proxy has its endpoint.
fn first_metric(ip: &str, sample: &str) -> f64 {
    wait_for_within("an answer from /metrics", POD_DEADLINE, || {
        metric(ip, sample).ok_or("no answer".to_owned())
    })
}

fn patch_monitor(ns: &TestNamespace<'_>, spec: Value) -> DynamicObject {
    ns.cluster().request(
        "patch the monitor",
        monitors(ns).patch(
            MONITOR,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        ),
    )
}

fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn pod_image(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

/// Waits for a ready service pod other than `old`; returns it.
fn replaced(ns: &TestNamespace<'_>, old: &str, what: &str, mut meanwhile: impl FnMut()) -> Pod {
    let selector = format!("app.kubernetes.io/instance={MONITOR}");
    let pods: Api<Pod> = ns.api();
    wait_for_within(what, POD_DEADLINE, || {
        meanwhile();
        let ready = ready_pods(ns, &selector);
        // With the surge the new pod is ready while the old one still stops (it writes its
        // last checkpoint and hands the Lease over): replaced once the old one is gone.
        let all = ns
            .cluster()
            .request("pods", pods.list(&ListParams::default().labels(&selector)));
        let old_gone = all.items.iter().all(|p| pod_name(p) != old);
        match ready.iter().find(|p| pod_name(p) != old) {
            Some(pod) if ready.len() == 1 && old_gone => Ok(pod.clone()),
            _ => Err(format!(
                "ready: {:?}; all: {:?}",
                ready.iter().map(pod_name).collect::<Vec<_>>(),
                all.items.iter().map(pod_name).collect::<Vec<_>>()
            )),
        }
    })
}

/// The data bytes of every ConfigMap in `ns`, each checked to be under the API server's 1 MiB.
fn configmap_bytes(ns: &TestNamespace<'_>) -> Vec<usize> {
    ns.list::<ConfigMap>()
        .iter()
        .map(|cm| {
            let bytes = cm
                .binary_data
                .iter()
                .flatten()
                .map(|(_, v)| v.0.len())
                .sum();
            assert!(bytes < 1 << 20, "{:?} is {bytes} bytes", cm.metadata.name);
            bytes
        })
        .collect()
}

/// Deletes the service pod `old` (gracefully, as `kubectl delete pod` does) and waits for its
/// ready replacement, calling `meanwhile` at each poll.
fn delete_and_replace(
    ns: &TestNamespace<'_>,
    old: &Pod,
    what: &str,
    meanwhile: impl FnMut(),
) -> Pod {
    let pods: Api<Pod> = ns.api();
    ns.cluster().request(
        "delete the service pod",
        pods.delete(&pod_name(old), &DeleteParams::default()),
    );
    replaced(ns, &pod_name(old), what, meanwhile)
}

/// What the kernel says of a container's main process on this node: its uid and whether its
/// root file system is mounted read-only.
fn process_of(pod: &Pod) -> (String, bool) {
    let id = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap();
    let id = id.trim_start_matches("containerd://").to_owned();
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cgroup.contains(&id) && cmdline.starts_with(b"/usr/local/bin/session-monitor")
        })
        .unwrap_or_else(|| panic!("no process of container {id} on this node"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_read_only = mounts.lines().any(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        fields.get(4) == Some(&"/")
            && fields
                .get(5)
                .is_some_and(|o| o.split(',').any(|o| o == "ro"))
    });
    (uid, root_read_only)
}

/// `kubectl auth can-i VERB RESOURCE/NAME --as=system:serviceaccount:NS:ACCOUNT`.
fn can(
    ns: &TestNamespace<'_>,
    account: &str,
    verb: &str,
    resource: &str,
    name: Option<&str>,
) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": format!("system:serviceaccount:{}:{account}", ns.name()),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", ns.name())],
            "resourceAttributes": {
                "namespace": ns.name(), "verb": verb, "resource": resource, "name": name,
            },
        },
    }))
    .unwrap();
    let api: Api<SubjectAccessReview> = Api::all(ns.cluster().client().clone());
    let answer = ns.cluster().request(
        "a SubjectAccessReview",
        api.create(&PostParams::default(), &review),
    );
    answer.status.is_some_and(|s| s.allowed)
}

fn own(command: &str, host: &str, user: &str, session: &str) -> String {
    common::datagram::own(command, host, "LAB", user, session)
}

/// The broker: this machine's mosquitto in an image built like the service's, with a password.
fn start_broker(ns: &TestNamespace<'_>) -> u16 {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let made = Command::new(common::program("mosquitto_passwd"))
        .args(["-b", "-c"])
        .arg(&passwd)
        .args([MQTT_USER, MQTT_PASSWORD])
        .output()
        .expect("mosquitto_passwd (apt-get install -y mosquitto)");
    assert!(made.status.success(), "{made:?}");
    let passwd = std::fs::read_to_string(&passwd).unwrap();
    ns.create(
        &serde_json::from_value::<Secret>(json!({
            "metadata": {"name": "mosquitto-passwd"},
            "stringData": {"passwd": passwd},
        }))
        .unwrap(),
    );
    ns.create(&serde_json::from_value::<ConfigMap>(json!({
        "metadata": {"name": "mosquitto"},
        "data": {"mosquitto.conf": "listener 1883\nallow_anonymous false\npassword_file /mosquitto/secret/passwd\npersistence false\n"},
    })).unwrap());
    ns.create(&serde_json::from_value::<Deployment>(json!({
        "metadata": {"name": "mosquitto"},
        "spec": {
            "selector": {"matchLabels": {"app": "mosquitto"}},
            "template": {
                "metadata": {"labels": {"app": "mosquitto"}},
                "spec": {
                    "securityContext": {"fsGroup": 65532},
                    "containers": [{
                        "name": "mosquitto",
                        "image": mqtt_image(),
                        "imagePullPolicy": "Never",
                        "ports": [{"containerPort": 1883, "protocol": "TCP"}],
                        "volumeMounts": [
                            {"name": "config", "mountPath": "/mosquitto/config"},
                            {"name": "secret", "mountPath": "/mosquitto/secret"},
                        ],
                    }],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "mosquitto"}},
                        {"name": "secret", "secret": {"secretName": "mosquitto-passwd", "defaultMode": 0o440}},
                    ],
                },
            },
        },
    })).unwrap());
    // NodePort: the service reaches it by DNS name, the test from the host.
    let service = ns.create(
        &serde_json::from_value::<Service>(json!({
            "metadata": {"name": "mosquitto"},
            "spec": {
                "type": "NodePort",
                "selector": {"app": "mosquitto"},
                "ports": [{"name": "mqtt", "port": 1883, "protocol": "TCP"}],
            },
        }))
        .unwrap(),
    );
    wait_for_within("the broker pod to be ready", POD_DEADLINE, || {
        let ready = ready_pods(ns, "app=mosquitto");
        (!ready.is_empty())
            .then_some(())
            .ok_or("no ready pod".to_owned())
    });
    node_port(&service)
}

/// The README's example monitor, with the UDP Service as a NodePort (this cluster has no load
/// balancer) and the test's broker.
fn create_monitor(ns: &TestNamespace<'_>, broker: &TestNamespace<'_>) {
    ns.create(
        &serde_json::from_value::<Secret>(json!({
            "metadata": {"name": "qlik-mqtt"},
            "type": "Opaque",
            "stringData": {"username": MQTT_USER, "password": MQTT_PASSWORD},
        }))
        .unwrap(),
    );
    let monitor: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "sessionmonitor.io/v1alpha1",
        "kind": "SessionMonitor",
        "metadata": {"name": MONITOR, "namespace": ns.name()},
        "spec": {
            "udp": {"port": 9997},
            "service": {"type": "NodePort"},
            "sessions": {"idleTimeout": "30m", "maxIdle": "24h", "excludeUsers": ["INTERNAL\\sa_*"]},
            "mqtt": {
                "url": format!("mqtt://mosquitto.{}.svc:1883", broker.name()),
                "credentialsSecret": {"name": "qlik-mqtt"},
            },
        },
    }))
    .unwrap();
    ns.cluster().request(
        "create the SessionMonitor",
        monitors(ns).create(&PostParams::default(), &monitor),
    );
}

/// The host as pods see it (the cluster's bridge; see the cluster tool's README).
const HOST_FROM_PODS: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const QLIK_CENTRAL: &str = "qs-central.corp.example";

/// Step 5e': spec.qlik set on the running monitor; returns the pod it rolled to. Leaves the
/// monitor reconciling with a site that lists nobody, so later steps count as before.
fn qlik_from_the_pod(ns: &TestNamespace<'_>, http_ip: &str, selector: &str, running: &Pod) -> Pod {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[QLIK_CENTRAL]);
    let fake = FakeQlik::start_on(
        HOST_FROM_PODS,
        &certs,
        Site {
            nodes: vec![NodeSpec::new(QLIK_CENTRAL, &[""], Casing::Pascal)],
        },
    );
    let listed = FakeSession::new(
        "LAB",
        "known-only-to-qlik",
        "9d3f0c52-7a41-4b8e-9f0e-2c1d6a7b8e90",
    );
    fake.set_sessions(0, "", vec![listed]);
    let file = |path: &std::path::Path| std::fs::read_to_string(path).unwrap();
    ns.create(
        &serde_json::from_value::<Secret>(json!({
            "metadata": {"name": "qlik-certificates"},
            "type": "Opaque",
            "stringData": {
                "client.pem": file(&certs.client_cert),
                "client_key.pem": file(&certs.client_key),
                "root.pem": file(&certs.root),
            },
        }))
        .unwrap(),
    );
    patch_monitor(
        ns,
        json!({"qlik": {
            "repositoryUrl": format!("https://{QLIK_CENTRAL}:{}", fake.qrs_port()),
            "certificatesSecret": {"name": "qlik-certificates"},
            "resolve": [{"hostname": QLIK_CENTRAL, "ip": HOST_FROM_PODS.to_string()}],
            "reconcileInterval": "2s",
            "reconcileGrace": "1s",
        }}),
    );
    let rolled = replaced(
        ns,
        &pod_name(running),
        "the pod rolled for spec.qlik",
        || {},
    );
    let mounted = rolled.spec.as_ref().unwrap().containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/etc/session-monitor/qlik")
        .cloned()
        .expect("the certificates are mounted");
    assert_eq!(mounted.read_only, Some(true));
    assert!(
        ready_pods(ns, selector)
            .iter()
            .any(|p| pod_name(p) == pod_name(&rolled))
    );

    let summary = || -> Value {
        let (_, body) = http_get_at(http_ip, 9842, "/api/v1/summary").unwrap_or_default();
        serde_json::from_str(&body).unwrap_or(Value::Null)
    };
    // First the cheap per-proxy gauge (the summary lists every user: with 200,000 of them it
    // is 20 MB), then the summary once.
    let on_central = "session_monitor_host_active_users{host=\"qs-central\"}";
    wait_for_within("a user on the Qlik node", POD_DEADLINE, || {
        let users = metric(http_ip, on_central);
        let restarts = ready_pods(ns, selector)
            .iter()
            .map(|p| {
                p.status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()
                    .map(|c| c.restart_count)
            })
            .collect::<Vec<_>>();
        (users == Some(1.0))
            .then_some(())
            .ok_or(format!("{users:?} (container restarts {restarts:?})"))
    });
    let found = wait_for_within("the user only Qlik knows", POD_DEADLINE, || {
        let s = summary();
        let users: Vec<&str> = s["users"]
            .as_array()
            .map(|u| u.iter().filter_map(|u| u["name"].as_str()).collect())
            .unwrap_or_default();
        users
            .contains(&"LAB\\known-only-to-qlik")
            .then(|| s.clone())
            .ok_or(format!("{}", s["qlik_api"]))
    });
    let node = &found["qlik_api"]["nodes"][0];
    assert_eq!(node["up"], true, "{found}");
    assert_eq!(node["host"], "qs-central", "{found}");
    assert_eq!(found["qlik_api"]["repository_up"], true, "{found}");
    assert!(fake.qrs_requests() >= 1 && fake.requests(0) >= 1);
    assert_eq!(fake.forbidden(), 0);

    // The session ends and its stop is lost: the next reconcile past the grace removes it.
    fake.set_sessions(0, "", Vec::new());
    wait_for_within("the user gone with the API's list", POD_DEADLINE, || {
        let users = metric(http_ip, on_central);
        (users == Some(0.0))
            .then_some(())
            .ok_or(format!("{users:?}"))
    });
    rolled
}

/// `GET path` on the HTTP Service at `ip`, with `Authorization: Bearer TOKEN` when given.
fn http_get_bearer(ip: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    http_get_with(ip, 9842, path, token)
}

/// The token in the Secret the operator generated for the monitor (`spec.apiAuth`).
fn generated_token(ns: &TestNamespace<'_>) -> String {
    let secret: Secret = ns.must_get(&format!("{MONITOR}-api-token"));
    let bytes = secret.data.unwrap_or_default().remove("token");
    String::from_utf8(bytes.expect("the Secret has the key token").0).expect("an ASCII token")
}

/// Step 5e'': spec.apiAuth.generateToken set on the running monitor: the operator creates the
/// Secret `qlik-prod-api-token`, the pod rolls with it, and the API then needs the token while
/// /metrics stays open. Returns the token and the pod it rolled to; the token stays on, and the
/// later steps read only /metrics.
fn api_token_from_the_operator(
    ns: &TestNamespace<'_>,
    http_ip: &str,
    running: &Pod,
) -> (String, Pod) {
    patch_monitor(ns, json!({"apiAuth": {"generateToken": true}}));
    let token = wait_for_within("the generated token's Secret", POD_DEADLINE, || {
        ns.get::<Secret>(&format!("{MONITOR}-api-token"))
            .map(|_| generated_token(ns))
            .ok_or("absent".to_owned())
    });
    assert!(
        token.len() == 64 && token.chars().all(|c| c.is_ascii_hexdigit()),
        "64 hex characters, not {} characters",
        token.len()
    );
    let rolled = replaced(
        ns,
        &pod_name(running),
        "the pod rolled for spec.apiAuth",
        || {},
    );
    // With the surge the old pod may still answer for a moment after the new one is ready (its
    // endpoint leaves kube-proxy's rules a little later): the API needs the token once only the
    // new pod answers.
    wait_for_within(
        "/api/v1/users to need the token",
        POD_DEADLINE,
        || match http_get_bearer(http_ip, "/api/v1/users", None) {
            Some((401, _)) => Ok(()),
            other => Err(format!("{:?}", other.map(|(status, _)| status))),
        },
    );
    let (status, body) =
        http_get_bearer(http_ip, "/api/v1/users", Some(&token)).expect("an answer");
    assert_eq!(status, 200, "with the token: {body}");
    let (status, _) = http_get_bearer(http_ip, "/metrics", None).expect("an answer");
    assert_eq!(
        status, 200,
        "/metrics stays open: Prometheus carries no token"
    );
    let events: Vec<Event> = ns.list();
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("ApiTokenCreated")),
        "an Event ApiTokenCreated on the monitor: {events:?}"
    );
    (token, rolled)
}

#[test]
fn the_product_runs_in_a_real_cluster() {
    let Some(cluster) = Cluster::from_cluster_env("the_product_runs_in_a_real_cluster") else {
        return;
    };
    // A failing step prints each namespace's pods and their logs (the operator's, the service's),
    // its Events and the monitors' status: CI's log alone explains it.
    cluster.explain_on_failure(monitor_resource());
    let (repository, tag) = image();

    // 1. helm install, as the README says (`--create-namespace`; a namespace of the test's).
    let system = cluster.create_namespace("smon-system");
    let values = json!({"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}});
    let mut release = Release {
        cluster: &cluster,
        namespace: system.name().to_owned(),
        uninstalled: false,
    };
    helm(
        &cluster,
        &["install", RELEASE, system.name(), &values.to_string()],
    );
    let operator: Deployment = system.must_get(OPERATOR);
    let available = operator.status.and_then(|s| s.available_replicas);
    assert_eq!(
        available,
        Some(1),
        "helm --wait returned with the operator available"
    );
    let leader = wait_for_within("the operator to hold its Lease", POD_DEADLINE, || {
        let lease: Option<Lease> = system.get(OPERATOR);
        let holder = lease.and_then(|l| l.spec?.holder_identity);
        let pods = ready_pods(&system, "app.kubernetes.io/component=operator");
        match holder {
            Some(h) if pods.iter().any(|p| p.metadata.name.as_deref() == Some(&h)) => Ok(h),
            other => Err(format!("holder {other:?}")),
        }
    });
    eprintln!("operator {leader} leads");

    // 2. A broker in the cluster, with a password, addressed by its DNS name.
    let mqtt = cluster.create_namespace("mqtt");
    let mqtt_port = start_broker(&mqtt);
    let subscriber =
        Subscriber::connect_as(mqtt_port, "qliksense/#", Some((MQTT_USER, MQTT_PASSWORD)));

    // 3. The README's monitor: the service pod runs, the status says Ready with the endpoint.
    let qlik = cluster.create_namespace("qlik");
    create_monitor(&qlik, &mqtt);
    let udp: Service = wait_for_within("the UDP Service", POD_DEADLINE, || {
        qlik.get(MONITOR).ok_or("absent".to_owned())
    });
    let udp_port = node_port(&udp);
    let status = wait_for_within("the monitor to be Ready", POD_DEADLINE, || {
        let monitor = cluster.request("the monitor", monitors(&qlik).get(MONITOR));
        match condition(&monitor, "Ready") {
            Some((ready, _)) if ready == "True" => Ok(monitor.data["status"].clone()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(
        status["endpoint"].as_str(),
        Some(format!("<node>:{udp_port}").as_str()),
        "{status}"
    );
    let events: Vec<Event> = qlik.list();
    assert!(
        events
            .iter()
            .any(|e| e.involved_object.kind.as_deref() == Some("SessionMonitor")),
        "the operator records Events on the monitor: {events:?}"
    );
    let pod_selector = format!("app.kubernetes.io/instance={MONITOR}");
    let first_pod = ready_pods(&qlik, &pod_selector)
        .pop()
        .expect("the service pod is ready once the monitor is");
    // A lost node evicts it after 30 s, not Kubernetes' 300 (the admission plugin adds its
    // 300 s tolerations only where the pod has none of that key).
    let lost: Vec<(String, Option<i64>)> = first_pod
        .spec
        .iter()
        .flat_map(|s| s.tolerations.iter().flatten())
        .filter(|t| t.effect.as_deref() == Some("NoExecute"))
        .map(|t| (t.key.clone().unwrap_or_default(), t.toleration_seconds))
        .collect();
    assert_eq!(
        lost,
        [
            ("node.kubernetes.io/not-ready".to_owned(), Some(30)),
            ("node.kubernetes.io/unreachable".to_owned(), Some(30)),
        ],
        "the pod's node-lost tolerations"
    );

    // 4. Datagrams from outside the cluster to the NodePort → exact state on MQTT and HTTP.
    // kube-proxy programs a new NodePort within a second or so, and a datagram that arrives
    // before leaves an un-NATed conntrack entry that kube-proxy 1.20 never clears (README: "UDP
    // and kube-proxy"): the proxy sends only once a datagram from a throwaway port (an excluded
    // user, so nothing counts it) has arrived.
    let http: Service = qlik.must_get(&format!("{MONITOR}-http"));
    let http_ip = http.spec.unwrap().cluster_ip.unwrap();
    wait_for_within("the NodePort to reach the pod", POD_DEADLINE, || {
        let throwaway = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let probe = common::datagram::own("Start session", "qs1", "INTERNAL", "sa_probe", "p");
        let _ = throwaway.send_to(probe.as_bytes(), (Ipv4Addr::LOCALHOST, udp_port));
        std::thread::sleep(Duration::from_millis(200));
        let excluded = metric(&http_ip, "session_monitor_excluded_events_total").unwrap_or(0.0);
        (excluded > 0.0).then_some(()).ok_or("not yet".to_owned())
    });
    let proxy = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let send = |datagram: String| {
        proxy
            .send_to(datagram.as_bytes(), (Ipv4Addr::LOCALHOST, udp_port))
            .unwrap();
    };
    for (i, user) in ["ann", "joe", "zoe"].iter().enumerate() {
        send(own("Start session", "qs1", user, &format!("s{i}-1")));
        send(own("Start session", "qs2", user, &format!("s{i}-2")));
    }
    send(common::datagram::own(
        "Start session",
        "qs1",
        "INTERNAL",
        "sa_repository",
        "s-internal",
    ));
    send(own("Start session", "qs2", "bob", "s-bob"));
    send(own("Stop session", "qs2", "bob", "s-bob"));
    subscriber.wait_for_payload("qliksense/users/active/count", "3");
    subscriber.wait_for_payload(
        "qliksense/users/active/usernames",
        r#"["LAB\\ann","LAB\\joe","LAB\\zoe"]"#,
    );
    subscriber.wait_for_payload("qliksense/users/activeperserver/qs1/count", "3");
    subscriber.wait_for_payload("qliksense/users/activeperserver/qs2/count", "3");
    subscriber.wait_for_payload("qliksense/session-monitor/status", "online");
    let summary = |what: &str| -> Value {
        let (code, body) = wait_for_within(what, POD_DEADLINE, || {
            http_get_at(&http_ip, 9842, "/api/v1/summary").ok_or("no answer".to_owned())
        });
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let before = summary("/api/v1/summary through the HTTP Service");
    assert_eq!(before["active_users"], 3, "{before}");
    assert_eq!(before["active_sessions"], 6, "{before}");
    // 4b. kubectl get smon: the operator reads the service's /metrics through its HTTP Service
    // (every 30 s while it is ready) into status.activeUsers and activeSessions, the USERS and
    // SESSIONS columns.
    let status = wait_for_within("status.activeUsers from the operator", POD_DEADLINE, || {
        let monitor = cluster.request("the monitor", monitors(&qlik).get(MONITOR));
        let status = monitor.data["status"].clone();
        match (&status["activeUsers"], &status["activeSessions"]) {
            (users, sessions) if *users == json!(3) && *sessions == json!(6) => Ok(status),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(status["lastEventTime"].is_string(), "{status}");
    assert_eq!(
        before["active_users_per_host"],
        json!({"qs1": 3, "qs2": 3}),
        "{before}"
    );

    // 5. kubectl delete pod: the new pod restores every session from the ConfigMaps before it
    // is ready; a proxy that keeps sending (from its one port) reaches it once kube-proxy lets
    // go of the old pod (see the README's "UDP and kube-proxy").
    std::thread::sleep(Duration::from_secs(6)); // one checkpoint interval (5 s) and then some
    let deleted_at = std::time::Instant::now();
    // A Start is idempotent: resending it until it is counted counts it once.
    let replacement = delete_and_replace(&qlik, &first_pod, "a new ready service pod", || {
        send(own("Start session", "qs1", "late", "s-late"));
    });
    let names = |summary: &Value| -> Vec<String> {
        summary["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let after = summary("/api/v1/summary from the new pod");
    assert!(
        ["LAB\\ann", "LAB\\joe", "LAB\\zoe"]
            .iter()
            .all(|n| names(&after).iter().any(|m| m == n)),
        "the restored users are there as soon as the new pod is ready: {after}"
    );
    wait_for_within(
        "the proxy's flow to reach the new pod",
        POD_DEADLINE,
        || {
            send(own("Start session", "qs1", "late", "s-late"));
            let old_gone = qlik.get::<Pod>(&pod_name(&first_pod)).is_none();
            let received =
                metric(&http_ip, "session_monitor_datagrams_received_total").unwrap_or(0.0);
            (old_gone && received > 0.0).then_some(()).ok_or(format!(
                "old pod gone: {old_gone}; received by the new pod: {received}"
            ))
        },
    );
    eprintln!(
        "replaced by {}; the proxy's flow reached it {:?} after the deletion",
        pod_name(&replacement),
        deleted_at.elapsed()
    );
    subscriber.wait_for_payload("qliksense/users/active/count", "4");
    subscriber.wait_for_payload(
        "qliksense/users/active/usernames",
        r#"["LAB\\ann","LAB\\joe","LAB\\late","LAB\\zoe"]"#,
    );
    let (_, metrics) = http_get_at(&http_ip, 9842, "/metrics").expect("/metrics");
    assert!(
        metrics.contains("session_monitor_checkpoint_restores_total{result=\"restored\"} 1"),
        "the new pod restored the checkpoint:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("restores"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    configmap_bytes(&qlik);

    // 5b. What the pod runs as, and may do, seen from the node and the API server.
    let (uid, read_only) = process_of(&replacement);
    assert_eq!(
        uid, "65532 65532 65532 65532",
        "real, effective, saved and fs uid"
    );
    assert!(read_only, "the root file system is mounted read-only");
    let deployment: Deployment = qlik.must_get(MONITOR);
    let account = deployment
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .service_account_name
        .unwrap();
    let checkpoint = format!("{MONITOR}-checkpoint");
    let shard = format!("{MONITOR}-checkpoint-3");
    assert!(can(&qlik, &account, "get", "configmaps", Some(&checkpoint)));
    assert!(can(
        &qlik,
        &account,
        "update",
        "configmaps",
        Some(&checkpoint)
    ));
    assert!(can(&qlik, &account, "update", "configmaps", Some(&shard)));
    assert!(!can(
        &qlik,
        &account,
        "get",
        "configmaps",
        Some("kube-root-ca.crt")
    ));
    assert!(!can(
        &qlik,
        &account,
        "update",
        "configmaps",
        Some(&format!("{MONITOR}-config"))
    ));
    assert!(!can(&qlik, &account, "list", "configmaps", None));
    assert!(!can(&qlik, &account, "create", "configmaps", None));
    assert!(!can(
        &qlik,
        &account,
        "delete",
        "configmaps",
        Some(&checkpoint)
    ));
    assert!(!can(&qlik, &account, "get", "secrets", Some("qlik-mqtt")));

    // 5c. 200,000 sessions of as many users in the pod, with the default 16 checkpoint shards:
    // their checkpoint (about 8 MB with the history) calls for 18 or more, and the operator's shard autopilot grants
    // them without a restart while writes still succeed. Then the pod deleted: all restored,
    // every ConfigMap under the API server's 1 MiB.
    const MANY: u32 = 200_000;
    let before_many = 7.0; // ann, joe, zoe on two proxies, and late
    let granted_before = cluster
        .request("the monitor", monitors(&qlik).get(MONITOR))
        .data["status"]["checkpointShards"]
        .as_u64();
    assert_eq!(granted_before, Some(16), "the default");
    let started = std::time::Instant::now();
    for i in 0..MANY {
        // Ids and names as incompressible as real ones, so the checkpoint has a real size.
        let id = common::churn::session_id(u64::from(i));
        let user = common::churn::session_id(u64::from(i) | 1 << 40);
        send(own(
            "Start session",
            &format!("qs{}", 1 + i % 4),
            &format!("user-{}", &user[..23]),
            &id,
        ));
        if i % 500 == 499 {
            // About 25,000/s: well within what one pod takes, and no burst beyond its buffer.
            let due = started + Duration::from_millis(20) * (i / 500 + 1);
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
        }
    }
    let sessions = "session_monitor_active_sessions";
    let writes = "session_monitor_checkpoint_writes_total{result=\"success\"}";
    let failed_writes = "session_monitor_checkpoint_writes_total{result=\"failure\"}";
    let written = wait_for_within("200,000 more sessions in the pod", POD_DEADLINE, || {
        let n = metric(&http_ip, sessions).unwrap_or(0.0);
        let received = metric(&http_ip, "session_monitor_datagrams_received_total");
        (n == before_many + f64::from(MANY))
            .then(|| metric(&http_ip, writes).unwrap_or(0.0))
            .ok_or(format!("{n} sessions, {received:?} datagrams received"))
    });
    // A write that finishes after the count was reached may have begun before it (CI once saw a
    // checkpoint of 7.3 MB, some of them only): wait for one that holds them all.
    wait_for_within("a checkpoint of them all", POD_DEADLINE, || {
        let w = metric(&http_ip, writes).unwrap_or(0.0);
        let held = metric(&http_ip, "session_monitor_checkpoint_sessions").unwrap_or(0.0);
        (w > written && held == before_many + f64::from(MANY))
            .then_some(())
            .ok_or(format!("{w} writes, the last of {held} sessions"))
    });
    let big = ready_pods(&qlik, &pod_selector).pop().unwrap();
    let wanted = metric(&http_ip, "session_monitor_checkpoint_shards_wanted").unwrap();
    let bytes = metric(&http_ip, "session_monitor_checkpoint_size_bytes").unwrap();
    eprintln!("checkpoint of {bytes} bytes: {wanted} shards wanted");
    assert!(
        wanted > 16.0,
        "{wanted} shards wanted: the test needs a raise"
    );
    // The operator reads it within its 30 s refresh and grants it.
    let granted = wait_for_within("the autopilot's grant", POD_DEADLINE, || {
        let monitor = cluster.request("the monitor", monitors(&qlik).get(MONITOR));
        let status = &monitor.data["status"];
        match status["checkpointShards"].as_u64() {
            Some(g) if g as f64 >= wanted => Ok(g),
            other => Err(format!(
                "{other:?} granted, {} wanted",
                status["checkpointShardsWanted"]
            )),
        }
    });
    let events: Vec<Event> = qlik.list();
    let raised = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("CheckpointShardsRaised"))
        .unwrap_or_else(|| panic!("an Event CheckpointShardsRaised: {events:?}"));
    eprintln!(
        "autopilot: {}",
        raised.message.as_deref().unwrap_or_default()
    );
    let last = format!("{MONITOR}-checkpoint-{granted}");
    assert!(can(&qlik, &account, "update", "configmaps", Some(&last)));
    assert!(qlik.get::<ConfigMap>(&last).is_some(), "{last} exists");
    // The kubelet refreshes the mounted configuration within a minute or two; the same pod
    // then takes the count and writes on. The checkpoint's size varies a little from write to
    // write, so the operator may grant once more meanwhile (18, then 19): the pod takes what
    // the status grants when it looks, never less than the first grant.
    let raised_at = std::time::Instant::now();
    let took = wait_for_within(
        "the pod to take the grant",
        Duration::from_secs(180),
        || {
            let max = metric(&http_ip, "session_monitor_checkpoint_shards_max");
            let monitor = cluster.request("the monitor", monitors(&qlik).get(MONITOR));
            let now = monitor.data["status"]["checkpointShards"].as_u64();
            match (max, now) {
                (Some(max), Some(now)) if max == now as f64 && now >= granted => Ok(now),
                other => Err(format!("(pod, status): {other:?}")),
            }
        },
    );
    eprintln!(
        "the pod took {took} shards {:?} after the grant of {granted}",
        raised_at.elapsed()
    );
    let reloads = "session_monitor_config_reloads_total{outcome=\"shards_raised\"}";
    let reloaded = metric(&http_ip, reloads).unwrap_or(0.0);
    assert!(
        (1.0..=(took - 16) as f64).contains(&reloaded),
        "{reloaded} raises taken for {took} shards"
    );
    let still = ready_pods(&qlik, &pod_selector);
    assert_eq!(
        still.iter().map(pod_name).collect::<Vec<_>>(),
        vec![pod_name(&big)],
        "no restart for the grant"
    );
    // Checkpointing goes on with the grant: a change is written, and no write ever failed.
    send(own("Start session", "qs1", "late", "s-late"));
    send(own("Stop session", "qs1", "ann", "s0-1"));
    send(own("Start session", "qs1", "ann", "s0-1"));
    let before = metric(&http_ip, writes).unwrap_or(0.0);
    wait_for_within("a checkpoint after the grant", POD_DEADLINE, || {
        let w = metric(&http_ip, writes).unwrap_or(0.0);
        (w > before).then_some(()).ok_or(format!("{w} writes"))
    });
    assert_eq!(
        metric(&http_ip, failed_writes),
        Some(0.0),
        "no write failed"
    );

    let restored = delete_and_replace(&qlik, &big, "the pod after 200,000 sessions", || {});
    assert_eq!(
        first_metric(&http_ip, sessions),
        before_many + f64::from(MANY),
        "all restored when {} turned ready",
        pod_name(&restored)
    );
    let used = configmap_bytes(&qlik).iter().filter(|&&b| b > 0).count();
    assert!(
        used > 8,
        "200,000 sessions span several ConfigMaps ({used})"
    );
    subscriber.wait_for_payload("qliksense/users/active/count", &(4 + MANY).to_string());

    // 5d. A spec change rolls the pod (with a surge; the checkpoint Lease hands over) with the
    // state kept.
    assert_eq!(
        qlik.must_get::<Deployment>(MONITOR)
            .spec
            .unwrap()
            .strategy
            .unwrap()
            .type_
            .as_deref(),
        Some("RollingUpdate")
    );
    patch_monitor(&qlik, json!({"sessions": {"idleTimeout": "45m"}}));
    let rolled = replaced(
        &qlik,
        &pod_name(&restored),
        "the pod rolled by a spec change",
        || {},
    );
    assert_eq!(
        first_metric(&http_ip, sessions),
        before_many + f64::from(MANY)
    );

    // 5e. An invalid spec: Degraded, saying why; the running pod untouched.
    patch_monitor(&qlik, json!({"sessions": {"maxIdle": "10m"}}));
    let message = wait_for_within("Degraded for an invalid spec", POD_DEADLINE, || {
        let monitor = cluster.request("the monitor", monitors(&qlik).get(MONITOR));
        match condition(&monitor, "Degraded") {
            Some((degraded, message)) if degraded == "True" => Ok(message),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(message.contains("spec.sessions.maxIdle"), "{message}");
    std::thread::sleep(Duration::from_secs(3));
    let still: Vec<String> = ready_pods(&qlik, &pod_selector)
        .iter()
        .map(pod_name)
        .collect();
    assert_eq!(
        still,
        vec![pod_name(&rolled)],
        "the running pod is left alone"
    );
    patch_monitor(&qlik, json!({"sessions": {"maxIdle": "24h"}}));
    wait_for_within("Degraded cleared", POD_DEADLINE, || {
        let monitor = cluster.request("the monitor", monitors(&qlik).get(MONITOR));
        match condition(&monitor, "Degraded") {
            Some((degraded, _)) if degraded == "False" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // 5e'. spec.qlik: the pod gets the certificates Secret, reaches a Qlik site (testkit's fake,
    // on the host at the address pods reach it, by names only `resolve` knows) and counts the
    // users its proxy API lists, then drops them when it no longer lists them.
    let rolled = qlik_from_the_pod(&qlik, &http_ip, &pod_selector, &rolled);
    assert_eq!(
        first_metric(&http_ip, sessions),
        before_many + f64::from(MANY)
    );

    // 5e''. spec.apiAuth: the operator generates a token; the API needs it, /metrics does not.
    let (token, rolled) = api_token_from_the_operator(&qlik, &http_ip, &rolled);
    assert_eq!(
        first_metric(&http_ip, sessions),
        before_many + f64::from(MANY)
    );

    // 5f. helm upgrade to a second image tag, with two operator replicas: the operator and the
    // service roll, the state is kept.
    let (next_repository, next_tag) = next_image();
    let values = json!({
        "image": {"repository": next_repository, "tag": next_tag, "pullPolicy": "Never"},
        "replicaCount": 2,
    });
    helm(
        &cluster,
        &["upgrade", RELEASE, system.name(), &values.to_string()],
    );
    let operators = wait_for_within("two operator pods on the new tag", POD_DEADLINE, || {
        let ready = ready_pods(&system, "app.kubernetes.io/component=operator");
        let upgraded = ready
            .iter()
            .filter(|p| pod_image(p).ends_with(&next_tag))
            .count();
        let total = ready.len();
        (total == 2 && upgraded == 2)
            .then_some(ready)
            .ok_or(format!("{upgraded} of {total} upgraded"))
    });
    let upgraded = replaced(
        &qlik,
        &pod_name(&rolled),
        "the service pod on the new tag",
        || {},
    );
    assert!(
        pod_image(&upgraded).ends_with(&next_tag),
        "{}",
        pod_image(&upgraded)
    );
    assert_eq!(
        first_metric(&http_ip, sessions),
        before_many + f64::from(MANY)
    );

    // 5g. The leader's pod deleted: the other replica takes the Lease and reconciles a change
    // within the lease's duration (15 s) and grace (5 s).
    let holder = |system: &TestNamespace<'_>| {
        system
            .get::<Lease>(OPERATOR)
            .and_then(|l| l.spec?.holder_identity)
            .unwrap_or_default()
    };
    let leader = wait_for_within("a leader among the new pods", POD_DEADLINE, || {
        let h = holder(&system);
        operators
            .iter()
            .any(|p| pod_name(p) == h)
            .then_some(h.clone())
            .ok_or(h)
    });
    let operator_pods: Api<Pod> = system.api();
    cluster.request(
        "delete the leader",
        operator_pods.delete(&leader, &DeleteParams::default()),
    );
    let took_over = std::time::Instant::now();
    let generation = patch_monitor(&qlik, json!({"sessions": {"idleTimeout": "50m"}}))
        .metadata
        .generation
        .unwrap();
    wait_for_within(
        "the other replica to reconcile the change",
        Duration::from_secs(40),
        || {
            let monitor = cluster.request("the monitor", monitors(&qlik).get(MONITOR));
            let observed = monitor.data["status"]["observedGeneration"].as_i64();
            let h = holder(&system);
            (observed == Some(generation) && h != leader && !h.is_empty())
                .then_some(())
                .ok_or(format!("observed {observed:?}, holder {h}"))
        },
    );
    eprintln!("took over and reconciled in {:?}", took_over.elapsed());
    assert!(
        took_over.elapsed() < Duration::from_secs(25),
        "{:?}",
        took_over.elapsed()
    );
    let final_pod = replaced(
        &qlik,
        &pod_name(&upgraded),
        "the pod rolled by the new leader",
        || {},
    );
    assert_eq!(
        first_metric(&http_ip, sessions),
        before_many + f64::from(MANY)
    );
    let _ = final_pod;
    // The upgraded operators and the new leader kept the generated token (5e'').
    assert!(
        generated_token(&qlik) == token,
        "the token survives operator upgrades"
    );
    let (status, _) = wait_for_within("the API with the token", POD_DEADLINE, || {
        http_get_bearer(&http_ip, "/api/v1/users", Some(&token)).ok_or("no answer".to_owned())
    });
    assert_eq!(status, 200);

    // 6. helm uninstall, as the README says: the operator goes (garbage collection runs here),
    // the CRD and the monitors stay; deleting the monitors and the CRD removes the rest.
    helm(&cluster, &["uninstall", RELEASE, system.name()]);
    wait_for_within("the operator's pods to go", POD_DEADLINE, || {
        let left = ready_pods(&system, "app.kubernetes.io/component=operator").len()
            + system.list::<Pod>().len();
        (left == 0).then_some(()).ok_or(format!("{left} pods left"))
    });
    assert!(system.get::<Deployment>(OPERATOR).is_none());
    assert!(
        !ready_pods(&qlik, &pod_selector).is_empty(),
        "the monitor's service keeps running, unmanaged"
    );
    cluster.request(
        "delete the monitor",
        monitors(&qlik).delete(MONITOR, &DeleteParams::default()),
    );
    wait_for_within(
        "the monitor's children to be collected",
        POD_DEADLINE,
        || {
            let deployment = qlik.get::<Deployment>(MONITOR);
            let services = qlik.get::<Service>(MONITOR);
            (deployment.is_none() && services.is_none())
                .then_some(())
                .ok_or(format!(
                    "deployment {} service {}",
                    deployment.is_some(),
                    services.is_some()
                ))
        },
    );
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client().clone());
    cluster.request("delete the CRD", crds.delete(CRD, &DeleteParams::default()));
    release.uninstalled = true;
    drop(subscriber);
    qlik.delete();
    mqtt.delete();
    system.delete();
}
