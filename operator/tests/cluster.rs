//! Opt-in: the real operator binary against a real kube-apiserver, end to end.
//!
//! Runs when `SESSION_MONITOR_TEST_KUBECONFIG` names a kubeconfig (`.ci/run` starts a real API
//! server for it; the README's "Tests" section says how by hand). Without it each test prints
//! one line saying so and passes; with it set but the API server unreachable, they fail.
//!
//! The main test applies the CRD from `crds/`, creates the example's Secret and SessionMonitor in
//! a namespace of its own, starts `session-monitor-operator` watching only that namespace (with
//! its Lease there too, so tests run in parallel), and checks what the operator made of it
//! through the API, the way an administrator would: children, status, Events, a rollout, drift
//! correction, an invalid spec, a missing Secret and a graceful shutdown that hands the leader
//! Lease back.
//!
//! The API server runs alone (no controller-manager): Deployments get no pods and no status, and
//! nothing is garbage-collected. The test plays the Deployment controller where it must, by
//! writing the Deployment's status itself. The namespace is deleted at the end, also when the
//! test panics, and never waited for (it stays `Terminating` without a controller-manager); that
//! harness is `session_monitor_testkit::cluster`, shared with the service's ConfigMap test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::config::Kubeconfig;
use serde_json::json;
use session_monitor_config::Settings;
use session_monitor_operator::crd::{ApiAuthSpec, SessionMonitor};
use session_monitor_operator::crdgen;
use session_monitor_testkit::cluster::{
    Cluster, FIELD_MANAGER, TestNamespace, free_tcp_port, http_get, wait_for,
};
use session_monitor_testkit::process::Process;

const DEFAULT_IMAGE: &str = "example/session-monitor:test";

// The example's objects (examples/sessionmonitor.yaml).
const NAME: &str = "qlik-prod";
const SECRET: &str = "qlik-mqtt";
const PASSWORD: &str = "change-me";

// The documented interface of the children (README, "Operator").
const CONFIG_MAP: &str = "qlik-prod-config";
const CONFIG_KEY: &str = "session-monitor.toml";
const CHECKPOINT: &str = "qlik-prod-checkpoint";
const CHECKSUM_ANNOTATION: &str = "sessionmonitor.io/config-checksum";
const ROLE_LABEL: &str = "sessionmonitor.io/role";
const LEASE: &str = "session-monitor-operator";
/// `spec.apiAuth.generateToken`: the Secret, its key, and where the pod finds it.
const TOKEN_SECRET: &str = "qlik-prod-api-token";
const RECONCILED: &str = "session_monitor_operator_reconciles_total{result=\"Reconciled\"}";
const TOKEN_KEY: &str = "token";
const TOKEN_DIR: &str = "/etc/session-monitor/api-token";
const TOKEN_FILE: &str = "/etc/session-monitor/api-token/token";
/// What the operator logs when it created the token's Secret (never the token).
const CREATED_LOG: &str = "created the API token Secret";

/// Applies the committed CRD, exactly as the file has it.
fn apply_crd(cluster: &Cluster) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crdgen::CRD_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let crd: serde_json::Value =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    cluster.apply_crd(&crd);
}

/// What the test reads in its namespace besides the children: the SessionMonitor and the Events
/// about it.
trait MonitorNamespace {
    /// The example's SessionMonitor.
    fn monitor(&self) -> SessionMonitor;

    /// Events (events.k8s.io/v1) about the object with `uid`.
    fn events(&self, uid: &str) -> Vec<Event>;

    /// Waits for an Event of `type_` and `reason` about `uid` whose note contains `note` and that
    /// was recorded at least `times` times (the recorder counts repeats in `series`).
    fn wait_for_event(&self, uid: &str, type_: &str, reason: &str, note: &str, times: i32)
    -> Event;
}

impl MonitorNamespace for TestNamespace<'_> {
    fn monitor(&self) -> SessionMonitor {
        self.must_get(NAME)
    }

    fn events(&self, uid: &str) -> Vec<Event> {
        self.list::<Event>()
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid))
            .collect()
    }

    fn wait_for_event(
        &self,
        uid: &str,
        type_: &str,
        reason: &str,
        note: &str,
        times: i32,
    ) -> Event {
        wait_for(
            &format!("a {type_} Event {reason:?} (×{times}) mentioning {note:?}"),
            || {
                let events = self.events(uid);
                events
                    .iter()
                    .find(|e| {
                        e.type_.as_deref() == Some(type_)
                            && e.reason.as_deref() == Some(reason)
                            && e.note.as_deref().unwrap_or_default().contains(note)
                            && e.series.as_ref().map_or(1, |s| s.count) >= times
                    })
                    .cloned()
                    .ok_or_else(|| describe_events(&events))
            },
        )
    }
}

