//! Opt-in: the ConfigMap checkpoint store against a real kube-apiserver.
//!
//! These tests run when `SESSION_MONITOR_TEST_KUBECONFIG` names a kubeconfig (`.ci/run` starts a
//! real API server for them, see `../shared/k8s/README.md`). Without it each test prints one line
//! saying so and passes; with it set but the API server unreachable, they fail.
//!
//! Each test gets a namespace of its own, with a name never used before, deleted at the end, also
//! when the test panics. The tests do not wait for the deletion: an API server without a
//! controller-manager leaves a deleted namespace `Terminating` forever. That harness is
//! `session_monitor_testkit::cluster`, shared with the operator's test.
//!
//! The service talks to the cluster itself (`KUBECONFIG` in its environment); the test reads the
//! ConfigMaps with its own client, the way the service reads them, to see what really is stored.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use common::churn::session_id;
use common::datagram::{butler, butler_sos, own};
use common::{Service, free_tcp_port, wait_for};
use k8s_openapi::api::core::v1::ConfigMap;
use session_monitor::checkpoint::codec::{self, Checkpoint};
use session_monitor_testkit::cluster::{Cluster, TestNamespace};

/// The checkpoint's ConfigMap; its shards are `smon-checkpoint-1` … `-8`.
const NAME: &str = "smon-checkpoint";
const MAX_SHARDS: usize = 8;
/// The documented interface of the stored objects (README, "Checkpoint in Kubernetes").
const MANIFEST_ANNOTATION: &str = "sessionmonitor.io/checkpoint-manifest";
const GENERATION_ANNOTATION: &str = "sessionmonitor.io/checkpoint-generation";
const DATA_KEY: &str = "checkpoint";
/// The API server's limit for a ConfigMap's data.
const MIB: usize = 1024 * 1024;
const WRITES_OK: &str = "session_monitor_checkpoint_writes_total{result=\"success\"}";

/// A checkpoint as stored in the cluster, read and checked the way the service reads it.
struct Stored {
    generation: u64,
    /// The shard ConfigMaps the manifest lists, in order.
    shards: Vec<ConfigMap>,
    main: ConfigMap,
    checkpoint: Checkpoint,
}

impl Stored {
    fn objects(&self) -> impl Iterator<Item = &ConfigMap> {
        std::iter::once(&self.main).chain(&self.shards)
    }
}

fn annotation<'a>(cm: &'a ConfigMap, key: &str) -> Option<&'a str> {
    cm.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn chunk(cm: &ConfigMap) -> &[u8] {
    let name = cm.metadata.name.as_deref().unwrap_or_default();
    &cm.binary_data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .unwrap_or_else(|| panic!("ConfigMap {name} has no binaryData.{DATA_KEY}"))
        .0
}

/// What counts against the API server's 1 MiB: data and binaryData (decoded); annotations and
/// labels are added for a margin.
fn stored_bytes(cm: &ConfigMap) -> usize {
    let data: usize = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    let binary: usize = cm
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.0.len())
        .sum();
    let meta: usize = [&cm.metadata.annotations, &cm.metadata.labels]
        .into_iter()
        .flatten()
        .flatten()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    data + binary + meta
}

/// Reads `NAME`, its manifest and its shards. `None` when there is no checkpoint yet, or when a
/// writer replaced a shard between our reads (a later read sees a consistent one). Panics on
/// anything the service must never leave behind: a missing shard, a wrong length or CRC, bytes
/// that do not decode.
fn read_checkpoint(ns: &TestNamespace) -> Option<Stored> {
    let main = ns.get::<ConfigMap>(NAME)?;
    let text = annotation(&main, MANIFEST_ANNOTATION)
        .unwrap_or_else(|| panic!("ConfigMap {NAME} lacks the annotation {MANIFEST_ANNOTATION}"));
    let manifest: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(manifest["format"], 1, "{text}");
    let generation = manifest["generation"].as_u64().expect(text);
    let names: Vec<String> = manifest["shards"]
        .as_array()
        .expect(text)
        .iter()
        .map(|s| s.as_str().expect(text).to_owned())
        .collect();
    let mut bytes = chunk(&main).to_vec();
    let mut shards = Vec::new();
    for name in &names {
        let shard = ns
            .get::<ConfigMap>(name)
            .unwrap_or_else(|| panic!("shard {name} in the manifest {text} is missing"));
        if annotation(&shard, GENERATION_ANNOTATION) != Some(generation.to_string().as_str()) {
            return None; // rewritten for a newer checkpoint since we read NAME
        }
        bytes.extend_from_slice(chunk(&shard));
        shards.push(shard);
    }
    assert_eq!(
        manifest["bytes"].as_u64(),
        Some(bytes.len() as u64),
        "{text}"
    );
    assert_eq!(
        manifest["crc32"].as_u64(),
        Some(crc32fast::hash(&bytes) as u64),
        "{text}"
    );
    let checkpoint = codec::decode(&bytes).unwrap_or_else(|e| panic!("{text}: {e}"));
    Some(Stored {
        generation,
        shards,
        main,
        checkpoint,
    })
}

