//! `cargo run --release -p session-monitor-bench`: measures the service against its performance
//! targets, each beside its physical reference where there is one, prints a table and writes
//! it with the machine's description to BENCHMARKS.md.
//!
//! The service runs as a separate process: this executable re-run in the service role, which
//! calls the service's own `cli::main` (the whole `session-monitor` binary, built in release).

mod checkpoint;
mod ingest;
mod latency;
mod loss;
mod memory;
mod parse;
mod parse_before;
mod payload;
mod procs;
mod realistic;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// The service's `publish_interval` default, which the latency target is relative to.
const PUBLISH_INTERVAL: Duration = session_monitor::config::defaults::PUBLISH_INTERVAL;
const COUNT_PUBLISH_INTERVAL: Duration = session_monitor::config::defaults::COUNT_PUBLISH_INTERVAL;

struct Row {
    figure: String,
    measured: String,
    target: String,
    reference: String,
    verdict: &'static str,
}

fn row(
    figure: impl Into<String>,
    measured: impl Into<String>,
    target: impl Into<String>,
    reference: impl Into<String>,
    met: Option<bool>,
) -> Row {
    Row {
        figure: figure.into(),
        measured: measured.into(),
        target: target.into(),
        reference: reference.into(),
        verdict: match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        },
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn thousands(n: f64) -> String {
    let n = n.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn main() {
    match std::env::var(procs::ROLE).as_deref() {
        Ok("service") => std::process::exit(match session_monitor::cli::main() {
            std::process::ExitCode::SUCCESS => 0,
            _ => 1,
        }),
        Ok("bare-receiver") => {
            let arg = |i: usize| std::env::args().nth(i).expect("port and buffer");
            procs::bare_receiver_main(
                arg(1).parse().expect("a port"),
                arg(2).parse().expect("a size"),
            );
            return;
        }
        _ => {}
    }
    // `--only NAME[,NAME]` runs some sections (ingest, parse, loss, latency, memory, checkpoint,
    // payload) and implies --no-write: BENCHMARKS.md is only written from a whole run.
    let args: Vec<String> = std::env::args().collect();
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|names| names.split(',').map(str::to_owned).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    let write = only.is_none() && !args.iter().any(|a| a == "--no-write");
    let mut rows = Vec::new();
    let step = |name: &str| eprintln!("[bench] {name}…");

    if want("ingest") {
        for (buffer, label) in [
            (
                session_monitor::config::defaults::UDP_RECEIVE_BUFFER_BYTES,
                "8 MiB buffer (default, granted to root)",
            ),
            (procs::POD_RECEIVE_BUFFER_BYTES, "pod buffer 212,992 B"),
        ] {
            step(&format!(
                "ingest at {label}: bare receiver, then the service (4 s each at full speed)"
            ));
            let ingest = ingest::run(buffer);
            let ratio = ingest.service.received_per_sec / ingest.bare.received_per_sec;
            let share = |t: &ingest::Throughput| 100.0 * t.received_per_sec / t.sent_per_sec;
            rows.push(row(
            format!("Ingest, {label}: datagrams/s taken by the service (loopback, {} sender threads in a separate process)", ingest::SENDERS),
            format!(
                "{}/s ({:.0} % of what was sent); service/bare = {:.2}",
                thousands(ingest.service.received_per_sec),
                share(&ingest.service),
                ratio
            ),
            "≥ 200,000/s and ≥ 0.9 × bare",
            format!(
                "bare receiver (recv per datagram, counts only) {}/s ({:.0} % of what was sent)",
                thousands(ingest.bare.received_per_sec),
                share(&ingest.bare),
            ),
            Some(ingest.service.received_per_sec >= 200_000.0 && ratio >= 0.9),
        ));
            rows.push(row(
                format!("Ingest, {label}: sent vs counted by the service"),
                format!(
                    "{} sent, {} counted, {} lost ({} kernel drops reported)",
                    thousands(ingest.service.sent as f64),
                    thousands(ingest.service.counted as f64),
                    thousands(ingest.service.sent.saturating_sub(ingest.service.counted) as f64),
                    thousands(ingest.kernel_drops as f64)
                ),
                "every loss counted",
                format!(
                    "bare receiver: {} sent, {} counted; senders {}/s",
                    thousands(ingest.bare.sent as f64),
                    thousands(ingest.bare.counted as f64),
                    thousands(ingest.service.sent_per_sec)
                ),
                Some(ingest.service.sent - ingest.service.counted == ingest.kernel_drops),
            ));
        }
    }
    if want("parse") {
        step("parser: decode and parse 100,000 realistic datagrams, beside the parser before #22");
        let p = parse::run(&ingest::pool(100_000), 20, 5);
        let ratio = p.now_ns / p.before_ns;
        rows.push(row(
            format!(
                "Parser: decode + parse per datagram ({} realistic datagrams: 10,000 users, 4 proxies, all three formats, half the connection messages with a user agent, 1 % malformed; one core)",
                thousands(p.datagrams as f64)
            ),
            format!(
                "{:.0} ns ({} accepted); now/before = {:.2}",
                p.now_ns,
                thousands(p.now_accepted as f64),
                ratio
            ),
            "≤ 1.10 × before",
            format!(
                "the parser before #22 (lossy UTF-8, fields split at a fixed count; bench/src/parse_before.rs) {:.0} ns ({} accepted)",
                p.before_ns,
                thousands(p.before_accepted as f64)
            ),
            Some(ratio <= 1.10),
        ));
    }
    if want("loss") {
        for (sessions, rate, seconds) in [(1_000_000, 20_000, 30), (100_000, 50_000, 15)] {
            step(&format!(
                "loss at the pod buffer: {} sessions, {}/s for {seconds} s",
                thousands(sessions as f64),
                thousands(rate as f64)
            ));
            let l = loss::run(sessions, rate, seconds);
            rows.push(row(
            format!(
                "Loss at the pod buffer (212,992 B): {} sessions, {} events/s for {} s; checkpoints every 5 s, user list republished to mosquitto, /api/v1/users every 5 s",
                thousands(l.sessions as f64),
                thousands(l.rate as f64),
                l.seconds
            ),
            format!(
                "{} kernel drops; {} sent, {} received",
                thousands(l.kernel_drops as f64),
                thousands(l.sent as f64),
                thousands(l.received as f64)
            ),
            "0 kernel drops",
            format!(
                "{} checkpoints (mean {}), {} user lists rendered, {} API fetches (mean {}, {}); spool high water {}",
                l.checkpoints,
                ms(l.checkpoint_mean),
                l.list_publishes,
                l.api_fetches,
                ms(l.api_mean),
                mb(l.api_bytes as u64),
                mb(l.spool_high_water)
            ),
            Some(l.kernel_drops == 0 && l.received == l.sent && l.checkpoints >= (l.seconds / 5).saturating_sub(1)),
        ));
        }
    }
    if want("latency") {
        step("latency: datagram → MQTT publish through mosquitto at 10/s and 1,000/s (5 s each)");
        let list_limit = PUBLISH_INTERVAL + Duration::from_millis(10);
        for l in latency::run(&[10, 1_000]) {
            rows.push(row(
                format!(
                    "Latency datagram → count on MQTT at {}/s ({} probes): p50 / p99 / max",
                    thousands(l.rate as f64),
                    l.probes
                ),
                format!(
                    "{} / {} / {}",
                    ms(l.count.p50),
                    ms(l.count.p99),
                    ms(l.count.max)
                ),
                "p50 ≤ 2 ms, p99 ≤ 5 ms",
                format!(
                    "count_publish_interval {} (default)",
                    ms(COUNT_PUBLISH_INTERVAL)
                ),
                Some(
                    l.count.p50 <= Duration::from_millis(2)
                        && l.count.p99 <= Duration::from_millis(5),
                ),
            ));
            rows.push(row(
                format!(
                    "Latency datagram → user list on MQTT at {}/s: p50 / p99 / max",
                    thousands(l.rate as f64),
                ),
                format!(
                    "{} / {} / {}",
                    ms(l.list.p50),
                    ms(l.list.p99),
                    ms(l.list.max)
                ),
                format!("p99 ≤ {}", ms(list_limit)),
                format!("publish_interval {} (default)", ms(PUBLISH_INTERVAL)),
                Some(l.list.p99 <= list_limit),
            ));
        }
    }
    if want("memory") {
        for sessions in [100_000, 1_000_000] {
            step(&format!(
                "memory: {} active sessions",
                thousands(sessions as f64)
            ));
            let m = memory::run(sessions, Some("mqtt://127.0.0.1:9"));
            rows.push(row(
                format!(
                    "Memory: resident with {} sessions ({} users)",
                    thousands(m.sessions as f64),
                    thousands(m.users as f64)
                ),
                format!(
                    "{} ({:.0} B/session above the idle {})",
                    mb(m.rss),
                    m.bytes_per_session(),
                    mb(m.baseline_rss)
                ),
                if sessions == 1_000_000 {
                    "< 300 MB"
                } else {
                    ""
                },
                "",
                (sessions == 1_000_000).then_some(m.rss < 300_000_000),
            ));
        }
    }
    if want("checkpoint") {
        for sessions in [100_000, 1_000_000] {
            step(&format!(
                "checkpoint: {} sessions",
                thousands(sessions as f64)
            ));
            let c = checkpoint::run(sessions);
            let small = sessions == 100_000;
            let write_limit = Duration::from_millis(if small { 200 } else { 500 });
            rows.push(row(
                format!(
                    "Checkpoint {} sessions: encode from the registry + write (file)",
                    thousands(sessions as f64)
                ),
                format!(
                    "{} + {} = {}",
                    ms(c.encode),
                    ms(c.write),
                    ms(c.encode + c.write)
                ),
                format!("≤ {}", ms(write_limit)),
                format!(
                    "{} encoded ({:.1} B/session); {} ConfigMaps of 900 KiB",
                    mb(c.bytes as u64),
                    c.bytes as f64 / sessions as f64,
                    c.config_maps
                ),
                Some(c.encode + c.write <= write_limit),
            ));
            rows.push(row(
                format!(
                    "Checkpoint {} sessions: restore (read, decode, load)",
                    thousands(sessions as f64)
                ),
                ms(c.restore),
                "≤ 1 s",
                "",
                Some(c.restore <= Duration::from_secs(1)),
            ));
        }
    }
    if want("payload") {
        step("MQTT payload: the user list at 10,000 users");
        let p = payload::run(10_000);
        rows.push(row(
        format!("MQTT user list at {} users", thousands(p.users as f64)),
        format!(
            "{} bytes; rendered in {}; publish → delivered {}",
            thousands(p.list_bytes as f64),
            ms(p.render),
            ms(p.delivery)
        ),
        "",
        "sent at most once per publish_interval, only when the set changed (Butler: on every event)",
        None,
    ));
    }
    let table = render(&rows);
    println!("{table}");
    if write {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
        std::fs::write(&path, benchmarks_md(&table)).expect("write BENCHMARKS.md");
        eprintln!("[bench] wrote {}", path.display());
    }
}

fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | measured | target | reference | |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.figure, r.measured, r.target, r.reference, r.verdict
        );
    }
    out
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!(
        "{model}, {cores} cores, {memory} RAM; Linux {}; {}; `net.core.rmem_max` = {}",
        command_output("uname", &["-r"]),
        command_output("rustc", &["--version"]),
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    )
}