/// The operator's identity as the Helm chart grants it: a ServiceAccount bound to a ClusterRole
/// with exactly the rules of the chart's `files/operator-rules.yaml` (generated from
/// `operator/src/rbac.rs`). Returns a kubeconfig that impersonates that ServiceAccount, so a
/// permission the code uses and the chart lacks fails the test (the admin identity hid a
/// missing `create` once). The ClusterRole and its binding are cluster-scoped and named for the
/// namespace; like the namespace, they stay on the throwaway test server.
fn least_privileged_kubeconfig(ns: &TestNamespace, dir: &Path) -> PathBuf {
    const ACCOUNT: &str = "session-monitor-operator";
    let rules_file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crdgen::CHART_RULES_FILE);
    let text = std::fs::read_to_string(&rules_file).unwrap();
    let rules: Vec<PolicyRule> =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", rules_file.display()));
    let cluster = ns.cluster();
    if ns.get::<ServiceAccount>(ACCOUNT).is_none() {
        ns.create(&ServiceAccount {
            metadata: ObjectMeta {
                name: Some(ACCOUNT.into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        });
    }
    let role_name = format!("{}-operator", ns.name());
    let roles: Api<ClusterRole> = Api::all(cluster.client().clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(cluster.client().clone());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    cluster.request(
        "apply the operator's ClusterRole",
        roles.patch(
            &role_name,
            &apply,
            &Patch::Apply(ClusterRole {
                metadata: ObjectMeta {
                    name: Some(role_name.clone()),
                    ..ObjectMeta::default()
                },
                rules: Some(rules),
                ..ClusterRole::default()
            }),
        ),
    );
    cluster.request(
        "apply the operator's ClusterRoleBinding",
        bindings.patch(
            &role_name,
            &apply,
            &Patch::Apply(ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(role_name.clone()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: role_name.clone(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: ACCOUNT.into(),
                    namespace: Some(ns.name().to_owned()),
                    ..Subject::default()
                }]),
            }),
        ),
    );
    let mut config = Kubeconfig::read_from(cluster.kubeconfig()).unwrap();
    for user in &mut config.auth_infos {
        if let Some(auth) = user.auth_info.as_mut() {
            auth.impersonate = Some(format!("system:serviceaccount:{}:{ACCOUNT}", ns.name()));
        }
    }
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    path
}

/// The operator binary as a child process, watching one namespace; killed when dropped.
struct Operator {
    process: Process,
    http_port: u16,
    /// Its leader-election identity (`POD_NAME`).
    identity: String,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Starts the operator with `--log-level log_level` and waits until `/readyz` answers 200.
    fn start(ns: &TestNamespace, log_level: &str) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("operator.log");
        let http_port = free_tcp_port();
        let identity = format!("operator-e2e-{}", std::process::id());
        let mut command = Command::new(env!("CARGO_BIN_EXE_session-monitor-operator"));
        // No settings leaking in from the environment of whoever runs the test.
        for (key, _) in std::env::vars() {
            if key.starts_with("SESSION_MONITOR_OPERATOR_") {
                command.env_remove(key);
            }
        }
        let kubeconfig = least_privileged_kubeconfig(ns, dir.path());
        command
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", &identity)
            .env_remove("POD_NAMESPACE")
            // Plain text in the log file, which failures print.
            .env("NO_COLOR", "1")
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--watch-namespaces", ns.name()])
            .args(["--lease-namespace", ns.name()])
            .args(["--default-image", DEFAULT_IMAGE])
            .args(["--log-level", log_level]);
        let mut operator = Operator {
            process: Process::spawn("the operator", &mut command, &log),
            http_port,
            identity,
            _dir: dir,
        };
        wait_for("the operator's /readyz to answer 200", || {
            operator.assert_running();
            match http_get(http_port, "/readyz") {
                Some((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        operator
    }

    /// [`Operator::start`], then waits until it holds the leader Lease and says so in
    /// `/metrics`.
    fn start_leading(ns: &TestNamespace, log_level: &str) -> Operator {
        let operator = Operator::start(ns, log_level);
        operator.wait_for_metric("session_monitor_operator_leader", 1.0);
        assert_eq!(
            lease_holder(ns).as_deref(),
            Some(operator.identity.as_str()),
            "the leader holds Lease {LEASE} in {}",
            ns.name()
        );
        operator
    }

    /// SIGTERM: a prompt exit 0, and the Lease handed back. kube-lease-manager releases by
    /// clearing `holderIdentity` (and the times), so a successor need not wait for it to expire.
    fn stop_and_release_the_lease(&mut self, ns: &TestNamespace) {
        assert_eq!(
            lease_holder(ns).as_deref(),
            Some(self.identity.as_str()),
            "the operator still leads before SIGTERM"
        );
        let term = Instant::now();
        self.sigterm();
        let status = self.wait_exit(Duration::from_secs(10));
        eprintln!(
            "the operator exited with {status} {:?} after SIGTERM",
            term.elapsed()
        );
        assert!(
            status.success(),
            "a graceful shutdown exits 0, not {status}:\n{}",
            self.log_text()
        );
        assert_eq!(
            lease_holder(ns),
            None,
            "the leader Lease is released on shutdown:\n{}",
            self.log_text()
        );
    }

    fn assert_running(&mut self) {
        self.process.assert_running();
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// The value of the sample `name` (with its labels, if any) in `/metrics`.
    fn metric(&self, name: &str) -> Option<f64> {
        let (status, body) = http_get(self.http_port, "/metrics")?;
        assert_eq!(status, 200, "/metrics: {body}");
        session_monitor_testkit::metrics::sample(&body, name)
    }

    fn wait_for_metric(&self, name: &str, value: f64) {
        wait_for(&format!("{name} {value} in /metrics"), || {
            match self.metric(name) {
                Some(v) if v == value => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }

    fn sigterm(&mut self) {
        self.process.signal(libc::SIGTERM);
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        self.process.wait_exit(within)
    }
}

/// The example's Secret and SessionMonitor, moved to `namespace`.
fn example(namespace: &str) -> (Secret, SessionMonitor) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sessionmonitor.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let document = |kind: &str| {
        text.split("\n---\n")
            .find(|d| d.contains(&format!("\nkind: {kind}\n")))
            .unwrap_or_else(|| panic!("{} has no {kind}", path.display()))
    };
    let mut secret: Secret = serde_saphyr::from_str(document("Secret")).unwrap();
    let mut monitor: SessionMonitor = serde_saphyr::from_str(document("SessionMonitor")).unwrap();
    assert_eq!(secret.name_any(), SECRET);
    assert_eq!(monitor.name_any(), NAME);
    secret.metadata.namespace = Some(namespace.to_owned());
    monitor.metadata.namespace = Some(namespace.to_owned());
    (secret, monitor)
}

fn secret(name: &str, username: &str, password: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([
            ("username".to_owned(), username.to_owned()),
            ("password".to_owned(), password.to_owned()),
        ])),
        ..Secret::default()
    }
}

fn condition<'a>(monitor: &'a SessionMonitor, type_: &str) -> Option<&'a Condition> {
    monitor
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// `generation 3, observed 3: Ready=False/Unavailable Progressing=True/RollingOut …`, for
/// assertion messages.
fn describe(monitor: &SessionMonitor) -> String {
    let status = monitor.status.clone().unwrap_or_default();
    let conditions: Vec<String> = status
        .conditions
        .iter()
        .map(|c| format!("{}={}/{} ({:?})", c.type_, c.status, c.reason, c.message))
        .collect();
    format!(
        "generation {:?}, observed {:?}, endpoint {:?}: {}",
        monitor.metadata.generation,
        status.observed_generation,
        status.endpoint,
        conditions.join(", ")
    )
}

fn describe_events(events: &[Event]) -> String {
    let all: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{}/{} ×{} {:?}",
                e.type_.as_deref().unwrap_or("?"),
                e.reason.as_deref().unwrap_or("?"),
                e.series.as_ref().map_or(1, |s| s.count),
                e.note.as_deref().unwrap_or_default()
            )
        })
        .collect();
    format!("events {all:?}")
}

/// Whether the monitor's status describes its current generation with these conditions, each
/// given as `(status, reason)`.
fn status_is(monitor: &SessionMonitor, expected: [(&str, (&str, &str)); 3]) -> bool {
    let current =
        monitor.status.as_ref().and_then(|s| s.observed_generation) == monitor.metadata.generation;
    current
        && expected.iter().all(|(type_, (status, reason))| {
            condition(monitor, type_).is_some_and(|c| {
                c.status == *status
                    && c.reason == *reason
                    && c.observed_generation == monitor.metadata.generation
            })
        })
}

fn wait_for_monitor(
    ns: &TestNamespace,
    what: &str,
    check: impl Fn(&SessionMonitor) -> bool,
) -> SessionMonitor {
    wait_for(&format!("the SessionMonitor: {what}"), || {
        let monitor = ns.monitor();
        if check(&monitor) {
            Ok(monitor)
        } else {
            Err(describe(&monitor))
        }
    })
}

fn checksum(deployment: &Deployment) -> String {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CHECKSUM_ANNOTATION))
        .cloned()
        .unwrap_or_else(|| panic!("the Deployment's pod template has no {CHECKSUM_ANNOTATION}"))
}