/// Waits until the checkpoint in the cluster passes `check`. It is read again whenever the
/// service has counted another successful write: everything counted before the metric was read
/// is visible to the read that follows, so no write is missed and none is waited for in vain.
fn wait_for_checkpoint(
    service: &Service,
    ns: &TestNamespace,
    what: &str,
    check: impl Fn(&Stored) -> bool,
) -> Stored {
    let mut read_after = None;
    wait_for(what, || {
        let writes = service.metric(WRITES_OK)?;
        if read_after == Some(writes) {
            return None;
        }
        let stored = read_checkpoint(ns)?;
        read_after = Some(writes);
        check(&stored).then_some(stored)
    })
}

/// Sessions per user (`DIRECTORY\userid` as first seen) in a checkpoint.
fn checkpointed_users(checkpoint: &Checkpoint) -> BTreeMap<String, u64> {
    let mut users = BTreeMap::new();
    for s in &checkpoint.sessions {
        *users
            .entry(format!("{}\\{}", s.user_directory, s.user_id))
            .or_default() += 1;
    }
    users
}

/// Sessions per user as `/api/v1/users` shows them.
fn active_users(users: &serde_json::Value) -> BTreeMap<String, u64> {
    users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap().to_owned(),
                u["sessions"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn expected(users: &[(&str, u64)]) -> BTreeMap<String, u64> {
    users.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

/// The service with the ConfigMap store in `ns`, reaching the cluster through `KUBECONFIG`.
/// MQTT goes to the embedded broker on a port of its own (no mosquitto needed).
fn service_args(ns: &TestNamespace) -> Vec<String> {
    [
        "--checkpoint-configmap",
        NAME,
        "--checkpoint-namespace",
        ns.name(),
        "--checkpoint-interval",
        "200ms",
        "--mqtt-embedded-listen",
        &format!("127.0.0.1:{}", free_tcp_port()),
    ]
    .map(str::to_owned)
    .to_vec()
}

fn start_service(dir: &Path, ns: &TestNamespace) -> Service {
    let args = service_args(ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = ns.cluster().kubeconfig().to_str().unwrap();
    Service::start_without_checkpoint_file(dir, &args, &[("KUBECONFIG", kubeconfig)])
}

/// Starts the stopped service again (same ports, same cluster, a new broker port) and waits
/// until it is ready, i.e. has restored the checkpoint.
fn restart_service(service: &mut Service, ns: &TestNamespace) {
    let args = service_args(ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    service.restart(&args);
}

fn metric(service: &Service, sample: &str) -> f64 {
    service
        .metric(sample)
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
}

#[test]
fn the_configmap_checkpoint_on_a_real_api_server_survives_sigterm_and_sigkill() {
    let Some(cluster) = Cluster::from_env(
        "the_configmap_checkpoint_on_a_real_api_server_survives_sigterm_and_sigkill",
    ) else {
        return;
    };
    let started = Instant::now();
    let ns = cluster.create_namespace("smon-e2e");
    let dir = tempfile::tempdir().unwrap();
    let mut service = start_service(dir.path(), &ns);
    assert_eq!(
        metric(
            &service,
            "session_monitor_checkpoint_restores_total{result=\"empty\"}"
        ),
        1.0,
        "a new namespace holds no checkpoint"
    );

    // Four users in all three formats, on three proxies; one of joe's sessions stops again.
    for datagram in [
        butler("Start session", "qs1", "LAB", "joe"),
        butler("Open connection", "qs1", "LAB", "joe"),
        butler_sos("Start session", "qs2", "CORP", "Ann"),
        own("Start session", "qs2", "LAB", "joe", "sid-1"),
        own("Start session", "qs2", "LAB", "joe", "sid-2"),
        own("Stop session", "qs2", "LAB", "joe", "sid-2"),
        own("Start session", "qs1", "CORP", "Émile", "sid-3"),
        butler_sos("Open connection", "qs3", "LAB", "kim"),
    ] {
        service.send(datagram);
    }
    let first = expected(&[
        ("CORP\\Ann", 1),
        ("CORP\\Émile", 1),
        ("LAB\\joe", 2),
        ("LAB\\kim", 1),
    ]);
    let users = wait_for("the four users in /api/v1/users", || {
        let users = service.get_json("/api/v1/users");
        (active_users(&users) == first
            && service.metric("session_monitor_datagrams_received_total") == Some(8.0))
        .then_some(users)
    });

    // SIGTERM: a clean exit, with the checkpoint in the ConfigMap.
    service.signal(libc::SIGTERM);
    let status = service.wait_exit();
    assert!(status.success(), "{status}:\n{}", service.log_text());
    let stored = read_checkpoint(&ns).expect("a checkpoint in the ConfigMap after SIGTERM");
    assert_eq!(checkpointed_users(&stored.checkpoint), first);
    assert!(
        stored.shards.is_empty(),
        "a small checkpoint needs no shard"
    );
    assert!(ns.get::<ConfigMap>(&format!("{NAME}-1")).is_none());
    assert_eq!(
        stored.main.metadata.labels.as_ref().unwrap()["app.kubernetes.io/name"],
        "session-monitor"
    );

    // Restarted, the same users are back before any new datagram, as they were.
    restart_service(&mut service, &ns);
    assert_eq!(service.get_json("/api/v1/users"), users);
    let summary = service.get_json("/api/v1/summary");
    assert_eq!(
        (&summary["active_users"], &summary["active_sessions"]),
        (&4.into(), &5.into())
    );
    assert_eq!(
        metric(&service, "session_monitor_datagrams_received_total"),
        0.0
    );
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_restored_sessions"),
        5.0
    );
    assert_eq!(
        metric(
            &service,
            "session_monitor_checkpoint_restores_total{result=\"restored\"}"
        ),
        1.0
    );

    // More traffic after the restart: joe's session on qs2 stops, Ann opens a second one, a
    // new user arrives on a new proxy.
    for datagram in [
        own("Stop session", "qs2", "LAB", "joe", "sid-1"),
        own("Start session", "qs1", "CORP", "Ann", "sid-4"),
        butler("Start session", "qs4", "LAB", "zoe"),
    ] {
        service.send(datagram);
    }
    let second = expected(&[
        ("CORP\\Ann", 2),
        ("CORP\\Émile", 1),
        ("LAB\\joe", 1),
        ("LAB\\kim", 1),
        ("LAB\\zoe", 1),
    ]);
    let users = wait_for("the new traffic in /api/v1/users", || {
        let users = service.get_json("/api/v1/users");
        (active_users(&users) == second
            && service.metric("session_monitor_datagrams_received_total") == Some(3.0))
        .then_some(users)
    });
    // The restarted process writes over the objects the first one created.
    let newer = wait_for_checkpoint(&service, &ns, "the new traffic in the ConfigMap", |s| {
        checkpointed_users(&s.checkpoint) == second
    });
    assert!(newer.generation > stored.generation);

    // SIGKILL: no final write; the periodic one is all there is, and it is enough.
    service.signal(libc::SIGKILL);
    let status = service.wait_exit();
    assert!(!status.success(), "killed: {status}");
    restart_service(&mut service, &ns);
    assert_eq!(service.get_json("/api/v1/users"), users);
    assert_eq!(
        metric(&service, "session_monitor_datagrams_received_total"),
        0.0
    );
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_restored_sessions"),
        6.0
    );

    drop(service);
    ns.delete();
    eprintln!("restart test took {:?}", started.elapsed());
}

#[test]
fn a_large_registry_is_sharded_across_configmaps_and_restored_exactly() {
    const SESSIONS: u64 = 100_000;
    const USERS: u64 = 20_000;
    const HOSTS: u64 = 4;
    let Some(cluster) =
        Cluster::from_env("a_large_registry_is_sharded_across_configmaps_and_restored_exactly")
    else {
        return;
    };
    let started = Instant::now();
    let ns = cluster.create_namespace("smon-e2e");
    let dir = tempfile::tempdir().unwrap();
    let mut service = start_service(dir.path(), &ns);

    // Paced so the socket buffer never overflows: each batch fits in the buffer the kernel
    // granted (a datagram of ~130 bytes occupies well under 4 KiB of it), and the next batch
    // goes once the service has read the previous one.
    let buffer = metric(&service, "session_monitor_udp_receive_buffer_bytes");
    let batch = ((buffer / 4096.0) as u64).clamp(64, 10_000);
    let mut sent = 0;
    while sent < SESSIONS {
        let end = (sent + batch).min(SESSIONS);
        for n in sent..end {
            service.send(own(
                "Start session",
                &format!("qs-proxy-{}", n % HOSTS),
                "LAB",
                &format!("user{:05}", n % USERS),
                &session_id(n),
            ));
        }
        sent = end;
        wait_for(&format!("the service to read {sent} datagrams"), || {
            (service.metric("session_monitor_datagrams_received_total")? == sent as f64)
                .then_some(())
        });
    }
    wait_for("every session in the registry", || {
        (service.metric("session_monitor_active_sessions")? == SESSIONS as f64).then_some(())
    });
    assert_eq!(
        metric(&service, "session_monitor_active_users"),
        USERS as f64
    );
    assert_eq!(
        metric(&service, "session_monitor_udp_kernel_drops_total"),
        0.0
    );
    eprintln!(
        "sent {SESSIONS} datagrams in batches of {batch} after {:?}",
        started.elapsed()
    );

    let stored = wait_for_checkpoint(&service, &ns, "all sessions in the ConfigMaps", |s| {
        s.checkpoint.sessions.len() == SESSIONS as usize
    });
    let shard_names: Vec<&str> = stored
        .shards
        .iter()
        .map(|s| s.metadata.name.as_deref().unwrap())
        .collect();
    let allowed: Vec<String> = (1..=MAX_SHARDS).map(|i| format!("{NAME}-{i}")).collect();
    assert!(
        !shard_names.is_empty(),
        "{} bytes in {NAME} alone",
        chunk(&stored.main).len()
    );
    assert!(
        shard_names.iter().all(|n| allowed.iter().any(|a| a == n)),
        "{shard_names:?}"
    );
    // Every object the service wrote, also the shards of earlier, smaller checkpoints: only
    // `NAME` and `NAME-1` … `NAME-8`, each under the API server's limit.
    let all = ns.list::<ConfigMap>();
    assert!(all.len() > shard_names.len());
    for cm in &all {
        let name = cm.metadata.name.as_deref().unwrap();
        assert!(
            name == NAME || allowed.iter().any(|a| a == name),
            "unexpected ConfigMap {name}"
        );
        let bytes = stored_bytes(cm);
        assert!(bytes < MIB, "ConfigMap {name} holds {bytes} bytes");
    }
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_shards"),
        shard_names.len() as f64
    );
    let total: usize = stored.objects().map(|cm| chunk(cm).len()).sum();
    eprintln!(
        "checkpoint of {total} bytes in {NAME} and {shard_names:?} after {:?}",
        started.elapsed()
    );

    let summary = service.get_json("/api/v1/summary");
    service.signal(libc::SIGTERM);
    let status = service.wait_exit();
    assert!(status.success(), "{status}:\n{}", service.log_text());
    restart_service(&mut service, &ns);
    let restored = service.get_json("/api/v1/summary");
    assert_eq!(
        (&restored["active_users"], &restored["active_sessions"]),
        (&USERS.into(), &SESSIONS.into())
    );
    assert_eq!(restored, summary, "the same registry, user by user");
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_restored_sessions"),
        SESSIONS as f64
    );
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_shards"),
        shard_names.len() as f64
    );
    assert_eq!(
        metric(&service, "session_monitor_datagrams_received_total"),
        0.0
    );

    drop(service);
    ns.delete();
    eprintln!("sharding test took {:?}", started.elapsed());
}
