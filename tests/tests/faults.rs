//! Injected faults against the real binary, and what must survive them: a full disk under the
//! checkpoint file, SIGKILL in the middle of checkpoint writes, a broker that is away for minutes
//! under load, and a flood of datagrams the service must refuse. (The ConfigMap store's faults,
//! which need a real API server, are in `configmap_cluster.rs`.)

mod common;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::churn::{self, Churn};
use common::datagram::own;
use common::{Mosquitto, Service, Subscriber, wait_for};
use session_monitor::checkpoint::codec;
use session_monitor_testkit::cluster::wait_for_within;

const WRITES_FAILED: &str = "session_monitor_checkpoint_writes_total{result=\"failure\"}";
const RESTORED: &str = "session_monitor_checkpoint_restores_total{result=\"restored\"}";

/// An address for the service's embedded broker: not the default port, which tests running in
/// parallel would contend for.
fn embedded_broker() -> String {
    format!("127.0.0.1:{}", common::free_tcp_port())
}

fn metric(service: &Service, sample: &str) -> f64 {
    service
        .metric(sample)
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
}

/// The sessions of the churn users in a checkpoint file; panics if it does not decode.
fn stored_sessions(path: &Path) -> BTreeSet<u64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let checkpoint =
        codec::decode(&bytes).unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
    checkpoint
        .sessions
        .iter()
        .map(|s| churn::number(&s.user_id))
        .collect()
}

/// Files a write cut short left in `dir` (`.<name>.<random>.partial`).
fn partial_writes(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

#[test]
fn the_churn_check_tells_each_session_old_or_new_from_a_mix() {
    let set = |ns: &[u64]| ns.iter().copied().collect::<BTreeSet<u64>>();
    let before = || Churn::with_state(set(&[0, 1, 2, 3]), 4);
    let batch = before().batch(2, 2); // starts 4 and 5, stops 0 and 1
    assert_eq!(batch.stops, [0, 1]);
    // Old, new, and each session old or new (the registry is written shard by shard).
    for stored in [set(&[0, 1, 2, 3]), set(&[2, 3, 4, 5]), set(&[0, 2, 3, 5])] {
        before().check(&batch, stored).unwrap();
    }
    let lost = before().check(&batch, set(&[0, 1, 4, 5])).unwrap_err();
    assert!(lost.contains("session 2 "), "{lost}");
    // 0 and 1 were stopped by an earlier batch: back in the checkpoint, they are a mix.
    let mut after_earlier_stops = Churn::with_state(set(&[2, 3]), 4);
    let batch = after_earlier_stops.batch(2, 1);
    let undone = after_earlier_stops
        .check(&batch, set(&[0, 2, 3, 4, 5]))
        .unwrap_err();
    assert!(undone.contains("session 0 "), "{undone}");
    assert_eq!(churn::number("k0000042"), 42);
}

/// SIGKILL at random moments while the registry changes and checkpoints are written every few
/// milliseconds, 100 times: every checkpoint left behind decodes, holds each session as it was
/// before the last batch or after it, and restores in full; what a killed write leaves is
/// removed at the next start.
#[test]
fn sigkill_during_file_checkpoint_writes_leaves_old_or_new_never_a_mix() {
    const ITERATIONS: usize = 100;
    const HELD: u64 = 20_000;
    const BATCH: u64 = 1_500;
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("checkpoint");
    let mqtt = embedded_broker();
    let args = [
        "--checkpoint-interval",
        "5ms",
        "--mqtt-embedded-listen",
        &mqtt,
    ];
    let mut service = Service::start(dir.path(), &args);

    let mut churn = Churn::default();
    let fill = churn.batch(HELD, 0);
    service.send_paced(&fill.datagrams());
    wait_for("the whole registry in the checkpoint file", || {
        (file.exists() && stored_sessions(&file).len() == HELD as usize).then_some(())
    });
    churn.check(&fill, stored_sessions(&file)).unwrap();

    let started = Instant::now();
    let (mut in_write, mut cut_short) = (0, 0);
    for i in 0..ITERATIONS {
        let batch = churn.batch(BATCH, BATCH as usize);
        // A kill within about the time a write takes here.
        let offset = churn::send_until_a_write_starts(&service, &batch);
        let delay = Duration::from_millis(rng.u64(0..100));
        in_write += usize::from(churn::kill_in_a_write(&mut service, offset, delay));
        cut_short += usize::from(!partial_writes(dir.path()).is_empty());
        let stored = stored_sessions(&file);
        churn
            .check(&batch, stored)
            .unwrap_or_else(|e| panic!("iteration {i} (seed {seed}): {e}"));

        service.restart(&args);
        assert_eq!(metric(&service, RESTORED), 1.0, "iteration {i}");
        assert_eq!(
            metric(&service, "session_monitor_checkpoint_restored_sessions"),
            churn.held().len() as f64,
            "iteration {i}"
        );
        assert_eq!(partial_writes(dir.path()), Vec::<String>::new());
    }
    eprintln!(
        "{ITERATIONS} kills (seed {seed}) in {:?}: {in_write} during a checkpoint write \
         ({cut_short} with its file half-written); every checkpoint was whole",
        started.elapsed()
    );
    // Without kills that land in writes this test would prove nothing.
    assert!(in_write > 0, "no kill landed in a write");
}

/// A tmpfs of its own, unmounted when dropped (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&at)
            .output()
            .expect("mount(8)");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounting needs root; `.ci/run` runs as root and sets `SESSION_MONITOR_TEST_REQUIRE_ROOT` so
/// that this test cannot be skipped there.
fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("SESSION_MONITOR_TEST_REQUIRE_ROOT").is_none(),
        "{test} needs root to mount a tmpfs"
    );
    eprintln!("skipping {test}: it mounts a tmpfs, which needs root");
    false
}