fn config_text(config_map: &ConfigMap) -> String {
    config_map
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .cloned()
        .unwrap_or_else(|| panic!("ConfigMap {CONFIG_MAP} has no key {CONFIG_KEY}"))
}

fn settings(config_map: &ConfigMap) -> Settings {
    let text = config_text(config_map);
    toml::from_str(&text).unwrap_or_else(|e| panic!("{CONFIG_KEY} is not valid: {e}\n{text}"))
}

/// The Deployment controller's part, which this API server lacks: its one pod is up to date
/// and available.
fn report_rollout_done(ns: &TestNamespace) {
    let deployment: Deployment = ns.must_get(NAME);
    let generation = deployment.metadata.generation.unwrap();
    let status = json!({"status": {
        "observedGeneration": generation,
        "replicas": 1,
        "updatedReplicas": 1,
        "readyReplicas": 1,
        "availableReplicas": 1,
    }});
    ns.cluster()
        .run(
            "PATCH the Deployment's status",
            ns.api::<Deployment>().patch_status(
                NAME,
                &PatchParams::default(),
                &Patch::Merge(&status),
            ),
        )
        .unwrap_or_else(|e| panic!("PATCH Deployment {NAME}/status: {e}"));
}

/// Labels and a controller owner reference to the monitor: what lets `kubectl get -l` find the
/// children and the garbage collector remove them.
fn assert_owned_and_labelled(kind: &str, meta: &ObjectMeta, uid: &str) {
    let name = meta.name.as_deref().unwrap_or_default();
    let owners = meta.owner_references.clone().unwrap_or_default();
    assert!(
        owners.iter().any(|o| o.uid == uid
            && o.kind == "SessionMonitor"
            && o.api_version == "sessionmonitor.io/v1alpha1"
            && o.name == NAME
            && o.controller == Some(true)),
        "{kind} {name}: owner references {owners:?} do not name SessionMonitor {NAME} (uid {uid}) as controller"
    );
    let labels = meta.labels.clone().unwrap_or_default();
    for (key, value) in [
        ("app.kubernetes.io/name", "session-monitor"),
        ("app.kubernetes.io/instance", NAME),
        ("app.kubernetes.io/managed-by", "session-monitor-operator"),
        ("app.kubernetes.io/component", "session-tracking"),
    ] {
        assert_eq!(
            labels.get(key).map(String::as_str),
            Some(value),
            "{kind} {name}: label {key} in {labels:?}"
        );
    }
}

