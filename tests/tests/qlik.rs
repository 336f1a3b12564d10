//! Reconciliation with the Qlik proxy API, end to end: the real binary against testkit's fake
//! Qlik Sense (the QRS and each node's QPS API on their own loopback ports, mutual TLS with
//! certificates from one site CA, the Xrfkey checked), with real datagrams and a real broker.

mod common;

use std::path::Path;
use std::time::Duration;

use common::datagram::own;
use common::{Mosquitto, Service, Subscriber, wait_for};
use session_monitor_testkit::qlik::{
    Behaviour, Casing, FakeQlik, FakeSession, NodeSpec, QlikCerts, Site,
};

const CENTRAL: &str = "qs-central.corp.local";
const RIM1: &str = "qs-rim1.corp.local";
const RIM2: &str = "qs-rim2.corp.local";

fn session(user: &str, id: &str) -> FakeSession {
    FakeSession::new("LAB", user, id)
}

fn node(host_name: &str, virtual_proxies: &[&str], casing: Casing) -> NodeSpec {
    NodeSpec::new(host_name, virtual_proxies, casing)
}

/// The flags that point the service at `fake` through discovery, with `certs`' files.
fn discovery_args(fake: &FakeQlik, certs: &QlikCerts, extra: &[&str]) -> Vec<String> {
    let resolve = [CENTRAL, RIM1, RIM2]
        .map(|h| format!("{h}=127.0.0.1"))
        .join(",");
    let mut args: Vec<String> = vec![
        "--qlik-repository-url".into(),
        format!("https://{CENTRAL}:{}", fake.qrs_port()),
        "--qlik-resolve".into(),
        resolve,
    ];
    args.extend(certs.service_flags());
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Nothing listens at this broker address: tests that do not watch MQTT need no broker.
const NO_BROKER: [&str; 2] = ["--mqtt-url", "mqtt://127.0.0.1:9"];

fn start(dir: &Path, args: &[String]) -> Service {
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    if !args.contains(&"--mqtt-url") {
        args.extend(NO_BROKER);
    }
    Service::start(dir, &args)
}

fn qlik_status(service: &Service) -> serde_json::Value {
    service.get_json("/api/v1/summary")["qlik_api"].clone()
}

fn reconciles(service: &Service) -> f64 {
    ["ok", "partial", "failed"]
        .iter()
        .filter_map(|r| {
            service.metric(&format!(
                "session_monitor_qlik_reconciles_total{{result=\"{r}\"}}"
            ))
        })
        .sum()
}

/// Waits until the service has finished `n` more reconcile rounds.
fn wait_rounds(service: &Service, n: f64) {
    let target = reconciles(service) + n;
    wait_for("reconcile rounds", || {
        (reconciles(service) >= target).then_some(())
    });
}

#[test]
fn a_cold_start_publishes_the_exact_count_before_any_datagram() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![node(CENTRAL, &[""], Casing::Pascal)],
        },
    );
    let users: Vec<FakeSession> = (0..500)
        .map(|i| session(&format!("user{i:03}"), &format!("api-{i}")))
        .collect();
    fake.set_sessions(0, "", users);
    let broker = Mosquitto::start();
    let sub = Subscriber::connect(broker.port, "qliksense/#");
    let args = discovery_args(
        &fake,
        &certs,
        &[
            "--mqtt-url",
            &broker.url(),
            "--qlik-reconcile-interval",
            "0s",
        ],
    );
    let service = start(dir.path(), &args);

    // Ready means reconciled: the count is exact before a single datagram.
    let summary = service.get_json("/api/v1/summary");
    assert_eq!(summary["active_users"], 500);
    assert_eq!(summary["active_users_per_host"]["qs-central"], 500);
    assert_eq!(summary["qlik_api"]["nodes"][0]["added"], 500);
    assert_eq!(summary["qlik_api"]["source"], "discovery");
    // The first count MQTT ever carries is the exact one, not a climb from zero.
    sub.wait_for_payload("qliksense/users/active/count", "500");
    let counts: Vec<String> = sub
        .messages()
        .into_iter()
        .filter(|m| m.topic == "qliksense/users/active/count")
        .map(|m| m.payload)
        .collect();
    assert_eq!(counts[0], "500", "{counts:?}");
    assert_eq!(
        service.metric("session_monitor_qlik_reconcile_sessions_added_total{host=\"qs-central\"}"),
        Some(500.0)
    );
    assert!(fake.qrs_requests() >= 1 && fake.requests(0) >= 1);
}

