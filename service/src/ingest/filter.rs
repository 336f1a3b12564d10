//! A socket filter (classic BPF) that drops oversized datagrams in the kernel, before they take
//! space in the receive buffer.
//!
//! Why: the kernel charges a datagram's whole allocation to the buffer, about 64 KiB for a 60 KB
//! datagram, so a flood of them fills even an 8 MiB buffer with ~130 datagrams that the service
//! would only count and drop, and the kernel then drops the proxies' events behind them. The
//! fault test `a_flood_from_a_disallowed_source_and_oversized_datagrams_leave_allowed_traffic_exact`
//! lost up to 1.4% of the allowed events this way before the filter.
//!
//! The kernel counts what the filter drops with the buffer overflows (`udp_kernel_drops_total`).
//! So that an oversized datagram is still seen, counted as `too_large` and logged with its
//! sender, the filter lets one in [`SAMPLE_ONE_IN`] through, chosen at random by the kernel.
//! Datagrams from disallowed sources are not filtered here: they are small, cost the buffer
//! little, and their sender in the service's log is how an administrator finds a proxy missing
//! from `udp_allowed_sources`.
//!
//! Classic BPF needs no privilege (`SO_ATTACH_FILTER`), unlike eBPF.

/// One oversized datagram in this many reaches the service, to be counted and logged.
pub const SAMPLE_ONE_IN: u32 = 64;

/// A classic BPF instruction, as `struct sock_filter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instruction {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Opcodes (linux/filter.h, linux/bpf_common.h).
const LD_W_LEN: u16 = 0x80; // BPF_LD | BPF_W | BPF_LEN: A = length of the packet
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS: A = word at k
const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K
/// SKF_AD_OFF + SKF_AD_RANDOM: a random word from the kernel.
const RANDOM: u32 = (-0x1000i32 + 56) as u32;
/// The filter runs on the UDP header and payload.
const UDP_HEADER: u32 = 8;
const ACCEPT: u32 = u32::MAX;
const DROP: u32 = 0;

/// The program: accept datagrams of at most `max_datagram_bytes` of payload; of longer ones,
/// accept one in `sample_one_in` (a power of two) at random and drop the rest.
pub fn program(max_datagram_bytes: u32, sample_one_in: u32) -> Vec<Instruction> {
    assert!(sample_one_in.is_power_of_two(), "{sample_one_in}");
    let i = |code, jt, jf, k| Instruction { code, jt, jf, k };
    vec![
        i(LD_W_LEN, 0, 0, 0),
        // Jumps are relative to the next instruction.
        i(JGT_K, 1, 0, max_datagram_bytes.saturating_add(UDP_HEADER)),
        i(RET_K, 0, 0, ACCEPT),
        i(LD_W_ABS, 0, 0, RANDOM),
        i(AND_K, 0, 0, sample_one_in - 1),
        i(JEQ_K, 0, 1, 0),
        i(RET_K, 0, 0, ACCEPT),
        i(RET_K, 0, 0, DROP),
    ]
}

/// Attaches [`program`] to `socket`.
#[cfg(target_os = "linux")]
pub fn attach(
    socket: &impl std::os::fd::AsRawFd,
    max_datagram_bytes: usize,
    sample_one_in: u32,
) -> std::io::Result<()> {
    let max = u32::try_from(max_datagram_bytes).unwrap_or(u32::MAX);
    let mut filter: Vec<libc::sock_filter> = program(max, sample_one_in)
        .into_iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: a valid socket descriptor and a sock_fprog pointing at `filter`, which outlives the
    // call (the kernel copies the program).
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn attach<S>(_: &S, _: usize, _: u32) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "socket filters are Linux only",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    /// What arrives of `sizes` sent to a socket with the filter attached, by the real kernel.
    fn arrive(bind: &str, max: usize, sample_one_in: u32, sizes: &[usize]) -> Vec<usize> {
        let receiver = UdpSocket::bind(bind).unwrap();
        attach(&receiver, max, sample_one_in).unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let sender = UdpSocket::bind(bind).unwrap();
        let to = receiver.local_addr().unwrap();
        for &n in sizes {
            sender.send_to(&vec![b'x'; n], to).unwrap();
        }
        let mut got = Vec::new();
        let mut buf = vec![0; 70_000];
        while let Ok((n, _)) = receiver.recv_from(&mut buf) {
            got.push(n);
        }
        got
    }

    /// "Never" for a test: one in 2^31.
    const NEVER: u32 = 1 << 31;

    #[test]
    fn datagrams_up_to_the_limit_pass_and_longer_ones_are_dropped_on_ipv4_and_ipv6() {
        let sizes = [0, 1, 99, 100, 101, 8_192, 60_000, 100];
        assert_eq!(
            arrive("127.0.0.1:0", 100, NEVER, &sizes),
            [0, 1, 99, 100, 100]
        );
        if UdpSocket::bind("[::1]:0").is_ok() {
            assert_eq!(arrive("[::1]:0", 100, NEVER, &sizes), [0, 1, 99, 100, 100]);
        }
    }

    #[test]
    fn about_one_in_sample_of_the_oversized_is_let_through() {
        // Few enough that what passes fits the default receive buffer.
        let sizes = vec![200; 1_024];
        let got = arrive("127.0.0.1:0", 100, 16, &sizes).len();
        // 64 expected; binomial(1024, 1/16) leaves 24..120 about once in 10^9 runs.
        assert!((24..120).contains(&got), "{got}");
        assert_eq!(arrive("127.0.0.1:0", 100, 1, &sizes[..64]).len(), 64);
    }

    #[test]
    fn the_program_is_what_the_comments_say() {
        let p = program(8_192, 64);
        assert_eq!(p.len(), 8);
        assert_eq!(p[1].k, 8_200);
        assert_eq!(p[4].k, 63);
        assert_eq!(program(u32::MAX, 1)[1].k, u32::MAX);
    }
}