/// Fills `dir`'s file system to the last byte; returns the filler file.
fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xA5u8; 4096];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    // Smaller writes until not one byte more fits.
    while let Ok(1..) = f.write(&block[..1]) {}
    path
}

#[test]
fn a_full_disk_fails_checkpoints_keeps_the_last_one_whole_and_recovers() {
    if !root_or_skip("a_full_disk_fails_checkpoints_keeps_the_last_one_whole_and_recovers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let volume = Tmpfs::mount(dir.path().join("volume"), "1m");
    let file = volume.0.join("checkpoint");
    let file_arg = file.display().to_string();
    let mqtt = embedded_broker();
    let args = [
        "--checkpoint-file",
        &file_arg,
        "--checkpoint-interval",
        "20ms",
        "--mqtt-embedded-listen",
        &mqtt,
    ];
    let mut service = Service::start_without_checkpoint_file(dir.path(), &args, &[]);

    let mut churn = Churn::default();
    let first = churn.batch(300, 0);
    service.send_paced(&first.datagrams());
    wait_for("the first batch applied", || {
        (service.metric("session_monitor_active_sessions")? == 300.0).then_some(())
    });
    wait_for("the first checkpoint", || {
        (file.exists() && stored_sessions(&file).len() == 300).then_some(())
    });
    churn.check(&first, stored_sessions(&file)).unwrap();
    let saved = std::fs::read(&file).unwrap();

    let filler = fill_up(&volume.0);
    let failures_before = metric(&service, WRITES_FAILED);
    let second = churn.batch(2_000, 100);
    service.send_paced(&second.datagrams());
    wait_for("the second batch applied", || {
        (service.metric("session_monitor_active_sessions")? == 2_200.0).then_some(())
    });
    wait_for("checkpoint writes to fail on the full disk", || {
        (service.metric(WRITES_FAILED)? >= failures_before + 2.0).then_some(())
    });
    // Still serving, with the whole registry; the previous checkpoint untouched; nothing
    // half-written left on the volume.
    let summary = service.get_json("/api/v1/summary");
    assert_eq!(summary["active_sessions"], 2_200);
    assert_eq!(service.get("/readyz").unwrap().0, 200);
    assert_eq!(std::fs::read(&file).unwrap(), saved);
    assert_eq!(partial_writes(&volume.0), Vec::<String>::new());
    let log = service.log_text();
    assert!(
        log.contains("checkpoint write failed") && log.contains("No space left on device"),
        "the failure is logged with its cause:\n{log}"
    );

    // Space returns: the next write (after the back-off) holds everything.
    std::fs::remove_file(filler).unwrap();
    wait_for("a checkpoint with the whole registry", || {
        (stored_sessions(&file).len() == 2_200).then_some(())
    });
    churn.check(&second, stored_sessions(&file)).unwrap();
    service.signal(libc::SIGKILL);
    service.wait_exit();
    service.restart(&args);
    assert_eq!(
        metric(&service, "session_monitor_checkpoint_restored_sessions"),
        2_200.0
    );
    drop(service);
    drop(volume);
}

/// Events at 10,000 per second while the broker is away for minutes: the service's memory stays
/// flat, and when the broker returns it gets the state as it is, with nothing from the outage.
#[test]
fn a_broker_outage_under_load_keeps_memory_flat_and_publishes_only_the_present() {
    // Minutes in CI; SESSION_MONITOR_TEST_OUTAGE_SECS shortens it for a quick local run.
    let outage = Duration::from_secs(
        std::env::var("SESSION_MONITOR_TEST_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );
    const RATE: u64 = 10_000;
    const ACTIVE: u64 = 5_000;
    let mut broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(
        dir.path(),
        &[
            "--mqtt-url",
            &broker.url(),
            "--publish-interval",
            "100ms",
            "--mqtt-topic-session-start",
            "qliksense/session/start",
            "--mqtt-topic-session-stop",
            "qliksense/session/stop",
        ],
    );
    wait_for("connected", || {
        (service.metric("session_monitor_mqtt_connected")? == 1.0).then_some(())
    });
    broker.stop();
    wait_for("the outage noticed", || {
        (service.metric("session_monitor_mqtt_connected")? == 0.0).then_some(())
    });

    // One sender at RATE: a new session, and once ACTIVE are held, a stop of the oldest.
    let stop = Arc::new(AtomicBool::new(false));
    let port = service.udp_port;
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let started = Instant::now();
            // Sessions `stopped..started` are held.
            let (mut started_n, mut stopped_n) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let due = started.elapsed().as_micros() as u64 * RATE / 1_000_000;
                while started_n + stopped_n < due {
                    let d = if started_n - stopped_n < ACTIVE || (started_n + stopped_n) % 2 == 0 {
                        started_n += 1;
                        churn::datagram("Start session", started_n - 1)
                    } else {
                        stopped_n += 1;
                        churn::datagram("Stop session", stopped_n - 1)
                    };
                    socket.send_to(d.as_bytes(), ("127.0.0.1", port)).unwrap();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (
                started_n + stopped_n,
                started_n - stopped_n,
                started.elapsed(),
            )
        })
    };

    // Memory once the registry has reached its working size, then through the outage.
    std::thread::sleep(Duration::from_secs(5).min(outage / 4));
    let settled = service.rss_bytes();
    let mut peak = settled;
    let end = Instant::now() + outage;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(service.rss_bytes());
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, held, took) = sender.join().unwrap();
    let rate = sent as f64 / took.as_secs_f64();
    wait_for("every datagram read", || {
        (service.metric("session_monitor_datagrams_received_total")? == sent as f64).then_some(())
    });
    eprintln!(
        "outage of {outage:?}: {sent} events at {rate:.0}/s; RSS {} MiB settled, {} MiB peak",
        settled >> 20,
        peak >> 20
    );
    assert!(rate > RATE as f64 * 0.9, "the load reached {rate:.0}/s");
    assert!(
        peak <= settled + 16 * 1024 * 1024,
        "memory grew during the outage: {settled} → {peak} bytes"
    );
    assert_eq!(
        metric(&service, "session_monitor_udp_kernel_drops_total"),
        0.0
    );
    assert!(metric(&service, "session_monitor_mqtt_events_dropped_total") > 0.0);

    // The present, as the API shows it.
    let summary = service.get_json("/api/v1/summary");
    let users = summary["active_users"].as_u64().unwrap();
    assert_eq!(users, held);

    broker.restart();
    let sub = Subscriber::connect(broker.port, "#");
    // After minutes away the service retries every 30 s (its longest back-off).
    let present = users.to_string();
    wait_for_within("the present count", Duration::from_secs(45), || {
        match sub.latest().get("qliksense/users/active/count") {
            Some(m) if m.payload == present => Ok(()),
            latest => Err(format!("{latest:?}, want {present}")),
        }
    });
    wait_for("a counted reconnect", || {
        (service.metric("session_monitor_mqtt_connections_total")? >= 2.0).then_some(())
    });
    // Anything queued during the outage would have arrived right after the reconnect, before
    // or with the state; give it the time of several publish intervals.
    std::thread::sleep(Duration::from_millis(500));
    let messages = sub.messages();
    let events: Vec<_> = messages
        .iter()
        .filter(|m| m.topic.starts_with("qliksense/session/"))
        .collect();
    assert!(
        events.is_empty(),
        "{} events from the outage were published after it, e.g. {:?}",
        events.len(),
        events.first()
    );
    let counts: Vec<&str> = messages
        .iter()
        .filter(|m| m.topic == "qliksense/users/active/count")
        .map(|m| m.payload.as_str())
        .collect();
    assert_eq!(
        counts,
        [users.to_string().as_str()],
        "only the present count"
    );
    let list = &sub.latest()["qliksense/users/active/usernames"];
    let names: serde_json::Value = serde_json::from_str(&list.payload).unwrap();
    assert_eq!(names.as_array().unwrap().len() as u64, users);
}

