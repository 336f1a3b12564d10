//! The service end to end: real datagrams in, a real mosquitto out, the real binary between.

mod common;

use common::datagram::{butler, butler_sos, own};
use common::{Mosquitto, Service, Subscriber, command, wait_for};
use session_monitor::config::Settings;

const COUNT: &str = "qliksense/users/active/count";
const USERS: &str = "qliksense/users/active/usernames";
const STATUS: &str = "qliksense/session-monitor/status";

fn per_host(host: &str) -> String {
    format!("qliksense/users/activeperserver/{host}/count")
}

/// Two users on two proxies in all three formats; one user's second session stops.
fn send_sample_traffic(service: &Service) {
    service.send(butler("Start session", "qs-proxy-1", "LAB", "joe"));
    service.send(butler("Open connection", "qs-proxy-1", "LAB", "joe"));
    service.send(butler_sos("Start session", "qs-proxy-2", "CORP", "Ann"));
    service.send(own("Start session", "qs-proxy-2", "LAB", "joe", "sid-1"));
    service.send(own("Start session", "qs-proxy-2", "LAB", "joe", "sid-2"));
    service.send(own("Stop session", "qs-proxy-2", "LAB", "joe", "sid-2"));
}

fn assert_sample_state(sub: &Subscriber) {
    sub.wait_for_payload(COUNT, "2");
    sub.wait_for_payload(USERS, r#"["CORP\\Ann","LAB\\joe"]"#);
    sub.wait_for_payload(&per_host("qs-proxy-1"), "1");
    sub.wait_for_payload(&per_host("qs-proxy-2"), "2");
}

#[test]
fn datagrams_become_exact_retained_state_on_mqtt() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::connect(broker.port, "#");
    let service = Service::start(dir.path(), &["--mqtt-url", &broker.url()]);
    sub.wait_for_payload(STATUS, "online");
    send_sample_traffic(&service);
    assert_sample_state(&sub);

    // A dashboard that connects late gets the current state at once, as retained messages.
    let late = Subscriber::connect(broker.port, "qliksense/#");
    let latest = wait_for("retained state for a late subscriber", || {
        let latest = late.latest();
        (latest.len() == 5).then_some(latest)
    });
    for (topic, payload) in [
        (COUNT, "2"),
        (USERS, r#"["CORP\\Ann","LAB\\joe"]"#),
        (&per_host("qs-proxy-1"), "1"),
        (&per_host("qs-proxy-2"), "2"),
        (STATUS, "online"),
    ] {
        let m = &latest[topic];
        assert_eq!((m.payload.as_str(), m.retain), (payload, true), "{topic}");
    }

    // The stop of joe's last session on proxy 1 leaves him active through proxy 2.
    service.send(butler("Stop session", "qs-proxy-1", "LAB", "joe"));
    sub.wait_for_payload(&per_host("qs-proxy-1"), "0");
    assert_eq!(sub.latest()[COUNT].payload, "2");
}

#[test]
fn a_burst_is_coalesced_into_few_publishes_of_the_latest_state() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::connect(broker.port, COUNT);
    let service = Service::start(
        dir.path(),
        &["--mqtt-url", &broker.url(), "--publish-interval", "200ms"],
    );
    for i in 0..2000 {
        service.send(butler(
            "Start session",
            "qs-proxy-1",
            "LAB",
            &format!("user{i}"),
        ));
    }
    sub.wait_for_payload(COUNT, "2000");
    let publishes = sub.messages().len();
    // 2000 changes in well under a second: a handful of publishes, not 2000.
    assert!(publishes <= 20, "{publishes} publishes for one burst");
}

#[test]
fn last_will_says_offline_when_the_service_is_killed() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::connect(broker.port, STATUS);
    let mut service = Service::start(
        dir.path(),
        &["--mqtt-url", &broker.url(), "--mqtt-keep-alive", "2s"],
    );
    sub.wait_for_payload(STATUS, "online");
    service.signal(libc::SIGKILL);
    service.wait_exit();
    sub.wait_for_payload(STATUS, "offline");
    // And a late subscriber sees `offline` retained.
    let late = Subscriber::connect(broker.port, STATUS);
    let m = late.wait_for_payload(STATUS, "offline");
    assert!(m.retain);
}

