//! What a real Apache log4net 2.0.17 `UdpAppender` sent with `qlik/LocalLogConfig.xml`
//! (`tests/fixtures/log4net-2.0.17/`, its README says how they were made and what each case is):
//! each datagram gives exactly the user, session and drop reason it must, first through the
//! parser as the service calls it, then through the real binary, whose user list and drop
//! counters are checked after each folder has been sent as the appender sent it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::{Mosquitto, Service, wait_for};
use session_monitor::parser::{self, Command, Encoding, Limits, Reject};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/log4net-2.0.17")
}

/// One recorded datagram, in the order the appender sent it.
struct Recorded {
    file: String,
    bytes: Vec<u8>,
}

/// A folder's datagrams in the order of its `index.json`; every `.bin` file is in the index.
fn recorded(folder: &str) -> Vec<Recorded> {
    let dir = fixtures().join(folder);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let recorded: Vec<Recorded> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let file = case["file"].as_str().unwrap().to_owned();
            let bytes = std::fs::read(dir.join(format!("{file}.bin"))).unwrap();
            assert_eq!(
                bytes.len() as u64,
                case["bytes"].as_u64().unwrap(),
                "{file}"
            );
            Recorded { file, bytes }
        })
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".bin").map(str::to_owned)
        })
        .collect();
    let indexed: BTreeSet<String> = recorded.iter().map(|r| r.file.clone()).collect();
    assert_eq!(on_disk, indexed, "{folder}: files and index.json differ");
    recorded
}

/// What one datagram must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Accepted: `DIR\user`, the command, and the session id it is keyed by (`None`: by host
    /// and user).
    Event(&'static str, Command, Option<&'static str>),
    Dropped(Reject),
}

use Command::{
    CloseConnection as Close, OpenConnection as Open, StartSession as Start, StopSession as Stop,
};
use Expect::{Dropped, Event};

const ANNA: &str = "4b0a7e2c-1f3d-4c5e-9a8b-7c6d5e4f3a21";
const JOERG: &str = "951a44fc-1207-c8a9-c03e-7d3a0b204a43";

fn expected(folder: &str, encoding: &str, file: &str) -> Expect {
    let joerg = |command| Event("LAB\\Jörg Müller", command, Some(JOERG));
    let watanabe = Event(
        "JP\\渡辺",
        Start,
        Some("68ec949a-dd14-c1d7-cbfc-b0d3e59d3a31"),
    );
    match (folder, encoding, file) {
        ("main", _, "01_start_session") => Event("LAB\\anna.berg", Start, Some(ANNA)),
        ("main", _, "02_open_connection_hub") => Event("LAB\\anna.berg", Open, Some(ANNA)),
        ("main", _, "03_close_connection_hub") => Event("LAB\\anna.berg", Close, Some(ANNA)),
        ("main", _, "04_child_logger_AuditActivity.Proxy.Sub") => Event(
            "LAB\\child.user",
            Start,
            Some("59de439d-3c24-e939-cfbd-511a324adf06"),
        ),
        ("main", _, "05_debug_level_start") => Event(
            "LAB\\debug.user",
            Start,
            Some("09ec1094-81fd-3d0b-99a5-e648c3faf0e1"),
        ),
        ("main", _, "06_app_context_open_connection" | "07_app_context_with_query") => {
            Event("LAB\\anna.berg", Open, Some(ANNA))
        }
        ("main", _, "08_open_connection_useragent") => Event("LAB\\anna.berg", Open, Some(ANNA)),
        ("main", _, "09_close_connection_useragent") => Event("LAB\\anna.berg", Close, Some(ANNA)),
        ("main", _, "10_session_id_not_set") => Event("LAB\\no.sid", Start, None),
        ("main", _, "11_session_id_not_set_stop") => Event("LAB\\no.sid", Stop, None),
        ("main", _, "12_origin_context_not_set") => Event(
            "LAB\\no.ctx",
            Start,
            Some("347f4cb7-a8dd-1a00-6343-ff851f921e78"),
        ),
        ("main", _, "13_user_not_set") => Dropped(Reject::MissingUser),
        ("main", _, "14_session_id_as_guid_object") => Event(
            "LAB\\guid.obj",
            Start,
            Some("abcdef01-2345-6789-abcd-ef0123456789"),
        ),
        // `0`: no session id; each user keyed by host and user, never one shared session.
        ("main", _, "15_session_id_zero_internal") => Event("INTERNAL\\sa_proxy", Start, None),
        ("main", _, "16_session_id_zero_second_user") => {
            Event("INTERNAL\\sa_repository", Start, None)
        }
        ("main", _, "17_logical_thread_context") => Event(
            "LAB\\ltc.user",
            Start,
            Some("3583f671-d21c-fe7c-0134-e0589487591e"),
        ),
        ("main", _, "18_user_with_semicolon") => Event(
            "LAB\\semi;colon",
            Start,
            Some("11a6a9d1-b37f-ca5a-2061-adc037cd5f17"),
        ),
        ("main", _, "19_with_exception") => Event(
            "LAB\\exc.user",
            Start,
            Some("0d69453c-4c73-b167-7661-75883fce3045"),
        ),
        ("main", _, "20_big_9000_bytes") => Dropped(Reject::TooLarge),
        ("main", _, "21_stop_session") => Event("LAB\\anna.berg", Stop, Some(ANNA)),
        ("main" | "noenc", _, "22_nonascii_start_joerg" | "01_nonascii_start_joerg") => {
            joerg(Start)
        }
        ("main" | "noenc", _, "23_nonascii_start_watanabe" | "02_nonascii_start_watanabe") => {
            watanabe
        }
        ("main" | "noenc", _, "24_nonascii_stop_joerg" | "03_nonascii_stop_joerg") => joerg(Stop),
        // No `encoding` line on a Western European Windows: `ö` is one byte, not UTF-8, and
        // `渡辺` was already `??` when log4net wrote it.
        ("enc-windows-1252", "utf-8", "01_nonascii_start_joerg" | "03_nonascii_stop_joerg") => {
            Dropped(Reject::InvalidEncoding)
        }
        ("enc-windows-1252", "windows-1252", "01_nonascii_start_joerg") => joerg(Start),
        ("enc-windows-1252", "windows-1252", "03_nonascii_stop_joerg") => joerg(Stop),
        ("enc-windows-1252", _, "02_nonascii_start_watanabe") => {
            Dropped(Reject::ReplacedCharacters)
        }
        // UTF-16LE is recognised whatever is configured.
        ("enc-utf-16", _, "01_nonascii_start_joerg") => joerg(Start),
        ("enc-utf-16", _, "02_nonascii_start_watanabe") => watanabe,
        ("enc-utf-16", _, "03_nonascii_stop_joerg") => joerg(Stop),
        other => panic!("no expectation for {other:?}: add one for each new fixture"),
    }
}