/// A Service's ports as (name, port, protocol).
fn ports_of(service: &Service) -> Vec<(String, i32, Option<String>)> {
    service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port,
                p.protocol.clone(),
            )
        })
        .collect()
}

/// Every child of the example monitor, as the operator must have applied it.
fn assert_children(ns: &TestNamespace, uid: &str, shards: usize, service_type: &str) {
    let account: ServiceAccount = ns.must_get(NAME);
    assert_owned_and_labelled("ServiceAccount", &account.metadata, uid);

    let role: Role = ns.must_get(NAME);
    assert_owned_and_labelled("Role", &role.metadata, uid);
    let rules = role.rules.clone().unwrap_or_default();
    assert_eq!(rules.len(), 3, "Role rules {rules:?}");
    // The checkpoint writer's Lease: get and patch by name, create (RBAC cannot name a create).
    assert_eq!(
        (
            rules[1].resources.as_ref(),
            rules[1].resource_names.as_ref(),
            rules[1].verbs.as_slice()
        ),
        (
            Some(&vec!["leases".to_owned()]),
            Some(&vec![format!("{NAME}-writer")]),
            &["get".to_owned(), "patch".to_owned()][..]
        ),
        "{rules:?}"
    );
    assert_eq!(
        (
            rules[2].resources.as_ref(),
            rules[2].resource_names.as_ref(),
            rules[2].verbs.as_slice()
        ),
        (
            Some(&vec!["leases".to_owned()]),
            None,
            &["create".to_owned()][..]
        ),
        "{rules:?}"
    );
    let mut checkpoints = vec![CHECKPOINT.to_owned()];
    checkpoints.extend((1..=shards).map(|i| format!("{CHECKPOINT}-{i}")));
    assert_eq!(rules[0].api_groups, Some(vec![String::new()]), "{rules:?}");
    assert_eq!(
        rules[0].resources,
        Some(vec!["configmaps".to_owned()]),
        "{rules:?}"
    );
    assert_eq!(
        rules[0].resource_names.as_ref(),
        Some(&checkpoints),
        "the Role names exactly the checkpoint ConfigMaps"
    );
    assert_eq!(rules[0].verbs, ["get", "update"], "{rules:?}");

    let binding: RoleBinding = ns.must_get(NAME);
    assert_owned_and_labelled("RoleBinding", &binding.metadata, uid);
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        ("Role", NAME)
    );
    let subjects = binding.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "RoleBinding subjects {subjects:?}");
    assert_eq!(
        (
            subjects[0].kind.as_str(),
            subjects[0].name.as_str(),
            subjects[0].namespace.as_deref()
        ),
        ("ServiceAccount", NAME, Some(ns.name()))
    );

    let config: ConfigMap = ns.must_get(CONFIG_MAP);
    assert_owned_and_labelled("ConfigMap", &config.metadata, uid);
    assert_eq!(
        config.metadata.labels.as_ref().unwrap()[ROLE_LABEL],
        "config"
    );
    let text = config_text(&config);
    assert!(
        text.contains(&format!("checkpoint_configmap = \"{CHECKPOINT}\"")),
        "{CONFIG_KEY}:\n{text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "the Secret's password leaked into ConfigMap {CONFIG_MAP}:\n{text}"
    );
    let rendered = settings(&config);
    assert_eq!(rendered.idle_timeout, Some(Duration::from_secs(30 * 60)));
    assert_eq!(rendered.checkpoint_configmap_shards, Some(shards));
    assert_eq!(
        rendered.mqtt_username, None,
        "credentials stay in the Secret"
    );

    for name in &checkpoints {
        let checkpoint: ConfigMap = ns.must_get(name);
        assert_owned_and_labelled("ConfigMap", &checkpoint.metadata, uid);
        assert_eq!(
            checkpoint.metadata.labels.as_ref().unwrap()[ROLE_LABEL],
            "checkpoint"
        );
        assert!(
            checkpoint.data.is_none() && checkpoint.binary_data.is_none(),
            "checkpoint ConfigMap {name} must start empty: {checkpoint:?}"
        );
    }

    let service: Service = ns.must_get(NAME);
    assert_owned_and_labelled("Service", &service.metadata, uid);
    let spec = service.spec.clone().unwrap();
    assert_eq!(spec.type_.as_deref(), Some(service_type));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    let ports = ports_of(&service);
    assert_eq!(
        ports,
        [("udp-ingest".to_owned(), 9997, Some("UDP".to_owned()))]
    );
    let selector = Some(BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), NAME.to_owned()),
        (
            "app.kubernetes.io/name".to_owned(),
            "session-monitor".to_owned(),
        ),
    ]));
    assert_eq!(spec.selector, selector);
    // HTTP (metrics, probes, the API that lists user names) never on the exposed Service.
    let http: Service = ns.must_get(&format!("{NAME}-http"));
    assert_owned_and_labelled("Service", &http.metadata, uid);
    let http_spec = http.spec.clone().unwrap();
    assert_eq!(http_spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(http_spec.selector, selector);
    let http_ports = ports_of(&http);
    assert_eq!(
        http_ports,
        [("http-metrics".to_owned(), 9842, Some("TCP".to_owned()))]
    );

    let deployment: Deployment = ns.must_get(NAME);
    assert_owned_and_labelled("Deployment", &deployment.metadata, uid);
    let spec = deployment.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(1));
    // A surge: the new pod is ready before the old one stops (the checkpoint Lease hands over).
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate")
    );
    let sum = checksum(&deployment);
    assert!(
        sum.len() == 32 && sum.chars().all(|c| c.is_ascii_hexdigit()),
        "{CHECKSUM_ANNOTATION}: {sum:?}"
    );
    let pod = spec.template.spec.clone().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    let pod_security = pod.security_context.clone().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(
        pod_security.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some(DEFAULT_IMAGE));
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.privileged, Some(false));
    assert_eq!(
        security.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        security.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    let volumes = pod.volumes.clone().unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|v| v.config_map.as_ref().is_some_and(|c| c.name == CONFIG_MAP)),
        "the pod mounts {CONFIG_MAP}: {volumes:?}"
    );
    assert_eq!(credentials_secret(&deployment), SECRET);
}

