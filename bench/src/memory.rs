//! Resident memory of the service holding N active sessions (realistic names, GUID session ids,
//! ~1.3 sessions per user, 4 proxies), read from /proc while the sessions are active.

use std::net::UdpSocket;
use std::time::Duration;

use session_monitor::parser::{Command, Format};
use session_monitor_simulate::Datagram;

use crate::procs::{ServiceProcess, wait_for};
use crate::realistic;

pub struct Memory {
    pub sessions: usize,
    pub users: usize,
    pub baseline_rss: u64,
    pub rss: u64,
}

impl Memory {
    pub fn bytes_per_session(&self) -> f64 {
        (self.rss.saturating_sub(self.baseline_rss)) as f64 / self.sessions as f64
    }
}

pub fn run(sessions: usize, mqtt_url: Option<&str>) -> Memory {
    let service = ServiceProcess::start(mqtt_url);
    let baseline_rss = service.rss_bytes();
    let records = realistic::sessions(sessions, session_monitor::registry::UnixMillis::now());
    let socket = UdpSocket::bind("127.0.0.1:0").expect("socket");
    socket
        .connect(("127.0.0.1", service.udp_port))
        .expect("connect");
    // Batches the 8 MiB receive buffer absorbs; the next goes once the service caught up.
    let mut sent = 0u64;
    for batch in records.chunks(4096) {
        for r in batch {
            let datagram = Datagram::event(
                Format::SessionMonitor,
                &r.host,
                Command::StartSession,
                &r.user_directory,
                &r.user_id,
                &"/hub/",
                &r.proxy_session_id.as_deref().unwrap_or(""),
            )
            .render();
            socket.send(datagram.as_bytes()).expect("send");
            sent += 1;
        }
        wait_for("the service to catch up", Duration::from_secs(60), || {
            (service.metric("session_monitor_datagrams_received_total") as u64 >= sent)
                .then_some(())
        });
    }
    let active = wait_for("every session active", Duration::from_secs(60), || {
        let n = service.metric("session_monitor_active_sessions") as usize;
        (n == sessions).then_some(n)
    });
    let users = service.metric("session_monitor_active_users") as usize;
    // Let a publish cycle (if any) settle before reading.
    std::thread::sleep(Duration::from_millis(500));
    Memory {
        sessions: active,
        users,
        baseline_rss,
        rss: service.rss_bytes(),
    }
}