#[test]
fn state_is_republished_after_the_broker_restarts() {
    let mut broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(dir.path(), &["--mqtt-url", &broker.url()]);
    send_sample_traffic(&service);
    wait_for("the service to publish", || {
        (service.metric("session_monitor_mqtt_publishes_total{kind=\"state\"}")? >= 4.0)
            .then_some(())
    });

    // The restarted broker has no persistence: everything it knows must come from the service.
    broker.restart();
    let sub = Subscriber::connect(broker.port, "#");
    assert_sample_state(&sub);
    sub.wait_for_payload(STATUS, "online");
    // Retained again, too: a late subscriber gets all of it.
    let late = Subscriber::connect(broker.port, "#");
    assert_sample_state(&late);
    assert!(
        late.latest().values().all(|m| m.retain),
        "all state is retained"
    );
    wait_for("a counted reconnect", || {
        (service.metric("session_monitor_mqtt_connections_total")? >= 2.0).then_some(())
    });
}

#[test]
fn no_stale_backlog_after_a_broker_outage_only_the_latest_state() {
    let mut broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(
        dir.path(),
        &["--mqtt-url", &broker.url(), "--publish-interval", "50ms"],
    );
    wait_for("connected", || {
        (service.metric("session_monitor_mqtt_connected")? == 1.0).then_some(())
    });
    broker.stop();
    wait_for("the outage noticed", || {
        (service.metric("session_monitor_mqtt_connected")? == 0.0).then_some(())
    });
    // Five states while the broker is away, each long enough to have been published.
    for i in 1..=5 {
        service.send(butler("Start session", "qs1", "LAB", &format!("u{i}")));
        wait_for("the change applied", || {
            (service.metric("session_monitor_active_users")? == i as f64).then_some(())
        });
        std::thread::sleep(std::time::Duration::from_millis(60));
    }
    broker.restart();
    let sub = Subscriber::connect(broker.port, COUNT);
    sub.wait_for_payload(COUNT, "5");
    wait_for("a counted reconnect", || {
        (service.metric("session_monitor_mqtt_connections_total")? >= 2.0).then_some(())
    });
    // Anything queued during the outage would arrive by now, after the reconnect; only 5 did.
    service.send(butler("Start session", "qs1", "LAB", "u6"));
    sub.wait_for_payload(COUNT, "6");
    let counts: Vec<String> = sub.messages().into_iter().map(|m| m.payload).collect();
    assert_eq!(counts, ["5", "6"]);
}

#[test]
fn sigterm_then_restart_restores_the_same_users_before_any_new_datagram() {
    let dir = tempfile::tempdir().unwrap();
    let users = r#"["CORP\\Ann","LAB\\joe"]"#;
    {
        let broker = Mosquitto::start();
        let sub = Subscriber::connect(broker.port, "#");
        let mut service = Service::start(dir.path(), &["--mqtt-url", &broker.url()]);
        send_sample_traffic(&service);
        sub.wait_for_payload(USERS, users);
        service.signal(libc::SIGTERM);
        assert!(service.wait_exit().success());
        // A clean stop says offline itself (a clean DISCONNECT does not fire the Last Will).
        sub.wait_for_payload(STATUS, "offline");
        assert!(service.log_text().contains("shutting down"));
    }
    // A new, empty broker: whatever it receives comes from the restored registry.
    let broker = Mosquitto::start();
    let sub = Subscriber::connect(broker.port, "#");
    let service = Service::start(dir.path(), &["--mqtt-url", &broker.url()]);
    assert_sample_state(&sub);
    let summary = service.get_json("/api/v1/summary");
    assert_eq!(summary["active_users"], 2);
    assert_eq!(summary["active_sessions"], 3);
    let names: Vec<&str> = summary["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["CORP\\Ann", "LAB\\joe"]);
    assert_eq!(summary["users"][1]["sessions"], 2);
    assert!(
        summary["users"][1]["first_seen"].as_u64().unwrap()
            <= summary["users"][1]["last_seen"].as_u64().unwrap()
    );
    assert_eq!(
        service.metric("session_monitor_datagrams_received_total"),
        Some(0.0)
    );
    assert_eq!(
        service.metric("session_monitor_checkpoint_restored_sessions"),
        Some(3.0)
    );
}

#[test]
fn a_corrupt_checkpoint_is_set_aside_and_the_service_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("checkpoint"), b"SMCP\x01 this is not zlib").unwrap();
    let broker = Mosquitto::start();
    let service = Service::start(dir.path(), &["--mqtt-url", &broker.url()]);
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("checkpoint.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "kept aside for inspection");
    assert_eq!(
        std::fs::read(dir.path().join(&aside[0])).unwrap(),
        b"SMCP\x01 this is not zlib"
    );
    assert!(service.log_text().contains("checkpoint unreadable"));
    assert_eq!(
        service.metric("session_monitor_checkpoint_restores_total{result=\"corrupt\"}"),
        Some(1.0)
    );
    service.send(butler("Start session", "qs1", "LAB", "joe"));
    wait_for("the service to work normally", || {
        (service.metric("session_monitor_active_users")? == 1.0).then_some(())
    });
}