/// A flood from a source that is not allowed, and datagrams over the size limit, as fast as one
/// sender each can go, while an allowed proxy sends 20,000 sessions: every one of those is
/// counted, the rest is counted as dropped, and the kernel dropped nothing.
#[test]
fn a_flood_from_a_disallowed_source_and_oversized_datagrams_leave_allowed_traffic_exact() {
    const SESSIONS: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(
        dir.path(),
        &[
            "--udp-allowed-sources",
            "127.0.0.1/32",
            "--mqtt-embedded-listen",
            &embedded_broker(),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let port = service.udp_port;
    let flood = |from: &'static str, datagram: Vec<u8>| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // A hostile sender is elsewhere on the network, not on the service's cores: here it
            // is, so it runs at the lowest priority and takes only CPU time the service leaves.
            // SAFETY: setpriority(2) on this thread's own id.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
            let socket = UdpSocket::bind((from, 0)).unwrap();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A full socket buffer answers ENOBUFS/EAGAIN on some kernels: keep going.
                if socket.send_to(&datagram, ("127.0.0.1", port)).is_ok() {
                    sent += 1;
                }
            }
            sent
        })
    };
    let intruder = flood(
        "127.0.0.2",
        own("Start session", "qs-evil", "EVIL", "mallory", "x").into_bytes(),
    );
    let oversized = flood("127.0.0.1", vec![b'/'; 60_000]);

    let started = Instant::now();
    let allowed = UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in 0..SESSIONS {
        let d = churn::datagram("Start session", n);
        allowed.send_to(d.as_bytes(), ("127.0.0.1", port)).unwrap();
        if n % 100 == 99 {
            std::thread::sleep(Duration::from_millis(10)); // 10,000 per second
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (intruded, oversent) = (intruder.join().unwrap(), oversized.join().unwrap());
    eprintln!(
        "in {:?}: {SESSIONS} allowed, {intruded} from a disallowed source, {oversent} oversized",
        started.elapsed()
    );
    // Everything queued is read once the count stops moving.
    let mut last = -1.0;
    wait_for("the service to read what was queued", || {
        std::thread::sleep(Duration::from_millis(200));
        let now = service.metric("session_monitor_datagrams_received_total")?;
        (std::mem::replace(&mut last, now) == now).then_some(())
    });
    assert_eq!(
        metric(&service, "session_monitor_active_sessions"),
        SESSIONS as f64,
        "allowed sessions lost; the kernel dropped {} datagrams",
        metric(&service, "session_monitor_udp_kernel_drops_total")
    );
    let dropped = |reason: &str| {
        metric(
            &service,
            &format!("session_monitor_datagrams_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    // Every flood datagram counted once: by reason in the service, or by the kernel (which drops
    // most oversized ones before they take buffer space, see the socket filter).
    let kernel = metric(&service, "session_monitor_udp_kernel_drops_total");
    assert_eq!(
        dropped("source_not_allowed") + dropped("too_large") + kernel,
        (intruded + oversent) as f64
    );
    assert!(dropped("source_not_allowed") > 0.0);
    assert!(
        dropped("too_large") > 0.0,
        "a sample of the oversized is counted by reason"
    );
    // The kernel may drop flood datagrams when the buffer is full; that none of the allowed
    // ones was lost is what the exact count above shows.
    eprintln!(
        "dropped: {} not allowed, {} too large, {} by the kernel",
        dropped("source_not_allowed"),
        dropped("too_large"),
        metric(&service, "session_monitor_udp_kernel_drops_total")
    );
    let users: Vec<String> = service
        .get_json("/api/v1/users")
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(users.len() as u64, SESSIONS);
    assert!(
        users.iter().all(|u| u.starts_with('k')),
        "nothing of the flood is counted"
    );
}
