//! What to publish and when: the publisher's decisions, without IO. The network loop feeds it
//! changes, link ups and downs and the clock, and carries out what it says.
//!
//! State topics come in two classes with their own interval: the *counts* (the user count and
//! the per-proxy counts, a few bytes each) and the *list* (the user list, up to megabytes). A
//! change of a class is due at once if nothing of that class was published within its interval,
//! otherwise when the interval ends; so a burst becomes one publish of the latest state. Nothing
//! is due while the link is down, and everything is due after it comes up, since the broker may
//! have lost what was in flight. [`Retained`] remembers what the broker holds, so only payloads
//! that differ are sent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A class of state topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Counts,
    List,
}

#[derive(Debug)]
struct Coalescer {
    interval: Duration,
    pending: bool,
    /// Taken and not yet published (the list renders off the loop).
    in_flight: bool,
    /// The earliest time the next publish of this class may go.
    next_allowed: Instant,
}

impl Coalescer {
    fn new(interval: Duration, now: Instant) -> Coalescer {
        Coalescer {
            interval,
            pending: true,
            in_flight: false,
            next_allowed: now,
        }
    }

    fn waiting(&self) -> bool {
        self.pending && !self.in_flight
    }

    fn due(&self, now: Instant) -> bool {
        self.waiting() && now >= self.next_allowed
    }
}

#[derive(Debug)]
pub struct Schedule {
    connected: bool,
    counts: Coalescer,
    list: Coalescer,
}

impl Schedule {
    /// Starts with everything pending: the first connection publishes the whole state.
    pub fn new(counts_interval: Duration, list_interval: Duration, now: Instant) -> Schedule {
        Schedule {
            connected: false,
            counts: Coalescer::new(counts_interval, now),
            list: Coalescer::new(list_interval, now),
        }
    }

    /// The set of sessions changed: both classes may have.
    pub fn changed(&mut self) {
        self.counts.pending = true;
        self.list.pending = true;
    }

    /// A new connection: everything is due now.
    pub fn connected(&mut self, now: Instant) {
        self.connected = true;
        for c in [&mut self.counts, &mut self.list] {
            c.pending = true;
            c.next_allowed = now;
        }
    }

    pub fn disconnected(&mut self) {
        self.connected = false;
    }

    /// Whether `class` should be published now.
    pub fn due(&self, class: Class, now: Instant) -> bool {
        self.connected && self.coalescer(class).due(now)
    }

    /// If `class` is due, takes it: the caller renders and publishes it, then calls
    /// [`Schedule::published`]. Changes meanwhile make it pending again, not due until then.
    pub fn take(&mut self, class: Class, now: Instant) -> bool {
        if !self.due(class, now) {
            return false;
        }
        let c = self.coalescer_mut(class);
        c.pending = false;
        c.in_flight = true;
        true
    }

    /// `class` was rendered and handed to the client at `now`; `complete` is false if some
    /// message could not be queued (it stays pending, retried after the interval).
    pub fn published(&mut self, class: Class, now: Instant, complete: bool) {
        let c = self.coalescer_mut(class);
        c.in_flight = false;
        c.pending |= !complete;
        c.next_allowed = now + c.interval;
    }

    /// When the loop must wake next to publish, if anything is pending.
    pub fn wake_at(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        [&self.counts, &self.list]
            .into_iter()
            .filter(|c| c.waiting())
            .map(|c| c.next_allowed)
            .min()
    }

    fn coalescer(&self, class: Class) -> &Coalescer {
        match class {
            Class::Counts => &self.counts,
            Class::List => &self.list,
        }
    }

    fn coalescer_mut(&mut self, class: Class) -> &mut Coalescer {
        match class {
            Class::Counts => &mut self.counts,
            Class::List => &mut self.list,
        }
    }
}

/// What the broker holds for each state topic, as far as this connection knows.
#[derive(Debug, Default)]
pub struct Retained {
    sent: HashMap<String, String>,
}

impl Retained {
    /// The broker may have lost everything (a new connection).
    pub fn forget(&mut self) {
        self.sent.clear();
    }