#[test]
fn sessions_whose_stop_was_lost_leave_within_an_interval_and_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![node(CENTRAL, &[""], Casing::Camel)],
        },
    );
    fake.set_sessions(0, "", vec![session("ann", "qa"), session("bob", "qb")]);
    let args = discovery_args(
        &fake,
        &certs,
        &[
            "--qlik-reconcile-interval",
            "1s",
            "--qlik-reconcile-grace",
            "1s",
        ],
    );
    let service = start(dir.path(), &args);
    // The proxy logs hashed ids: they are not the API's.
    service.send(own("Start session", "QS-CENTRAL", "LAB", "ann", "h-ann"));
    service.send(own("Start session", "QS-CENTRAL", "LAB", "bob", "h-bob"));
    wait_rounds(&service, 2.0);
    // Paired by count: two users, two sessions, nothing doubled.
    let summary = service.get_json("/api/v1/summary");
    assert_eq!(
        (
            summary["active_users"].as_u64(),
            summary["active_sessions"].as_u64()
        ),
        (Some(2), Some(2))
    );

    // bob leaves; his stop datagram is lost.
    fake.set_sessions(0, "", vec![session("ann", "qa")]);
    let lost_at = std::time::Instant::now();
    wait_for("bob to leave", || {
        (service.get_json("/api/v1/summary")["active_users"] == 1).then_some(())
    });
    let took = lost_at.elapsed();
    // One interval plus the grace, plus the time a round takes here.
    assert!(took < Duration::from_millis(3500), "took {took:?}");
    assert_eq!(
        service.get_json("/api/v1/summary")["users"][0]["name"],
        "LAB\\ann"
    );
    // The API showed the proxy first: it is named by the first label of the API's name.
    assert!(
        service
            .metric("session_monitor_qlik_reconcile_sessions_removed_total{host=\"qs-central\"}")
            >= Some(1.0)
    );
}

#[test]
fn a_session_started_during_a_reconcile_is_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![node(CENTRAL, &[""], Casing::Pascal)],
        },
    );
    let args = discovery_args(
        &fake,
        &certs,
        &[
            "--qlik-reconcile-interval",
            "1s",
            "--qlik-reconcile-grace",
            "0s",
        ],
    );
    let service = start(dir.path(), &args);
    wait_rounds(&service, 1.0);
    // The next list is fetched slowly; carl starts while it is in flight, so it lacks him.
    fake.set_behaviour(0, Behaviour::Slow(Duration::from_secs(2)));
    let before = fake.requests(0);
    wait_for("a request in flight", || {
        (fake.requests(0) > before).then_some(())
    });
    service.send(own("Start session", "QS-CENTRAL", "LAB", "carl", "h-carl"));
    wait_rounds(&service, 1.0);
    assert_eq!(
        service.get_json("/api/v1/summary")["active_users"],
        1,
        "carl was undone"
    );
    assert_eq!(qlik_status(&service)["nodes"][0]["in_grace"], 1);
    // From the next list on, Qlik lists him.
    fake.set_sessions(0, "", vec![session("carl", "q-carl")]);
    fake.set_behaviour(0, Behaviour::Normal);
    wait_rounds(&service, 2.0);
    let summary = service.get_json("/api/v1/summary");
    assert_eq!(
        (
            summary["active_users"].as_u64(),
            summary["active_sessions"].as_u64()
        ),
        (Some(1), Some(1))
    );
}