/// `--max-sessions`: a flood of made-up session ids stops at the bound, counted by reason, while
/// the sessions held still take their events and a stop makes room again.
#[test]
fn new_sessions_beyond_max_sessions_are_dropped_and_counted() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::connect(broker.port, USERS);
    let service = Service::start(
        dir.path(),
        &["--mqtt-url", &broker.url(), "--max-sessions", "2"],
    );
    for user in ["ann", "joe", "eve", "bob"] {
        service.send(butler("Start session", "qs1", "LAB", user));
    }
    sub.wait_for_payload(USERS, r#"["LAB\\ann","LAB\\joe"]"#);
    let dropped = "session_monitor_datagrams_dropped_total{reason=\"too_many_sessions\"}";
    wait_for("the two beyond the bound counted", || {
        (service.metric(dropped)? == 2.0).then_some(())
    });
    service.send(butler("Stop session", "qs1", "LAB", "ann"));
    service.send(butler("Start session", "qs1", "LAB", "bob"));
    sub.wait_for_payload(USERS, r#"["LAB\\bob","LAB\\joe"]"#);
    assert_eq!(service.metric(dropped), Some(2.0));
}

#[test]
fn metrics_pass_promtool_and_show_the_rejects_of_a_malformed_burst() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(
        dir.path(),
        &[
            "--mqtt-url",
            &broker.url(),
            "--udp-max-datagram-bytes",
            "1000",
        ],
    );
    let malformed: [(&[u8], &str, usize); 6] = [
        (b"hello", "unknown_prefix", 30),
        (
            b"/proxy-session/;qs1;Start session;LAB",
            "too_few_fields",
            20,
        ),
        (
            b"/proxy-session/;qs1;Reload;LAB;joe;o;c;m",
            "unknown_command",
            10,
        ),
        (
            b"/proxy-session/;qs1;Start session;LAB;(null);o;c;m",
            "missing_user",
            10,
        ),
        (&[b'x'; 1500], "too_large", 5),
        (b"\r\n", "empty", 5),
    ];
    for (datagram, _, n) in &malformed {
        for _ in 0..*n {
            service.send(datagram);
        }
    }
    service.send(butler("Start session", "qs1", "LAB", "joe"));
    let total: usize = malformed.iter().map(|(_, _, n)| n).sum::<usize>() + 1;
    // The kernel drops most oversized datagrams itself (the socket filter lets one in 64 through
    // to be counted by reason): each is counted once, in one place or the other.
    let kernel = "session_monitor_udp_kernel_drops_total";
    wait_for("all datagrams counted", || {
        let counted =
            service.metric("session_monitor_datagrams_received_total")? + service.metric(kernel)?;
        (counted == total as f64).then_some(())
    });
    for (_, reason, n) in &malformed {
        let sample = format!("session_monitor_datagrams_dropped_total{{reason=\"{reason}\"}}");
        let mut counted = service.metric(&sample).unwrap_or(0.0);
        if *reason == "too_large" {
            counted += service.metric(kernel).unwrap();
        }
        assert_eq!(counted, *n as f64, "{sample}");
    }
    assert_eq!(
        service.metric("session_monitor_udp_oversized_filter"),
        Some(1.0)
    );
    assert_eq!(service.metric("session_monitor_active_users"), Some(1.0));
    assert!(
        service.log_text().contains("dropped datagram"),
        "drops are logged"
    );
    // Rate-limited: one line per reason per 10 s, not one per datagram.
    assert!(service.log_text().matches("dropped datagram").count() <= malformed.len());

    let (_, scrape) = service.get("/metrics").unwrap();
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (apt-get install -y prometheus); see README");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "session_monitor_build_info",
        "process_resident_memory_bytes",
        "session_monitor_udp_kernel_drops_total",
    ] {
        assert!(scrape.contains(name), "{name} missing");
    }
}

