//! The Grafana dashboard and the alert rules, evaluated by a real Prometheus (Debian's
//! `prometheus`) that scrapes the real service and the real operator: every query of the
//! dashboard parses, runs and returns series, and every alert rule evaluates without error.
//!
//! Runs when `SESSION_MONITOR_TEST_KUBECONFIG` names a kubeconfig (the operator needs an API
//! server, and a SessionMonitor to count); without it, it prints why and passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::datagram::{butler, butler_sos, own};
use common::{Mosquitto, Service, free_tcp_port, wait_for};
use serde_json::{Value, json};
use session_monitor_operator::crd::SessionMonitor;
use session_monitor_testkit::cluster::{Cluster, wait_for_within};
use session_monitor_testkit::process::Process;
use session_monitor_testkit::qlik::{Casing, FakeQlik, FakeSession, NodeSpec, QlikCerts, Site};

const QLIK: &str = "qs-central.corp.local";
/// Grafana's `$__rate_interval` here: ten scrapes of one second.
const RATE_INTERVAL: &str = "10s";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What Prometheus scrapes: a job name, a loopback port, and labels added to its series.
type Target<'a> = (&'a str, u16, &'a [(&'a str, &'a str)]);

/// A Prometheus on a free port, scraping `targets` (job, port, extra labels) every second and
/// evaluating the alert rules; killed when dropped, the end of its log shown if the test fails.
struct Prometheus {
    port: u16,
    /// Dropped before the directory its data and log are in.
    _process: Process,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[Target]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = repo().join("charts/session-monitor-operator/files/alerts.yaml");
        let scrape_configs: Vec<Value> = targets
            .iter()
            .map(|(job, port, labels)| {
                let labels: serde_json::Map<String, Value> = labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                json!({
                    "job_name": job,
                    "static_configs": [{"targets": [format!("127.0.0.1:{port}")], "labels": labels}],
                })
            })
            .collect();
        // JSON is YAML: no YAML writer needed.
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [rules],
            "scrape_configs": scrape_configs,
        });
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let port = free_tcp_port();
        // Needs prometheus (apt-get install -y prometheus); see README.
        let process = Process::spawn(
            "prometheus",
            Command::new(common::program("prometheus"))
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}")),
            &dir.path().join("prometheus.log"),
        );
        let prometheus = Prometheus {
            port,
            _process: process,
            _dir: dir,
        };
        wait_for("Prometheus to be ready", || {
            common::get(port, "/-/ready")
                .ok()
                .filter(|(code, _)| *code == 200)
        });
        prometheus
    }

    /// `GET /api/v1/…`, answered with status success; its `data`.
    fn api(&self, path: &str) -> Value {
        let (code, body) = common::get(self.port, path).expect("Prometheus answers");
        let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(
            (code, &answer["status"]),
            (200, &json!("success")),
            "{path}: {body}"
        );
        answer["data"].clone()
    }

    /// An instant query's result vector (or matrix).
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)));
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Percent-encoding for a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard's queries, with its variables as Grafana would fill them for "all".
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo().join("charts/session-monitor-operator/dashboards/session-monitor.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$namespace", ".*")
                .replace("$monitor", ".*");
            assert!(!expr.contains('$'), "a Grafana variable left in {expr}");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    queries
}

/// The operator binary watching `namespace`, with the cluster's admin kubeconfig; killed when
/// dropped.
struct Operator {
    _process: Process,
    port: u16,
}

impl Operator {
    fn start(cluster: &Cluster, namespace: &str, dir: &Path) -> Operator {
        let port = free_tcp_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_session-monitor-operator-under-test"));
        for (key, _) in std::env::vars() {
            if key.starts_with("SESSION_MONITOR_OPERATOR_") {
                command.env_remove(key);
            }
        }
        command
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("POD_NAME", format!("dashboards-{}", std::process::id()))
            .env_remove("POD_NAMESPACE")
            .env("NO_COLOR", "1")
            .args(["--http-listen", &format!("127.0.0.1:{port}")])
            .args(["--watch-namespaces", namespace])
            .args(["--lease-namespace", namespace]);
        let _process = Process::spawn("the operator", &mut command, &dir.join("operator.log"));
        Operator { _process, port }
    }
}

