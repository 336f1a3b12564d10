//! The processes a benchmark runs beside itself: the service (this executable re-run in the
//! service role, i.e. the service's own `cli::main` compiled in release), the bare receiver,
//! and mosquitto. Each is killed when its handle drops.

use std::io::{BufRead, BufReader, Write};

use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

/// Environment variable that selects a child role of this executable.
pub const ROLE: &str = "SESSION_MONITOR_BENCH_ROLE";

pub use session_monitor_testkit::http::{free_tcp_port, free_udp_port};
pub use session_monitor_testkit::mosquitto::Mosquitto;
/// Polls `check` until it returns `Some`, for at most `limit`.
pub use session_monitor_testkit::poll::until as wait_for;
use session_monitor_testkit::process::{KillOnDrop, Process};

pub struct ServiceProcess {
    /// Its log is in `_dir`, and its end is printed if the benchmark panics.
    process: Process,
    pub udp_port: u16,
    pub http_port: u16,
    _dir: tempfile::TempDir,
}

/// How a benchmark runs the service; [`ServiceOptions::default`] is the service's defaults on
/// loopback with a file checkpoint that is not written during the run (interval 1 h), so that
/// only the work under measurement happens.
#[derive(Clone, Debug)]
pub struct ServiceOptions<'a> {
    /// `None` for the embedded broker.
    pub mqtt_url: Option<&'a str>,
    /// `None` for the service's default (8 MiB).
    pub receive_buffer_bytes: Option<usize>,
    pub checkpoint_interval: &'a str,
    /// Run on the receiving side's CPUs (see [`Cpus`]).
    pub pinned: bool,
    /// A checkpoint (encoded) the service restores at start, as after a restart.
    pub checkpoint: Option<Vec<u8>>,
}

impl Default for ServiceOptions<'_> {
    fn default() -> Self {
        ServiceOptions {
            mqtt_url: None,
            receive_buffer_bytes: None,
            checkpoint_interval: "1h",
            pinned: false,
            checkpoint: None,
        }
    }
}

/// The receive buffer a pod gets: the kernel's default `net.core.rmem_max`, since a pod has no
/// CAP_NET_ADMIN to go beyond it.
pub const POD_RECEIVE_BUFFER_BYTES: usize = 212_992;

impl ServiceProcess {
    /// The service with its defaults (see [`ServiceOptions`]); `mqtt_url`: `None` for the
    /// embedded broker.
    pub fn start(mqtt_url: Option<&str>) -> ServiceProcess {
        ServiceProcess::start_with(ServiceOptions {
            mqtt_url,
            ..ServiceOptions::default()
        })
    }

    pub fn start_with(options: ServiceOptions<'_>) -> ServiceProcess {
        let restoring = options.checkpoint.is_some();
        let mqtt_url = options.mqtt_url;
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(bytes) = &options.checkpoint {
            // Where the service looks by default, relative to its working directory.
            let path = dir
                .path()
                .join(session_monitor::config::defaults::CHECKPOINT_FILE);
            std::fs::create_dir_all(path.parent().expect("a directory")).expect("data dir");
            std::fs::write(&path, bytes).expect("write the checkpoint");
        }
        let udp_port = free_udp_port();
        let http_port = free_tcp_port();
        let embedded = format!("127.0.0.1:{}", free_tcp_port());
        let mut command = Command::new(std::env::current_exe().expect("own executable"));
        command
            .env(ROLE, "service")
            .current_dir(dir.path())
            .args(["--udp-listen", &format!("127.0.0.1:{udp_port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--checkpoint-interval", options.checkpoint_interval])
            .args(["--log-level", "error"]);
        match mqtt_url {
            Some(url) => command.args(["--mqtt-url", url]),
            None => command.args(["--mqtt-embedded-listen", &embedded]),
        };
        if let Some(bytes) = options.receive_buffer_bytes {
            // As root the service forces the size (SO_RCVBUFFORCE): exactly what a pod gets.
            command.args(["--udp-receive-buffer-bytes", &bytes.to_string()]);
        }
        if options.pinned {
            Cpus::Receivers.pin_command(&mut command);
        }
        let log = dir.path().join("service.log");
        let process = Process::spawn("the service", &mut command, &log);
        let service = ServiceProcess {
            process,
            udp_port,
            http_port,
            _dir: dir,
        };
        let limit = Duration::from_secs(if restoring { 60 } else { 20 });
        wait_for("the service to be ready", limit, || {
            service.get("/readyz").filter(|(code, _)| *code == 200)
        });
        service
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        session_monitor_testkit::http::get("127.0.0.1", self.http_port, path, None).ok()
    }

    /// A sample of the service's own /metrics, e.g. `session_monitor_active_sessions`.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics").expect("/metrics answers");
        session_monitor_testkit::metrics::sample(&body, sample).unwrap_or(0.0)
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // It runs at `--log-level error`: anything in its log is worth seeing beside the figures.
        let log = self.process.log_text();
        if !log.trim().is_empty() && !std::thread::panicking() {
            eprintln!("--- the service logged ---\n{log}");
        }
    }
}

pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The bare receiver: a socket with the service's buffer size and a loop that only counts.
/// Asked over stdin ("?"), it answers its count on stdout.
pub struct BareReceiver {
    _child: KillOnDrop,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub port: u16,
}

impl BareReceiver {
    /// A bare receiver with a receive buffer of `buffer` bytes, forced like the service's.
    pub fn start(buffer: usize) -> BareReceiver {
        let port = free_udp_port();
        let mut child = Command::new(std::env::current_exe().expect("own executable"))
            .env(ROLE, "bare-receiver")
            .arg(port.to_string())
            .arg(buffer.to_string())
            .apply(|c| Cpus::Receivers.pin_command(c))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the bare receiver");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut receiver = BareReceiver {
            _child: KillOnDrop(child),
            stdin,
            stdout,
            port,
        };
        receiver.count(); // answers once bound
        receiver
    }

    pub fn count(&mut self) -> u64 {
        writeln!(self.stdin, "?").expect("ask the bare receiver");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("its answer");
        line.trim().parse().expect("a count")
    }
}

/// The bare receiver's process: counts datagrams on 127.0.0.1:`port`, with the same socket
/// set-up as the service (its own `bind`, so the same buffer).
pub fn bare_receiver_main(port: u16, buffer: usize) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let config = session_monitor::config::UdpConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        allowed_sources: Vec::new(),
        limits: Default::default(),
        encoding: session_monitor::parser::UTF_8,
        receive_buffer_bytes: buffer,
    };
    let socket = session_monitor::ingest::bind(&config).expect("bind").socket;
    socket.set_read_timeout(None).expect("blocking receive");
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8193];
        loop {
            if socket.recv(&mut buf).is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        if line.is_err() {
            break;
        }
        let _ = writeln!(stdout, "{}", count.load(Ordering::Relaxed));
        let _ = stdout.flush();
    }
}

/// Which CPUs a side of the ingest measurement runs on. In production the senders are the
/// proxies, other machines; here they share the machine, and on loopback the sender's CPU does
/// the kernel's delivery work. Left to the scheduler, a receiver that uses more CPU slows its
/// own senders and so looks slower than it is. So, with two CPUs or more, the senders get CPU 0
/// and the receiver (the service, or the bare receiver) all the others.
#[derive(Clone, Copy)]
pub enum Cpus {
    Senders,
    Receivers,
}

impl Cpus {
    fn set(self) -> Option<libc::cpu_set_t> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if n < 2 {
            return None;
        }
        // SAFETY: cpu_set_t is a plain bit set; zeroed is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let cpus = match self {
            Cpus::Senders => 0..1,
            Cpus::Receivers => 1..n,
        };
        for cpu in cpus {
            // SAFETY: cpu < n ≤ CPU_SETSIZE on any machine this runs on.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        Some(set)
    }

    /// Pins the calling thread.
    pub fn pin_current_thread(self) {
        if let Some(set) = self.set() {
            // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of its size.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        }
    }

    /// Pins the process `command` starts (and so every thread it makes).
    pub fn pin_command(self, command: &mut Command) {
        use std::os::unix::process::CommandExt;
        if let Some(set) = self.set() {
            // SAFETY: sched_setaffinity is async-signal-safe and touches only the child.
            unsafe {
                command.pre_exec(move || {
                    libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
                    Ok(())
                });
            }
        }
    }
}

/// `Command` builders chain; this lets a helper join the chain.
trait Apply {
    fn apply(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self;
}

impl Apply for Command {
    fn apply(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self {
        f(self);
        self
    }
}
