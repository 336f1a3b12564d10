//! The processes a benchmark runs beside itself: the service (this executable re-run in the
//! service role, i.e. the service's own `cli::main` compiled in release), the bare receiver,
//! and mosquitto. Each is killed when its handle drops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable that selects a child role of this executable.
pub const ROLE: &str = "SESSION_MONITOR_BENCH_ROLE";

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
        .port()
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// Polls `check` every 10 ms until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct ServiceProcess {
    child: Child,
    pub udp_port: u16,
    pub http_port: u16,
    _dir: tempfile::TempDir,
}

impl ServiceProcess {
    /// Starts the service on loopback with a file checkpoint that is not written during the
    /// run (interval 1 h), so that only the work under measurement happens. `mqtt_url`: `None`
    /// for the embedded broker.
    pub fn start(mqtt_url: Option<&str>) -> ServiceProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let udp_port = free_udp_port();
        let http_port = free_tcp_port();
        let embedded = format!("127.0.0.1:{}", free_tcp_port());
        let mut command = Command::new(std::env::current_exe().expect("own executable"));
        command
            .env(ROLE, "service")
            .current_dir(dir.path())
            .args(["--udp-listen", &format!("127.0.0.1:{udp_port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--checkpoint-interval", "1h", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        match mqtt_url {
            Some(url) => command.args(["--mqtt-url", url]),
            None => command.args(["--mqtt-embedded-listen", &embedded]),
        };
        let child = command.spawn().expect("start the service");
        let service = ServiceProcess {
            child,
            udp_port,
            http_port,
            _dir: dir,
        };
        wait_for("the service to be ready", Duration::from_secs(20), || {
            service.get("/readyz").filter(|(code, _)| *code == 200)
        });
        service
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let code = response.split(' ').nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_owned();
        Some((code, body))
    }

    /// A sample of the service's own /metrics, e.g. `session_monitor_active_sessions`.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics").expect("/metrics answers");
        body.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub port: u16,
}

impl BareReceiver {
    pub fn start() -> BareReceiver {
        let port = free_udp_port();
        let mut child = Command::new(std::env::current_exe().expect("own executable"))
            .env(ROLE, "bare-receiver")
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the bare receiver");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut receiver = BareReceiver {
            child,
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

impl Drop for BareReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bare receiver's process: counts datagrams on 127.0.0.1:`port`.
pub fn bare_receiver_main(port: u16) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    let buffer = session_monitor::config::defaults::UDP_RECEIVE_BUFFER_BYTES;
    let _ = socket.set_recv_buffer_size(buffer);
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("bind");
    let socket: UdpSocket = socket.into();
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

pub struct Mosquitto {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_tcp_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("mosquitto config");
        let child = Command::new(program("mosquitto"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install -y mosquitto)");
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Mosquitto {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program from PATH, or from /usr/sbin where Debian puts mosquitto.
fn program(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    if !on_path && sbin.is_file() {
        sbin
    } else {
        PathBuf::from(name)
    }
}