const FOLDERS: [(&str, &str); 5] = [
    ("main", "utf-8"),
    ("noenc", "utf-8"),
    ("enc-windows-1252", "utf-8"),
    ("enc-windows-1252", "windows-1252"),
    ("enc-utf-16", "utf-8"),
];

fn encoding(label: &str) -> Encoding {
    encoding_rs::Encoding::for_label(label.as_bytes()).unwrap()
}

/// Size cap, decoding and parsing with the service's defaults but `encoding`, as ingest does.
fn parse_as_ingest(datagram: &[u8], encoding: Encoding) -> Expect {
    let limits = Limits::default();
    let text = match parser::decode_datagram(datagram, &limits, encoding) {
        Ok(text) => text,
        Err(reason) => return Dropped(reason),
    };
    match parser::parse(&text, &limits) {
        Ok(e) => {
            let name: &'static str =
                Box::leak(format!("{}\\{}", e.user_directory, e.user_id).into_boxed_str());
            let sid = e
                .proxy_session_id
                .map(|s| &*Box::leak(s.to_owned().into_boxed_str()));
            assert_eq!(e.host, "QS-PROXY-1");
            Event(name, e.command, sid)
        }
        Err(reason) => Dropped(reason),
    }
}

#[test]
fn every_recorded_datagram_gives_its_user_session_or_reason() {
    for (folder, label) in FOLDERS {
        for r in recorded(folder) {
            assert_eq!(
                parse_as_ingest(&r.bytes, encoding(label)),
                expected(folder, label, &r.file),
                "{folder}/{}.bin read as {label}: {:?}",
                r.file,
                parser::clean(&r.bytes)
            );
        }
    }
}

#[test]
fn the_context_origin_and_message_are_kept_as_log4net_wrote_them() {
    let by_file: BTreeMap<String, Vec<u8>> = recorded("main")
        .into_iter()
        .map(|r| (r.file, r.bytes))
        .collect();
    let parse = |file: &str| {
        let text = parser::decode(&by_file[file], parser::UTF_8)
            .unwrap()
            .into_owned();
        let text: &'static str = Box::leak(text.into_boxed_str());
        parser::parse(text, &Limits::default()).unwrap()
    };
    let e = parse("07_app_context_with_query");
    assert_eq!(
        e.context,
        Some("/app/0c7b9a2e-1d2f-4e3a-8b4c-5d6e7f8a9b0c/sheet/abc/state/analysis?qlikTicket=x%3By")
    );
    let e = parse("08_open_connection_useragent");
    assert!(e.message.ends_with("Safari/537.36'"), "{}", e.message);
    assert_eq!(e.origin, Some("AppAccess"));
    let e = parse("12_origin_context_not_set");
    assert_eq!((e.origin, e.context), (None, None));
    let e = parse("19_with_exception");
    assert!(
        e.message
            .ends_with("System.InvalidOperationException: boom"),
        "{}",
        e.message
    );
    let e = parse("18_user_with_semicolon");
    assert_eq!((e.origin, e.context), (Some("AppAccess"), Some("/hub/")));
}