/// The Secret the pod reads its MQTT user name from.
fn credentials_secret(deployment: &Deployment) -> String {
    let pod = deployment.spec.as_ref().unwrap().template.spec.as_ref();
    pod.and_then(|p| p.containers.first())
        .and_then(|c| c.env.as_ref())
        .and_then(|env| {
            env.iter()
                .find(|e| e.name == "SESSION_MONITOR_MQTT_USERNAME")
        })
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .map(|s| s.name.clone())
        .expect("SESSION_MONITOR_MQTT_USERNAME comes from a Secret")
}

fn lease_holder(ns: &TestNamespace) -> Option<String> {
    ns.get::<Lease>(LEASE)
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[test]
fn the_operator_deploys_heals_and_reports_a_session_monitor_on_a_real_api_server() {
    let test = "the_operator_deploys_heals_and_reports_a_session_monitor_on_a_real_api_server";
    let Some(cluster) = Cluster::from_env(test) else {
        return;
    };
    let started = Instant::now();
    let phase = |name: &str| eprintln!("[{:>7.2?}] {name}", started.elapsed());

    phase("CRD");
    apply_crd(&cluster);
    let ns = cluster.create_namespace("smon-op-e2e");
    let (example_secret, example_monitor) = example(ns.name());
    // The example's LoadBalancer: without a cloud provider it gets a node port and no address.
    let service_type = "LoadBalancer";
    ns.create(&example_secret);
    let created = ns.create(&example_monitor);
    let uid = created.uid().expect("the API server sets a uid");

    phase("operator start");
    let mut operator = Operator::start_leading(&ns, "info");

    phase("children and status");
    let monitor = wait_for_monitor(&ns, "a status for the first generation", |m| {
        status_is(
            m,
            [
                // No controller-manager: the Deployment never gets a pod.
                ("Ready", ("False", "Unavailable")),
                ("Progressing", ("True", "RollingOut")),
                ("Degraded", ("False", "Reconciled")),
            ],
        )
    });
    assert_children(
        &ns,
        &uid,
        usize::from(example_monitor.spec.checkpoint.shards),
        service_type,
    );
    let service: Service = ns.must_get(NAME);
    let udp_node_port = service.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    assert_eq!(
        monitor.status.as_ref().unwrap().endpoint,
        Some(format!("<node>:{udp_node_port}")),
        "a {service_type} Service (without a load balancer's address) is reached on its node port"
    );
    // The example asks for a ServiceMonitor; without the Prometheus Operator's API the operator
    // leaves it out, says why in a Warning Event, and still succeeds.
    ns.wait_for_event(
        &uid,
        "Warning",
        "ServiceMonitorUnavailable",
        "monitoring.coreos.com/v1",
        1,
    );
    let events = ns.events(&uid);
    assert!(
        events.iter().all(|e| e.type_.as_deref() != Some("Warning")
            || e.reason.as_deref() == Some("ServiceMonitorUnavailable")),
        "no other Warning Event for a healthy monitor: {}",
        describe_events(&events)
    );
    let reconciled = operator.metric(RECONCILED).unwrap_or(0.0);
    assert!(reconciled >= 1.0, "reconciles counted: {reconciled}");

    phase("Deployment available");
    report_rollout_done(&ns);
    wait_for_monitor(&ns, "Ready once its pod is available", |m| {
        status_is(
            m,
            [
                ("Ready", ("True", "Available")),
                ("Progressing", ("False", "Complete")),
                ("Degraded", ("False", "Reconciled")),
            ],
        )
    });
    ns.wait_for_event(
        &uid,
        "Normal",
        "Ready",
        &format!("<node>:{udp_node_port}"),
        1,
    );
    operator.wait_for_metric(
        "session_monitor_operator_monitors{condition=\"Ready\",status=\"True\"}",
        1.0,
    );

    phase("spec change rolls the Deployment");
    let before: Deployment = ns.must_get(NAME);
    let changed: SessionMonitor =
        ns.merge_patch(NAME, json!({"spec": {"sessions": {"idleTimeout": "45m"}}}));
    assert!(changed.metadata.generation > monitor.metadata.generation);
    wait_for_monitor(&ns, "the new generation observed, rolling out", |m| {
        status_is(
            m,
            [
                // The old pod serves until the Deployment controller replaces it.
                ("Ready", ("True", "Available")),
                ("Progressing", ("True", "RollingOut")),
                ("Degraded", ("False", "Reconciled")),
            ],
        )
    });
    let config: ConfigMap = ns.must_get(CONFIG_MAP);
    assert_eq!(
        settings(&config).idle_timeout,
        Some(Duration::from_secs(45 * 60)),
        "{CONFIG_MAP} renders the new idleTimeout"
    );
    let rolled: Deployment = ns.must_get(NAME);
    assert_ne!(
        checksum(&rolled),
        checksum(&before),
        "a new configuration changes the pod template, so the pod is replaced"
    );
    assert!(rolled.metadata.generation > before.metadata.generation);
    report_rollout_done(&ns);
    wait_for_monitor(&ns, "the rollout complete", |m| {
        condition(m, "Progressing").is_some_and(|c| c.status == "False")
    });

    phase("invalid spec");
    let good: Deployment = ns.must_get(NAME);
    let good_config: ConfigMap = ns.must_get(CONFIG_MAP);
    // The CRD's pattern lets a prefix length of 33 through; the operator parses it exactly.
    ns.merge_patch::<SessionMonitor>(
        NAME,
        json!({"spec": {"udp": {"allowedSources": ["10.0.0.0/33"]}}}),
    );
    let broken = wait_for_monitor(&ns, "Degraded by the invalid spec", |m| {
        status_is(
            m,
            [
                ("Ready", ("True", "Available")),
                ("Progressing", ("False", "InvalidSpec")),
                ("Degraded", ("True", "InvalidSpec")),
            ],
        )
    });
    let message = &condition(&broken, "Degraded").unwrap().message;
    assert!(
        message.starts_with("spec.udp.allowedSources[0]: \"10.0.0.0/33\""),
        "the Degraded message names the field: {message:?}"
    );
    ns.wait_for_event(
        &uid,
        "Warning",
        "InvalidSpec",
        "spec.udp.allowedSources[0]",
        1,
    );
    operator.wait_for_metric(
        "session_monitor_operator_monitors{condition=\"Degraded\",status=\"True\"}",
        1.0,
    );
    let kept: Deployment = ns.must_get(NAME);
    assert_eq!(
        (&kept.metadata.generation, &kept.spec),
        (&good.metadata.generation, &good.spec),
        "an invalid spec leaves the running Deployment alone"
    );
    assert_eq!(ns.must_get::<ConfigMap>(CONFIG_MAP).data, good_config.data);
    ns.merge_patch::<SessionMonitor>(
        NAME,
        json!({"spec": {"udp": {"allowedSources": ["10.20.0.0/16"]}}}),
    );
    wait_for_monitor(&ns, "recovered once the spec is fixed", |m| {
        status_is(
            m,
            [
                ("Ready", ("True", "Available")),
                ("Progressing", ("False", "Complete")),
                ("Degraded", ("False", "Reconciled")),
            ],
        )
    });
    ns.wait_for_event(&uid, "Normal", "Recovered", "", 1);
    assert_eq!(
        checksum(&ns.must_get(NAME)),
        checksum(&good),
        "the fixed spec is the configuration that runs: no rollout"
    );

    phase("drift: deleted and edited children");
    let old_service: Service = ns.must_get(NAME);
    ns.delete_object::<Service>(NAME);
    let restored = wait_for("the deleted Service to be restored", || {
        match ns.get::<Service>(NAME) {
            Some(s) if s.uid() != old_service.uid() => Ok(s),
            other => Err(format!("{:?}", other.map(|s| s.uid()))),
        }
    });
    assert_owned_and_labelled("Service", &restored.metadata, &uid);
    let node_port = restored.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    wait_for_monitor(&ns, "the endpoint of the new Service", |m| {
        m.status.as_ref().and_then(|s| s.endpoint.clone()) == Some(format!("<node>:{node_port}"))
    });
    let old_config: ConfigMap = ns.must_get(CONFIG_MAP);
    ns.delete_object::<ConfigMap>(CONFIG_MAP);
    let restored = wait_for("the deleted config ConfigMap to be restored", || {
        match ns.get::<ConfigMap>(CONFIG_MAP) {
            Some(c) if c.uid() != old_config.uid() => Ok(c),
            other => Err(format!("{:?}", other.map(|c| c.uid()))),
        }
    });
    assert_owned_and_labelled("ConfigMap", &restored.metadata, &uid);
    assert_eq!(restored.data, old_config.data);
    let scaled: Deployment = ns.merge_patch(NAME, json!({"spec": {"replicas": 3}}));
    assert_eq!(scaled.spec.unwrap().replicas, Some(3));
    wait_for("the Deployment scaled back to 1 replica", || {
        let replicas = ns
            .must_get::<Deployment>(NAME)
            .spec
            .and_then(|s| s.replicas);
        if replicas == Some(1) {
            Ok(())
        } else {
            Err(format!("replicas {replicas:?}"))
        }
    });
    report_rollout_done(&ns);

    phase("missing Secret");
    let good: Deployment = ns.must_get(NAME);
    let rotated = "qlik-mqtt-rotated";
    ns.merge_patch::<SessionMonitor>(
        NAME,
        json!({"spec": {"mqtt": {"credentialsSecret": {"name": rotated}}}}),
    );
    let missing = wait_for_monitor(&ns, "Degraded by the missing Secret", |m| {
        status_is(
            m,
            [
                ("Ready", ("True", "Available")),
                ("Progressing", ("False", "MissingSecret")),
                ("Degraded", ("True", "MissingSecret")),
            ],
        )
    });
    let message = &condition(&missing, "Degraded").unwrap().message;
    assert!(
        message.contains(rotated),
        "the Degraded message names the Secret: {message:?}"
    );
    ns.wait_for_event(&uid, "Warning", "MissingSecret", rotated, 1);
    let kept: Deployment = ns.must_get(NAME);
    assert_eq!(
        (&kept.metadata.generation, &kept.spec),
        (&good.metadata.generation, &good.spec),
        "a missing Secret leaves the running Deployment alone"
    );
    ns.create(&secret(rotated, "session-monitor", "rotated-password"));
    // Secrets are not watched: the operator looks again after MISSING_SECRET_RETRY (60 s).
    // Any change to the monitor triggers a reconcile at once; an annotation does not even
    // change its generation.
    let touched: SessionMonitor = ns.merge_patch(
        NAME,
        json!({"metadata": {"annotations": {"e2e.sessionmonitor.io/touched": "1"}}}),
    );
    assert_eq!(touched.metadata.generation, missing.metadata.generation);
    wait_for_monitor(&ns, "recovered once the Secret exists", |m| {
        condition(m, "Degraded").is_some_and(|c| c.status == "False" && c.reason == "Reconciled")
            && m.status.as_ref().unwrap().observed_generation == m.metadata.generation
    });
    let now_using: Deployment = ns.must_get(NAME);
    assert_eq!(credentials_secret(&now_using), rotated);
    assert_ne!(
        checksum(&now_using),
        checksum(&good),
        "other credentials roll the pod"
    );
    ns.wait_for_event(&uid, "Normal", "Recovered", "", 2);

    phase("SIGTERM");
    operator.stop_and_release_the_lease(&ns);
    drop(operator);
    ns.delete();
    eprintln!("operator end-to-end test took {:?}", started.elapsed());
}

/// The generated token's value, as the pod will read it.
fn token(secret: &Secret) -> String {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY))
        .unwrap_or_else(|| panic!("Secret {TOKEN_SECRET} has no key {TOKEN_KEY}"));
    String::from_utf8(bytes.0.clone()).expect("an ASCII token")
}

