//! Opt-in: the ConfigMap checkpoint store against a real kube-apiserver.
//!
//! These tests run when `SESSION_MONITOR_TEST_KUBECONFIG` names a kubeconfig (`.ci/run` starts a
//! real API server for them; the README's "Tests" section says how by hand). Without it each
//! test prints one line saying so and passes; with it set but the API server unreachable, they
//! fail.
//!
//! Each test gets a namespace of its own, with a name never used before, deleted at the end, also
//! when the test panics. The tests do not wait for the deletion: an API server without a
//! controller-manager leaves a deleted namespace `Terminating` forever. That harness is
//! `session_monitor_testkit::cluster`, shared with the operator's test.
//!
//! The service talks to the cluster itself (`KUBECONFIG` in its environment); the test reads the
//! ConfigMaps with its own client, the way the service reads them, to see what really is stored.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::churn::{self, Churn, session_id};
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
const WRITES_FAILED: &str = "session_monitor_checkpoint_writes_total{result=\"failure\"}";
const RESTORED: &str = "session_monitor_checkpoint_restores_total{result=\"restored\"}";

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
fn service_args(ns: &TestNamespace, interval: &str) -> Vec<String> {
    [
        "--checkpoint-configmap",
        NAME,
        "--checkpoint-namespace",
        ns.name(),
        "--checkpoint-interval",
        interval,
        "--mqtt-embedded-listen",
        &format!("127.0.0.1:{}", free_tcp_port()),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Checkpoints every 200 ms unless a test asks otherwise.
const INTERVAL: &str = "200ms";

fn start_service(dir: &Path, ns: &TestNamespace) -> Service {
    start_service_every(dir, ns, INTERVAL)
}

fn start_service_every(dir: &Path, ns: &TestNamespace, interval: &str) -> Service {
    let args = service_args(ns, interval);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = ns.cluster().kubeconfig().to_str().unwrap();
    Service::start_without_checkpoint_file(dir, &args, &[("KUBECONFIG", kubeconfig)])
}

/// Starts the stopped service again (same ports, same cluster, a new broker port) and waits
/// until it is ready, i.e. has restored the checkpoint.
fn restart_service(service: &mut Service, ns: &TestNamespace) {
    restart_service_every(service, ns, INTERVAL);
}

fn restart_service_every(service: &mut Service, ns: &TestNamespace, interval: &str) {
    let args = service_args(ns, interval);
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

/// The churn session numbers in a stored checkpoint.
fn stored_sessions(stored: &Stored) -> BTreeSet<u64> {
    stored
        .checkpoint
        .sessions
        .iter()
        .map(|s| churn::number(&s.user_id))
        .collect()
}

/// Shards written for a generation after the committed one: what a write cut short between its
/// first shard and its commit leaves.
fn uncommitted_shards(ns: &TestNamespace, stored: &Stored) -> usize {
    (1..=MAX_SHARDS)
        .filter_map(|i| ns.get::<ConfigMap>(&format!("{NAME}-{i}")))
        .filter(|cm| {
            annotation(cm, GENERATION_ANNOTATION)
                .and_then(|g| g.parse::<u64>().ok())
                .is_some_and(|g| g > stored.generation)
        })
        .count()
}

/// Fills the registry with `held` churn sessions and waits until the store holds all of them.
fn fill(service: &Service, ns: &TestNamespace, churn: &mut Churn, held: u64) -> Stored {
    let fill = churn.batch(held, 0);
    service.send_paced(&fill.datagrams());
    let stored = wait_for_checkpoint(service, ns, "the whole registry in the ConfigMaps", |s| {
        s.checkpoint.sessions.len() == held as usize
    });
    churn.check(&fill, stored_sessions(&stored)).unwrap();
    stored
}

/// SIGKILL aimed at 100 sharded ConfigMap writes (a checkpoint of 45,000 sessions, about
/// 1.2 MB, takes the main ConfigMap and a shard): every checkpoint left behind reads whole, holds each session
/// as before or after the last batch, and restores in full.
#[test]
fn sigkill_during_sharded_configmap_writes_leaves_old_or_new_never_a_mix() {
    const ITERATIONS: usize = 100;
    const HELD: u64 = 45_000;
    const BATCH: u64 = 1_000;
    let test = "sigkill_during_sharded_configmap_writes_leaves_old_or_new_never_a_mix";
    let Some(cluster) = Cluster::from_env(test) else {
        return;
    };
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let ns = cluster.create_namespace("smon-kill");
    let dir = tempfile::tempdir().unwrap();
    let every = "20ms";
    let mut service = start_service_every(dir.path(), &ns, every);
    let mut churn = Churn::default();
    let stored = fill(&service, &ns, &mut churn, HELD);
    assert!(!stored.shards.is_empty(), "the checkpoint is sharded");

    let started = Instant::now();
    let (mut in_write, mut cut_short) = (0, 0);
    for i in 0..ITERATIONS {
        let batch = churn.batch(BATCH, BATCH as usize);
        let offset = churn::send_until_a_write_starts(&service, &batch);
        let delay = Duration::from_millis(rng.u64(0..250));
        in_write += usize::from(churn::kill_in_a_write(&mut service, offset, delay));

        let stored = read_checkpoint(&ns).unwrap_or_else(|| {
            panic!("iteration {i}: the manifest names a shard of another generation")
        });
        cut_short += usize::from(uncommitted_shards(&ns, &stored) > 0);
        churn
            .check(&batch, stored_sessions(&stored))
            .unwrap_or_else(|e| panic!("iteration {i} (seed {seed}): {e}"));

        restart_service_every(&mut service, &ns, every);
        assert_eq!(metric(&service, RESTORED), 1.0, "iteration {i}");
        assert_eq!(
            metric(&service, "session_monitor_checkpoint_restored_sessions"),
            churn.held().len() as f64,
            "iteration {i}"
        );
    }
    eprintln!(
        "{ITERATIONS} kills (seed {seed}) in {:?}: {in_write} during a checkpoint write \
         ({cut_short} after writing a shard of the next generation); every checkpoint was whole",
        started.elapsed()
    );
    assert!(in_write > 0, "no kill landed in a write");
    drop(service);
    ns.delete();
}

/// An API server of this test's own, which it can kill and start again: etcd keeps running, so
/// what was committed survives, as in a control-plane restart.
struct OwnApiServer {
    tool: PathBuf,
    dir: tempfile::TempDir,
    restarted: Vec<std::process::Child>,
}

impl OwnApiServer {
    /// `None`, after saying why, without `SESSION_MONITOR_TEST_KUBE_APISERVER` (the path of the
    /// `kube-apiserver` tool; `.ci/run` sets it).
    fn start(test: &str) -> Option<OwnApiServer> {
        let Some(tool) = std::env::var_os("SESSION_MONITOR_TEST_KUBE_APISERVER") else {
            eprintln!("skipping {test}: SESSION_MONITOR_TEST_KUBE_APISERVER is not set");
            return None;
        };
        let server = OwnApiServer {
            tool: PathBuf::from(tool),
            dir: tempfile::tempdir().unwrap(),
            restarted: Vec::new(),
        };
        let out = Command::new(&server.tool)
            .arg("start")
            .arg(server.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(server)
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// SIGKILL to kube-apiserver; returns its executable and arguments for [`Self::start_again`].
    fn kill(&mut self) -> (String, Vec<String>) {
        let pid_file = self.dir.path().join("run/kube-apiserver.pid");
        let record = std::fs::read_to_string(&pid_file).unwrap();
        let mut fields = record.split_whitespace();
        let pid: i32 = fields.next().unwrap().parse().unwrap();
        let exe = fields.nth(1).unwrap().to_owned();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .skip(1)
            .map(|a| String::from_utf8(a.to_vec()).unwrap())
            .collect();
        // SAFETY: kill(2) on the API server this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        wait_for("kube-apiserver to exit", || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            stat.is_none_or(|s| s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')))
                .then_some(())
        });
        (exe, args)
    }

    /// Starts the killed API server again with its command line; the pid file is updated so
    /// that the tool's `stop` finds the new process.
    fn start_again(&mut self, (exe, args): (String, Vec<String>)) {
        let pid_file = self.dir.path().join("run/kube-apiserver.pid");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("logs/kube-apiserver.log"))
            .unwrap();
        let child = Command::new(&exe)
            .args(&args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let start_time = stat
            .rsplit(") ")
            .next()
            .unwrap()
            .split(' ')
            .nth(19)
            .unwrap();
        std::fs::write(&pid_file, format!("{} {start_time} {exe}\n", child.id())).unwrap();
        self.restarted.push(child);
    }
}

impl Drop for OwnApiServer {
    fn drop(&mut self) {
        let _ = Command::new(&self.tool)
            .arg("stop")
            .arg(self.dir.path())
            .output();
        for child in &mut self.restarted {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The API server killed at random moments of sharded checkpoint writes and started again, ten
/// times. Each time, once a write has failed and before the service may write again (it is
/// stopped with SIGSTOP), the stored
/// checkpoint reads whole and holds each session as before or after the batch; then the service
/// continues, writes the registry as it is, and at the end a restart restores all of it.
#[test]
fn an_api_server_restarted_in_the_middle_of_sharded_writes_leaves_old_or_new() {
    const ROUNDS: usize = 10;
    const HELD: u64 = 45_000;
    const BATCH: u64 = 1_000;
    let test = "an_api_server_restarted_in_the_middle_of_sharded_writes_leaves_old_or_new";
    let Some(mut server) = OwnApiServer::start(test) else {
        return;
    };
    let cluster = Cluster::connect(test, "its own kube-apiserver", server.kubeconfig());
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let ns = cluster.create_namespace("smon-apiserver");
    let dir = tempfile::tempdir().unwrap();
    let every = "20ms";
    let mut service = start_service_every(dir.path(), &ns, every);
    let mut churn = Churn::default();
    fill(&service, &ns, &mut churn, HELD);

    let mut cut_short = 0;
    for round in 0..ROUNDS {
        let batch = churn.batch(BATCH, BATCH as usize);
        churn::send_until_a_write_starts(&service, &batch);
        std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        let failed = metric(&service, WRITES_FAILED);
        let command = server.kill();
        // If the kill came after the batch's last write, nothing would be written again: one
        // more event (a connection on a session of the batch, no change of who is active)
        // makes the service write, and fail.
        service.send(churn::datagram("Open connection", batch.starts.start));
        // The write in flight (or the next) fails; then the service is frozen, so that nothing
        // it does after the API server is back hides what the crash left.
        wait_for("a checkpoint write to fail", || {
            (service.metric(WRITES_FAILED)? > failed).then_some(())
        });
        service.signal(libc::SIGSTOP);
        server.start_again(command);
        wait_for("the restarted API server to answer", || {
            cluster
                .run("GET /version", cluster.client().apiserver_version())
                .ok()
        });
        let stored = read_checkpoint(&ns).unwrap_or_else(|| {
            panic!("round {round}: the manifest names a shard of another generation")
        });
        cut_short += usize::from(uncommitted_shards(&ns, &stored) > 0);
        churn
            .check(&batch, stored_sessions(&stored))
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));

        service.signal(libc::SIGCONT);
        let stored = wait_for_checkpoint(&service, &ns, "the registry as it is, written", |s| {
            let sessions = stored_sessions(s);
            batch.starts.clone().all(|n| sessions.contains(&n))
                && batch.stops.iter().all(|n| !sessions.contains(n))
        });
        churn.check(&batch, stored_sessions(&stored)).unwrap();
    }
    let failed = metric(&service, WRITES_FAILED);
    eprintln!(
        "{ROUNDS} API server restarts (seed {seed}): {failed} checkpoint writes failed, \
         {cut_short} restarts found a shard of an uncommitted generation; every checkpoint was whole"
    );
    assert!(failed >= ROUNDS as f64);

    service.signal(libc::SIGKILL);
    service.wait_exit();
    restart_service_every(&mut service, &ns, every);
    assert_eq!(metric(&service, RESTORED), 1.0);
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_restored_sessions"),
        churn.held().len() as f64
    );
    drop(service);
    ns.delete();
}

/// The operator raises `checkpoint_configmap_shards` in the mounted configuration file when a
/// checkpoint outgrows its shards, and does not roll the pod for it: the running service reads
/// the file again and its next write uses the new shards. Here the service starts with one
/// shard, grows until a write fails for want of a free one, and the file is then rewritten the
/// way the kubelet updates a ConfigMap volume (a new file renamed over the old).
#[test]
fn a_raised_shard_count_in_the_config_file_applies_without_a_restart() {
    const BATCH: u64 = 15_000;
    let test = "a_raised_shard_count_in_the_config_file_applies_without_a_restart";
    let Some(cluster) = Cluster::from_env(test) else {
        return;
    };
    let ns = cluster.create_namespace("smon-raise");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let write_config = |shards: usize| {
        let next = dir.path().join(".config.toml.next");
        std::fs::write(&next, format!("checkpoint_configmap_shards = {shards}\n")).unwrap();
        std::fs::rename(&next, &config).unwrap();
    };
    write_config(1);
    let mut args = service_args(&ns, "100ms");
    args.extend(["--config".to_owned(), config.to_str().unwrap().to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = ns.cluster().kubeconfig().to_str().unwrap();
    let mut service =
        Service::start_without_checkpoint_file(dir.path(), &args, &[("KUBECONFIG", kubeconfig)]);

    // Grow until a write finds no free shard: the committed checkpoint holds the only one.
    let mut churn = Churn::default();
    let mut sessions = 0;
    while metric(&service, WRITES_FAILED) == 0.0 {
        assert!(sessions < 300_000, "no write failed with one shard");
        service.send_paced(&churn.batch(BATCH, 0).datagrams());
        sessions += BATCH;
        let ok = metric(&service, WRITES_OK);
        wait_for("a write of the batch, or a failed one", || {
            let settled = service.metric(WRITES_FAILED)? > 0.0 || service.metric(WRITES_OK)? > ok;
            settled.then_some(())
        });
    }
    // The failure may have come from a write of part of the last batch: the next attempt sizes
    // the whole registry (every datagram is read by now).
    let failed = metric(&service, WRITES_FAILED);
    wait_for("a write attempt on the whole registry", || {
        (service.metric(WRITES_FAILED)? > failed).then_some(())
    });
    let wanted = metric(&service, "session_monitor_checkpoint_shards_wanted");
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_shards_max"),
        1.0
    );
    assert!(wanted > 1.0, "{wanted} shards wanted");
    eprintln!("{sessions} sessions: a write failed; {wanted} shards wanted");

    let pid = service.pid();
    write_config(wanted as usize);
    let raised = "session_monitor_config_reloads_total{outcome=\"shards_raised\"}";
    wait_for("the service to read the raised setting", || {
        (service.metric(raised)? == 1.0).then_some(())
    });
    // The raise wakes the writer out of its back-off.
    let stored = wait_for_checkpoint(&service, &ns, "every session in the raised shards", |s| {
        s.checkpoint.sessions.len() == sessions as usize
    });
    assert!(!stored.shards.is_empty());
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_shards_max"),
        wanted
    );
    // And it keeps writing: more sessions (within the quarter of growth `wanted` allows for),
    // no more failures.
    let failed = metric(&service, WRITES_FAILED);
    service.send_paced(&churn.batch(BATCH / 5, 0).datagrams());
    sessions += BATCH / 5;
    wait_for_checkpoint(&service, &ns, "the next batch checkpointed", |s| {
        s.checkpoint.sessions.len() == sessions as usize
    });
    assert_eq!(metric(&service, WRITES_FAILED), failed);
    assert_eq!(service.pid(), pid, "the same process: no restart");
    let log = service.log_text();
    assert!(
        log.contains("checkpoint_configmap_shards raised by the configuration file"),
        "{log}"
    );
    for outcome in ["restart_needed", "lowering_ignored", "invalid"] {
        let sample = format!("session_monitor_config_reloads_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric(&service, &sample), 0.0, "{sample}");
    }

    // The next start reads the raised file and restores every session from the wider layout.
    service.signal(libc::SIGTERM);
    service.wait_exit();
    service.restart(&args);
    assert_eq!(
        metric(&service, "session_monitor_active_sessions"),
        sessions as f64
    );
    assert_eq!(metric(&service, RESTORED), 1.0);
    ns.delete();
}

/// A rollout's handover with two real processes and one real API server: the old one writes the
/// checkpoint; the new one starts beside it, turns ready as a standby (no writes), and both
/// count what reaches them; the old one stops, writes its last checkpoint and releases the
/// Lease; the new one takes it over and holds exactly what one process seeing every datagram
/// would, then writes the checkpoint itself.
#[test]
fn a_rollout_hands_the_checkpoint_over_through_the_lease() {
    let Some(cluster) = Cluster::from_env("a_rollout_hands_the_checkpoint_over_through_the_lease")
    else {
        return;
    };
    let ns = cluster.create_namespace("smon-handover");
    let start = |dir: &Path, pod: &str| {
        let mut args = service_args(&ns, INTERVAL);
        args.extend(["--checkpoint-lease".into(), "smon-writer".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let kubeconfig = ns.cluster().kubeconfig().to_str().unwrap();
        Service::start_without_checkpoint_file(
            dir,
            &args,
            &[("KUBECONFIG", kubeconfig), ("POD_NAME", pod)],
        )
    };
    let writer = "session_monitor_checkpoint_writer";
    let (old_dir, new_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut old = start(old_dir.path(), "smon-old");
    wait_for("the first process to hold the Lease", || {
        (old.metric(writer)? == 1.0).then_some(())
    });
    // Before the new pod: ann (kept), bob (stops at the old pod later), carl (stops at the new
    // one), dora (used at the new one).
    for (user, sid) in [("ann", "a1"), ("bob", "b1"), ("carl", "c1"), ("dora", "d1")] {
        old.send(own("Start session", "qs1", "LAB", user, sid));
    }
    wait_for_checkpoint(&old, &ns, "the four users checkpointed", |s| {
        checkpointed_users(&s.checkpoint).len() == 4
    });

    let mut new = start(new_dir.path(), "smon-new");
    let log = |old: &Service, new: &Service| {
        format!("old:\n{}\nnew:\n{}", old.log_text(), new.log_text())
    };
    assert_eq!(
        new.metric(writer),
        Some(0.0),
        "ready as a standby:\n{}",
        log(&old, &new)
    );
    assert_eq!(new.get_json("/api/v1/summary")["active_users"], 4);
    // Both count what reaches them meanwhile; the standby writes nothing.
    old.send(own("Stop session", "qs1", "LAB", "bob", "b1"));
    old.send(own("Start session", "qs1", "LAB", "eve", "e1"));
    new.send(own("Stop session", "qs2", "LAB", "carl", "c1"));
    new.send(own("Open connection", "qs2", "LAB", "dora", "d1"));
    new.send(own("Start session", "qs2", "LAB", "fay", "f1"));
    wait_for("each process to count what reached it", || {
        (old.metric("session_monitor_datagrams_received_total")? == 6.0
            && new.metric("session_monitor_datagrams_received_total")? == 3.0)
            .then_some(())
    });
    assert_eq!(
        metric(&new, WRITES_OK),
        0.0,
        "a standby never writes:\n{}",
        log(&old, &new)
    );

    // The old one stops: its last checkpoint, then the Lease is released and taken.
    let released = Instant::now();
    old.signal(libc::SIGTERM);
    assert!(old.wait_exit().success(), "{}", log(&old, &new));
    wait_for("the new process to take the Lease over", || {
        (new.metric(writer)? == 1.0).then_some(())
    });
    eprintln!("handover took {:?} after SIGTERM", released.elapsed());
    assert_eq!(
        metric(&new, "session_monitor_checkpoint_takeovers_total"),
        1.0
    );
    // A take-over is not a restore at start: that was one, when the standby began.
    assert_eq!(metric(&new, RESTORED), 1.0);
    let truth = expected(&[
        ("LAB\\ann", 1),
        ("LAB\\dora", 1),
        ("LAB\\eve", 1),
        ("LAB\\fay", 1),
    ]);
    assert_eq!(
        active_users(&new.get_json("/api/v1/users")),
        truth,
        "{}",
        log(&old, &new)
    );
    let stored = wait_for_checkpoint(&new, &ns, "the new writer's checkpoint", |s| {
        checkpointed_users(&s.checkpoint) == truth
    });
    assert!(stored.generation > 0);
    new.signal(libc::SIGTERM);
    assert!(new.wait_exit().success(), "{}", log(&old, &new));
}
