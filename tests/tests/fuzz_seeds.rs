//! The fuzzers' seed corpora (`fuzz/seeds/<target>/`): real inputs of every kind, so that
//! libFuzzer starts from datagrams, checkpoints, ConfigMaps, configuration files and specs that
//! reach deep into the code rather than from nothing.
//!
//! This test checks that every committed seed is still what its target expects (a checkpoint
//! seed decodes with this build's codec, a spec seed validates, …), so a format change cannot
//! quietly turn the seeds into noise. `SESSION_MONITOR_WRITE_FUZZ_SEEDS=1 cargo test -p
//! session-monitor-e2e --test fuzz_seeds` writes them afresh from the real encoders, and the
//! well-formed datagrams from the one datagram renderer (`session_monitor_simulate::datagram`).
//!
//! It lives with the end-to-end tests because the seeds need the service's codec and the
//! operator's validation; the fuzz crate itself builds only with nightly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use session_monitor::checkpoint::codec;
use session_monitor::checkpoint::layout::{self, Assembly};
use session_monitor::config::{Config, Settings};
use session_monitor::exclusions::Exclusions;
use session_monitor::history::{History, Sample};
use session_monitor::parser::{self, Command, Format, Limits};
use session_monitor::registry::sharded::ShardedRegistry;
use session_monitor::registry::{ExpiryPolicy, UnixMillis};
use session_monitor_operator::crd::SessionMonitor;
use session_monitor_operator::validate;
use session_monitor_simulate::datagram::Datagram;

/// Separates datagrams in a `datagram` seed (the target's convention).
const SEPARATOR: u8 = 0x1e;
const START: UnixMillis = UnixMillis(1_796_083_200_000);

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
}

/// A session's life as a proxy with `format`'s appender logs it.
fn lifecycle(format: Format) -> Vec<String> {
    let session = "4b0a7e2c-1f0d-4c39-9a8e-3f2b1c0d9e11";
    [
        Command::StartSession,
        Command::OpenConnection,
        Command::OpenConnection,
        Command::CloseConnection,
        Command::StopSession,
    ]
    .into_iter()
    .map(|command| {
        Datagram::event(
            format,
            "QSPROXY1",
            command,
            "LAB",
            "joe",
            &"/app/0c7b",
            &session,
        )
        .render()
    })
    .collect()
}

fn joined(datagrams: &[impl AsRef<[u8]>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, d) in datagrams.iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        out.extend_from_slice(d.as_ref());
    }
    out
}

/// Three users on two proxies, one excluded, one left to expire (the empty record is 31 minutes
/// of silence), a Qlik GUID as the session id.
fn busy_site() -> Vec<Vec<u8>> {
    use Command::{OpenConnection as Open, StartSession as Start};
    use Format::{Butler, SessionMonitor as Own};
    // An empty host marks 31 minutes of silence (an empty record in the seed).
    #[rustfmt::skip]
    let rows = [
        (Own, "qs-proxy-1", Start, "LAB", "joe", "4b0a7e2c-1f0d-4c39-9a8e-3f2b1c0d9e11"),
        (Own, "qs-proxy-2", Start, "LAB", "ann", "5c1b8f3d-2a1e-4d4a-8b9f-4a3c2d1e0f22"),
        (Own, "qs-proxy-2", Open, "LAB", "ann", "5c1b8f3d-2a1e-4d4a-8b9f-4a3c2d1e0f22"),
        (Butler, "qs-proxy-1", Start, "INTERNAL", "sa_scheduler", ""),
        (Own, "QS-PROXY-1", Start, "LAB", "bob", "6d2c9a4e-3b2f-4e5b-9ca0-5b4d3e2f1a33"),
        (Own, "", Start, "", "", ""),
        (Own, "qs-proxy-1", Start, "LAB", "joe", "7e3dab5f-4c3a-4f6c-adb1-6c5e4f3a2b44"),
    ];
    rows.iter()
        .map(|&(format, host, command, directory, user, id)| match host {
            "" => Vec::new(),
            _ => Datagram::event(format, host, command, directory, user, &"/hub/", &id)
                .render()
                .into_bytes(),
        })
        .collect()
}

