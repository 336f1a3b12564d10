//! The Node-RED example (`examples/node-red/`) against the real binary: `npm ci` installs the
//! Node-RED and Dashboard 2.0 its lockfile pins, Node-RED runs the flow against a real mosquitto
//! and the service, and headless Chromium opens the dashboard and reads what a person would see:
//! the count, the per-proxy counts and the user names, then the same page updated live after a
//! user leaves; the chart seeded from `/api/v1/history` with the week of history the service
//! restored from its checkpoint (written here, before it starts), as Node-RED's log reports.
//!
//! Needs Node.js (20 or newer, with npm; the npm registry for the first `npm ci`) and Chromium
//! (`apt-get install -y chromium`, or `CHROMIUM=PATH`). `npm ci` is skipped when `node_modules`
//! was installed from the same package.json and lockfile. The dashboard's screenshot is written
//! to the target directory (`node-red.png`, path printed), and to `docs/images/node-red.png`, the
//! README's, with `SESSION_MONITOR_UPDATE_SCREENSHOTS=1`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::datagram::own;
use common::{Mosquitto, Service, Subscriber, free_tcp_port};
use session_monitor::checkpoint::codec::BodyWriter;
use session_monitor::history::{History, Minute, Sample};
use session_monitor::registry::UnixMillis;
use session_monitor_testkit::process::{KillOnDrop, Process};

/// Node-RED starts in a few seconds; this is for a loaded machine.
const NODE_RED_DEADLINE: Duration = Duration::from_secs(60);
/// Kept in step with the flow's `history → chart points` function.
const HISTORY_LOG: &str = "[function:history → chart points] history: ";

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn example_dir() -> PathBuf {
    repo_root().join("examples/node-red")
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "{} is missing: the Node-RED test opens the dashboard in headless Chromium \
         (apt-get install -y chromium, or CHROMIUM=PATH); see README",
        path.display()
    );
    path
}

