//! Opt-in tests against a real kube-apiserver: the cluster, a namespace per test, and polling.
//!
//! Owns: reading the kubeconfig that `SESSION_MONITOR_TEST_KUBECONFIG` names (a test without it
//! prints one line and passes; with it set but the API server unreachable, it fails), a client on
//! a runtime of its own so that tests stay synchronous, namespaces with names never used before
//! and their deletion (at the end of a test and, best effort, when it panics), typed requests that
//! fail the test with the request in the message, and the polling helpers such tests wait with.
//!
//! Does not own anything a test checks: it creates no object but the namespace, and deletes
//! nothing but the namespace and its Services.
//!
//! The tests' API server runs alone (no controller-manager): a deleted namespace stays
//! `Terminating` forever, so nothing here waits for a deletion to finish.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

// Polling and HTTP are the light harness's; these tests reach them here too.
pub use crate::http::{free_tcp_port, http_get, http_get_at, http_get_with};
pub use crate::poll::{wait_for, wait_for_within};

/// The environment variable naming the kubeconfig of the API server to test against.
pub const KUBECONFIG_VAR: &str = "SESSION_MONITOR_TEST_KUBECONFIG";
/// The state directory of a real single-node cluster (`kube-cluster start DIR`) for the tests
/// that need pods, Services and controllers.
pub const CLUSTER_VAR: &str = "SESSION_MONITOR_TEST_CLUSTER";
/// How long any request or awaited condition may take before the test fails.
pub const DEADLINE: Duration = crate::poll::DEADLINE;
/// The field manager of everything the tests write themselves, and the `created-by` label of
/// their namespaces.
pub const FIELD_MANAGER: &str = "session-monitor-e2e";

/// The API server named by `SESSION_MONITOR_TEST_KUBECONFIG`, with a client on a runtime of its
/// own: the tests themselves are synchronous, and so are the guards that clean up on panic.
pub struct Cluster {
    kubeconfig: PathBuf,
    minor: u32,
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    /// Kinds (custom resources) whose objects a namespace prints when its test fails.
    explained: std::sync::Mutex<Vec<kube::core::ApiResource>>,
}

impl Cluster {
    /// `None`, after printing why, when the variable is unset or empty. Panics when it is set but
    /// the kubeconfig is unusable or its API server does not answer: a cluster that was asked
    /// for and is missing is a failure, not a skip.
    pub fn from_env(test: &str) -> Option<Cluster> {
        let Some(path) = std::env::var_os(KUBECONFIG_VAR).filter(|p| !p.is_empty()) else {
            eprintln!(
                "skipping {test}: {KUBECONFIG_VAR} is not set (set it to a kubeconfig to run it against a real API server)"
            );
            return None;
        };
        Some(Cluster::connect(test, KUBECONFIG_VAR, PathBuf::from(path)))
    }

    /// The real cluster named by `SESSION_MONITOR_TEST_CLUSTER` (its state directory, with
    /// `kubeconfig` inside), like [`Cluster::from_env`].
    pub fn from_cluster_env(test: &str) -> Option<Cluster> {
        let Some(dir) = std::env::var_os(CLUSTER_VAR).filter(|p| !p.is_empty()) else {
            eprintln!(
                "skipping {test}: {CLUSTER_VAR} is not set (set it to a kube-cluster state directory to run it in a real cluster)"
            );
            return None;
        };
        Some(Cluster::connect(
            test,
            CLUSTER_VAR,
            PathBuf::from(dir).join("kubeconfig"),
        ))
    }

