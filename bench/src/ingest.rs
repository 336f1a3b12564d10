//! Ingest throughput: a sender process (this one) blasts realistic datagrams at the service,
//! then at a bare receiver (a socket loop that only counts, with the same buffer); both counts
//! come from the receivers themselves.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use session_monitor_simulate::Traffic;

use crate::procs::{BareReceiver, Cpus, ServiceOptions, ServiceProcess, wait_for};

pub const SENDERS: usize = 2;

pub struct Throughput {
    /// Datagrams per second the receiver counted in the measured window.
    pub received_per_sec: f64,
    /// Datagrams per second the sender sent in that window.
    pub sent_per_sec: f64,
    pub sent: u64,
    pub counted: u64,
}

pub struct Ingest {
    pub service: Throughput,
    pub bare: Throughput,
    pub kernel_drops: u64,
}

/// A pool of realistic datagrams (10,000 users, 4 proxies, all three formats, 1 % malformed),
/// generated before the clock starts.
pub fn pool(n: usize) -> Vec<Vec<u8>> {
    let mut traffic = Traffic::new(10_000, 4, 0.01, fastrand::Rng::with_seed(7)).expect("traffic");
    (0..n)
        .map(|_| {
            let mut out = Vec::new();
            traffic.next_into(&mut out);
            out
        })
        .collect()
}

/// Sends `pool` round-robin to `port` as fast as one thread can until `stop`.
fn blast(port: u16, pool: Arc<Vec<Vec<u8>>>, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    Cpus::Senders.pin_current_thread();
    let socket = UdpSocket::bind("127.0.0.1:0").expect("sender socket");
    socket.connect(("127.0.0.1", port)).expect("connect");
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            if socket.send(&pool[i % pool.len()]).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
        }
    }
}

/// Blasts for `warmup + window`, measuring the receiver's count over `window`, then waits for
/// the receiver to drain its buffer.
fn measure(
    port: u16,
    pool: &Arc<Vec<Vec<u8>>>,
    warmup: Duration,
    window: Duration,
    mut count: impl FnMut() -> u64,
) -> Throughput {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    // Two sender threads: one alone is slower than a receiver on loopback, where the sender's
    // CPU does the kernel's delivery work; two saturate the receiving side of a 2-core machine.
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (pool, stop, sent) = (pool.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || blast(port, pool, stop, sent))
        })
        .collect();
    std::thread::sleep(warmup);
    let (c1, s1, t1) = (count(), sent.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(window);
    let (c2, s2, t2) = (count(), sent.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().expect("sender");
    }
    let seconds = (t2 - t1).as_secs_f64();
    // Drained when the count holds still for 200 ms.
    let mut last = count();
    let counted = wait_for("the receiver to drain", Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(200));
        let now = count();
        let stable = (now == last).then_some(now);
        last = now;
        stable
    });
    Throughput {
        received_per_sec: (c2 - c1) as f64 / seconds,
        sent_per_sec: (s2 - s1) as f64 / seconds,
        sent: sent.load(Ordering::Relaxed),
        counted,
    }
}

/// Both receivers with a socket buffer of `buffer` bytes.
pub fn run(buffer: usize) -> Ingest {
    let pool = Arc::new(pool(200_000));
    let warmup = Duration::from_secs(1);
    let window = Duration::from_secs(4);

    let mut bare = BareReceiver::start(buffer);
    let bare_result = measure(bare.port, &pool, warmup, window, || bare.count());
    drop(bare);

    // MQTT to an address where nothing listens: this measures ingest, not publishing (the
    // latency benchmark measures that with a real broker).
    let service = ServiceProcess::start_with(ServiceOptions {
        mqtt_url: Some("mqtt://127.0.0.1:9"),
        receive_buffer_bytes: Some(buffer),
        pinned: true,
        ..ServiceOptions::default()
    });
    let service_result = measure(service.udp_port, &pool, warmup, window, || {
        service.metric("session_monitor_datagrams_received_total") as u64
    });
    let kernel_drops = service.metric("session_monitor_udp_kernel_drops_total") as u64;
    Ingest {
        service: service_result,
        bare: bare_result,
        kernel_drops,
    }
}