#[test]
fn the_embedded_broker_serves_a_subscriber_when_no_url_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_tcp_port();
    let service = Service::start(
        dir.path(),
        &["--mqtt-embedded-listen", &format!("127.0.0.1:{port}")],
    );
    let sub = Subscriber::connect(port, "qliksense/#");
    sub.wait_for_payload(STATUS, "online");
    send_sample_traffic(&service);
    assert_sample_state(&sub);
}

#[test]
fn event_topics_carry_one_json_object_per_event() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::connect(broker.port, "qliksense/session/#");
    let service = Service::start(
        dir.path(),
        &[
            "--mqtt-url",
            &broker.url(),
            "--mqtt-topic-session-start",
            "qliksense/session/start",
            "--mqtt-topic-session-stop",
            "qliksense/session/stop",
        ],
    );
    // Events are dropped, not queued, while the broker link is down (nothing stale later).
    wait_for("connected", || {
        (service.metric("session_monitor_mqtt_connected")? == 1.0).then_some(())
    });
    service.send(own("Start session", "qs1", "LAB", "joe", "sid-9"));
    service.send(butler("Open connection", "qs1", "LAB", "joe")); // no topic configured for it
    service.send(own("Stop session", "qs1", "LAB", "joe", "sid-9"));
    let messages = wait_for("two event messages", || {
        let m = sub.messages();
        (m.len() == 2).then_some(m)
    });
    let start: serde_json::Value = serde_json::from_str(&messages[0].payload).unwrap();
    assert_eq!(messages[0].topic, "qliksense/session/start");
    assert!(!messages[0].retain, "events are not retained");
    assert_eq!(start["user"], "LAB\\joe");
    assert_eq!(start["proxy_session_id"], "sid-9");
    assert_eq!(start["host"], "qs1");
    assert_eq!(messages[1].topic, "qliksense/session/stop");
}

#[test]
fn idle_sessions_expire_and_the_count_follows() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::connect(broker.port, COUNT);
    let service = Service::start(
        dir.path(),
        &[
            "--mqtt-url",
            &broker.url(),
            "--idle-timeout",
            "1s",
            "--max-idle",
            "1h",
        ],
    );
    service.send(butler("Start session", "qs1", "LAB", "idle"));
    service.send(butler("Open connection", "qs1", "LAB", "busy"));
    sub.wait_for_payload(COUNT, "2");
    // `idle` has no connection and goes after 1 s; `busy` holds an open connection.
    sub.wait_for_payload(COUNT, "1");
    assert_eq!(service.get_json("/api/v1/users")[0]["name"], "LAB\\busy");
    assert_eq!(
        service.metric("session_monitor_sessions_expired_total{rule=\"idle\"}"),
        Some(1.0)
    );
}

#[test]
fn excluded_users_are_not_counted() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::connect(broker.port, USERS);
    let service = Service::start(
        dir.path(),
        &[
            "--mqtt-url",
            &broker.url(),
            "--exclude-users",
            "INTERNAL\\sa_*",
        ],
    );
    service.send(butler("Start session", "qs1", "INTERNAL", "sa_scheduler"));
    service.send(butler("Start session", "qs1", "LAB", "joe"));
    sub.wait_for_payload(USERS, r#"["LAB\\joe"]"#);
    assert_eq!(
        service.metric("session_monitor_excluded_events_total"),
        Some(1.0)
    );
}

