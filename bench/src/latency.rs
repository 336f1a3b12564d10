//! Latency from datagram to MQTT publish, with a real mosquitto: background load at a fixed
//! rate (connection events of 1,000 active users, which refresh sessions but change no topic),
//! and every 20 ms a probe datagram that adds a user. A probe's latency is the time from its
//! send to the first count publish that includes it, seen by a subscriber in this process.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use crate::procs::{Mosquitto, ServiceProcess, wait_for};

const COUNT_TOPIC: &str = "qliksense/users/active/count";
const PRELOADED: usize = 1000;
const PROBE_EVERY: Duration = Duration::from_millis(20);
const RUN_FOR: Duration = Duration::from_secs(5);

pub struct Latency {
    pub rate: u64,
    pub probes: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

fn datagram(command: &str, user: &str, session: &str) -> String {
    format!(
        "/session-monitor/;qs-proxy-1.corp.example;{command};LOAD;{user};AppAccess;/app/0c7b;{session};{command} for user"
    )
}

/// Count publishes as (arrival, count).
type Seen = Arc<Mutex<Vec<(Instant, usize)>>>;

fn subscribe(port: u16) -> (Client, Seen) {
    let mut options = MqttOptions::new("bench-latency", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, 100);
    client
        .subscribe(COUNT_TOPIC, QoS::AtMostOnce)
        .expect("subscribe");
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let at = Instant::now();
                    if let Some(count) = std::str::from_utf8(&p.payload)
                        .ok()
                        .and_then(|s| s.parse().ok())
                    {
                        sink.lock().unwrap().push((at, count));
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, seen)
}

fn latest(seen: &Seen) -> Option<usize> {
    seen.lock().unwrap().last().map(|(_, c)| *c)
}

pub fn run(rates: &[u64]) -> Vec<Latency> {
    let broker = Mosquitto::start();
    let service = ServiceProcess::start(Some(&broker.url()));
    let (_client, seen) = subscribe(broker.port);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("socket");
    socket
        .connect(("127.0.0.1", service.udp_port))
        .expect("connect");
    for i in 0..PRELOADED {
        let _ =
            socket.send(datagram("Start session", &format!("u{i}"), &format!("s{i}")).as_bytes());
        if i % 200 == 199 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    wait_for(
        "the preloaded users on MQTT",
        Duration::from_secs(20),
        || (latest(&seen) == Some(PRELOADED)).then_some(()),
    );
    let mut base = PRELOADED;
    rates
        .iter()
        .map(|&rate| {
            let result = run_rate(&socket, service.udp_port, &seen, rate, base);
            base += result.probes;
            result
        })
        .collect()
}

fn run_rate(probe_socket: &UdpSocket, port: u16, seen: &Seen, rate: u64, base: usize) -> Latency {
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("socket");
            socket.connect(("127.0.0.1", port)).expect("connect");
            let per_ms = rate as f64 / 1000.0;
            let start = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64;
                while sent < due {
                    let i = (sent / 2) as usize % PRELOADED;
                    let command = if sent.is_multiple_of(2) {
                        "Open connection"
                    } else {
                        "Close connection"
                    };
                    let _ = socket
                        .send(datagram(command, &format!("u{i}"), &format!("s{i}")).as_bytes());
                    sent += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300)); // load at full rate before the first probe
    let mut sends = Vec::new();
    let start = Instant::now();
    while start.elapsed() < RUN_FOR {
        let k = sends.len();
        let user = format!("probe-{rate}-{k}");
        sends.push(Instant::now());
        let _ = probe_socket.send(datagram("Start session", &user, &user).as_bytes());
        std::thread::sleep(PROBE_EVERY);
    }
    let last = base + sends.len();
    wait_for("the last probe on MQTT", Duration::from_secs(20), || {
        (latest(seen).is_some_and(|c| c >= last)).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let publishes = seen.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = sends
        .iter()
        .enumerate()
        .map(|(k, sent)| {
            let wanted = base + k + 1;
            publishes
                .iter()
                .find(|(at, count)| at >= sent && *count >= wanted)
                .map(|(at, _)| *at - *sent)
                .expect("every probe is published")
        })
        .collect();
    latencies.sort();
    let n = latencies.len();
    Latency {
        rate,
        probes: n,
        p50: latencies[n / 2],
        p99: latencies[(n * 99).div_ceil(100) - 1],
        max: latencies[n - 1],
    }
}
