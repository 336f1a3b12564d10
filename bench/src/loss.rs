//! Loss under load in a pod's conditions: the socket buffer a pod gets (212,992 bytes, forced
//! to exactly that), a large registry, a steady stream of events, and everything else the
//! service does meanwhile at its defaults: checkpoints every 5 s, the user list republished to
//! a real mosquitto as the set of users changes, and `/api/v1/users` fetched every 5 s. Every
//! datagram sent must be received: the kernel's drop counter must not move.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use session_monitor::checkpoint::codec::{self, Checkpoint};
use session_monitor::registry::{SessionRecord, UnixMillis};

use session_monitor::parser::Format;
use session_monitor_simulate::datagram::{self, Datagram};

use crate::procs::{Mosquitto, POD_RECEIVE_BUFFER_BYTES, ServiceOptions, ServiceProcess, wait_for};
use crate::realistic;

pub struct Loss {
    pub sessions: usize,
    pub rate: u64,
    pub seconds: u64,
    pub sent: u64,
    pub received: u64,
    pub kernel_drops: u64,
    pub checkpoints: u64,
    pub checkpoint_mean: Duration,
    pub list_publishes: u64,
    pub api_fetches: usize,
    pub api_mean: Duration,
    pub api_bytes: usize,
    pub spool_high_water: u64,
}

fn datagram(command: &str, r: &SessionRecord) -> String {
    Datagram::event(
        Format::SessionMonitor,
        &r.host,
        datagram::command(command),
        &r.user_directory,
        &r.user_id,
        &"/hub/",
        &r.proxy_session_id.as_deref().unwrap_or(""),
    )
    .render()
}

/// Sends `datagrams` at `per_sec`, in 1 ms slices, until they run out or `stop`.
fn paced(
    socket: &UdpSocket,
    per_sec: u64,
    stop: &AtomicBool,
    mut next: impl FnMut() -> Option<String>,
    sent: &AtomicU64,
) {
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * per_sec as f64) as u64;
        while n < due {
            let Some(d) = next() else { return };
            if socket.send(d.as_bytes()).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

pub fn run(sessions: usize, rate: u64, seconds: u64) -> Loss {
    let broker = Mosquitto::start();
    let url = broker.url();
    let now = UnixMillis::now();
    let records = Arc::new(realistic::sessions(sessions, now));
    // The registry comes from a checkpoint, as after a pod restart: exact, and quick to load.
    let checkpoint = codec::encode(&Checkpoint {
        saved_at: now,
        hosts: Vec::new(),
        sessions: records.to_vec(),
    });
    let service = ServiceProcess::start_with(ServiceOptions {
        mqtt_url: Some(&url),
        receive_buffer_bytes: Some(POD_RECEIVE_BUFFER_BYTES),
        checkpoint_interval: "5s",
        pinned: false,
        checkpoint: Some(checkpoint),
    });
    let socket = UdpSocket::bind("127.0.0.1:0").expect("socket");
    socket
        .connect(("127.0.0.1", service.udp_port))
        .expect("connect");
    wait_for("every session active", Duration::from_secs(120), || {
        (service.metric("session_monitor_active_sessions") as usize == sessions).then_some(())
    });

    let metric = |name: &str| service.metric(name) as u64;
    let checkpoint_count = "session_monitor_checkpoint_duration_seconds_count";
    let checkpoint_sum = "session_monitor_checkpoint_duration_seconds_sum";
    let list_topic = "session_monitor_mqtt_list_render_seconds_count";
    let before = (
        metric("session_monitor_datagrams_received_total"),
        metric("session_monitor_udp_kernel_drops_total"),
        metric(checkpoint_count),
        service.metric(checkpoint_sum),
        metric(list_topic),
    );

    // The stream: per 20 events, 18 connection opens and closes of active sessions (refreshes),
    // one stop of an active session and one start of a new one, so the set of users changes all
    // the time and the list is republished at every interval.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let fresh = realistic::sessions(sessions + (rate * seconds / 10) as usize, now);
    let sender = {
        let (records, sent, stop, socket) = (
            records.clone(),
            sent.clone(),
            stop.clone(),
            socket.try_clone().expect("socket"),
        );
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(11);
            let mut next_fresh = sessions;
            let mut stopped = 0usize;
            let mut k = 0u64;
            paced(
                &socket,
                rate,
                &stop,
                || {
                    k += 1;
                    let d = match k % 20 {
                        0 => {
                            stopped += 1;
                            datagram("Stop session", &records[stopped * 7919 % records.len()])
                        }
                        10 => {
                            next_fresh += 1;
                            datagram(
                                "Start session",
                                &fresh[(next_fresh - 1).min(fresh.len() - 1)],
                            )
                        }
                        j => {
                            let command = if j % 2 == 0 {
                                "Open connection"
                            } else {
                                "Close connection"
                            };
                            datagram(command, &records[rng.usize(..records.len())])
                        }
                    };
                    Some(d)
                },
                &sent,
            );
        })
    };
    let started = Instant::now();
    let mut api = Vec::new();
    let mut api_bytes = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        if let Some((200, body)) = service.get("/api/v1/users") {
            api.push(t.elapsed());
            api_bytes = body.len();
        }
        let next = Duration::from_secs(5 * api.len().max(1) as u64);
        std::thread::sleep(
            next.saturating_sub(started.elapsed())
                .min(Duration::from_secs(5)),
        );
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender");
    let sent = sent.load(Ordering::Relaxed);
    let received = wait_for(
        "the service to take every datagram",
        Duration::from_secs(60),
        || {
            let got = metric("session_monitor_datagrams_received_total") - before.0;
            let drops = metric("session_monitor_udp_kernel_drops_total") - before.1;
            (got + drops >= sent).then_some(got)
        },
    );
    let checkpoints = metric(checkpoint_count) - before.2;
    let checkpoint_seconds = service.metric(checkpoint_sum) - before.3;
    Loss {
        sessions,
        rate,
        seconds,
        sent,
        received,
        kernel_drops: metric("session_monitor_udp_kernel_drops_total") - before.1,
        checkpoints,
        checkpoint_mean: Duration::from_secs_f64(checkpoint_seconds / checkpoints.max(1) as f64),
        list_publishes: metric(list_topic) - before.4,
        api_fetches: api.len(),
        api_mean: api.iter().sum::<Duration>() / api.len().max(1) as u32,
        api_bytes,
        spool_high_water: metric("session_monitor_ingest_spool_high_water_bytes"),
    }
}