#[test]
fn discovery_finds_every_node_and_virtual_proxy_and_matches_their_logged_names() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL, RIM1, RIM2]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![
                node(CENTRAL, &["", "sales"], Casing::Pascal),
                node(RIM1, &["", "sales"], Casing::Camel),
                node(RIM2, &[""], Casing::Pascal),
            ],
        },
    );
    // joe has a tab on each virtual proxy of the central node: two sessions.
    fake.set_sessions(0, "", vec![session("joe", "c1")]);
    fake.set_sessions(0, "sales", vec![session("joe", "c2")]);
    fake.set_sessions(1, "sales", vec![session("ann", "r1")]);
    fake.set_sessions(2, "", vec![session("eve", "r2")]);
    let args = discovery_args(
        &fake,
        &certs,
        &[
            "--qlik-host-aliases",
            &format!("{RIM2}=PROXY-EXTRA"),
            "--qlik-reconcile-interval",
            "1s",
            "--qlik-reconcile-grace",
            "0s",
        ],
    );
    let service = start(dir.path(), &args);
    // The central proxy logs its machine name in capitals and a hashed session id: a third
    // session of joe's until the next reconcile pairs his sessions by count.
    service.send(own(
        "Open connection",
        "QS-CENTRAL",
        "LAB",
        "joe",
        "hashed-1",
    ));
    wait_for("joe's event", || {
        (service.get_json("/api/v1/summary")["active_sessions"] == 5).then_some(())
    });
    wait_rounds(&service, 1.0);

    let summary = service.get_json("/api/v1/summary");
    let hosts: Vec<(String, u64, u64)> = summary["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_owned(),
                h["active_users"].as_u64().unwrap(),
                h["active_sessions"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        hosts,
        [
            ("PROXY-EXTRA".into(), 1, 1),
            ("qs-central".into(), 1, 2),
            ("qs-rim1".into(), 1, 1)
        ]
    );
    // The session joe's events name is one of the two kept: its stop is understood at once.
    fake.set_sessions(0, "sales", vec![]);
    service.send(own("Stop session", "QS-CENTRAL", "LAB", "joe", "hashed-1"));
    wait_for("joe's stop", || {
        (service.get_json("/api/v1/summary")["active_sessions"] == 3).then_some(())
    });
    let nodes = summary["qlik_api"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let central = nodes.iter().find(|n| n["host"] == "qs-central").unwrap();
    assert_eq!(central["virtual_proxies"], serde_json::json!(["", "sales"]));
    assert_eq!(central["up"], true);
    assert_eq!(summary["qlik_api"]["repository_up"], true);
    assert!(fake.forbidden() == 0);
}

#[test]
fn an_api_that_is_down_or_slow_leaves_the_events_in_charge_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![node(CENTRAL, &[""], Casing::Pascal)],
        },
    );
    fake.set_sessions(0, "", vec![session("ann", "qa"), session("bob", "qb")]);
    fake.set_behaviour(0, Behaviour::Down);
    let args = discovery_args(
        &fake,
        &certs,
        &[
            "--qlik-reconcile-interval",
            "1s",
            "--qlik-startup-timeout",
            "2s",
            "--qlik-request-timeout",
            "500ms",
        ],
    );
    // Ready anyway: events and the checkpoint.
    let service = start(dir.path(), &args);
    service.send(own("Start session", "QS-CENTRAL", "LAB", "ann", "h-ann"));
    wait_for("ann from events", || {
        (service.get_json("/api/v1/summary")["active_users"] == 1).then_some(())
    });
    let node = CENTRAL;
    wait_for("the node reported down", || {
        (service.metric(&format!("session_monitor_qlik_api_up{{api=\"qps\",node=\"{node}\"}}")) == Some(0.0)
            && service.metric(&format!("session_monitor_qlik_api_errors_total{{api=\"qps\",node=\"{node}\",reason=\"connect\"}}")) >= Some(1.0))
        .then_some(())
    });
    assert_eq!(qlik_status(&service)["nodes"][0]["up"], false);
    assert!(
        service
            .log_text()
            .contains("cannot read a Qlik proxy's sessions")
    );

    // Slow beyond the request timeout: a timeout, still no crash.
    fake.set_behaviour(0, Behaviour::Slow(Duration::from_secs(2)));
    wait_for("a timeout", || {
        service
            .metric(&format!("session_monitor_qlik_api_errors_total{{api=\"qps\",node=\"{node}\",reason=\"timeout\"}}"))
            .filter(|n| *n >= 1.0)
    });
    // Failing with 500: counted by status.
    fake.set_behaviour(0, Behaviour::Failing(500));
    wait_for("a 500", || {
        service
            .metric(&format!("session_monitor_qlik_api_errors_total{{api=\"qps\",node=\"{node}\",reason=\"status\"}}"))
            .filter(|n| *n >= 1.0)
    });
    assert_eq!(service.get_json("/api/v1/summary")["active_users"], 1);

    // Back: bob, whom no event showed, is found.
    fake.set_behaviour(0, Behaviour::Normal);
    wait_for("bob from the API", || {
        (service.get_json("/api/v1/summary")["active_users"] == 2).then_some(())
    });
    assert_eq!(
        service.metric(&format!(
            "session_monitor_qlik_api_up{{api=\"qps\",node=\"{node}\"}}"
        )),
        Some(1.0)
    );
    assert!(service.log_text().contains("Qlik proxy API answers again"));
}

