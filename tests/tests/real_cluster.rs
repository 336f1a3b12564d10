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

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use session_monitor_testkit::cluster::{Cluster, TestNamespace, wait_for_within};

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

/// `GET path` on `ip:port` (a ClusterIP: the host routes the service range into the cluster).
fn get(ip: &str, port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let address = SocketAddr::new(ip.parse().ok()?, port);
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
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

#[test]
fn the_product_runs_in_a_real_cluster() {
    let Some(cluster) = Cluster::from_cluster_env("the_product_runs_in_a_real_cluster") else {
        return;
    };
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

    // 4. Datagrams from outside the cluster to the NodePort → exact state on MQTT and HTTP.
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
    let http: Service = qlik.must_get(&format!("{MONITOR}-http"));
    let http_ip = http.spec.unwrap().cluster_ip.unwrap();
    let summary = |what: &str| -> Value {
        let (code, body) = wait_for_within(what, POD_DEADLINE, || {
            get(&http_ip, 9842, "/api/v1/summary").ok_or("no answer".to_owned())
        });
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let before = summary("/api/v1/summary through the HTTP Service");
    assert_eq!(before["active_users"], 3, "{before}");
    assert_eq!(before["active_sessions"], 6, "{before}");
    assert_eq!(
        before["active_users_per_host"],
        json!({"qs1": 3, "qs2": 3}),
        "{before}"
    );

    // 5. kubectl delete pod: the new pod restores every session from the ConfigMaps before it
    // is Ready, and what proxies send while it restores is kept.
    std::thread::sleep(Duration::from_secs(6)); // one checkpoint interval (5 s) and then some
    let pods: Api<Pod> = qlik.api();
    cluster.request(
        "delete the service pod",
        pods.delete(
            first_pod.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        ),
    );
    // A proxy keeps sending: a Start is idempotent, so resending it until the new pod is ready
    // counts once; it may only reach the new pod once that pod listens.
    let replacement = wait_for_within("a new ready service pod", POD_DEADLINE, || {
        send(own("Start session", "qs1", "late", "s-late"));
        let ready = ready_pods(&qlik, &pod_selector);
        ready
            .into_iter()
            .find(|p| p.metadata.name != first_pod.metadata.name)
            .ok_or("none yet".to_owned())
    });
    eprintln!(
        "replaced by {}",
        replacement.metadata.name.as_deref().unwrap()
    );
    let after = summary("/api/v1/summary from the new pod");
    let names: Vec<&str> = after["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert!(
        ["LAB\\ann", "LAB\\joe", "LAB\\zoe"]
            .iter()
            .all(|n| names.contains(n)),
        "the restored users are there as soon as the new pod is ready: {after}"
    );
    subscriber.wait_for_payload("qliksense/users/active/count", "4");
    subscriber.wait_for_payload(
        "qliksense/users/active/usernames",
        r#"["LAB\\ann","LAB\\joe","LAB\\late","LAB\\zoe"]"#,
    );
    let (_, metrics) = get(&http_ip, 9842, "/metrics").expect("/metrics");
    assert!(
        metrics.contains("session_monitor_checkpoint_restores_total{result=\"restored\"} 1"),
        "the new pod restored the checkpoint:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("restores"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let shards: Vec<ConfigMap> = qlik.list();
    for cm in &shards {
        let bytes: usize = cm
            .binary_data
            .iter()
            .flatten()
            .map(|(_, v)| v.0.len())
            .sum();
        assert!(bytes < 1 << 20, "{:?} is {bytes} bytes", cm.metadata.name);
    }

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