#[test]
fn every_dashboard_query_returns_series_and_every_alert_rule_evaluates_in_a_real_prometheus() {
    let test =
        "every_dashboard_query_returns_series_and_every_alert_rule_evaluates_in_a_real_prometheus";
    let Some(cluster) = Cluster::from_env(test) else {
        return;
    };
    let ns = cluster.create_namespace("smon-dash");
    let dir = tempfile::tempdir().unwrap();

    // The operator, with a monitor to reconcile and count.
    cluster.apply_crd(&session_monitor_operator::crdgen::json());
    let monitor: SessionMonitor = serde_json::from_value(json!({
        "apiVersion": "sessionmonitor.io/v1alpha1",
        "kind": "SessionMonitor",
        "metadata": {"name": "qlik-prod", "namespace": ns.name()},
        "spec": {"mqtt": {"url": "mqtt://mosquitto.mqtt.svc:1883"}},
    }))
    .unwrap();
    ns.create(&monitor);
    let operator = Operator::start(&cluster, ns.name(), dir.path());

    // The service with every part the dashboard shows: a broker, a checkpoint, a fake Qlik site
    // to reconcile with, and datagrams of every format, some of them rejected.
    let certs = QlikCerts::generate(dir.path(), &[QLIK]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![NodeSpec::new(QLIK, &[""], Casing::Pascal)],
        },
    );
    fake.set_sessions(0, "", vec![FakeSession::new("LAB", "api-user", "api-1")]);
    let broker = Mosquitto::start();
    let mut args = vec![
        "--mqtt-url".to_owned(),
        broker.url(),
        "--checkpoint-interval".into(),
        "100ms".into(),
        "--qlik-repository-url".into(),
        format!("https://{QLIK}:{}", fake.qrs_port()),
        "--qlik-resolve".into(),
        format!("{QLIK}=127.0.0.1"),
        "--qlik-reconcile-interval".into(),
        "1s".into(),
    ];
    args.extend(certs.service_flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = Service::start(dir.path(), &args);

    let prometheus = Prometheus::start(&[
        ("qlik-prod", service.http_port, &[("namespace", "qlik")]),
        ("smon-operator", operator.port, &[]),
    ]);
    // Traffic through a few scrapes, so rates have two samples and histograms observations.
    for round in 0..6 {
        let user = format!("user{round}");
        service.send(butler("Start session", "qs-central", "LAB", &user));
        service.send(butler_sos("Open connection", "qs-central", "LAB", &user));
        service.send(own(
            "Start session",
            "qs-2",
            "CORP",
            &user,
            &format!("sid-{round}"),
        ));
        service.send(own(
            "Stop session",
            "qs-2",
            "CORP",
            &user,
            &format!("sid-{round}"),
        ));
        service.send("not a proxy datagram");
        std::thread::sleep(Duration::from_millis(700));
    }
    wait_for("the operator's monitor counted and scraped", || {
        (!prometheus
            .query("session_monitor_operator_monitors")
            .is_empty())
        .then_some(())
    });

    // Until every query has series: rates need two scrapes inside their window, histograms an
    // observation; the deadline says which never do.
    let queries = dashboard_queries();
    wait_for_within(
        "every dashboard query to return series",
        Duration::from_secs(30),
        || {
            let empty: Vec<String> = queries
                .iter()
                .filter(|(_, expr)| prometheus.query(expr).is_empty())
                .map(|(title, expr)| format!("{title}: {expr}"))
                .collect();
            match empty.is_empty() {
                true => Ok(()),
                false => Err(format!(
                    "{} of {} return none:\n{}",
                    empty.len(),
                    queries.len(),
                    empty.join("\n")
                )),
            }
        },
    );

    // The alert rules, as Prometheus evaluates them against these targets.
    let rules = wait_for("every alert rule evaluated", || {
        let groups = prometheus.api("/api/v1/rules")["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules
            .iter()
            .all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            })
            .then_some(rules)
    });
    assert_eq!(rules.len(), 12, "the rules of alerts.yaml");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    // A healthy service fires nothing.
    let firing: Vec<&Value> = rules.iter().filter(|r| r["state"] == "firing").collect();
    assert!(firing.is_empty(), "{firing:?}");
    eprintln!(
        "{} dashboard queries returned series; {} alert rules evaluated",
        queries.len(),
        rules.len()
    );
    drop(service);
    ns.delete();
}
