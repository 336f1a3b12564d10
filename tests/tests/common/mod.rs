#![allow(dead_code)] // each test file uses a different part of the harness
//! The harness of the end-to-end tests: a real mosquitto per test on a free loopback port, the
//! real `session-monitor` binary as a child process, real UDP datagrams, and an MQTT subscriber.
//!
//! Everything waits by polling with a deadline; nothing sleeps a fixed time to "let things
//! settle". Every child process is killed when its handle drops, also when a test panics.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[allow(unused_imports)] // each test file uses a different part of the harness
pub use session_monitor_testkit::mosquitto::{Mosquitto, program};
pub use session_monitor_testkit::poll::DEADLINE;
use session_monitor_testkit::process::{Log, Process};

/// Polls `check` until it returns `Some`, or panics after [`DEADLINE`] with `what`.
pub fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    session_monitor_testkit::poll::until(what, DEADLINE, check)
}

pub mod churn;

#[allow(unused_imports)]
pub use session_monitor_testkit::http::{free_tcp_port, free_udp_port};

/// HTTP GET on a loopback port, `(status, body)`.
pub fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    session_monitor_testkit::http::get("127.0.0.1", port, path, None)
}

/// The real binary with its own ports and checkpoint directory.
pub struct Service {
    env: Vec<(String, String)>,
    pub udp_port: u16,
    pub http_port: u16,
    pub dir: PathBuf,
    process: Option<Process>,
    log: Log,
    udp: UdpSocket,
    /// Whether the harness passes `--checkpoint-file` in [`Service::dir`] (the default).
    checkpoint_file: bool,
}

/// The service binary: the debug build Cargo made for these tests, or the one
/// `SESSION_MONITOR_TEST_BINARY` names (e.g. `target/release/session-monitor`, to see the faults
/// at the speed users run it).
pub fn binary() -> String {
    std::env::var("SESSION_MONITOR_TEST_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_session-monitor-under-test").to_owned())
}

/// A command for the binary with no SESSION_MONITOR_* settings leaking in from the environment.
pub fn command() -> Command {
    let mut command = Command::new(binary());
    for (key, _) in std::env::vars() {
        if key.starts_with("SESSION_MONITOR_") {
            command.env_remove(key);
        }
    }
    command
}

impl Service {
    /// Starts the service with `args` added to its ports and a checkpoint file in `dir`, and
    /// waits until `/readyz` answers 200.
    pub fn start(dir: &Path, args: &[&str]) -> Service {
        Service::start_with_env(dir, args, &[])
    }

    /// [`Service::start`] with extra environment variables (for settings that are not flags).
    pub fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Service {
        Service::start_with_store(dir, args, env, true)
    }

    /// [`Service::start_with_env`] without the harness's `--checkpoint-file`, for tests whose
    /// `args` choose another checkpoint store (`--checkpoint-configmap`). `dir` holds the log.
    pub fn start_without_checkpoint_file(
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Service {
        Service::start_with_store(dir, args, env, false)
    }

    fn start_with_store(
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        checkpoint_file: bool,
    ) -> Service {
        let mut service = Service {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            udp_port: free_udp_port(),
            http_port: free_tcp_port(),
            dir: dir.to_owned(),
            process: None,
            log: Log(dir.join(format!("service-{}.log", std::process::id()))),
            udp: UdpSocket::bind("127.0.0.1:0").unwrap(),
            checkpoint_file,
        };
        service.spawn(args);
        service
    }

    fn spawn(&mut self, args: &[&str]) {
        let mut command = command();
        // A test may listen elsewhere on the same port (`[::]:{udp_port}`, dual-stack).
        if !args.contains(&"--udp-listen") {
            command.args(["--udp-listen", &format!("127.0.0.1:{}", self.udp_port)]);
        }
        command.args(["--http-listen", &format!("127.0.0.1:{}", self.http_port)]);
        if self.checkpoint_file {
            command.args([
                "--checkpoint-file",
                &self.dir.join("checkpoint").display().to_string(),
            ]);
        }
        command
            .args(["--log-level", "debug,rumqttd=off"])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let process = Process::spawn("the service", &mut command, &self.log.0);
        let process = self.process.insert(process);
        let port = self.http_port;
        wait_for("the service to be ready", || {
            process.assert_running();
            get(port, "/readyz").ok().filter(|(code, _)| *code == 200)
        });
    }

    /// Restarts with the same ports, directory and `args`, after the previous process exited.
    pub fn restart(&mut self, args: &[&str]) {
        assert!(self.process.is_none(), "stop the service first");
        self.spawn(args);
    }

    pub fn send(&self, datagram: impl AsRef<[u8]>) {
        self.udp
            .send_to(datagram.as_ref(), ("127.0.0.1", self.udp_port))
            .unwrap();
    }

    /// Sends from an IPv6 socket to `::1`, as a proxy whose `remoteAddress` resolves to IPv6.
    pub fn send_v6(&self, datagram: impl AsRef<[u8]>) {
        let socket = UdpSocket::bind("[::1]:0").expect("an IPv6 loopback socket");
        socket
            .send_to(datagram.as_ref(), ("::1", self.udp_port))
            .unwrap();
    }

    /// Sends `datagrams` in chunks the socket buffer holds, each once the service has read the
    /// one before, so that none is dropped by the kernel.
    pub fn send_paced(&self, datagrams: &[String]) {
        let mut received = self
            .metric("session_monitor_datagrams_received_total")
            .unwrap_or(0.0);
        for chunk in datagrams.chunks(500) {
            for d in chunk {
                self.send(d);
            }
            received += chunk.len() as f64;
            wait_for("the service to read the chunk", || {
                (self.metric("session_monitor_datagrams_received_total")? >= received).then_some(())
            });
        }
    }

    /// HTTP GET on the service; `(status, body)`.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        get(self.http_port, path)
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (code, body) = self.get(path).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The value of one sample in `/metrics`, e.g. `session_monitor_active_users`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").ok()?;
        session_monitor_testkit::metrics::sample(&body, sample)
    }