/// The users a folder leaves active, as the events give them (starts minus stops).
fn active_after(folder: &str, label: &str) -> BTreeSet<&'static str> {
    let mut active = BTreeSet::new();
    for r in recorded(folder) {
        match expected(folder, label, &r.file) {
            Event(user, Start, _) => {
                active.insert(user);
            }
            Event(user, Stop, _) => {
                active.remove(user);
            }
            _ => {}
        }
    }
    active
}

fn dropped_by_reason(folder: &str, label: &str) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for r in recorded(folder) {
        if let Dropped(reason) = expected(folder, label, &r.file) {
            *counts.entry(reason.as_str()).or_default() += 1;
        }
    }
    counts
}

/// Sends a folder as the appender sent it, to a fresh service, and checks its user list, its
/// sessions and its drop counters.
fn replay(folder: &str, label: &str) {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--mqtt-url".to_owned(), broker.url()];
    if label != "utf-8" {
        args.extend(["--udp-encoding".to_owned(), label.to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = Service::start(dir.path(), &args);
    let recorded = recorded(folder);
    for r in &recorded {
        service.send(&r.bytes);
    }
    let dropped = dropped_by_reason(folder, label);
    // An oversize datagram mostly ends in the kernel (the socket filter), 1 in 64 reaches us.
    let too_large = dropped.get("too_large").copied().unwrap_or(0) as f64;
    let seen = (recorded.len() as f64) - too_large;
    let context = || format!("{folder} as {label}; log:\n{}", service.log_text());
    wait_for(&format!("{folder}: every datagram read"), || {
        let received = service.metric("session_monitor_datagrams_received_total")?;
        let kernel = service
            .metric("session_monitor_udp_kernel_drops_total")
            .unwrap_or(0.0);
        (received + kernel >= recorded.len() as f64 && received >= seen).then_some(())
    });
    let users = service.get_json("/api/v1/users");
    let names: BTreeSet<String> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = active_after(folder, label)
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(names, want, "{}", context());
    for u in users.as_array().unwrap() {
        assert_eq!(u["sessions"], 1, "{u} {}", context());
    }
    assert_eq!(
        service.metric("session_monitor_active_sessions"),
        Some(want.len() as f64),
        "{}",
        context()
    );
    for (reason, n) in &dropped {
        if *reason == "too_large" {
            continue;
        }
        let sample = format!("session_monitor_datagrams_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(
            service.metric(&sample),
            Some(*n as f64),
            "{sample} {}",
            context()
        );
    }
    for reason in [
        "ambiguous_fields",
        "unknown_message",
        "session_of_another_user",
    ] {
        let sample = format!("session_monitor_datagrams_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(service.metric(&sample), Some(0.0), "{sample} {}", context());
    }
    let told = service
        .log_text()
        .matches("a proxy sends names this service cannot read")
        .count();
    let encoding_drops = dropped.get("invalid_encoding").copied().unwrap_or(0)
        + dropped.get("replaced_characters").copied().unwrap_or(0);
    assert_eq!(
        told,
        usize::from(encoding_drops > 0),
        "once per sender: {}",
        context()
    );
    if encoding_drops > 0 {
        assert!(
            service
                .log_text()
                .contains(r#"<param name=\"encoding\" value=\"utf-8\" />"#)
                || service
                    .log_text()
                    .contains(r#"<param name="encoding" value="utf-8" />"#),
            "the log names the fix: {}",
            context()
        );
    }
}

#[test]
fn the_binary_counts_what_log4net_sent_in_utf8() {
    replay("main", "utf-8");
}

#[test]
fn the_binary_counts_what_an_appender_without_its_encoding_line_sent() {
    replay("noenc", "utf-8");
    replay("enc-windows-1252", "utf-8");
    replay("enc-windows-1252", "windows-1252");
    replay("enc-utf-16", "utf-8");
}

#[test]
fn a_dual_stack_listener_hears_ipv4_and_ipv6_senders() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_udp_port();
    let listen = format!("[::]:{port}");
    let mut service = Service::start(
        dir.path(),
        &["--mqtt-url", &broker.url(), "--udp-listen", &listen],
    );
    service.udp_port = port;
    let start = |user: &str| common::datagram::own("Start session", "qs1", "LAB", user, user);
    service.send_v6(start("over.ipv6"));
    service.send(start("over.ipv4"));
    wait_for("both users counted", || {
        (service.metric("session_monitor_active_users")? == 2.0).then_some(())
    });
    let names: BTreeSet<String> = service
        .get_json("/api/v1/users")
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["LAB\\over.ipv4".to_owned(), "LAB\\over.ipv6".to_owned()])
    );
}