#[test]
fn a_wrong_certificate_or_root_names_the_setting_and_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![node(CENTRAL, &[""], Casing::Pascal)],
        },
    );
    let static_proxy = format!("https://{CENTRAL}:{}/", fake.node_port(0));
    let base = |cert: &Path, key: &Path, root: &Path| -> Vec<String> {
        vec![
            "--qlik-proxies".into(),
            static_proxy.clone(),
            "--qlik-resolve".into(),
            format!("{CENTRAL}=127.0.0.1"),
            "--qlik-client-cert-file".into(),
            path(cert),
            "--qlik-client-key-file".into(),
            path(key),
            "--qlik-ca-file".into(),
            path(root),
            "--qlik-startup-timeout".into(),
            "2s".into(),
        ]
    };

    // A client certificate from another CA: the node refuses it at the TLS layer.
    let wrong_client = dir.path().join("wrong-client");
    std::fs::create_dir(&wrong_client).unwrap();
    let service = start(
        &wrong_client,
        &base(
            &certs.other_client_cert,
            &certs.other_client_key,
            &certs.root,
        ),
    );
    wait_for("the refusal in the log", || {
        let log = service.log_text();
        (log.contains("qlik_client_cert_file") && log.contains(CENTRAL)).then_some(())
    });
    assert!(
        service.metric(&format!(
            "session_monitor_qlik_api_errors_total{{api=\"qps\",node=\"{CENTRAL}\",reason=\"tls\"}}"
        )) >= Some(1.0)
    );
    drop(service);

    // The wrong root: the node's certificate is not trusted.
    let wrong_root = dir.path().join("wrong-root");
    std::fs::create_dir(&wrong_root).unwrap();
    let service = start(
        &wrong_root,
        &base(&certs.client_cert, &certs.client_key, &certs.other_root),
    );
    wait_for("the distrust in the log", || {
        let log = service.log_text();
        (log.contains("qlik_ca_file") && log.contains(CENTRAL)).then_some(())
    });
    drop(service);

    // A key file that is not a key stops the start, naming the setting.
    let out = common::command()
        .args(base(&certs.client_cert, &certs.root, &certs.root))
        .args([
            "--udp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("qlik_client_key_file"), "{stderr}");
}

#[test]
fn an_encrypted_key_is_read_with_its_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![node(CENTRAL, &[""], Casing::Pascal)],
        },
    );
    fake.set_sessions(0, "", vec![session("joe", "q1")]);
    let encrypted = certs.encrypted_client_key("s3cret pass");
    let args = [
        "--qlik-proxies".to_owned(),
        format!("https://{CENTRAL}:{}/", fake.node_port(0)),
        "--qlik-resolve".into(),
        format!("{CENTRAL}=127.0.0.1"),
        "--qlik-client-cert-file".into(),
        path(&certs.client_cert),
        "--qlik-client-key-file".into(),
        path(&encrypted),
        "--qlik-ca-file".into(),
        path(&certs.root),
    ];
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(NO_BROKER);
    let service = Service::start_with_env(
        dir.path(),
        &args,
        &[("SESSION_MONITOR_QLIK_CLIENT_KEY_PASSPHRASE", "s3cret pass")],
    );
    assert_eq!(service.get_json("/api/v1/summary")["active_users"], 1);
    assert_eq!(qlik_status(&service)["source"], "static");
    assert!(!service.log_text().contains("s3cret"));
}