    pub fn pid(&self) -> u32 {
        self.running().pid()
    }

    fn running(&self) -> &Process {
        self.process.as_ref().expect("running")
    }

    fn running_mut(&mut self) -> &mut Process {
        self.process.as_mut().expect("running")
    }

    /// The process's resident memory in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    pub fn signal(&mut self, signal: libc::c_int) {
        self.running_mut().signal(signal);
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut process = self.process.take().expect("running");
        process.wait_exit(DEADLINE)
    }

    /// The log's length now, for [`Service::log_since`].
    pub fn log_len(&self) -> u64 {
        self.log.bytes()
    }

    /// The log written since it was `offset` bytes long.
    pub fn log_since(&self, offset: u64) -> String {
        self.log.since(offset)
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }
}

/// One received MQTT message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: String,
    pub retain: bool,
}

/// An MQTT client subscribed to `#`, recording every message in order.
pub struct Subscriber {
    client: rumqttc::Client,
    stop: Arc<std::sync::atomic::AtomicBool>,
    messages: Arc<Mutex<Vec<Message>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Connects to the broker on `port` and subscribes to `filter`; waits for the SUBACK so no
    /// message published afterwards can be missed.
    pub fn connect(port: u16, filter: &str) -> Subscriber {
        Subscriber::connect_as(port, filter, None)
    }

    /// [`Subscriber::connect`] with a user name and password.
    pub fn connect_as(port: u16, filter: &str, credentials: Option<(&str, &str)>) -> Subscriber {
        let id = format!(
            "e2e-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_max_packet_size(64 * 1024 * 1024, 64 * 1024);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut connection) = rumqttc::Client::new(options, 100);
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(Mutex::new(false));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (messages, subscribed, stop) = (messages.clone(), subscribed.clone(), stop.clone());
            std::thread::spawn(move || {
                for event in connection.iter() {
                    match event {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            messages.lock().unwrap().push(Message {
                                topic: p.topic.clone(),
                                payload: String::from_utf8_lossy(&p.payload).into_owned(),
                                retain: p.retain,
                            });
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            *subscribed.lock().unwrap() = true
                        }
                        Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
                        // The broker may be restarting in some tests: keep trying.
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
        };
        wait_for("the MQTT subscription", || {
            subscribed.lock().unwrap().then_some(())
        });
        Subscriber {
            client,
            stop,
            messages,
            thread: Some(thread),
        }
    }

    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    /// The latest payload seen on each topic.
    pub fn latest(&self) -> HashMap<String, Message> {
        self.messages()
            .into_iter()
            .map(|m| (m.topic.clone(), m))
            .collect()
    }

    /// Waits until the latest message on `topic` has `payload`.
    pub fn wait_for_payload(&self, topic: &str, payload: &str) -> Message {
        wait_for(
            &format!(
                "{payload:?} on {topic} (latest: {:?})",
                self.latest().get(topic)
            ),
            || {
                self.latest()
                    .get(topic)
                    .filter(|m| m.payload == payload)
                    .cloned()
            },
        )
    }
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Datagrams in the three formats the service accepts.
/// Datagrams as the proxies send them, rendered by the simulator's one renderer.
pub mod datagram {
    use session_monitor::parser::Format;
    use session_monitor_simulate::datagram::{Datagram, command};

    fn render(
        format: Format,
        name: &str,
        host: &str,
        dir: &str,
        user: &str,
        session: &str,
    ) -> String {
        let context = match format {
            Format::SessionMonitor => "/app/0c7b",
            Format::Butler | Format::ButlerSos => "/hub/",
        };
        Datagram::event(format, host, command(name), dir, user, &context, &session).render()
    }

    /// Butler's layout (no session id: the service keys its sessions by host and user).
    pub fn butler(command: &str, host: &str, dir: &str, user: &str) -> String {
        render(Format::Butler, command, host, dir, user, "")
    }

    /// Butler SOS's layout.
    pub fn butler_sos(command: &str, host: &str, dir: &str, user: &str) -> String {
        render(Format::ButlerSos, command, host, dir, user, "")
    }

    /// Our own layout, with the proxy's session id.
    pub fn own(command: &str, host: &str, dir: &str, user: &str, session_id: &str) -> String {
        render(Format::SessionMonitor, command, host, dir, user, session_id)
    }
}
