//! The ConfigMap store against the mocked API server: the exact requests it makes, and how it
//! answers conflicts, oversized checkpoints, API errors and corrupt data.

use std::sync::Arc;

use http::Method;
use serde_json::json;

use super::configmap::{CORRUPT_ANNOTATION, ConfigMapError, ConfigMapStore, MANIFEST_ANNOTATION};
use super::fake_api::{FakeApi, MAX_CONFIGMAP_BYTES};
use super::*;
use crate::exclusions::Exclusions;
use crate::metrics::Metrics;
use crate::metrics::{CheckpointRestore, CheckpointWrite};
use crate::parser::{Command, Format, ProxyEvent};
use crate::registry::{DEFAULT_MAX_HOSTS, ExpiryPolicy, ShardedRegistry};

const CMS: &str = "/api/v1/namespaces/qlik/configmaps";

fn store(api: &FakeApi, max_shards: usize, shard_bytes: usize) -> ConfigMapStore {
    ConfigMapStore::new(api.client("qlik"), "qlik", "cp", max_shards, shard_bytes)
}

fn get(name: &str) -> String {
    format!("GET {CMS}/{name}")
}
fn put(name: &str) -> String {
    format!("PUT {CMS}/{name}")
}
fn post() -> String {
    format!("POST {CMS}")
}

/// Incompressible, distinct bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn state() -> Arc<State> {
    Arc::new(State::new(
        ShardedRegistry::new(
            ExpiryPolicy::default(),
            Exclusions::default(),
            DEFAULT_MAX_HOSTS,
            8,
        ),
        Metrics::new(),
    ))
}

fn start(state: &State, user: &str, session_id: &str) {
    let event = ProxyEvent {
        format: Format::SessionMonitor,
        host: "qs1",
        command: Command::StartSession,
        user_directory: "LAB",
        user_id: user,
        origin: None,
        context: None,
        proxy_session_id: Some(session_id),
        message: "",
    };
    state.registry().apply(&event, UnixMillis::now());
    state.changed(true);
}

#[tokio::test]
async fn first_start_creates_then_replaces() {
    let api = FakeApi::default();
    let s = store(&api, 8, 1000);
    assert_eq!(s.load().await.unwrap(), None);
    assert_eq!(api.take_log(), [get("cp")]);

    s.save(b"first").await.unwrap();
    assert_eq!(
        api.take_log(),
        [post()],
        "404 seen at load: create, without asking again"
    );
    s.save(b"second").await.unwrap();
    assert_eq!(
        api.take_log(),
        [put("cp")],
        "known object: replace with its resourceVersion"
    );

    let cm = api.object("cp").unwrap();
    assert_eq!(cm["binaryData"]["checkpoint"], json!("c2Vjb25k")); // base64("second")
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/component"],
        "checkpoint"
    );
    let manifest: serde_json::Value = serde_json::from_str(
        cm["metadata"]["annotations"][MANIFEST_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["generation"], 2);
    assert_eq!(manifest["shards"], json!([]));
}

#[tokio::test]
async fn restore_reads_what_was_saved() {
    let api = FakeApi::default();
    store(&api, 8, 1000).save(b"registry bytes").await.unwrap();
    api.take_log();
    let fresh = store(&api, 8, 1000);
    assert_eq!(
        fresh.load().await.unwrap().as_deref(),
        Some(&b"registry bytes"[..])
    );
    assert_eq!(api.take_log(), [get("cp")]);
}

#[tokio::test]
async fn an_empty_configmap_made_by_the_operator_is_a_first_start() {
    let api = FakeApi::default();
    api.put_object(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cp", "ownerReferences": [{
        "apiVersion": "sessionmonitor.io/v1alpha1", "kind": "SessionMonitor", "name": "prod", "uid": "u-1"}]}}));
    let s = store(&api, 8, 1000);
    assert_eq!(s.load().await.unwrap(), None);
    s.save(b"x").await.unwrap();
    assert_eq!(api.take_log(), [get("cp"), put("cp")]);
    let cm = api.object("cp").unwrap();
    assert_eq!(
        cm["metadata"]["ownerReferences"][0]["name"], "prod",
        "the operator's owner reference is kept"
    );
}

