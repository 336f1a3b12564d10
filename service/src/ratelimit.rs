//! Rate limiting for log lines that a flood of bad input could otherwise turn into a flood of
//! logs: at most one line per key per period, reporting how many were suppressed in between.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub struct RateLimiter {
    period: Duration,
    /// Per key: when a line was last allowed, and how many were suppressed since.
    last: HashMap<&'static str, (Instant, u64)>,
}

impl RateLimiter {
    pub fn new(period: Duration) -> RateLimiter {
        RateLimiter {
            period,
            last: HashMap::new(),
        }
    }

    /// `Some(suppressed)` if a line for `key` may be logged now.
    pub fn allow(&mut self, key: &'static str) -> Option<u64> {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&mut self, key: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(key) {
            Some((at, suppressed)) if now.duration_since(*at) < self.period => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                *at = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// "Once per sender": the first of a key is allowed, later ones not, for a bounded number of
/// keys (beyond it nothing more is allowed: a flood of spoofed senders cannot grow it).
pub struct OncePer<K> {
    seen: std::collections::HashSet<K>,
    max_keys: usize,
}

impl<K: std::hash::Hash + Eq> OncePer<K> {
    pub fn new(max_keys: usize) -> OncePer<K> {
        OncePer {
            seen: std::collections::HashSet::new(),
            max_keys,
        }
    }

    /// Whether this is the first time `key` is seen (and there is room to remember it).
    pub fn first(&mut self, key: K) -> bool {
        self.seen.len() < self.max_keys && self.seen.insert(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_key_within_the_bound() {
        let mut once = OncePer::new(2);
        assert!(once.first("a"));
        assert!(!once.first("a"));
        assert!(once.first("b"));
        assert!(!once.first("c"), "beyond the bound");
        assert!(!once.first("b"));
    }

    #[test]
    fn one_line_per_period_per_key() {
        let mut r = RateLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.allow_at("a", t0), Some(0));
        assert_eq!(r.allow_at("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(r.allow_at("a", t0 + Duration::from_secs(2)), None);
        assert_eq!(r.allow_at("b", t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(r.allow_at("a", t0 + Duration::from_secs(11)), Some(2));
        assert_eq!(r.allow_at("a", t0 + Duration::from_secs(12)), None);
    }
}
