//! The page at `/` in a real browser: Debian's `chromium`, headless, driven by playwright-core
//! (`tests/browser/page.test.mjs`) against the real binary with a real mosquitto. Datagrams make
//! the count, a restart makes the history come from the checkpoint, and the browser checks what
//! a person would see: the count, a change within a second, the restored history, the filter,
//! 10,000 users, and no console error. It saves a screenshot (the README's, `docs/images/page.png`,
//! with `SESSION_MONITOR_UPDATE_SCREENSHOTS=1`).
//!
//! Needs node and chromium (`apt-get install -y chromium`); runs `npm ci` in `tests/browser` when
//! its `node_modules` is missing. Skipped, with a message, when `/usr/bin/chromium` is absent and
//! `SESSION_MONITOR_TEST_BROWSER` is unset (CI sets it, so there a missing browser fails).
//! `SESSION_MONITOR_TEST_BROWSER` may name another Chromium executable.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::datagram::own;
use common::{Mosquitto, Service, wait_for};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Users with one or two sessions on three proxies: (directory, id, proxies).
const USERS: &[(&str, &str, &[&str])] = &[
    ("CORP", "ann.lee", &["qs-proxy-1"]),
    ("CORP", "bob.smith", &["qs-proxy-1", "qs-proxy-2"]),
    ("CORP", "carla.diaz", &["qs-proxy-2"]),
    ("LAB", "joe", &["qs-proxy-1"]),
    ("LAB", "dev.kumar", &["qs-proxy-3"]),
    ("CORP", "erik.berg", &["qs-proxy-2", "qs-proxy-3"]),
    ("CORP", "fatima.zahra", &["qs-proxy-1"]),
    ("SALES", "greg.olsen", &["qs-proxy-3"]),
    // Stopped before the restart: the peak of 12 exists only in the restored history.
    ("SALES", "hiro.tanaka", &["qs-proxy-2"]),
    ("CORP", "ines.costa", &["qs-proxy-1"]),
    ("LAB", "jules.martin", &["qs-proxy-3"]),
    ("SALES", "kofi.mensah", &["qs-proxy-2"]),
];
const STOPPED: usize = 4;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Whether `/api/v1/history` holds `peak` as some minute's most users.
fn history_has(service: &Service, peak: u64) -> bool {
    let history = service.get_json("/api/v1/history");
    history["total"]["max"]
        .as_array()
        .is_some_and(|max| max.iter().any(|v| v.as_u64() == Some(peak)))
}

/// The browser's driver, installed from the lock file when it is missing.
fn browser_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        eprintln!(
            "installing the browser test's driver: npm ci in {}",
            dir.display()
        );
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .unwrap_or_else(|e| panic!("cannot run npm ({e}); run `npm ci` in {}", dir.display()));
        assert!(status.success(), "`npm ci` in {} failed", dir.display());
    }
    dir
}

/// The browser to drive, or `None` (with a message) when the test is to be skipped.
fn chromium() -> Option<String> {
    match std::env::var("SESSION_MONITOR_TEST_BROWSER") {
        Ok(path) if path.starts_with('/') => Some(path),
        Ok(_) => Some(CHROMIUM.to_owned()),
        Err(_) if Path::new(CHROMIUM).exists() => Some(CHROMIUM.to_owned()),
        Err(_) => {
            eprintln!(
                "skipped: {CHROMIUM} is missing (apt-get install -y chromium) and \
                 SESSION_MONITOR_TEST_BROWSER is unset"
            );
            None
        }
    }
}

