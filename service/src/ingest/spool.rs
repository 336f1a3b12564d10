//! The hand-off between the thread that drains the UDP socket and the thread that applies the
//! datagrams: a byte-bounded buffer the receiver appends to and the applier swaps out whole.
//!
//! Why a spool: the kernel's socket buffer is all a pod gets (212,992 bytes by default, a few
//! hundred datagrams, tens of milliseconds at 20,000 events/s). Any pause of the thread that
//! applies events (a shard lock held by a reader, a hash table growing) would overflow it. The
//! receiver never touches the registry, so it keeps draining the socket into this spool, which
//! holds seconds of traffic. Only when the spool is full does the receiver wait, and the kernel's
//! buffer (and its drop counter) take over again: no loss is ever silent.
//!
//! Both sides take the lock for O(1) or O(datagrams handed over) work, never more; wake-ups are
//! signalled only to a side that is actually waiting, so a busy pipeline makes no futex calls.

use std::net::SocketAddr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Datagrams, stored back to back.
#[derive(Debug, Default)]
pub struct Batch {
    data: Vec<u8>,
    datagrams: Vec<(u32, SocketAddr)>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.datagrams.clear();
    }

    pub fn push(&mut self, datagram: &[u8], peer: SocketAddr) {
        self.data.extend_from_slice(datagram);
        self.datagrams.push((self.data.len() as u32, peer));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        let mut start = 0;
        self.datagrams.iter().map(move |&(end, peer)| {
            let datagram = &self.data[start..end as usize];
            start = end as usize;
            (datagram, peer)
        })
    }
}

pub struct Spool {
    inner: Mutex<Inner>,
    filled: Condvar,
    drained: Condvar,
    capacity_bytes: usize,
}

#[derive(Default)]
struct Inner {
    pending: Batch,
    applier_waiting: bool,
    receiver_waiting: bool,
    closed: bool,
    /// The most bytes ever pending at once, for the metric.
    high_water: usize,
}

/// What [`Spool::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// `batch` now holds datagrams.
    Datagrams,
    /// Nothing arrived within the timeout.
    Idle,
    /// The receiver has stopped and everything it handed over has been taken.
    Closed,
}

impl Spool {
    /// A spool that holds up to `capacity_bytes` of datagrams before the receiver waits.
    pub fn new(capacity_bytes: usize) -> Spool {
        Spool {
            inner: Mutex::new(Inner::default()),
            filled: Condvar::new(),
            drained: Condvar::new(),
            capacity_bytes,
        }
    }

    /// Appends `datagrams`; first waits while the spool is full.
    pub fn push<'a>(&self, datagrams: impl IntoIterator<Item = (&'a [u8], SocketAddr)>) {
        let mut inner = self.lock();
        while inner.pending.data.len() >= self.capacity_bytes && !inner.closed {
            inner.receiver_waiting = true;
            inner = self.drained.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.receiver_waiting = false;
        for (datagram, peer) in datagrams {
            inner.pending.push(datagram, peer);
        }
        inner.high_water = inner.high_water.max(inner.pending.data.len());
        if inner.applier_waiting {
            inner.applier_waiting = false;
            self.filled.notify_one();
        }
    }

    /// Swaps everything pending into `batch` (which is cleared first), waiting up to `timeout`
    /// for something to arrive.
    pub fn take(&self, batch: &mut Batch, timeout: Duration) -> Taken {
        batch.clear();
        let mut inner = self.lock();
        if inner.pending.is_empty() {
            if inner.closed {
                return Taken::Closed;
            }
            inner.applier_waiting = true;
            inner = self
                .filled
                .wait_timeout(inner, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            inner.applier_waiting = false;
            if inner.pending.is_empty() {
                return if inner.closed {
                    Taken::Closed
                } else {
                    Taken::Idle
                };
            }
        }
        std::mem::swap(&mut inner.pending, batch);
        if inner.receiver_waiting {
            inner.receiver_waiting = false;
            self.drained.notify_one();
        }
        Taken::Datagrams
    }

    /// The receiver has stopped: the applier takes what is left, then sees [`Taken::Closed`].
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        self.filled.notify_all();
        self.drained.notify_all();
    }

    /// The most bytes that were ever pending at once.
    pub fn high_water_bytes(&self) -> usize {
        self.lock().high_water
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn peer() -> SocketAddr {
        "10.0.0.1:5000".parse().unwrap()
    }

    #[test]
    fn datagrams_come_out_whole_and_in_order() {
        let spool = Spool::new(1 << 20);
        spool.push([(&b"one"[..], peer()), (&b""[..], peer())]);
        spool.push([(&b"three"[..], peer())]);
        let mut batch = Batch::default();
        assert_eq!(spool.take(&mut batch, Duration::ZERO), Taken::Datagrams);
        let got: Vec<&[u8]> = batch.iter().map(|(d, _)| d).collect();
        assert_eq!(got, vec![&b"one"[..], &b""[..], &b"three"[..]]);
        assert_eq!(spool.take(&mut batch, Duration::ZERO), Taken::Idle);
        assert!(batch.is_empty());
        assert_eq!(spool.high_water_bytes(), 8);
    }

    #[test]
    fn close_hands_over_what_is_left_first() {
        let spool = Spool::new(1 << 20);
        spool.push([(&b"last"[..], peer())]);
        spool.close();
        let mut batch = Batch::default();
        assert_eq!(spool.take(&mut batch, Duration::ZERO), Taken::Datagrams);
        assert_eq!(batch.len(), 1);
        assert_eq!(spool.take(&mut batch, Duration::ZERO), Taken::Closed);
    }

    #[test]
    fn a_full_spool_holds_the_receiver_until_the_applier_takes() {
        let spool = Arc::new(Spool::new(10));
        spool.push([(&b"0123456789"[..], peer())]);
        let receiver = {
            let spool = spool.clone();
            std::thread::spawn(move || spool.push([(&b"next"[..], peer())]))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !receiver.is_finished(),
            "the receiver waits while the spool is full"
        );
        let mut batch = Batch::default();
        assert_eq!(spool.take(&mut batch, Duration::ZERO), Taken::Datagrams);
        receiver.join().unwrap();
        assert_eq!(
            spool.take(&mut batch, Duration::from_secs(1)),
            Taken::Datagrams
        );
        assert_eq!(batch.iter().next().unwrap().0, b"next");
    }

    #[test]
    fn a_waiting_applier_wakes_on_the_first_datagram() {
        let spool = Arc::new(Spool::new(1 << 20));
        let applier = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                let mut batch = Batch::default();
                spool.take(&mut batch, Duration::from_secs(10))
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        spool.push([(&b"x"[..], peer())]);
        assert_eq!(applier.join().unwrap(), Taken::Datagrams);
    }
}
