//! Parser cost: decoding and parsing a pool of realistic datagrams in-process, beside the parser
//! as it was before it was anchored at both ends (`parse_before`), on the same pool in the same
//! run. The ingest rows cannot show it: there the senders are the limit.

use std::hint::black_box;
use std::time::{Duration, Instant};

use session_monitor::parser::{self, Limits};

use crate::parse_before;

pub struct ParseCost {
    pub datagrams: usize,
    /// Nanoseconds per datagram, best of the runs.
    pub now_ns: f64,
    pub before_ns: f64,
    pub now_accepted: usize,
    pub before_accepted: usize,
}

/// Best of `runs` passes over `pool` (each pass `repeat` times over it) for both parsers,
/// interleaved so that a busy moment of the machine does not favour one.
pub fn run(pool: &[Vec<u8>], repeat: usize, runs: usize) -> ParseCost {
    let limits = Limits::default();
    let now = |pool: &[Vec<u8>]| {
        let mut accepted = 0;
        for d in pool {
            if let Ok(text) = parser::decode_datagram(d, &limits, parser::UTF_8)
                && let Ok(e) = parser::parse(&text, &limits)
            {
                black_box(&e);
                accepted += 1;
            }
        }
        accepted
    };
    let before = |pool: &[Vec<u8>]| {
        let mut accepted = 0;
        for d in pool {
            if let Ok(text) = parse_before::clean_datagram(d, &limits)
                && let Ok(e) = parse_before::parse(&text, &limits)
            {
                black_box(&e);
                accepted += 1;
            }
        }
        accepted
    };
    let (mut best_now, mut best_before) = (Duration::MAX, Duration::MAX);
    let (mut now_accepted, mut before_accepted) = (0, 0);
    for _ in 0..runs {
        let t = Instant::now();
        for _ in 0..repeat {
            now_accepted = now(black_box(pool));
        }
        best_now = best_now.min(t.elapsed());
        let t = Instant::now();
        for _ in 0..repeat {
            before_accepted = before(black_box(pool));
        }
        best_before = best_before.min(t.elapsed());
    }
    let per = |d: Duration| d.as_nanos() as f64 / (pool.len() * repeat) as f64;
    ParseCost {
        datagrams: pool.len(),
        now_ns: per(best_now),
        before_ns: per(best_before),
        now_accepted,
        before_accepted,
    }
}