/// The quick start's demo: the simulator's traffic with a fifth of the stops lost, and its fake
/// Qlik site listing what is really open. The count the service reaches is the simulator's.
#[test]
fn the_simulators_site_corrects_the_lost_stops() {
    use session_monitor_simulate::{Kind, Traffic, qlik::SimulatedSite};
    let dir = tempfile::tempdir().unwrap();
    let mut traffic = Traffic::new(200, 3, 0.01, fastrand::Rng::with_seed(11)).unwrap();
    let site = SimulatedSite::start(&dir.path().join("qlik"), &traffic).unwrap();
    let mut args = site.service_flags();
    args.extend([
        "--qlik-reconcile-interval=1s".into(),
        "--qlik-reconcile-grace=1s".into(),
    ]);
    let service = start(dir.path(), &args);

    let mut lose = fastrand::Rng::with_seed(12);
    let (mut lost, mut datagram) = (0, Vec::new());
    for _ in 0..20_000 {
        let kind = traffic.next_into(&mut datagram);
        if kind == Kind::Event(session_monitor::parser::Command::StopSession) && lose.f64() < 0.2 {
            lost += 1;
            continue;
        }
        service.send(&datagram);
        site.update(&traffic);
    }
    site.sync(&traffic);
    assert!(lost > 50, "{lost} stops lost");
    let truth = (
        traffic.active_users() as u64,
        traffic.active_sessions() as u64,
    );
    let counts = || {
        let summary = service.get_json("/api/v1/summary");
        (
            summary["active_users"].as_u64().unwrap(),
            summary["active_sessions"].as_u64().unwrap(),
        )
    };
    // Every datagram is in once a marker sent last has arrived; then reconciliation corrects
    // what the lost stops left (counted in removed_total below).
    service.send(own("Start session", "QS-PROXY-1", "LAB", "marker", "m"));
    wait_for("the last datagram", || {
        (service
            .get_json("/api/v1/users")
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["user_id"] == "marker"))
        .then_some(())
    });
    service.send(own("Stop session", "QS-PROXY-1", "LAB", "marker", "m"));
    wait_for("the simulator's counts", || {
        (counts() == truth).then_some(())
    });
    let (_, metrics) = service.get("/metrics").unwrap();
    let removed: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("session_monitor_qlik_reconcile_sessions_removed_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(
        removed > 0.0,
        "the lost stops were corrected by reconciliation:\n{metrics}"
    );
    // The proxies log their machine names; the repository gives fully qualified ones.
    let hosts = service.get_json("/api/v1/summary")["hosts"].clone();
    assert_eq!(hosts.as_array().unwrap().len(), 3, "{hosts}");
}

/// What a proxy that logs a salted hash of its session id sends: never the API's id.
fn hashed(api_id: &str) -> String {
    format!(
        "{:08x}",
        crc32fast::hash(format!("salt:{api_id}").as_bytes())
    )
}

fn node_named<'a>(status: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["host"] == host)
        .unwrap_or_else(|| panic!("no node {host} in {status}"))
}

