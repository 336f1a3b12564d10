//! A real mosquitto broker on 127.0.0.1 for a test or a benchmark, and finding programs that
//! Debian keeps outside a user's PATH.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::http::free_tcp_port;
use crate::poll::until;

/// A program from PATH, or from /usr/sbin where Debian puts mosquitto (not on every PATH).
pub fn program(name: &str) -> PathBuf {
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

/// A mosquitto broker on 127.0.0.1, without persistence: a restart forgets retained messages,
/// which lets tests prove the service republishes its state. Killed when dropped.
pub struct Mosquitto {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Configuration lines beyond the listener, e.g. TLS files and authentication.
    extra_config: String,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(|_| "allow_anonymous true\n".to_owned())
    }

    /// Starts with configuration lines made by `config`, given the broker's own directory (for
    /// certificates and password files).
    pub fn start_with(config: impl FnOnce(&Path) -> String) -> Mosquitto {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // mosquitto started as root drops to the `mosquitto` user, which must read these files.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("a readable broker directory");
        let extra_config = config(dir.path());
        let mut broker = Mosquitto {
            port: free_tcp_port(),
            dir,
            extra_config,
            child: None,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let config = format!(
            "persistence false\nlistener {} 127.0.0.1\n{}",
            self.port, self.extra_config
        );
        std::fs::write(&conf, config).expect("the broker's configuration");
        let log =
            std::fs::File::create(self.dir.path().join("mosquitto.log")).expect("the broker's log");
        let child = Command::new(program("mosquitto"))
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().expect("the broker's log"))
            .stderr(log)
            .spawn()
            .expect("mosquitto must be installed (apt-get install -y mosquitto); see README");
        self.child = Some(child);
        let port = self.port;
        until(
            "mosquitto to accept connections",
            Duration::from_secs(20),
            || TcpStream::connect(("127.0.0.1", port)).ok(),
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}