fn benchmarks_md(table: &str) -> String {
    format!(
        "# Benchmarks\n\n\
         Written by `cargo run --release -p session-monitor-bench` (a few minutes once built; \
         `-- --no-write` only prints, `-- --only ingest,parse,loss,latency,memory,checkpoint,payload` \
         runs some sections and writes nothing). Run it again after a change that touches a hot \
         path, and commit the result. The targets are the project's performance goals; each \
         figure stands beside its physical reference where there is one.\n\n\
         Machine: {machine}.\n\n\
         {table}\n\
         How each figure is measured:\n\n\
         - **Ingest**: two sender threads in the benchmark process blast realistic datagrams \
         (10,000 users, 4 proxies, all three formats, 1 % malformed) over loopback as fast as they \
         can; the service (a separate process, release build) counts them in \
         `session_monitor_datagrams_received_total`, read over a 4 s window after 1 s of warm-up. \
         The reference is a bare receiver process with the same socket set-up (the service's own \
         `bind`, so the same buffer) whose loop only calls `recv` and counts. The senders run on \
         CPU 0 and the receiver on the others: in production the senders are the proxies, other \
         machines, and left to the scheduler a receiver that uses more CPU slows its own senders \
         on loopback (where the sender's CPU does the kernel's delivery work). Where both take \
         100 % of what was sent, the senders are the limit and the ratio is a lower bound. Once \
         with the service's default 8 MiB buffer (granted here because the benchmark runs as \
         root), once with the 212,992 bytes a pod gets (`net.core.rmem_max`'s default; the \
         service forces exactly that size). Every datagram the kernel dropped is reported in \
         `session_monitor_udp_kernel_drops_total`.\n\
         - **Loss at the pod buffer**: the service with a 212,992-byte socket buffer, a real \
         mosquitto, checkpoints every 5 s (the default) to a file, and its registry restored from \
         a checkpoint of N realistic sessions (as after a pod restart). Then a paced stream: per \
         20 events, 18 connection opens and closes of active sessions, one stop and one start, so \
         the set of users changes all the time and the user list is rendered and republished at \
         every interval; meanwhile the benchmark fetches `/api/v1/users` every 5 s. Sent is \
         counted by the sender, received by the service, kernel drops from `/proc/net/udp`.\n\
         - **Latency**: a real mosquitto; background load at the stated rate (connection \
         events of 1,000 active users: they refresh sessions but change no topic), and every \
         20 ms a probe that adds a user. A probe's latency runs from its send to the arrival, at \
         a subscriber in the benchmark process, of the first count publish that includes it, \
         and of the first user list that does. Defaults: the counts are published within \
         `count_publish_interval` (10 ms: at once when nothing was published in the last 10 \
         ms), the list within `publish_interval` (250 ms, so list latencies spread up to it by \
         design).\n\
         - **Memory**: VmRSS of the service process once all sessions are active (sent as \
         Start session datagrams with GUID session ids, ~1.3 sessions per user), with the MQTT \
         broker unreachable so that no publish is in flight; B/session is above the idle \
         process.\n\
         - **Checkpoint**: best of 5 (3 for 1,000,000) in-process runs, as the service does it: \
         the registry (64 shards) written shard by shard into a body from its own tables and \
         compressed (encode), the file store's atomic write (temporary file, fsync, rename), and \
         at start the file read, decoded and loaded into a fresh registry (restore). \
         ConfigMaps: `NAME` plus shards of 900 KiB.\n\
         - **MQTT payload**: rendering every state payload from a registry of 10,000 users, and \
         the median time from publishing the list (QoS 1) to its delivery to a subscriber \
         through mosquitto.\n",
        machine = machine()
    )
}
