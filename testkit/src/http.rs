//! The smallest HTTP client the tests need, and free loopback ports: HTTP/1.0, so no server
//! answers in chunks, and a `Connection: close` read to the end.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

/// `GET path` on `ip:port`, with `Authorization: Bearer TOKEN` when a token is given: the status
/// code and the body.
pub fn get(ip: &str, port: u16, path: &str, bearer: Option<&str>) -> io::Result<(u16, String)> {
    let ip = ip
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{ip}: {e}")))?;
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(2))?;
    // Generous: a benchmark's registry of a million users answers in megabytes.
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let authorization = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {ip}\r\n{authorization}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("no status in {head:?}"))
        })?;
    Ok((status, body.to_owned()))
}

/// `GET path` on 127.0.0.1: `None` while nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at("127.0.0.1", port, path)
}

/// `GET path` on `ip:port` (e.g. a ClusterIP, which a cluster's node routes to its pods).
pub fn http_get_at(ip: &str, port: u16, path: &str) -> Option<(u16, String)> {
    http_get_with(ip, port, path, None)
}

/// [`http_get_at`] with `Authorization: Bearer TOKEN` when a token is given.
pub fn http_get_with(
    ip: &str,
    port: u16,
    path: &str,
    bearer: Option<&str>,
) -> Option<(u16, String)> {
    get(ip, port, path, bearer).ok()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
        .port()
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}