/// The generated token's Secret as the operator must have created it; returns it.
fn assert_token_secret(ns: &TestNamespace, uid: &str) -> Secret {
    let secret: Secret = ns.must_get(TOKEN_SECRET);
    assert_owned_and_labelled("Secret", &secret.metadata, uid);
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    let value = token(&secret);
    assert!(
        value.len() == 64 && value.chars().all(|c| c.is_ascii_hexdigit()),
        "a token of 64 hex characters, {} long",
        value.len()
    );
    secret
}

/// The Deployment mounts the token's Secret read-only where the configuration points.
fn assert_mounts_the_token(ns: &TestNamespace) {
    let deployment: Deployment = ns.must_get(NAME);
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let volumes = pod.volumes.unwrap_or_default();
    let volume = volumes
        .iter()
        .find(|v| v.name == "api-token")
        .unwrap_or_else(|| panic!("no volume of {TOKEN_SECRET}: {volumes:?}"));
    let source = volume.secret.clone().unwrap();
    assert_eq!(source.secret_name.as_deref(), Some(TOKEN_SECRET));
    assert_eq!(source.default_mode, Some(0o440));
    let items: Vec<_> = source
        .items
        .unwrap_or_default()
        .into_iter()
        .map(|i| (i.key, i.path))
        .collect();
    assert_eq!(items, [(TOKEN_KEY.to_owned(), "token".to_owned())]);
    let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
    assert!(
        mounts.iter().any(|m| m.name == "api-token"
            && m.mount_path == TOKEN_DIR
            && m.read_only == Some(true)),
        "{mounts:?}"
    );
    let config: ConfigMap = ns.must_get(CONFIG_MAP);
    assert_eq!(
        settings(&config).api_token_file,
        Some(PathBuf::from(TOKEN_FILE)),
        "{CONFIG_MAP} points the service at the mounted token"
    );
    assert!(
        !config_text(&config).contains("api_token ="),
        "no token in {CONFIG_MAP}"
    );
}

