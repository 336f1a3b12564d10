//! Latency from datagram to MQTT publish, with a real mosquitto: background load at a fixed
//! rate (connection events of 1,000 active users, which refresh sessions but change no topic),
//! and every 20 ms a probe datagram that adds a user. A probe's latency is the time from its
//! send to the first count publish that includes it, and to the first user list that does, seen
//! by a subscriber in this process.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use session_monitor::parser::Format;
use session_monitor_simulate::datagram::{self, Datagram};

use crate::procs::{Mosquitto, ServiceProcess, wait_for};

const COUNT_TOPIC: &str = "qliksense/users/active/count";
const LIST_TOPIC: &str = "qliksense/users/active/usernames";
const PRELOADED: usize = 1000;
const PROBE_EVERY: Duration = Duration::from_millis(20);
const RUN_FOR: Duration = Duration::from_secs(5);

pub struct Latency {
    pub rate: u64,
    pub probes: usize,
    pub count: Percentiles,
    pub list: Percentiles,
}

pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Percentiles {
    fn of(mut latencies: Vec<Duration>) -> Percentiles {
        latencies.sort();
        let n = latencies.len();
        Percentiles {
            p50: latencies[n / 2],
            p99: latencies[(n * 99).div_ceil(100) - 1],
            max: latencies[n - 1],
        }
    }
}

fn datagram(command: &str, user: &str, session: &str) -> String {
    Datagram::event(
        Format::SessionMonitor,
        "qs-proxy-1.corp.example",
        datagram::command(command),
        "LOAD",
        user,
        &"/app/0c7b",
        &session,
    )
    .render()
}

/// Count publishes and user lists, as (arrival, users).
#[derive(Clone, Default)]
struct Seen {
    counts: Arc<Mutex<Vec<(Instant, usize)>>>,
    lists: Arc<Mutex<Vec<(Instant, usize)>>>,
}

fn subscribe(port: u16) -> (Client, Seen) {
    let mut options = MqttOptions::new("bench-latency", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut connection) = Client::new(options, 100);
    for topic in [COUNT_TOPIC, LIST_TOPIC] {
        client.subscribe(topic, QoS::AtMostOnce).expect("subscribe");
    }
    let seen = Seen::default();
    let sink = seen.clone();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let at = Instant::now();
                    if p.topic == COUNT_TOPIC {
                        if let Some(count) = std::str::from_utf8(&p.payload)
                            .ok()
                            .and_then(|s| s.parse().ok())
                        {
                            sink.counts.lock().unwrap().push((at, count));
                        }
                    } else if let Ok(list) = serde_json::from_slice::<Vec<String>>(&p.payload) {
                        sink.lists.lock().unwrap().push((at, list.len()));
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, seen)
}

fn latest(seen: &Mutex<Vec<(Instant, usize)>>) -> Option<usize> {
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
        || (latest(&seen.counts) == Some(PRELOADED)).then_some(()),
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
        (latest(&seen.counts).is_some_and(|c| c >= last)
            && latest(&seen.lists).is_some_and(|c| c >= last))
        .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let latencies = |publishes: &Mutex<Vec<(Instant, usize)>>| {
        let publishes = publishes.lock().unwrap().clone();
        let latencies = sends
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
        Percentiles::of(latencies)
    };
    Latency {
        rate,
        probes: sends.len(),
        count: latencies(&seen.counts),
        list: latencies(&seen.lists),
    }
}
