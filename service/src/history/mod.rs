//! Active users over time: per minute, the highest and the last number of concurrent users, in
//! total and per proxy host, kept for `history_retention`. Pure: samples in, with their time;
//! views out. The sampling task is [`run`]; the checkpoint carries it across restarts.
//!
//! A minute exists only if the service was up during it: minutes it was down are gaps, never
//! zeros. Memory is bounded: at most `retention` minutes, each with the total and at most
//! [`MAX_HOSTS`] hosts (a host beyond them counts in the total only): a minute takes 40 bytes
//! plus 12 per host in its own allocation (glibc rounds 12 up to 32, 48 to 64), so 14 days
//! (20,160 minutes) take 1.5 MB with one proxy host, 2.1 MB with four, at most about 17 MB.

mod peaks;
mod sampler;

use std::collections::VecDeque;
use std::time::Duration;

pub use peaks::{DayPeak, HourPeak, Peak, peaks, today_payload};
pub use sampler::{run, sample};

use crate::registry::UnixMillis;

/// Proxy hosts with a history of their own; a site has a handful.
pub const MAX_HOSTS: usize = 64;
pub const DEFAULT_RETENTION: Duration = session_monitor_config::defaults::HISTORY_RETENTION;
const MINUTE_MS: u64 = 60_000;

/// The highest and the last count of one minute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub max: u32,
    pub last: u32,
}

impl Sample {
    pub fn new(value: u32) -> Sample {
        Sample {
            max: value,
            last: value,
        }
    }

    fn add(&mut self, value: u32) {
        self.merge(Sample::new(value));
    }

    fn merge(&mut self, later: Sample) {
        self.max = self.max.max(later.max);
        self.last = later.last;
    }
}

/// One minute of history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the Unix epoch.
    pub minute: u32,
    pub total: Sample,
    /// When in the minute the total reached its max, in ms from the minute's start.
    pub total_max_at: u16,
    /// By index into [`History::hosts`], only hosts sampled in this minute.
    pub hosts: Vec<(u16, Sample)>,
}

impl Minute {
    pub fn start(&self) -> UnixMillis {
        UnixMillis(u64::from(self.minute) * MINUTE_MS)
    }

    /// When the total reached its max.
    pub fn total_max_time(&self) -> UnixMillis {
        UnixMillis(self.start().0 + u64::from(self.total_max_at))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    retention_minutes: u32,
    /// Host names, by the index the minutes use; at most [`MAX_HOSTS`].
    hosts: Vec<String>,
    /// Oldest first, strictly increasing.
    minutes: VecDeque<Minute>,
}

impl History {
    pub fn new(retention: Duration) -> History {
        History {
            retention_minutes: (retention.as_secs() / 60).max(1) as u32,
            hosts: Vec::new(),
            minutes: VecDeque::new(),
        }
    }

    /// Records the counts at `now`: the total (the highest since the last record, and now),
    /// and users per host now. Whether a new minute began.
    pub fn record<'a>(
        &mut self,
        now: UnixMillis,
        total: Sample,
        hosts: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> bool {
        let mut new_minute = false;
        let minute = (now.0 / MINUTE_MS) as u32;
        let offset = (now.0 % MINUTE_MS) as u16;
        match self.minutes.back_mut() {
            Some(m) if m.minute == minute => {
                if total.max > m.total.max {
                    m.total_max_at = offset;
                }
                m.total.merge(total);
            }
            // A clock that stepped back: keep the minutes ordered, fold into the last one.
            Some(m) if m.minute > minute => m.total.merge(total),
            _ => {
                new_minute = true;
                self.minutes.push_back(Minute {
                    minute,
                    total,
                    total_max_at: offset,
                    hosts: Vec::new(),
                });
                self.forget_before(minute);
            }
        }
        for (name, users) in hosts {
            let Some(index) = self.host_index(name) else {
                continue;
            };
            let m = self.minutes.back_mut().expect("a minute was just ensured");
            match m.hosts.iter_mut().find(|(i, _)| *i == index) {
                Some((_, sample)) => sample.add(users as u32),
                None => m.hosts.push((index, Sample::new(users as u32))),
            }
        }
        new_minute
    }