/// Runs one of `tests/browser`'s scripts with `plan`; panics with its output and the service's
/// log unless it passes within `limit`.
fn run_browser_script(script: &str, plan: &serde_json::Value, service: &Service, limit: Duration) {
    let browser = browser_dir();
    // Output to a file: a pipe nobody reads while waiting could fill and stall the browser.
    let log_path = service.dir.join(format!("{script}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let mut node = Command::new("node")
        .arg(browser.join(script))
        .arg(plan.to_string())
        .current_dir(&browser)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("node must be installed to run tests/browser/{script}: {e}"));
    let status = wait_for_exit(&mut node, limit);
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    eprintln!("{output}(browser checks took {:?})", started.elapsed());
    assert!(
        status.is_some_and(|s| s.success()),
        "the browser checks failed ({status:?}):\n{output}\n--- service log ---\n{}",
        service.log_text()
    );
}

#[test]
fn the_page_marks_a_silent_proxy_node_and_hashed_session_ids_in_a_real_browser() {
    use session_monitor_testkit::qlik::{Casing, FakeQlik, FakeSession, NodeSpec, QlikCerts, Site};
    let Some(chromium) = chromium() else { return };
    let (central, rim) = ("qs-central.corp.local", "qs-rim1.corp.local");
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[central, rim]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![
                NodeSpec::new(central, &[""], Casing::Pascal),
                NodeSpec::new(rim, &[""], Casing::Pascal),
            ],
        },
    );
    fake.set_sessions(0, "", vec![FakeSession::new("LAB", "ann", "api-a")]);
    fake.set_sessions(1, "", vec![FakeSession::new("LAB", "carl", "api-c")]);
    let mut args: Vec<String> = vec![
        "--mqtt-url".into(),
        "mqtt://127.0.0.1:9".into(),
        "--qlik-repository-url".into(),
        format!("https://{central}:{}", fake.qrs_port()),
        "--qlik-resolve".into(),
        format!("{central}=127.0.0.1,{rim}=127.0.0.1"),
        "--qlik-reconcile-interval".into(),
        "1s".into(),
        "--qlik-silent-after".into(),
        "1s".into(),
    ];
    args.extend(certs.service_flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = Service::start(dir.path(), &args);
    // The central proxy logs a hashed session id; the rim node sends nothing.
    service.send(own("Start session", "QS-CENTRAL", "LAB", "ann", "5f3c9a01"));
    wait_for("the rim node reported silent", || {
        (service.get_json("/api/v1/status")["silent_nodes"] == serde_json::json!(["qs-rim1"]))
            .then_some(())
    });
    let plan = serde_json::json!({
        "chromium": chromium,
        "url": format!("http://127.0.0.1:{}/", service.http_port),
        "silent": "qs-rim1",
        "hashed": "qs-central",
    });
    run_browser_script(
        "qlik_nodes.test.mjs",
        &plan,
        &service,
        Duration::from_secs(120),
    );
}

#[test]
fn the_page_shows_live_counts_restored_history_and_a_filtered_list_in_a_real_browser() {
    let Some(chromium) = chromium() else { return };

    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--mqtt-url", &broker.url()];
    let mut service = Service::start(dir.path(), &args);
    let session = |user: usize, proxy: usize| format!("sid-{user}-{proxy}");
    for (user, (directory, id, proxies)) in USERS.iter().enumerate() {
        for (proxy, host) in proxies.iter().enumerate() {
            service.send(own(
                "Start session",
                host,
                directory,
                id,
                &session(user, proxy),
            ));
        }
    }
    let peak = USERS.len() as u64;
    wait_for("the history to hold the peak of every user", || {
        history_has(&service, peak).then_some(())
    });
    for (user, (directory, id, proxies)) in USERS.iter().enumerate().skip(USERS.len() - STOPPED) {
        for (proxy, host) in proxies.iter().enumerate() {
            service.send(own(
                "Stop session",
                host,
                directory,
                id,
                &session(user, proxy),
            ));
        }
    }
    let count = USERS.len() - STOPPED;
    wait_for("the stops to be counted", || {
        (service.get_json("/api/v1/summary")["active_users"] == count).then_some(())
    });

    // The history now comes from the checkpoint.
    service.signal(libc::SIGTERM);
    assert!(service.wait_exit().success());
    let restarted_at = now_ms();
    service.restart(&args);
    assert_eq!(service.get_json("/api/v1/summary")["active_users"], count);
    assert!(
        history_has(&service, peak),
        "the service's own /api/v1/history lost the peak of {peak} across the restart"
    );
    let summary = service.get_json("/api/v1/summary");
    let hosts: Vec<&str> = summary["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["qs-proxy-1", "qs-proxy-2", "qs-proxy-3"]);

    // The README's picture changes only when asked (its times move with every run).
    let screenshot = match std::env::var_os("SESSION_MONITOR_UPDATE_SCREENSHOTS") {
        Some(v) if v == "1" => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("docs/images/page.png"),
        _ => Path::new(env!("CARGO_TARGET_TMPDIR")).join("page.png"),
    };
    let literal = "<img src=x onerror=alert(1)>";
    let plan = serde_json::json!({
        "chromium": chromium,
        "url": format!("http://127.0.0.1:{}/", service.http_port),
        "udp": format!("127.0.0.1:{}", service.udp_port),
        "count": count,
        "hosts": hosts,
        "per_host": summary["active_users_per_host"],
        "mqtt_connected": true,
        "restored": { "peak": peak, "before": restarted_at },
        "live": {
            "datagram": own("Start session", "qs-proxy-3", "SALES", "lena.park", "sid-new"),
            "count": count + 1,
            "host": "qs-proxy-3",
        },
        "filter": { "text": "ann", "match": "CORP\\ann.lee" },
        "literal": {
            "datagram": own("Start session", "qs-proxy-2", "LOAD", literal, "sid-literal"),
            "name": format!("LOAD\\{literal}"),
        },
        "bulk": {
            "users": 10_000,
            "template": own("Start session", "qs-proxy-3", "LOAD", "user{i}", "sid-bulk-{i}"),
            "one": "user04321",
            "wide": "u",
        },
        "screenshot": screenshot,
    });

    run_browser_script("page.test.mjs", &plan, &service, Duration::from_secs(180));
}

/// Waits for `child` to exit, killing it past `limit`; `None` if it had to be killed.
fn wait_for_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