#[tokio::test]
async fn large_checkpoints_are_sharded_into_the_free_bank_and_read_back() {
    let api = FakeApi::default();
    let s = store(&api, 4, 100);
    assert_eq!(s.load().await.unwrap(), None);
    api.take_log();

    let first = noise(250, 1); // chunks of 100, 100, 50: cp holds the first, cp-1 and cp-2 the rest
    s.save(&first).await.unwrap();
    assert_eq!(
        api.take_log(),
        [get("cp-1"), post(), get("cp-2"), post(), post()]
    );
    assert_eq!(s.shards_in_use().await, 2);

    // The next generation must not touch cp-1 and cp-2 until cp points away from them.
    let second = noise(300, 2);
    s.save(&second).await.unwrap();
    assert_eq!(
        api.take_log(),
        [get("cp-3"), post(), get("cp-4"), post(), put("cp")]
    );
    assert_eq!(
        store(&api, 4, 100).load().await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(api.take_log(), [get("cp"), get("cp-3"), get("cp-4")]);

    // A third goes back to the first bank, now free.
    let third = noise(180, 3);
    s.save(&third).await.unwrap();
    assert_eq!(api.take_log(), [put("cp-1"), put("cp")]);
    assert_eq!(store(&api, 4, 100).load().await.unwrap(), Some(third));
}

#[tokio::test]
async fn a_write_that_fails_before_its_commit_leaves_the_old_checkpoint_whole() {
    let api = FakeApi::default();
    let s = store(&api, 4, 100);
    let old = noise(250, 1);
    s.save(&old).await.unwrap();
    api.fail_next(Method::PUT, "/cp", 503);
    let err = s.save(&noise(250, 2)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    // New shards were written (cp-3, cp-4), but cp still names the old ones: old, not a mix.
    assert_eq!(store(&api, 4, 100).load().await.unwrap(), Some(old));
}

/// A commit that took effect although its answer was an error (the API server died after
/// writing to etcd): the next write must learn that, or it would take the shards the committed
/// manifest names for "free", overwrite them, and a crash before its own commit would leave
/// `cp` naming shards of another generation: an unreadable checkpoint, and every session lost
/// at the next start. Found while writing the fault test that restarts the real API server
/// during sharded writes.
#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_read_back_before_any_shard_is_reused() {
    let api = FakeApi::default();
    let s = store(&api, 4, 100);
    assert_eq!(s.load().await.unwrap(), None);
    s.save(&noise(250, 1)).await.unwrap(); // cp-1, cp-2
    api.lose_next_answer(Method::PUT, "/cp", 503);
    s.save(&noise(250, 2)).await.unwrap_err(); // cp-3, cp-4, and committed after all
    api.take_log();

    // The next write reads cp first, sees generation 2 on cp-3 and cp-4, and writes cp-1 and
    // cp-2; its commit fails, and what is stored is still generation 2, whole.
    api.fail_next(Method::PUT, "/cp", 503);
    s.save(&noise(250, 3)).await.unwrap_err();
    assert_eq!(
        api.take_log(),
        [get("cp"), put("cp-1"), put("cp-2"), put("cp")]
    );
    assert_eq!(
        store(&api, 4, 100).load().await.unwrap(),
        Some(noise(250, 2))
    );
    s.save(&noise(250, 3)).await.unwrap();
    assert_eq!(
        store(&api, 4, 100).load().await.unwrap(),
        Some(noise(250, 3))
    );
}

#[tokio::test]
async fn a_reader_never_returns_a_mix_of_generations() {
    let api = FakeApi::default();
    let s = store(&api, 2, 100);
    s.save(&noise(150, 1)).await.unwrap();
    // Someone overwrites the shard cp points at with another generation's data.
    let mut shard = api.object("cp-1").unwrap();
    shard["metadata"]["annotations"]["sessionmonitor.io/checkpoint-generation"] = json!("99");
    api.put_object(shard);
    let err = store(&api, 2, 100).load().await.unwrap_err();
    assert!(matches!(err, ConfigMapError::Corrupt { .. }), "{err}");
}

#[tokio::test]
async fn a_conflict_is_resolved_by_writing_the_current_registry_again() {
    let api = FakeApi::default();
    let state = state();
    let s = Store::ConfigMap(Arc::new(store(&api, 8, 900 * 1024)));
    restore(&s, &state).await.unwrap();
    start(&state, "joe", "s1");
    save(&s, &state).await.unwrap();
    api.take_log();

    api.touch("cp"); // another writer (an old pod still terminating, say)
    start(&state, "ann", "s2");
    save(&s, &state).await.unwrap();
    assert_eq!(api.take_log(), [put("cp"), get("cp"), put("cp")]);
    assert_eq!(state.metrics.checkpoint_conflicts.get(), 1);

    let restored = crate::state::State::new(
        ShardedRegistry::new(
            ExpiryPolicy::default(),
            Exclusions::default(),
            DEFAULT_MAX_HOSTS,
            8,
        ),
        Metrics::new(),
    );
    restore(
        &Store::ConfigMap(Arc::new(store(&api, 8, 900 * 1024))),
        &restored,
    )
    .await
    .unwrap();
    assert_eq!(
        restored.registry().active_users(),
        2,
        "the newest state won"
    );
}

#[tokio::test]
async fn no_configmap_over_1_mib_is_ever_sent() {
    let api = FakeApi::default();
    let s = store(&api, 8, configmap::DEFAULT_SHARD_BYTES);
    let big = noise(3 * 1024 * 1024, 7);
    // The fake answers 422 above 1 MiB, as the API server does; the store must not provoke it.
    s.save(&big).await.unwrap();
    for name in ["cp", "cp-1", "cp-2", "cp-3"] {
        let cm = api.object(name).unwrap_or_else(|| panic!("{name} written"));
        let encoded = cm["binaryData"]["checkpoint"].as_str().unwrap();
        assert!(encoded.len() * 3 / 4 <= MAX_CONFIGMAP_BYTES, "{name}");
    }
    assert_eq!(
        store(&api, 8, configmap::DEFAULT_SHARD_BYTES)
            .load()
            .await
            .unwrap(),
        Some(big)
    );
}

#[tokio::test]
async fn a_checkpoint_that_cannot_fit_is_refused_before_anything_is_sent() {
    let api = FakeApi::default();
    let s = store(&api, 2, configmap::DEFAULT_SHARD_BYTES);
    assert_eq!(s.load().await.unwrap(), None);
    api.take_log();
    let err = s.save(&noise(3 * 1024 * 1024, 7)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConfigMapError::TooLarge {
                needed: 3,
                free: 2,
                max: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("checkpoint_configmap_shards"));
    assert!(api.take_log().is_empty());
}

#[tokio::test(start_paused = true)]
async fn api_server_errors_at_start_are_retried_with_backoff() {
    let api = FakeApi::default();
    store(&api, 8, 1000)
        .save(&codec::encode(&codec::Checkpoint::default()))
        .await
        .unwrap();
    api.take_log();
    api.fail_next(Method::GET, "/cp", 503);
    api.fail_next(Method::GET, "/cp", 500);
    let state = state();
    let s = Store::ConfigMap(Arc::new(store(&api, 8, 1000)));
    restore_with_retry(&s, &state).await.unwrap();
    assert_eq!(api.take_log(), [get("cp"), get("cp"), get("cp")]);
    let m = &state.metrics;
    assert_eq!(m.checkpoint_restores(CheckpointRestore::Failed).get(), 2);
    assert_eq!(m.checkpoint_restores(CheckpointRestore::Restored).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_is_retried_with_backoff_while_running() {
    let api = FakeApi::default();
    let state = state();
    let s = Store::ConfigMap(Arc::new(store(&api, 8, 1000)));
    restore(&s, &state).await.unwrap();
    start(&state, "joe", "s1");
    api.take_log();
    for _ in 0..3 {
        api.fail_next(Method::POST, "/configmaps", 500);
    }
    let shutdown = crate::shutdown::Shutdown::default();
    let writer = tokio::spawn(run(
        s,
        state.clone(),
        Duration::from_secs(5),
        Duration::from_secs(20),
        Arc::new(std::sync::atomic::AtomicBool::new(true)),
        shutdown.at(crate::shutdown::Phase::Saving),
    ));
    // Attempts at 5 s, then after 10 s, 20 s, 40 s of backoff: the fourth succeeds.
    tokio::time::sleep(Duration::from_secs(5 + 10 + 20 + 40 + 1)).await;
    assert_eq!(
        state
            .metrics
            .checkpoint_writes(CheckpointWrite::Failure)
            .get(),
        3
    );
    assert_eq!(
        state
            .metrics
            .checkpoint_writes(CheckpointWrite::Success)
            .get(),
        1
    );
    shutdown.enter(crate::shutdown::Phase::Saving);
    writer.await.unwrap();
}

#[tokio::test]
async fn corrupt_data_is_copied_aside_when_allowed() {
    let api = FakeApi::default();
    store(&api, 8, 1000)
        .save(b"SMCP\x01 not zlib at all")
        .await
        .unwrap();
    api.take_log();
    let state = state();
    let s = Store::ConfigMap(Arc::new(store(&api, 8, 1000)));
    restore(&s, &state).await.unwrap();
    let log = api.take_log();
    assert_eq!(log, [get("cp"), post()]);
    let copies: Vec<String> = api
        .names()
        .into_iter()
        .filter(|n| n.starts_with("cp-corrupt-"))
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    let copy = api.object(&copies[0]).unwrap();
    // base64 of the corrupt bytes, kept for inspection
    assert_eq!(
        copy["binaryData"]["checkpoint"],
        json!("U01DUAEgbm90IHpsaWIgYXQgYWxs")
    );
    assert_eq!(
        state
            .metrics
            .checkpoint_restores(CheckpointRestore::Corrupt)
            .get(),
        1
    );
    assert_eq!(state.registry().active_sessions(), 0);
}

#[tokio::test]
async fn corrupt_data_leaves_an_annotation_when_a_copy_is_not_allowed() {
    let api = FakeApi::default();
    let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cp", "annotations": {
        MANIFEST_ANNOTATION: "{\"format\":1,\"generation\":4,\"bytes\":3,\"crc32\":1,\"shards\":[]}"}},
        "binaryData": {"checkpoint": "YWJj"}});
    api.put_object(cm.take());
    // Least-privilege RBAC names objects, and `create` cannot be limited by name: refused.
    api.fail_next(Method::POST, "/configmaps", 403);
    let state = state();
    let s = Store::ConfigMap(Arc::new(store(&api, 8, 1000)));
    restore(&s, &state).await.unwrap();
    assert_eq!(
        state
            .metrics
            .checkpoint_restores(CheckpointRestore::Corrupt)
            .get(),
        1
    );
    start(&state, "joe", "s1");
    save(&s, &state).await.unwrap();
    let cm = api.object("cp").unwrap();
    let note = cm["metadata"]["annotations"][CORRUPT_ANNOTATION]
        .as_str()
        .unwrap();
    assert!(note.contains("CRC-32"), "{note}");
}