#[test]
fn hashed_event_ids_stay_exact_and_a_node_that_never_sends_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL, RIM1]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![
                node(CENTRAL, &[""], Casing::Pascal),
                node(RIM1, &[""], Casing::Pascal),
            ],
        },
    );
    fake.set_sessions(
        0,
        "",
        vec![session("ann", "api-a"), session("bob", "api-b")],
    );
    // The rim node has a user, and its appender was never created (remoteAddress did not
    // resolve when its proxy started): it sends nothing.
    fake.set_sessions(1, "", vec![session("carl", "api-c")]);
    let args = discovery_args(
        &fake,
        &certs,
        &[
            "--qlik-reconcile-interval",
            "1s",
            "--qlik-reconcile-grace",
            "1s",
            "--qlik-silent-after",
            "2s",
        ],
    );
    let service = start(dir.path(), &args);
    for (user, id) in [("ann", "api-a"), ("bob", "api-b")] {
        service.send(own("Start session", "QS-CENTRAL", "LAB", user, &hashed(id)));
    }
    // `qlik_silent_after` (2s) has passed, and a round after it.
    wait_for("the rim node reported silent", || {
        (service.metric("session_monitor_qlik_node_silent{host=\"qs-rim1\"}")? == 1.0).then_some(())
    });
    let explain = |what: &str| {
        format!(
            "{what}\nsummary: {}\nlog:\n{}",
            service.get_json("/api/v1/summary"),
            service.log_text()
        )
    };
    // Exact: the hashed ids are paired by count, the silent node's user comes from its API.
    let summary = service.get_json("/api/v1/summary");
    assert_eq!(
        (
            summary["active_users"].as_u64(),
            summary["active_sessions"].as_u64()
        ),
        (Some(3), Some(3)),
        "{}",
        explain("three users, three sessions")
    );
    let central = node_named(&summary["qlik_api"], "qs-central");
    assert_eq!(central["event_ids_match_api"], false, "{central}");
    assert_eq!(central["pairing"], "count");
    assert_eq!(central["silent"], false);
    assert_eq!(central["heard_since_start"], true);
    let rim = node_named(&summary["qlik_api"], "qs-rim1");
    assert_eq!(
        (rim["silent"].clone(), rim["heard_since_start"].clone()),
        (true.into(), false.into()),
        "{rim}"
    );
    assert_eq!(
        service.metric("session_monitor_qlik_event_ids_match{host=\"qs-central\"}"),
        Some(0.0)
    );
    assert_eq!(
        service.metric("session_monitor_qlik_node_silent{host=\"qs-rim1\"}"),
        Some(1.0)
    );
    assert_eq!(
        service.metric("session_monitor_qlik_node_silent{host=\"qs-central\"}"),
        Some(0.0)
    );
    let status = service.get_json("/api/v1/status");
    assert_eq!(
        status["silent_nodes"],
        serde_json::json!(["qs-rim1"]),
        "{status}"
    );
    assert_eq!(status["qlik_nodes"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        service
            .log_text()
            .matches("has sent no event since this service started")
            .count(),
        1,
        "{}",
        explain("one warning for the silent node, not one per round")
    );

    // bob's stop carries his hashed id: understood at once, and the API agrees next round.
    fake.set_sessions(0, "", vec![session("ann", "api-a")]);
    service.send(own(
        "Stop session",
        "QS-CENTRAL",
        "LAB",
        "bob",
        &hashed("api-b"),
    ));
    wait_for("bob's stop", || {
        (service.get_json("/api/v1/summary")["active_users"] == 2).then_some(())
    });
    wait_rounds(&service, 2.0);
    let summary = service.get_json("/api/v1/summary");
    assert_eq!(
        (
            summary["active_users"].as_u64(),
            summary["active_sessions"].as_u64()
        ),
        (Some(2), Some(2)),
        "{}",
        explain("still exact after a stop with a hashed id")
    );

    // The rim node's appender comes back (its proxy restarted), with the API's own ids.
    service.send(own("Open connection", "QS-RIM1", "LAB", "carl", "api-c"));
    wait_rounds(&service, 2.0);
    let summary = service.get_json("/api/v1/summary");
    let rim = node_named(&summary["qlik_api"], "qs-rim1");
    assert_eq!(rim["silent"], false, "{}", explain("heard again"));
    assert_eq!(rim["event_ids_match_api"], true, "{rim}");
    assert_eq!(
        service.metric("session_monitor_qlik_node_silent{host=\"qs-rim1\"}"),
        Some(0.0)
    );
    assert_eq!(
        service.metric("session_monitor_qlik_event_ids_match{host=\"qs-rim1\"}"),
        Some(1.0)
    );
    assert_eq!(
        service.get_json("/api/v1/status")["silent_nodes"],
        serde_json::json!([])
    );
    assert_eq!(summary["active_users"], 2, "{summary}");
}