fn datagram_seeds() -> BTreeMap<String, Vec<u8>> {
    let mut seeds = BTreeMap::new();
    seeds.insert(
        "butler-lifecycle".into(),
        joined(&lifecycle(Format::Butler)),
    );
    seeds.insert(
        "butler-sos-lifecycle".into(),
        joined(&lifecycle(Format::ButlerSos)),
    );
    seeds.insert(
        "session-monitor-lifecycle".into(),
        joined(&lifecycle(Format::SessionMonitor)),
    );
    seeds.insert("busy-site".into(), joined(&busy_site()));
    // What the parser's tests know to be hostile, one per seed.
    let hostile: [&[u8]; 9] = [
        b"/proxy-session/;h;Start session;D;j\xffoe;o;c;m\xfe",
        b"/proxy-se\xffssion/;h;Start session;D;u;o;c;m",
        b"/proxy-session/;QS\x00PROXY;Start session;D;j\x1boe;o;c;msg\r\n",
        b"/proxy-session/;h;Start session;D;(null);o;c;m",
        b"/proxy-session/;h;Start session;D;   ;o;c;m",
        b"/proxy-session/;h;Start session;D;u;o;c",
        b"/session-monitor/;h;Start session;D;u;o;c;id",
        b"/proxy-session/;h;Reload app;D;u;o;c;m",
        b"/PROXY-SESSION/;h;START SESSION;D;u;o;c;a;b;\"c\";'d'",
    ];
    for (i, d) in hostile.iter().enumerate() {
        seeds.insert(format!("hostile-{i}"), d.to_vec());
    }
    // What a real log4net sent (tests/fixtures/log4net-2.0.17): the `;` in a user id, session id
    // `0`, a code page and UTF-16 among them.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/log4net-2.0.17");
    let mut wire = Vec::new();
    for folder in ["main", "enc-windows-1252", "enc-utf-16"] {
        let mut files: Vec<_> = std::fs::read_dir(fixtures.join(folder))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        files.sort();
        for file in files {
            wire.push(std::fs::read(file).unwrap());
        }
    }
    seeds.insert("hostile-log4net-2.0.17".into(), wire.join(&[0x1e][..]));
    let long_user = "u".repeat(600);
    seeds.insert(
        "hostile-long-field".into(),
        format!("/proxy-session/;h;Start session;D;{long_user};o;c;m").into_bytes(),
    );
    seeds
}

/// A registry and history after the busy site's traffic, checkpointed as the service does.
fn checkpoint_bytes() -> Vec<u8> {
    let registry = ShardedRegistry::new(
        ExpiryPolicy::default(),
        Exclusions::new(["INTERNAL\\sa_*"]).unwrap(),
        64,
        4,
    );
    let mut history = History::new(Duration::from_secs(14 * 24 * 3600));
    let limits = Limits::default();
    let mut now = START;
    for datagram in busy_site() {
        if datagram.is_empty() {
            now = UnixMillis(now.0 + 31 * 60 * 1000);
            registry.expire(now);
            continue;
        }
        now = UnixMillis(now.0 + 61_000);
        let text = parser::decode_datagram(&datagram, &limits, parser::UTF_8).unwrap();
        let event = parser::parse(&text, &limits).unwrap();
        registry.apply(&event, now);
        let hosts = registry.hosts();
        history.record(
            now,
            Sample::new(registry.take_peak() as u32),
            hosts.iter().map(|h| (h.host.as_str(), h.active_users)),
        );
    }
    let (mut body, _) = registry.write_checkpoint(now);
    body.history(&history);
    body.finish()
}

fn checkpoint_seeds() -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([("busy-site-v3".into(), checkpoint_bytes())])
}

fn configmap_seeds() -> BTreeMap<String, Vec<u8>> {
    let bytes = checkpoint_bytes();
    let mut seeds = BTreeMap::new();
    for (name, shard_bytes) in [("one-configmap", 1 << 20), ("sharded", bytes.len() / 3 + 1)] {
        let objects = layout::layout("smon-checkpoint", 4, &bytes, shard_bytes);
        seeds.insert(name.into(), serde_json::to_vec_pretty(&objects).unwrap());
    }
    let empty = layout::layout("smon-checkpoint", 1, &[], 1 << 20);
    seeds.insert("empty".into(), serde_json::to_vec_pretty(&empty).unwrap());
    seeds
}

fn example_monitors() -> Vec<(String, SessionMonitor)> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    ["sessionmonitor.yaml", "sessionmonitor-qlik.yaml"]
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(examples.join(file)).unwrap();
            // The examples hold Secrets too: take the SessionMonitor document.
            let document = text
                .split("\n---")
                .find(|d| d.contains("kind: SessionMonitor"))
                .unwrap_or_else(|| panic!("examples/{file} has no SessionMonitor"));
            let monitor: SessionMonitor =
                serde_saphyr::from_str(document).unwrap_or_else(|e| panic!("examples/{file}: {e}"));
            (file.trim_end_matches(".yaml").to_owned(), monitor)
        })
        .collect()
}

fn spec_seeds() -> BTreeMap<String, Vec<u8>> {
    example_monitors()
        .into_iter()
        .map(|(name, monitor)| (name, serde_json::to_vec_pretty(&monitor).unwrap()))
        .collect()
}