#[tokio::test]
async fn the_fake_refuses_an_oversized_configmap_as_the_api_server_does() {
    // Guards the test above: with shards over the limit, the same save must fail with 422.
    let api = FakeApi::default();
    let s = store(&api, 8, 2 * 1024 * 1024);
    let err = s.save(&noise(3 * 1024 * 1024, 7)).await.unwrap_err();
    assert!(
        matches!(&err, ConfigMapError::Api(kube::Error::Api(status)) if status.is_invalid()),
        "{err}"
    );
}

/// Every write says how many shards the checkpoint's size calls for and how many it may use, so
/// an alert (and an operator) can act while writes still succeed; when they run short, a write
/// that does not fit fails with the setting named, and the gauges say why.
#[tokio::test]
async fn each_write_reports_the_shards_its_size_calls_for() {
    let api = FakeApi::default();
    let state = state();
    let s = Store::ConfigMap(Arc::new(store(&api, 4, 100)));
    restore(&s, &state).await.unwrap();
    let m = &state.metrics;
    start(&state, "joe", "s1");
    save(&s, &state).await.unwrap();
    let size = m.checkpoint_size_bytes.get() as usize;
    assert_eq!(
        m.checkpoint_sessions.get(),
        1,
        "what a restart would restore"
    );
    assert_eq!(
        m.checkpoint_shards_wanted.get() as usize,
        layout::shards_wanted(size, 100)
    );
    assert_eq!(m.checkpoint_shards_max.get(), 4);

    // Enough users that the checkpoint outgrows four shards of 100 bytes.
    for i in 0..200 {
        start(&state, &format!("user{i:03}"), &format!("sid-{i}"));
    }
    let err = save(&s, &state).await.unwrap_err();
    assert!(
        err.to_string().contains("checkpoint_configmap_shards"),
        "{err}"
    );
    assert!(m.checkpoint_shards_wanted.get() > m.checkpoint_shards_max.get());
}

/// Writes go to shards the committed checkpoint does not use, so about every other checkpoint
/// sits in high shard numbers; a store restarted with a lower `checkpoint_configmap_shards`
/// (by hand, outside the operator) still reads it rather than setting it aside as corrupt.
#[tokio::test]
async fn a_store_restarted_with_fewer_shards_reads_the_high_shards_it_wrote() {
    let api = FakeApi::default();
    let s = store(&api, 8, 100);
    assert_eq!(s.load().await.unwrap(), None);
    s.save(&noise(300, 1)).await.unwrap();
    let second = noise(300, 2);
    s.save(&second).await.unwrap();
    let manifest = api.object("cp").unwrap()["metadata"]["annotations"][MANIFEST_ANNOTATION]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        manifest.contains("\"cp-3\"") || manifest.contains("\"cp-4\""),
        "the second write went to higher shards: {manifest}"
    );
    assert_eq!(store(&api, 2, 100).load().await.unwrap(), Some(second));
}