    /// Connects to the API server of `kubeconfig`; panics when it is unusable or does not
    /// answer (`variable` names where it came from).
    pub fn connect(test: &str, variable: &str, kubeconfig: PathBuf) -> Cluster {
        // Absolute, so that it still holds for a child process started in another directory.
        let kubeconfig = std::path::absolute(kubeconfig).unwrap();
        // kube's rustls needs a crypto provider; install the one the binaries use.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Multi-threaded (one worker), so the client's background tasks (connection pool, request
        // buffer) keep running between the test's requests.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(async {
            let config = Kubeconfig::read_from(&kubeconfig)
                .unwrap_or_else(|e| panic!("{variable}={}: {e}", kubeconfig.display()));
            let config =
                kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
                    .await
                    .unwrap_or_else(|e| panic!("{variable}={}: {e}", kubeconfig.display()));
            kube::Client::try_from(config)
                .unwrap_or_else(|e| panic!("{variable}={}: {e}", kubeconfig.display()))
        });
        let mut cluster = Cluster {
            kubeconfig,
            minor: 0,
            runtime,
            client,
            explained: std::sync::Mutex::default(),
        };
        let what = format!(
            "the API server of {variable}={}",
            cluster.kubeconfig.display()
        );
        match cluster.run(&what, cluster.client.apiserver_version()) {
            Ok(version) => {
                eprintln!("{test}: API server {}", version.git_version);
                // Providers append to the minor version (`20+`): the digits are what compares.
                let digits: String = version
                    .minor
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                cluster.minor = digits.parse().unwrap_or(0);
            }
            Err(error) => {
                panic!("{what} does not answer (unset the variable to skip these tests): {error}")
            }
        }
        cluster
    }

    /// When a test fails, each of its namespaces prints its objects of this kind too (e.g. the
    /// SessionMonitors, whose status says what the operator saw).
    pub fn explain_on_failure(&self, kind: kube::core::ApiResource) {
        self.explained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(kind);
    }

    /// Applies a CustomResourceDefinition (server-side and forced, so that tests running in
    /// parallel may apply it again) and waits until the API server serves it.
    pub fn apply_crd(&self, crd: &serde_json::Value) {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let name = crd["metadata"]["name"].as_str().expect("a CRD has a name");
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.run(
            "the CRD to be applied",
            api.patch(name, &params, &Patch::Apply(crd)),
        )
        .unwrap_or_else(|e| panic!("cannot apply the CRD {name}: {e}"));
        wait_for(&format!("CRD {name} to be Established"), || {
            let crd = self.run("GET the CRD", api.get(name)).unwrap();
            let conditions = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .map(|c| format!("{}={}", c.type_, c.status))
                .collect::<Vec<_>>();
            if conditions.iter().any(|c| c == "Established=True") {
                Ok(())
            } else {
                Err(format!("conditions {conditions:?}"))
            }
        });
    }

    /// The kubeconfig (an absolute path), for the processes under test to reach the same cluster.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's minor version (`20` for 1.20; `0` when it does not say).
    pub fn minor(&self) -> u32 {
        self.minor
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Runs `future` (a few API requests) to completion; fails the test after [`DEADLINE`].
    pub fn run<F: Future>(&self, what: &str, future: F) -> F::Output {
        // The timer is made inside the runtime: `timeout` needs its clock when created.
        self.runtime
            .block_on(async { tokio::time::timeout(DEADLINE, future).await })
            .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for {what}"))
    }

    /// [`Cluster::run`] for one API request that must succeed: its error fails the test, after
    /// `what`.
    pub fn request<T>(&self, what: &str, request: impl Future<Output = kube::Result<T>>) -> T {
        self.run(what, request)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// A new namespace named `{prefix}-…`, a name never used before, deleted when the guard
    /// drops.
    pub fn create_namespace(&self, prefix: &str) -> TestNamespace<'_> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "{prefix}-{}-{nanos}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/created-by".to_owned(),
                    FIELD_MANAGER.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        // The guard exists before the request, so a creation whose answer was lost is cleaned
        // up as well.
        let guard = TestNamespace {
            cluster: self,
            name,
            deleted: false,
        };
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.run(
            "the namespace to be created",
            api.create(&PostParams::default(), &namespace),
        )
        .unwrap_or_else(|e| panic!("cannot create namespace {}: {e}", guard.name));
        eprintln!("namespace {}", guard.name);
        guard
    }
}

/// An object that lives in a namespace and has a compile-time kind: every k8s-openapi type and
/// every `#[derive(CustomResource)]` type with `namespaced`.
pub trait NamespacedObject:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug
{
}

impl<K> NamespacedObject for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
{
}

fn kind<K: NamespacedObject>() -> Cow<'static, str> {
    K::kind(&())
}

