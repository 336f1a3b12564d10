//! The UDP socket: binding with a large receive buffer, receiving in batches, and the kernel's
//! own count of datagrams it dropped.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::UdpConfig;

/// How often a blocked receive wakes up to check for shutdown.
pub const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// Datagrams taken from the kernel per system call at most.
pub const BATCH: usize = 64;

/// A bound UDP socket and what the kernel granted it.
pub struct Bound {
    pub socket: UdpSocket,
    /// The receive buffer size the kernel granted (Linux reports double the usable size and
    /// caps the request at net.core.rmem_max unless we may force it).
    pub receive_buffer_bytes: usize,
    /// Whether oversized datagrams are dropped by the kernel (see [`super::filter`]), or why not.
    pub oversized_filter: std::io::Result<()>,
}

/// Binds the UDP socket with the configured receive buffer and the oversized-datagram filter.
///
/// On `[::]` (the default) the socket takes IPv4 and IPv6; where the host has no IPv6 at all
/// (a kernel booted with `ipv6.disable=1`, a pod without it) it takes `0.0.0.0` instead, with a
/// warning, rather than not starting.
pub fn bind(config: &UdpConfig) -> std::io::Result<Bound> {
    let socket = match bind_to(config, config.listen) {
        Err(e) if no_ipv6(config.listen, &e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], config.listen.port()));
            tracing::warn!(error = %e, listen = %config.listen, fallback = %v4, "no IPv6 on this host: UDP ingest listens on IPv4 only");
            bind_to(config, v4)?
        }
        other => other?,
    };
    let granted = socket.recv_buffer_size()?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(SHUTDOWN_POLL))?;
    let oversized_filter = super::filter::attach(
        &socket,
        config.limits.max_datagram_bytes,
        super::filter::SAMPLE_ONE_IN,
    );
    Ok(Bound {
        socket,
        receive_buffer_bytes: granted,
        oversized_filter,
    })
}

fn bind_to(config: &UdpConfig, listen: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        // Accept IPv4 too on "[::]", as administrators expect from a wildcard address.
        let _ = socket.set_only_v6(false);
    }
    // Needs CAP_NET_ADMIN; without it, fall back to the request net.core.rmem_max caps.
    if !force_recv_buffer_size(&socket, config.receive_buffer_bytes) {
        socket.set_recv_buffer_size(config.receive_buffer_bytes)?;
    }
    socket.bind(&listen.into())?;
    Ok(socket)
}

/// Whether binding the IPv6 wildcard failed because the host has no IPv6.
fn no_ipv6(listen: SocketAddr, error: &std::io::Error) -> bool {
    listen.ip() == std::net::Ipv6Addr::UNSPECIFIED
        && matches!(
            error.raw_os_error(),
            Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
        )
}

/// SO_RCVBUFFORCE: the requested size even above net.core.rmem_max, for a privileged process.
#[cfg(target_os = "linux")]
fn force_recv_buffer_size(socket: &Socket, bytes: usize) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(size) = libc::c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its correct length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn force_recv_buffer_size(_: &Socket, _: usize) -> bool {
    false
}

/// Receive buffers for [`BATCH`] datagrams of up to `slot` bytes each.
pub struct Slots {
    buffers: Vec<u8>,
    slot: usize,
    /// Length and sender of each datagram of the last receive.
    received: Vec<(usize, SocketAddr)>,
}

impl Slots {
    pub fn new(slot: usize) -> Slots {
        Slots {
            buffers: vec![0; slot * BATCH],
            slot,
            received: Vec::with_capacity(BATCH),
        }
    }

    /// The datagrams of the last [`recv_batch`]; one longer than a slot is cut to the slot.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.received
            .iter()
            .enumerate()
            .map(|(i, &(len, peer))| (&self.buffers[i * self.slot..][..len], peer))
    }
}