    fn host_index(&mut self, name: &str) -> Option<u16> {
        if let Some(i) = self.hosts.iter().position(|h| h.eq_ignore_ascii_case(name)) {
            return Some(i as u16);
        }
        if self.hosts.len() >= MAX_HOSTS {
            return None;
        }
        self.hosts.push(name.to_owned());
        Some(self.hosts.len() as u16 - 1)
    }

    fn forget_before(&mut self, now_minute: u32) {
        let oldest = now_minute.saturating_sub(self.retention_minutes - 1);
        while self.minutes.front().is_some_and(|m| m.minute < oldest) {
            self.minutes.pop_front();
        }
    }

    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    pub fn minutes(&self) -> impl DoubleEndedIterator<Item = &Minute> + ExactSizeIterator {
        self.minutes.iter()
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.retention_minutes) * 60)
    }

    /// Replaces the history with a checkpoint's (restored at start, before any sample), minus
    /// what is older than the retention at `now`.
    pub fn restore(&mut self, hosts: Vec<String>, minutes: Vec<Minute>, now: UnixMillis) {
        self.hosts = hosts;
        self.hosts.truncate(MAX_HOSTS);
        let known = self.hosts.len() as u16;
        let mut last = None;
        self.minutes = minutes
            .into_iter()
            .filter(|m| {
                let ordered = last.is_none_or(|l| m.minute > l);
                last = Some(m.minute);
                ordered
            })
            .map(|mut m| {
                m.hosts.retain(|(i, _)| *i < known);
                m
            })
            .collect();
        self.forget_before((now.0 / MINUTE_MS) as u32);
    }

    /// The history between `from` and `to` (inclusive of the minute `from` falls in, exclusive
    /// of `to`) in buckets of `step`, each the max of its minutes' max and the last of their
    /// last; `None` where no minute of the bucket was recorded.
    pub fn range(&self, from: UnixMillis, to: UnixMillis, step: Duration) -> Range {
        let step_ms = (step.as_millis() as u64).max(MINUTE_MS);
        let start = from.0 - from.0 % step_ms;
        let buckets = to.0.saturating_sub(start).div_ceil(step_ms) as usize;
        let mut range = Range {
            times: (0..buckets as u64)
                .map(|i| UnixMillis(start + i * step_ms))
                .collect(),
            total: Columns::new(buckets),
            hosts: self
                .hosts
                .iter()
                .map(|h| (h.clone(), Columns::new(buckets)))
                .collect(),
        };
        for m in &self.minutes {
            let t = m.start().0;
            if t < start || t >= to.0 {
                continue;
            }
            let bucket = ((t - start) / step_ms) as usize;
            range.total.add(bucket, m.total);
            for (host, sample) in &m.hosts {
                range.hosts[*host as usize].1.add(bucket, *sample);
            }
        }
        range
            .hosts
            .retain(|(_, c)| c.max.iter().any(Option::is_some));
        range
    }
}

/// A stretch of history in equal buckets: columns, for charts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub times: Vec<UnixMillis>,
    pub total: Columns,
    /// Hosts with data in the range, in order of first appearance.
    pub hosts: Vec<(String, Columns)>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Columns {
    pub max: Vec<Option<u32>>,
    pub last: Vec<Option<u32>>,
}

impl Columns {
    fn new(buckets: usize) -> Columns {
        Columns {
            max: vec![None; buckets],
            last: vec![None; buckets],
        }
    }