/// `npm ci` in the example, unless `node_modules` already holds what package.json and the
/// lockfile name (a stamp of both, written after a successful install).
fn npm_ci(dir: &Path) {
    let mut wanted = std::fs::read(dir.join("package.json")).unwrap();
    wanted.extend(std::fs::read(dir.join("package-lock.json")).unwrap());
    let stamp = dir.join("node_modules/.session-monitor-installed");
    if std::fs::read(&stamp).ok().as_deref() == Some(&wanted[..]) {
        return;
    }
    let started = Instant::now();
    let out = Command::new("npm")
        .args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .current_dir(dir)
        .output()
        .expect("npm must be installed (Node.js 20 or newer); see README");
    assert!(
        out.status.success(),
        "npm ci in {} failed:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&stamp, wanted).unwrap();
    eprintln!("npm ci: {:.1?}", started.elapsed());
}

/// A checkpoint with no session and the history of a site over the last 7 days up to 15 minutes
/// ago: office hours on weekdays (UTC), a few users at night and at weekends, split over qs1 and
/// qs2, and 3 hours two days ago when the service was down (no minutes: gaps, not zeros).
fn week_of_history(now: UnixMillis) -> Vec<u8> {
    let now_minute = now.0 / 60_000;
    let down = (now_minute - 2 * 1440 - 180)..(now_minute - 2 * 1440);
    let minutes: Vec<Minute> = (now_minute - 7 * 1440..now_minute - 15)
        .filter(|m| !down.contains(m))
        .map(|minute| {
            let weekday = (minute / 1440 + 3) % 7 < 5; // 1970-01-01 was a Thursday
            let hour = (minute % 1440) as f64 / 60.0;
            let day = (-((hour - 11.5) / 3.2).powi(2)).exp();
            let lunch = 1.0 - 0.25 * (-((hour - 12.5) / 0.6).powi(2)).exp();
            let peak = if weekday { 44.0 } else { 5.0 };
            let wobble = ((minute * 2_654_435_761) % 5) as f64 - 2.0;
            let last = (3.0 + peak * day * lunch + wobble * day).round().max(0.0) as u32;
            let max = last + (minute % 3 == 0) as u32;
            let qs1 = last.div_ceil(2) + last / 8;
            Minute {
                minute: minute as u32,
                total: Sample { max, last },
                total_max_at: 0,
                hosts: vec![
                    (
                        0,
                        Sample {
                            max: qs1.min(max),
                            last: qs1.min(last),
                        },
                    ),
                    (
                        1,
                        Sample {
                            max: max - qs1.min(max),
                            last: last - qs1.min(last),
                        },
                    ),
                ],
            }
        })
        .collect();
    let mut history = History::new(Duration::from_secs(14 * 86_400));
    history.restore(vec!["qs1".into(), "qs2".into()], minutes, now);
    let mut body = BodyWriter::new(now, &["qs1".into(), "qs2".into()], 0);
    body.history(&history);
    body.finish()
}

/// Node-RED running the example's flow; killed when dropped, its log shown if the test panics.
struct NodeRed {
    process: Process,
    port: u16,
    _user_dir: tempfile::TempDir,
}

impl NodeRed {
    fn start(example: &Path, mqtt_url: &str, api_url: &str) -> NodeRed {
        let user_dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            example.join("flow.json"),
            user_dir.path().join("flows.json"),
        )
        .unwrap();
        let port = free_tcp_port();
        // Needs Node.js 20 or newer; see README.
        let process = Process::spawn(
            "Node-RED",
            Command::new("node")
                .args(["node_modules/node-red/red.js", "--settings", "settings.js"])
                .current_dir(example)
                .env("NODE_RED_USER_DIR", user_dir.path())
                .env("PORT", port.to_string())
                .env("NODE_RED_HOST", "127.0.0.1")
                .env("SESSION_MONITOR_MQTT_URL", mqtt_url)
                .env("SESSION_MONITOR_API_URL", api_url)
                .stdin(Stdio::null()),
            &user_dir.path().join("node-red.log"),
        );
        let mut node_red = NodeRed {
            process,
            port,
            _user_dir: user_dir,
        };
        node_red.wait_for("the dashboard to be served", |n| {
            n.http_status("/dashboard/") == Some(200)
        });
        node_red
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }

    fn wait_for(&mut self, what: &str, mut check: impl FnMut(&mut NodeRed) -> bool) {
        let start = Instant::now();
        while !check(self) {
            if let Some(status) = self.process.exited() {
                panic!("Node-RED exited with {status} waiting for {what}");
            }
            assert!(
                start.elapsed() < NODE_RED_DEADLINE,
                "timed out after {NODE_RED_DEADLINE:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn http_status(&self, path: &str) -> Option<u16> {
        session_monitor_testkit::http::get("127.0.0.1", self.port, path, None)
            .ok()
            .map(|(code, _)| code)
    }
}

/// `test/check-dashboard.js` holding a page open in headless Chromium, phase by phase; killed
/// when dropped.
struct Browser {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
    log: PathBuf,
}

impl Browser {
    fn open(
        example: &Path,
        url: &str,
        screenshot: &Path,
        phases: &[&[&str]],
        log: PathBuf,
    ) -> Self {
        let mut args: Vec<&str> = Vec::new();
        for (i, phase) in phases.iter().enumerate() {
            if i > 0 {
                args.push("--next");
            }
            args.extend_from_slice(phase);
        }
        let mut child = Command::new("node")
            .arg("test/check-dashboard.js")
            .arg(url)
            .arg(screenshot)
            .args(&args)
            .current_dir(example)
            .env("CHROMIUM", chromium())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Browser {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child: KillOnDrop(child),
            log,
        }
    }

    /// Waits until phase `n` (from 1) holds on the page; the script bounds the wait.
    fn phase_ok(&mut self, n: usize) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        if line.trim() != format!("phase {n} ok") {
            let status = self.child.wait().unwrap();
            panic!(
                "the dashboard check failed in phase {n} ({status}):\n{line}{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// Lets the script go on to the next phase.
    fn next(&mut self) {
        writeln!(self.stdin.as_mut().unwrap(), "next").unwrap();
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "check-dashboard.js: {status}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

#[test]
fn dashboard_shows_the_count_the_proxies_and_the_users_live() {
    let example = example_dir();
    chromium();
    npm_ci(&example);

    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let now = UnixMillis(now.as_millis() as u64);
    std::fs::write(dir.path().join("checkpoint"), week_of_history(now)).unwrap();
    let service = Service::start(dir.path(), &["--mqtt-url", &broker.url()]);
    let subscriber = Subscriber::connect(broker.port, "qliksense/#");
    service.send(own("Start session", "qs1", "LAB", "joe", "s-joe"));
    service.send(own("Start session", "qs2", "CORP", "ann", "s-ann"));
    subscriber.wait_for_payload("qliksense/users/active/count", "2");
    subscriber.wait_for_payload(
        "qliksense/users/active/usernames",
        r#"["CORP\\ann","LAB\\joe"]"#,
    );

    let started = Instant::now();
    let mut node_red = NodeRed::start(
        &example,
        &broker.url(),
        &format!("http://127.0.0.1:{}", service.http_port),
    );
    eprintln!("Node-RED serving the dashboard: {:.1?}", started.elapsed());

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("node-red.png");
    let url = format!("http://127.0.0.1:{}/dashboard/active-users", node_red.port);
    let mut browser = Browser::open(
        &example,
        &url,
        &screenshot,
        &[
            &[
                ".session-monitor-count .nrdb-ui-text-value=2",
                ".session-monitor-status .nrdb-ui-text-value=online",
                ".session-monitor-proxies tr=qs1 1",
                ".session-monitor-proxies tr=qs2 1",
                r".session-monitor-users td=LAB\joe",
                r".session-monitor-users td=CORP\ann",
            ],
            // After CORP\ann leaves, on the page already open.
            &[
                ".session-monitor-count .nrdb-ui-text-value=1",
                ".session-monitor-proxies tr=qs1 1",
                ".session-monitor-proxies tr=qs2 0",
                r".session-monitor-users td=LAB\joe",
            ],
        ],
        dir.path().join("check-dashboard.log"),
    );
    browser.phase_ok(1);
    eprintln!(
        "dashboard shown: {:.1?}; screenshot: {}",
        started.elapsed(),
        screenshot.display()
    );

    service.send(own("Stop session", "qs2", "CORP", "ann", "s-ann"));
    subscriber.wait_for_payload("qliksense/users/active/count", "1");
    browser.next();
    browser.phase_ok(2);
    browser.finish();
    let page = std::fs::read_to_string(dir.path().join("check-dashboard.log")).unwrap();
    assert!(!page.contains("page error"), "{page}");

    // The chart was seeded from the service's history, not left empty by a failed request.
    node_red.wait_for("the flow's history request", |n| {
        n.log_text().contains(HISTORY_LOG)
    });
    let log = node_red.log_text();
    assert!(!log.contains("no history from"), "{log}");
    let line = log.lines().find(|l| l.contains(HISTORY_LOG)).unwrap();
    let seeded = &line[line.find(HISTORY_LOG).unwrap() + HISTORY_LOG.len()..];
    eprintln!("chart seeded: {seeded}");
    // "N of M steps with data": 7 days of 10-minute steps (1008, and the one `to` falls in),
    // less the 3 hours down; the last quarter hour has the test's own minutes.
    let (with_data, steps) = seeded
        .strip_suffix(" steps with data")
        .and_then(|s| s.split_once(" of "))
        .map(|(n, m)| (n.parse::<usize>().unwrap(), m.parse::<usize>().unwrap()))
        .unwrap_or_else(|| panic!("{line}"));
    assert!((1008..=1009).contains(&steps), "{line}");
    assert!(
        (steps - 20..=steps - 17).contains(&with_data),
        "about 18 steps without data (3 hours down) expected: {line}"
    );

    if std::env::var_os("SESSION_MONITOR_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        let readme_image = repo_root().join("docs/images/node-red.png");
        std::fs::create_dir_all(readme_image.parent().unwrap()).unwrap();
        std::fs::copy(&screenshot, &readme_image).unwrap();
        eprintln!("updated {}", readme_image.display());
    }
}