/// Waits for at least one datagram (up to the socket's read timeout), then takes every
/// datagram already queued, up to [`BATCH`], in one system call (Linux `recvmmsg`). Returns
/// how many were received; 0 on timeout.
#[cfg(target_os = "linux")]
pub fn recv_batch(socket: &UdpSocket, slots: &mut Slots) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    slots.received.clear();
    // SAFETY: zeroed sockaddr_storage, iovec and mmsghdr are valid values (plain C structs).
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    let mut iovecs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, chunk) in slots.buffers.chunks_exact_mut(slots.slot).enumerate() {
        iovecs[i] = libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: chunk.len(),
        };
        msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
        msgs[i].msg_hdr.msg_iov = &mut iovecs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every mmsghdr points at a live iovec over its own slot of `buffers` and at its
    // own sockaddr_storage, all of which outlive the call; BATCH is the array length.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let error = std::io::Error::last_os_error();
        return match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Ok(0),
            _ => Err(error),
        };
    }
    for (msg, addr) in msgs.iter().zip(&addrs).take(n as usize) {
        // Entry i is slot i's datagram (`Slots::datagrams`), so none may be skipped: a sender
        // of another family (never seen on a UDP socket) would shift every later datagram onto
        // the wrong sender. It keeps its place with the unspecified address instead, which no
        // list of proxies in `udp_allowed_sources` contains.
        let peer = socket_addr(addr).unwrap_or((std::net::Ipv4Addr::UNSPECIFIED, 0).into());
        // A datagram longer than its slot arrives cut (MSG_TRUNC in msg_flags); its length is
        // then the slot, one byte over the configured cap, so it is still seen as too large.
        slots.received.push((msg.msg_len as usize, peer));
    }
    Ok(slots.received.len())
}

#[cfg(not(target_os = "linux"))]
pub fn recv_batch(socket: &UdpSocket, slots: &mut Slots) -> std::io::Result<usize> {
    slots.received.clear();
    match socket.recv_from(&mut slots.buffers[..slots.slot]) {
        Ok((len, peer)) => {
            slots.received.push((len, peer));
            Ok(1)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

#[cfg(target_os = "linux")]
fn socket_addr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    match libc::c_int::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET; storage is large and aligned
            // enough for any socket address.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for AF_INET6 and sockaddr_in6.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Datagrams the kernel dropped for this socket because its receive buffer was full, from the
/// `drops` column of /proc/net/udp{,6}. `None` where the OS does not report it.
pub fn kernel_drops(socket: &UdpSocket) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
            .ok()?
            .ino();
        ["/proc/net/udp", "/proc/net/udp6"]
            .iter()
            .find_map(|table| {
                let text = std::fs::read_to_string(table).ok()?;
                text.lines().skip(1).find_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ref pointer drops
                    (cols.get(9)?.parse::<u64>().ok()? == inode)
                        .then(|| cols.get(12)?.parse().ok())?
                })
            })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_drops_are_read_for_our_socket() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(kernel_drops(&socket), Some(0));
        }
    }

    #[test]
    fn a_batch_holds_every_queued_datagram_with_its_sender() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let v4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let v6 = UdpSocket::bind("[::1]:0").ok();
        let target = receiver.local_addr().unwrap();
        for i in 0..(BATCH + 3) {
            v4.send_to(format!("datagram {i}").as_bytes(), target)
                .unwrap();
        }
        v4.send_to(&[b'x'; 20], target).unwrap();
        let mut slots = Slots::new(16);
        assert_eq!(recv_batch(&receiver, &mut slots).unwrap(), BATCH);
        let first: Vec<(Vec<u8>, SocketAddr)> =
            slots.datagrams().map(|(d, p)| (d.to_vec(), p)).collect();
        assert_eq!(first[0], (b"datagram 0".to_vec(), v4.local_addr().unwrap()));
        assert_eq!(
            first[BATCH - 1].0,
            format!("datagram {}", BATCH - 1).into_bytes()
        );
        assert_eq!(recv_batch(&receiver, &mut slots).unwrap(), 4);
        // Longer than its slot: cut to the slot, so the caller sees more than its cap.
        assert_eq!(slots.datagrams().last().unwrap().0, &[b'x'; 16][..]);
        if let Some(v6) = v6 {
            let receiver6 = UdpSocket::bind("[::1]:0").unwrap();
            v6.send_to(b"six", receiver6.local_addr().unwrap()).unwrap();
            assert_eq!(recv_batch(&receiver6, &mut slots).unwrap(), 1);
            let (d, p) = slots.datagrams().next().unwrap();
            assert_eq!((d, p), (&b"six"[..], v6.local_addr().unwrap()));
        }
        receiver
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        assert_eq!(
            recv_batch(&receiver, &mut slots).unwrap(),
            0,
            "timeout is not an error"
        );
    }
}