    /// Minutes arrive in order, so the last one added to a bucket is its last.
    fn add(&mut self, bucket: usize, sample: Sample) {
        let max = &mut self.max[bucket];
        *max = Some(max.map_or(sample.max, |m| m.max(sample.max)));
        self.last[bucket] = Some(sample.last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_is_as_small_as_the_docs_say() {
        assert_eq!(std::mem::size_of::<Minute>(), 40);
        assert_eq!(std::mem::size_of::<(u16, Sample)>(), 12);
    }

    const T0: u64 = 1_764_460_800_000; // 2025-11-30T00:00:00Z
    const MIN: u64 = 60_000;

    fn at(ms: u64) -> UnixMillis {
        UnixMillis(T0 + ms)
    }

    #[test]
    fn a_minute_keeps_its_highest_and_its_last_count() {
        let mut h = History::new(DEFAULT_RETENTION);
        h.record(at(1_000), Sample::new(3), [("qs1", 2), ("qs2", 1)]);
        h.record(at(20_000), Sample::new(7), [("qs1", 5), ("qs2", 2)]);
        h.record(at(59_000), Sample::new(4), [("qs1", 3), ("qs2", 1)]);
        let m = h.minutes().next().unwrap();
        assert_eq!(m.total, Sample { max: 7, last: 4 });
        assert_eq!(m.total_max_time(), at(20_000));
        assert_eq!(
            m.hosts,
            [
                (0, Sample { max: 5, last: 3 }),
                (1, Sample { max: 2, last: 1 })
            ]
        );
    }

    #[test]
    fn minutes_not_recorded_are_gaps() {
        let mut h = History::new(DEFAULT_RETENTION);
        h.record(at(0), Sample::new(3), [("qs1", 3)]);
        // Down for two minutes.
        h.record(at(3 * MIN), Sample::new(5), [("qs1", 5)]);
        let r = h.range(at(0), at(4 * MIN), Duration::from_secs(60));
        assert_eq!(r.times.len(), 4);
        assert_eq!(r.total.max, [Some(3), None, None, Some(5)]);
        assert_eq!(r.hosts[0].1.last, [Some(3), None, None, Some(5)]);
    }

    #[test]
    fn buckets_take_the_max_of_max_and_the_last_of_last() {
        let mut h = History::new(DEFAULT_RETENTION);
        for (minute, users) in [(0, 4), (1, 9), (2, 2), (3, 6)] {
            h.record(at(minute * MIN), Sample::new(users), []);
        }
        let r = h.range(at(0), at(4 * MIN), Duration::from_secs(120));
        assert_eq!(r.total.max, [Some(9), Some(6)]);
        assert_eq!(r.total.last, [Some(9), Some(6)]);
        assert_eq!(r.total.last, [Some(9), Some(6)]);
    }

    #[test]
    fn retention_bounds_the_minutes() {
        let mut h = History::new(Duration::from_secs(10 * 60));
        for minute in 0..100 {
            h.record(at(minute * MIN), Sample::new(minute as u32), []);
        }
        assert_eq!(h.minutes().len(), 10);
        assert_eq!(h.minutes().next().unwrap().total.last, 90);
    }

    #[test]
    fn hosts_beyond_the_limit_count_in_the_total_only() {
        let mut h = History::new(DEFAULT_RETENTION);
        let names: Vec<String> = (0..MAX_HOSTS + 5).map(|i| format!("qs{i}")).collect();
        h.record(
            at(0),
            Sample::new(100),
            names.iter().map(|n| (n.as_str(), 1)),
        );
        assert_eq!(h.hosts().len(), MAX_HOSTS);
        assert_eq!(h.minutes().next().unwrap().total.max, 100);
    }

    #[test]
    fn a_restore_drops_what_aged_out_and_keeps_order() {
        let mut h = History::new(Duration::from_secs(60 * 60));
        let minute = |m: u32, users: u32| Minute {
            minute: m,
            total: Sample::new(users),
            total_max_at: 0,
            hosts: vec![(0, Sample::new(users)), (7, Sample::new(1))],
        };
        let base = (T0 / MIN) as u32;
        h.restore(
            vec!["qs1".into()],
            vec![
                minute(base, 1),
                minute(base + 100, 2),
                minute(base + 99, 3),
                minute(base + 110, 4),
            ],
            at(120 * MIN),
        );
        let kept: Vec<u32> = h.minutes().map(|m| m.total.last).collect();
        assert_eq!(kept, [2, 4]);
        assert!(
            h.minutes().all(|m| m.hosts.len() == 1),
            "unknown host indexes dropped"
        );
    }
}