/// A namespace for one test. Dropped without [`TestNamespace::delete`] (a test that panicked),
/// it is deleted on the way out: best effort, bounded in time, never panicking in `drop`.
///
/// Its requests fail the test on an error, naming the request in the message.
pub struct TestNamespace<'c> {
    cluster: &'c Cluster,
    name: String,
    deleted: bool,
}

impl<'c> TestNamespace<'c> {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cluster(&self) -> &'c Cluster {
        self.cluster
    }

    pub fn api<K: NamespacedObject>(&self) -> Api<K> {
        Api::namespaced(self.cluster.client.clone(), &self.name)
    }

    /// The object, `None` when it does not exist.
    pub fn get<K: NamespacedObject>(&self, name: &str) -> Option<K> {
        let what = format!("GET {} {}/{name}", kind::<K>(), self.name);
        self.cluster.request(&what, self.api::<K>().get_opt(name))
    }

    /// The object, which must exist.
    pub fn must_get<K: NamespacedObject>(&self, name: &str) -> K {
        self.get(name)
            .unwrap_or_else(|| panic!("{} {}/{name} does not exist", kind::<K>(), self.name))
    }

    /// Every object of the kind in the namespace.
    pub fn list<K: NamespacedObject>(&self) -> Vec<K> {
        let what = format!("LIST {} in {}", kind::<K>(), self.name);
        let api = self.api::<K>();
        self.cluster
            .request(&what, api.list(&ListParams::default()))
            .items
    }

    pub fn create<K: NamespacedObject + Serialize>(&self, object: &K) -> K {
        let what = format!("POST {} {}", kind::<K>(), object.name_any());
        let api = self.api::<K>();
        self.cluster
            .request(&what, api.create(&PostParams::default(), object))
    }

    pub fn delete_object<K: NamespacedObject>(&self, name: &str) {
        let what = format!("DELETE {} {name}", kind::<K>());
        let api = self.api::<K>();
        self.cluster
            .request(&what, api.delete(name, &DeleteParams::background()));
    }

    /// A JSON merge patch, as `kubectl patch --type merge` or `kubectl edit` would send it.
    pub fn merge_patch<K: NamespacedObject>(&self, name: &str, patch: serde_json::Value) -> K {
        let what = format!("PATCH {} {name} with {patch}", kind::<K>());
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let api = self.api::<K>();
        self.cluster
            .request(&what, api.patch(name, &params, &Patch::Merge(&patch)))
    }

    /// Deletes the namespace, its Services first (they would hold their cluster IPs for good),
    /// and checks that the API server took it: it is gone or terminating. Does not wait for it
    /// to go.
    pub fn delete(mut self) {
        self.deleted = true;
        self.cluster
            .run(
                "the Services' deletion",
                delete_services(&self.api::<Service>()),
            )
            .unwrap_or_else(|e| panic!("cannot delete the Services in {}: {e}", self.name));
        let api: Api<Namespace> = Api::all(self.cluster.client.clone());
        self.cluster
            .run(
                "the namespace's deletion",
                api.delete(&self.name, &DeleteParams::background()),
            )
            .unwrap_or_else(|e| panic!("cannot delete namespace {}: {e}", self.name));
        let after = self
            .cluster
            .run("GET namespace", api.get_opt(&self.name))
            .unwrap();
        if let Some(namespace) = after {
            assert!(
                namespace.metadata.deletion_timestamp.is_some(),
                "namespace {} is not terminating after DELETE",
                self.name
            );
        }
    }
}