/// Triggers a reconcile (an annotation: no new generation) and waits until the operator counted
/// one more successful reconcile than `before`.
fn reconcile_again(ns: &TestNamespace, operator: &Operator, touch: &str) {
    let before = operator.metric(RECONCILED).unwrap_or(0.0);
    ns.merge_patch::<SessionMonitor>(
        NAME,
        json!({"metadata": {"annotations": {"e2e.sessionmonitor.io/touched": touch}}}),
    );
    wait_for("one more successful reconcile", || {
        match operator.metric(RECONCILED).unwrap_or(0.0) {
            now if now > before => Ok(()),
            now => Err(format!("{now} (before: {before})")),
        }
    });
}

/// `spec.apiAuth.generateToken`: the operator creates the token's Secret once, keeps it across
/// reconciles, mounts it, and replaces a deleted one with a new token that rolls the pod.
#[test]
fn the_operator_generates_a_stable_api_token_and_replaces_a_deleted_one() {
    let test = "the_operator_generates_a_stable_api_token_and_replaces_a_deleted_one";
    let Some(cluster) = Cluster::from_env(test) else {
        return;
    };
    let started = Instant::now();
    let phase = |name: &str| eprintln!("[{:>7.2?}] {name}", started.elapsed());

    phase("CRD");
    apply_crd(&cluster);
    let ns = cluster.create_namespace("smon-op-token");
    let (example_secret, mut example_monitor) = example(ns.name());
    example_monitor.spec.api_auth = Some(ApiAuthSpec {
        generate_token: Some(true),
        token_secret: None,
    });
    ns.create(&example_secret);
    let uid = ns
        .create(&example_monitor)
        .uid()
        .expect("the API server sets a uid");

    phase("operator start: the token's Secret");
    // With the chart's rules only: a missing `create` on Secrets fails here.
    let mut operator = Operator::start_leading(&ns, "info");
    wait_for_monitor(&ns, "applied, with the token", |m| {
        condition(m, "Degraded").is_some_and(|c| c.status == "False" && c.reason == "Reconciled")
            && m.status.as_ref().unwrap().observed_generation == m.metadata.generation
    });
    let first = assert_token_secret(&ns, &uid);
    let first_token = token(&first);
    assert_mounts_the_token(&ns);
    let created = ns.wait_for_event(&uid, "Normal", "ApiTokenCreated", TOKEN_SECRET, 1);
    assert!(
        !created.note.unwrap_or_default().contains(&first_token),
        "the Event never carries the token"
    );
    let rolled_out: Deployment = ns.must_get(NAME);

    phase("a second reconcile keeps the token");
    reconcile_again(&ns, &operator, "1");
    let kept: Secret = ns.must_get(TOKEN_SECRET);
    assert_eq!(kept.uid(), first.uid());
    assert_eq!(
        kept.resource_version(),
        first.resource_version(),
        "the Secret is never written again"
    );
    assert!(token(&kept) == first_token, "the token is stable");
    assert_eq!(
        checksum(&ns.must_get(NAME)),
        checksum(&rolled_out),
        "no rollout"
    );
    assert_eq!(
        operator.log_text().matches(CREATED_LOG).count(),
        1,
        "created once, however often reconciled"
    );

    phase("a change of the status alone starts no reconcile");
    // The operator's own status writes carry the service's live numbers; were they to start a
    // reconcile, a busy site would keep the operator reconciling nonstop. Five writes a second
    // apart: each would have started one; a requeue timer may fire meanwhile, at most once.
    let before = operator.metric(RECONCILED).unwrap_or(0.0);
    let monitors: Api<SessionMonitor> = ns.api();
    for users in 1..=5 {
        cluster.request(
            "a status write",
            monitors.patch_status(
                NAME,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"activeUsers": users}})),
            ),
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let after = operator.metric(RECONCILED).unwrap_or(0.0);
    assert!(
        after - before <= 1.0,
        "{} reconciles for five status writes",
        after - before
    );

    phase("a deleted token is replaced and rolls the pod");
    ns.delete_object::<Secret>(TOKEN_SECRET);
    // Secrets are not watched (that would need list/watch on all Secrets): the resync, or any
    // change to the monitor, recreates it.
    reconcile_again(&ns, &operator, "2");
    let second = wait_for("a new token Secret", || {
        match ns.get::<Secret>(TOKEN_SECRET) {
            Some(s) if s.uid() != first.uid() => Ok(s),
            other => Err(format!("{:?}", other.map(|s| s.uid()))),
        }
    });
    assert_token_secret(&ns, &uid);
    assert!(token(&second) != first_token, "a new token");
    // The same reconcile applies the Deployment after it created the Secret.
    wait_for("the new Secret's resourceVersion to roll the pod", || {
        let now = checksum(&ns.must_get(NAME));
        if now != checksum(&rolled_out) {
            Ok(())
        } else {
            Err(format!("checksum still {now}"))
        }
    });
    assert_mounts_the_token(&ns);
    ns.wait_for_event(&uid, "Normal", "ApiTokenCreated", TOKEN_SECRET, 2);
    let log = operator.log_text();
    assert_eq!(log.matches(CREATED_LOG).count(), 2, "{log}");
    assert!(
        !log.contains(&first_token) && !log.contains(&token(&second)),
        "the operator never logs a token"
    );

    phase("SIGTERM");
    operator.stop_and_release_the_lease(&ns);
    drop(operator);
    ns.delete();
    eprintln!("API token test took {:?}", started.elapsed());
}