fn config_seeds() -> BTreeMap<String, Vec<u8>> {
    // What the operator renders for the examples: real, complete configuration files.
    let mut seeds: BTreeMap<String, Vec<u8>> = example_monitors()
        .into_iter()
        .map(|(name, mut monitor)| {
            monitor
                .metadata
                .namespace
                .get_or_insert_with(|| "qlik".into());
            monitor.metadata.uid = Some("u-1".into());
            let plan = validate::validate(&monitor, "session-monitor:seed").unwrap();
            (format!("rendered-{name}"), plan.config_toml().into_bytes())
        })
        .collect();
    seeds.insert(
        "hand-written".into(),
        br#"udp_listen = "0.0.0.0:9997"
udp_allowed_sources = ["10.0.0.0/8", "192.168.1.20/32"]
http_listen = "0.0.0.0:9842"
idle_timeout = "30m"
max_idle = "1day"
exclude_users = ["INTERNAL\\sa_*"]
mqtt_url = "mqtt://broker.example:1883"
mqtt_username = "session-monitor"
mqtt_topic_user_count = "qliksense/users/active/count"
mqtt_topic_peak_today = "qliksense/users/peak/today"
checkpoint_file = "/var/lib/session-monitor/checkpoint"
checkpoint_interval = "5s"
history_retention = "14days"
qlik_proxies = ["https://qs-proxy-1.corp.example:4243/", "https://qs-proxy-1.corp.example:4243/hdr"]
qlik_client_cert_file = "/etc/qlik/client.pem"
qlik_client_key_file = "/etc/qlik/client_key.pem"
qlik_ca_file = "/etc/qlik/root.pem"
qlik_host_aliases = ["qs-proxy-1.corp.example=QSPROXY1"]
log_format = "json"
"#
        .to_vec(),
    );
    seeds
}

fn all_seeds() -> BTreeMap<&'static str, BTreeMap<String, Vec<u8>>> {
    BTreeMap::from([
        ("datagram", datagram_seeds()),
        ("checkpoint_file", checkpoint_seeds()),
        ("checkpoint_configmaps", configmap_seeds()),
        ("config_toml", config_seeds()),
        ("spec_validate", spec_seeds()),
    ])
}

/// What each target needs of its seeds to be worth starting from.
fn check(target: &str, name: &str, bytes: &[u8]) {
    let what = format!("fuzz/seeds/{target}/{name}");
    match target {
        "datagram" => {
            let limits = Limits::default();
            let parsed = bytes
                .split(|&b| b == SEPARATOR)
                .filter(|d| {
                    parser::decode_datagram(d, &limits, parser::UTF_8)
                        .is_ok_and(|text| parser::parse(&text, &limits).is_ok())
                })
                .count();
            // Hostile seeds may or may not parse; the traffic seeds must, every datagram.
            if !name.starts_with("hostile") {
                let records = bytes.split(|&b| b == SEPARATOR).filter(|d| !d.is_empty());
                assert_eq!(parsed, records.count(), "{what}: a datagram does not parse");
            }
        }
        "checkpoint_file" => {
            let decoded = codec::decode_segments(bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            let sessions: usize = decoded.segments.iter().map(|s| s.sessions.len()).sum();
            assert!(sessions >= 2, "{what}: only {sessions} sessions");
            assert!(!decoded.history.is_empty(), "{what}: no history");
        }
        "checkpoint_configmaps" => {
            let objects: Vec<ConfigMap> =
                serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            let manifest = layout::manifest_of("smon-checkpoint", &objects[0]).unwrap();
            let shards: Vec<Option<ConfigMap>> = manifest
                .iter()
                .flat_map(|m| &m.shards)
                .map(|s| {
                    objects
                        .iter()
                        .find(|o| o.metadata.name.as_deref() == Some(s))
                        .cloned()
                })
                .collect();
            match layout::assemble(&objects[0], manifest, &shards) {
                Ok(Assembly::Complete { bytes, .. }) if bytes.is_empty() => {}
                Ok(Assembly::Complete { bytes, .. }) => {
                    codec::decode_segments(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        "config_toml" => {
            let text = std::str::from_utf8(bytes).unwrap();
            let settings = Settings::from_toml(text).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut settings = Settings::default().or(settings);
            // The rendered files name the pod's mounted password; it does not exist here.
            let password = settings.mqtt_password_file.take().map(|_| "pw".to_owned());
            settings.mqtt_username.get_or_insert_with(|| "u".into());
            Config::from_settings(settings, password).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        "spec_validate" => {
            let mut monitor: SessionMonitor =
                serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            // What the API server guarantees of every object it returns (the target does the same).
            monitor
                .metadata
                .namespace
                .get_or_insert_with(|| "qlik".into());
            monitor.metadata.uid = Some("u-1".into());
            validate::validate(&monitor, "session-monitor:seed")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        other => panic!("no check for target {other}"),
    }
}

#[test]
fn committed_seeds_are_current_and_reach_deep() {
    let write = std::env::var_os("SESSION_MONITOR_WRITE_FUZZ_SEEDS").is_some();
    for (target, seeds) in all_seeds() {
        let dir = seeds_dir(target);
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &seeds {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        let mut committed: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (write them: see this file's header)",
                    dir.display()
                )
            })
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        committed.sort();
        let expected: Vec<String> = seeds.keys().cloned().collect();
        assert_eq!(
            committed, expected,
            "fuzz/seeds/{target}: seeds missing or stray"
        );
        for name in &committed {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            // The encoders are deterministic (fixed clock, fixed shard hashing): a seed that
            // differs is stale, and a format change would otherwise leave it behind unnoticed.
            assert!(
                bytes == seeds[name],
                "fuzz/seeds/{target}/{name} is stale: write the seeds afresh (see this file's header)"
            );
            check(target, name, &bytes);
        }
    }
}