impl TestNamespace<'_> {
    /// What a failed test's log needs to explain itself: every pod's state and the end of each
    /// container's log (the previous container's too, after a restart), the namespace's Events in
    /// order, and its objects of the kinds [`Cluster::explain_on_failure`] names. Best effort and
    /// bounded in time: a cluster that does not answer leaves a line saying so.
    fn explain(&self) {
        use k8s_openapi::api::core::v1::{Event, Pod};
        use kube::api::{DynamicObject, LogParams};
        let name = &self.name;
        let pods: Api<Pod> = self.api();
        let events: Api<Event> = self.api();
        let kinds = self
            .cluster
            .explained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let client = self.cluster.client.clone();
        let report = self.cluster.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                let mut out = format!("\n===== namespace {name}: what the cluster saw =====\n");
                match pods.list(&ListParams::default()).await {
                    Ok(list) => {
                        for pod in list {
                            let pod_name = pod.name_any();
                            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                            out += &format!("--- pod {pod_name} ({phase:?})\n");
                            for c in pod.status.iter().flat_map(|s| s.container_statuses.iter().flatten()) {
                                out += &format!(
                                    "container {}: ready={} restarts={} state={:?} last={:?}\n",
                                    c.name, c.ready, c.restart_count, c.state, c.last_state
                                );
                                for previous in [true, false] {
                                    if previous && c.restart_count == 0 {
                                        continue;
                                    }
                                    let params = LogParams {
                                        container: Some(c.name.clone()),
                                        tail_lines: Some(150),
                                        previous,
                                        ..LogParams::default()
                                    };
                                    let which = if previous { "previous log" } else { "log" };
                                    match pods.logs(&pod_name, &params).await {
                                        Ok(log) => out += &format!("--- {pod_name}/{} {which} (last 150 lines)\n{log}\n", c.name),
                                        Err(e) => out += &format!("--- {pod_name}/{} {which}: {e}\n", c.name),
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => out += &format!("cannot list pods: {e}\n"),
                }
                match events.list(&ListParams::default()).await {
                    Ok(list) => {
                        let mut list = list.items;
                        let at = |e: &Event| {
                            e.last_timestamp
                                .as_ref()
                                .map(|t| t.0)
                                .or_else(|| e.event_time.as_ref().map(|t| t.0))
                        };
                        list.sort_by_key(at);
                        out += &format!("--- {} Events\n", list.len());
                        for e in list {
                            out += &format!(
                                "{} {} {}/{} {}: {} (x{})\n",
                                at(&e).map(|t| t.to_string()).unwrap_or_default(),
                                e.type_.unwrap_or_default(),
                                e.involved_object.kind.unwrap_or_default(),
                                e.involved_object.name.unwrap_or_default(),
                                e.reason.unwrap_or_default(),
                                e.message.unwrap_or_default(),
                                e.count.unwrap_or(1)
                            );
                        }
                    }
                    Err(e) => out += &format!("cannot list Events: {e}\n"),
                }
                for kind in kinds {
                    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), name, &kind);
                    match api.list(&ListParams::default()).await {
                        Ok(list) => {
                            for object in list {
                                let shown = serde_json::json!({
                                    "spec": object.data.get("spec"),
                                    "status": object.data.get("status"),
                                });
                                out += &format!(
                                    "--- {} {}\n{}\n",
                                    kind.kind,
                                    object.name_any(),
                                    serde_json::to_string_pretty(&shown).unwrap_or_default()
                                );
                            }
                        }
                        Err(e) => out += &format!("cannot list {}: {e}\n", kind.plural),
                    }
                }
                out
            })
            .await
        });
        match report {
            Ok(report) => eprintln!("{report}===== end of namespace {name} ====="),
            Err(_) => eprintln!(
                "namespace {name}: the cluster did not answer within 30 s; nothing to show"
            ),
        }
    }
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // A failed test's log is all CI keeps: say what the cluster saw before it goes.
        if std::thread::panicking() {
            self.explain();
        }
        let services = self.api::<Service>();
        let api: Api<Namespace> = Api::all(self.cluster.client.clone());
        let params = DeleteParams::background();
        let result = self.cluster.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                if let Err(error) = delete_services(&services).await {
                    eprintln!("could not delete the Services in {}: {error}", self.name);
                }
                api.delete(&self.name, &params).await
            })
            .await
        });
        match result {
            Ok(Ok(_)) => eprintln!("deleted namespace {}", self.name),
            Ok(Err(error)) => eprintln!("could not delete namespace {}: {error}", self.name),
            Err(_) => eprintln!("timed out deleting namespace {}", self.name),
        }
    }
}

/// Deletes every Service in a namespace. A namespace never finishes terminating without a
/// controller-manager, and its Services would keep their cluster IPs and node ports for good:
/// a long-lived test API server (service range /24) would run out after a few hundred runs.
async fn delete_services(api: &Api<Service>) -> kube::Result<()> {
    for service in api.list(&ListParams::default()).await? {
        match api
            .delete(&service.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