/// Leader election and shutdown alone, with no SessionMonitor to reconcile.
#[test]
fn the_operator_leads_through_a_lease_and_hands_it_back_on_sigterm() {
    let Some(cluster) =
        Cluster::from_env("the_operator_leads_through_a_lease_and_hands_it_back_on_sigterm")
    else {
        return;
    };
    let started = Instant::now();
    apply_crd(&cluster);
    let ns = cluster.create_namespace("smon-op-e2e");
    // kube-runtime says at debug level when the controller's cache is filled.
    let mut operator = Operator::start_leading(&ns, "info,kube_runtime::controller=debug");
    assert_eq!(
        http_get(operator.http_port, "/healthz").map(|(status, _)| status),
        Some(200)
    );
    operator.wait_for_metric("session_monitor_operator_ready", 1.0);
    // A SIGTERM before the controller has listed the SessionMonitors would leave kube-runtime
    // 5.0.0's Runner unfinished; run.rs then gives up after SHUTDOWN_GRACE (10 s). This test
    // waits for the list, so that it checks the ordinary, prompt shutdown and the Lease's
    // release, not that bounded wait.
    wait_for("the controller's first list of SessionMonitors", || {
        operator.assert_running();
        let log = operator.log_text();
        if log.contains("store is ready, starting runner") {
            Ok(())
        } else {
            Err(log)
        }
    });
    operator.stop_and_release_the_lease(&ns);
    drop(operator);
    ns.delete();
    eprintln!("lease test took {:?}", started.elapsed());
}