#[test]
fn invalid_settings_stop_start_up_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = command()
            .args(args)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--mqtt-qos", "5"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("`mqtt_qos` (--mqtt-qos, SESSION_MONITOR_MQTT_QOS)"),
        "{err}"
    );

    let (code, err) = run(&[], &[("SESSION_MONITOR_MQTT_URL", "http://broker")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("mqtt_url"), "{err}");

    let (code, err) = run(&["--udp-listen", "not-an-address"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--udp-listen"), "{err}");

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "idle_timout = \"5m\"\n").unwrap();
    let (code, err) = run(&["--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("idle_timout"), "{err}");
}

#[test]
fn a_config_file_is_honoured_and_flags_override_it() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("session-monitor.toml");
    std::fs::write(
        &config,
        format!("mqtt_url = \"{}\"\nmqtt_topic_user_count = \"from/file\"\nmqtt_user_list_format = \"user-id\"\n", broker.url()),
    )
    .unwrap();
    let sub = Subscriber::connect(broker.port, "#");
    let service = Service::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--mqtt-topic-user-count",
            "from/flag",
        ],
    );
    service.send(butler("Start session", "qs1", "LAB", "joe"));
    sub.wait_for_payload("from/flag", "1");
    sub.wait_for_payload(USERS, r#"["joe"]"#);
    assert!(!sub.latest().contains_key("from/file"));
}

#[test]
fn the_readme_documents_every_setting() {
    let help = command().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .filter(|f| !["help", "version", "config"].contains(f))
        .collect();
    assert!(flags.len() > 30, "parsed the help: {flags:?}");
    // The secrets are never flags (process listings show flags), but still file keys.
    let keys = flags
        .iter()
        .map(|flag| flag.replace('-', "_"))
        .chain(Settings::NEVER_FLAGS.iter().map(|key| key.to_string()));
    for key in keys {
        assert!(
            readme.contains(&format!("`{key}`")),
            "README's configuration table lacks `{key}`"
        );
    }
}

/// The history is in the checkpoint: after a restart, the minutes before it are still there,
/// and the day's peak with them.
#[test]
fn history_and_peaks_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--mqtt-url", "mqtt://127.0.0.1:9"];
    let mut service = Service::start(dir.path(), &args);
    for user in ["joe", "ann", "eve"] {
        service.send(own(
            "Start session",
            "qs1",
            "LAB",
            user,
            &format!("s-{user}"),
        ));
    }
    // A proxy's count is sampled (the total's highest is exact): wait for the sample of three.
    wait_for("a sample of three", || {
        let h = service.get_json("/api/v1/history");
        (h["hosts"]["qs1"]["last"].as_array()?.last() == Some(&serde_json::json!(3))).then_some(())
    });
    service.send(own("Stop session", "qs1", "LAB", "eve", "s-eve"));
    wait_for("a sample of two", || {
        let h = service.get_json("/api/v1/history");
        (h["total"]["last"].as_array().unwrap().last() == Some(&serde_json::json!(2))).then_some(h)
    });
    service.signal(libc::SIGTERM);
    assert!(service.wait_exit().success());

    service.restart(&args);
    let history = service.get_json("/api/v1/history");
    let max: Vec<u64> = history["total"]["max"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert!(max.contains(&3), "the minute before the restart: {history}");
    assert_eq!(
        history["hosts"]["qs1"]["max"].as_array().unwrap().len(),
        history["times"].as_array().unwrap().len()
    );
    let peaks = service.get_json("/api/v1/peaks?days=1");
    assert_eq!(peaks["days"][0]["active_users"], 3, "{peaks}");
    assert_eq!(
        peaks["days"][0]["hosts"]["qs1"]["active_users"], 3,
        "{peaks}"
    );
    let (code, body) = service.get("/api/v1/peaks?days=99").unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("days"), "{body}");
}

/// The optional retained topic with today's peak: it rises with the count and stays when the
/// count falls.
#[test]
fn todays_peak_is_published_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let sub = Subscriber::connect(broker.port, "#");
    let service = Service::start(
        dir.path(),
        &[
            "--mqtt-url",
            &broker.url(),
            "--mqtt-topic-peak-today",
            "qliksense/users/peak/today",
        ],
    );
    service.send(own("Start session", "qs1", "LAB", "joe", "s1"));
    service.send(own("Start session", "qs1", "LAB", "ann", "s2"));
    sub.wait_for_payload(COUNT, "2");
    let peak = |sub: &Subscriber| -> Option<serde_json::Value> {
        let m = sub.latest().get("qliksense/users/peak/today").cloned()?;
        serde_json::from_str(&m.payload).ok()
    };
    wait_for("a peak of 2", || {
        peak(&sub).filter(|p| p["active_users"] == 2)
    });
    service.send(own("Stop session", "qs1", "LAB", "ann", "s2"));
    sub.wait_for_payload(COUNT, "1");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let today = peak(&sub).unwrap();
    assert_eq!(today["active_users"], 2, "{today}");
    assert_eq!(today["date"].as_str().unwrap().len(), 10, "{today}");
    // Retained: a late subscriber gets it at once.
    let late = Subscriber::connect(broker.port, "qliksense/users/peak/today");
    wait_for("the retained peak", || {
        late.messages()
            .into_iter()
            .find(|m| m.retain && m.payload.contains("\"active_users\":2"))
    });
}