    /// Whether `payload` differs from what the broker holds for `topic`.
    pub fn differs(&self, topic: &str, payload: &str) -> bool {
        self.sent.get(topic).is_none_or(|held| held != payload)
    }

    pub fn sent(&mut self, topic: String, payload: String) {
        self.sent.insert(topic, payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COUNTS: Duration = Duration::from_millis(10);
    const LIST: Duration = Duration::from_millis(250);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn connected(t0: Instant) -> Schedule {
        let mut s = Schedule::new(COUNTS, LIST, t0);
        s.connected(t0);
        for class in [Class::Counts, Class::List] {
            assert!(s.take(class, t0));
            s.published(class, t0, true);
        }
        s
    }

    #[test]
    fn nothing_is_due_until_connected_then_everything() {
        let t0 = Instant::now();
        let mut s = Schedule::new(COUNTS, LIST, t0);
        s.changed();
        assert!(!s.due(Class::Counts, ms(t0, 500)));
        assert_eq!(s.wake_at(), None);
        s.connected(ms(t0, 500));
        assert!(s.due(Class::Counts, ms(t0, 500)));
        assert!(s.due(Class::List, ms(t0, 500)));
    }

    #[test]
    fn an_isolated_change_is_due_at_once_in_both_classes() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        assert_eq!(s.wake_at(), None, "nothing pending");
        s.changed();
        let later = ms(t0, 1000);
        assert!(s.due(Class::Counts, later));
        assert!(s.due(Class::List, later));
    }

    #[test]
    fn a_burst_waits_for_each_classs_own_interval() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        s.changed();
        // Counts were published at t0: the next one is allowed at t0 + 10 ms; the list at
        // t0 + 250 ms.
        assert!(!s.due(Class::Counts, ms(t0, 5)));
        assert_eq!(s.wake_at(), Some(ms(t0, 10)));
        assert!(s.take(Class::Counts, ms(t0, 10)));
        s.published(Class::Counts, ms(t0, 10), true);
        assert!(!s.due(Class::List, ms(t0, 10)));
        assert_eq!(s.wake_at(), Some(ms(t0, 250)));
        s.changed();
        assert!(s.due(Class::Counts, ms(t0, 20)));
        assert!(s.due(Class::List, ms(t0, 250)));
    }

    #[test]
    fn an_incomplete_publish_is_retried_after_the_interval() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        s.changed();
        assert!(s.take(Class::Counts, ms(t0, 20)));
        s.published(Class::Counts, ms(t0, 20), false);
        assert!(!s.due(Class::Counts, ms(t0, 25)));
        assert!(s.due(Class::Counts, ms(t0, 30)));
    }

    #[test]
    fn a_change_during_a_render_is_kept() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        s.changed();
        assert!(s.take(Class::List, ms(t0, 300)));
        assert!(!s.take(Class::List, ms(t0, 300)), "taken once");
        s.changed();
        assert!(
            !s.due(Class::List, ms(t0, 350)),
            "not while the render is under way"
        );
        assert_eq!(s.wake_at(), Some(ms(t0, 10)), "only the counts wait");
        s.published(Class::List, ms(t0, 400), true);
        assert!(!s.due(Class::List, ms(t0, 600)));
        assert!(
            s.due(Class::List, ms(t0, 650)),
            "the change during the render is kept"
        );
    }

    #[test]
    fn a_disconnect_stops_and_a_reconnect_republishes() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        s.disconnected();
        s.changed();
        assert!(!s.due(Class::Counts, ms(t0, 100)));
        s.connected(ms(t0, 101));
        assert!(s.due(Class::Counts, ms(t0, 101)));
        assert!(
            s.due(Class::List, ms(t0, 101)),
            "the list too, before its interval"
        );
    }

    #[test]
    fn retained_sends_only_what_differs() {
        let mut r = Retained::default();
        assert!(r.differs("a", "1"));
        r.sent("a".into(), "1".into());
        assert!(!r.differs("a", "1"));
        assert!(r.differs("a", "2"));
        r.forget();
        assert!(r.differs("a", "1"));
    }
}
