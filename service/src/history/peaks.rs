//! Peaks of concurrent users per day and per hour (UTC), total and per host, with the time they
//! were reached: the number license planning asks for.

use std::collections::BTreeMap;

use super::{History, MINUTE_MS};
use crate::registry::UnixMillis;

const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// The highest count and when it was first reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Peak {
    pub active_users: u32,
    pub at: UnixMillis,
}

impl Peak {
    fn raise(peak: &mut Option<Peak>, active_users: u32, at: UnixMillis) {
        if peak.is_none_or(|p| active_users > p.active_users) {
            *peak = Some(Peak { active_users, at });
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DayPeak {
    /// The UTC day, `YYYY-MM-DD`.
    pub date: String,
    /// The day's start (UTC midnight).
    pub start: UnixMillis,
    #[serde(flatten)]
    pub peak: Peak,
    /// Per host (by name).
    pub hosts: BTreeMap<String, Peak>,
    /// Hours with data, in order.
    pub hours: Vec<HourPeak>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HourPeak {
    /// The hour's start.
    pub hour: UnixMillis,
    #[serde(flatten)]
    pub peak: Peak,
    /// Per host (by name), the minute it was reached.
    pub hosts: BTreeMap<String, Peak>,
}

/// The peaks of the last `days` UTC days up to `now` (today included), newest first; days
/// without data are left out. A host's peak time is the minute it was reached.
pub fn peaks(history: &History, now: UnixMillis, days: u32) -> Vec<DayPeak> {
    let today = now.0 - now.0 % DAY_MS;
    let first = today.saturating_sub(u64::from(days.saturating_sub(1)) * DAY_MS);
    let mut out: Vec<DayPeak> = Vec::new();
    let mut host_peaks: Vec<Option<Peak>> = Vec::new();
    for m in history.minutes() {
        let start = m.start().0;
        if start < first {
            continue;
        }
        let day = start - start % DAY_MS;
        if out.last().is_none_or(|d| d.start.0 != day) {
            finish_hosts(out.last_mut(), &mut host_peaks, history.hosts());
            out.push(DayPeak {
                date: date(day),
                start: UnixMillis(day),
                peak: Peak {
                    active_users: 0,
                    at: m.total_max_time(),
                },
                hosts: BTreeMap::new(),
                hours: Vec::new(),
            });
            host_peaks = vec![None; history.hosts().len()];
        }
        let d = out.last_mut().expect("pushed above");
        let mut peak = Some(d.peak);
        Peak::raise(&mut peak, m.total.max, m.total_max_time());
        d.peak = peak.expect("raised from Some");
        let hour = UnixMillis(start - start % HOUR_MS);
        let h = match d.hours.last_mut() {
            Some(h) if h.hour == hour => h,
            _ => {
                d.hours.push(HourPeak {
                    hour,
                    peak: Peak {
                        active_users: 0,
                        at: m.total_max_time(),
                    },
                    hosts: BTreeMap::new(),
                });
                d.hours.last_mut().expect("pushed")
            }
        };
        let mut p = Some(h.peak);
        Peak::raise(&mut p, m.total.max, m.total_max_time());
        h.peak = p.expect("raised from Some");
        for (host, sample) in &m.hosts {
            Peak::raise(&mut host_peaks[*host as usize], sample.max, m.start());
            let name = &history.hosts()[*host as usize];
            let mut hp = h.hosts.get(name).copied();
            Peak::raise(&mut hp, sample.max, m.start());
            if let Some(hp) = hp {
                h.hosts.insert(name.clone(), hp);
            }
        }
    }
    finish_hosts(out.last_mut(), &mut host_peaks, history.hosts());
    out.reverse();
    out
}

/// Today's (UTC) highest count so far, as the optional retained MQTT topic carries it:
/// `{"date":"2026-11-30","active_users":42,"at":…}`. `current` is the highest count since
/// the history's last sample, which it does not have yet.
pub fn today_payload(history: &History, now: UnixMillis, current: usize) -> String {
    let today = now.0 - now.0 % DAY_MS;
    let mut peak = None;
    for m in history.minutes().rev() {
        if m.start().0 < today {
            break;
        }
        // Walking back, a tie keeps the earlier minute: the time the peak was first reached.
        if peak.is_none_or(|p: Peak| m.total.max >= p.active_users) {
            peak = Some(Peak {
                active_users: m.total.max,
                at: m.total_max_time(),
            });
        }
    }
    let peak = match peak {
        Some(p) if p.active_users as usize >= current => p,
        _ => Peak {
            active_users: current as u32,
            at: now,
        },
    };
    serde_json::json!({"date": date(today), "active_users": peak.active_users, "at": peak.at})
        .to_string()
}

fn finish_hosts(day: Option<&mut DayPeak>, peaks: &mut [Option<Peak>], names: &[String]) {
    if let Some(day) = day {
        day.hosts = peaks
            .iter()
            .zip(names)
            .filter_map(|(p, name)| p.map(|peak| (name.clone(), peak)))
            .collect();
    }
}

/// `YYYY-MM-DD` of a UTC midnight (Howard Hinnant's days-to-civil).
fn date(day_start_ms: u64) -> String {
    let days = (day_start_ms / DAY_MS) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{DEFAULT_RETENTION, Sample};

    const DAY0: u64 = 1_764_460_800_000; // 2025-11-30T00:00:00Z

    #[test]
    fn todays_peak_is_the_highest_since_midnight_or_the_count_now() {
        let mut h = History::new(DEFAULT_RETENTION);
        let at = |ms: u64| UnixMillis(DAY0 + ms);
        h.record(at(DAY_MS - HOUR_MS), Sample::new(50), []); // yesterday
        h.record(at(DAY_MS + HOUR_MS), Sample::new(7), []);
        h.record(at(DAY_MS + 2 * HOUR_MS + 5_000), Sample::new(9), []);
        h.record(at(DAY_MS + 3 * HOUR_MS), Sample::new(9), []);
        let now = at(DAY_MS + 4 * HOUR_MS);
        let peak: serde_json::Value = serde_json::from_str(&today_payload(&h, now, 3)).unwrap();
        assert_eq!(peak["date"], "2025-12-01");
        assert_eq!(peak["active_users"], 9);
        assert_eq!(peak["at"], at(DAY_MS + 2 * HOUR_MS + 5_000).0);
        let higher: serde_json::Value = serde_json::from_str(&today_payload(&h, now, 12)).unwrap();
        assert_eq!(
            (higher["active_users"].as_u64(), higher["at"].as_u64()),
            (Some(12), Some(now.0))
        );
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(date(DAY0), "2025-11-30");
        assert_eq!(date(DAY0 + DAY_MS), "2025-12-01");
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400_000), "2000-02-29");
    }

    #[test]
    fn each_day_and_hour_has_its_peak_and_when() {
        let mut h = History::new(DEFAULT_RETENTION);
        let at = |ms: u64| UnixMillis(DAY0 + ms);
        h.record(at(9 * HOUR_MS), Sample::new(5), [("qs1", 5)]);
        h.record(
            at(9 * HOUR_MS + 30_000),
            Sample::new(12),
            [("qs1", 8), ("qs2", 4)],
        );
        h.record(at(14 * HOUR_MS), Sample::new(7), [("qs1", 3), ("qs2", 6)]);
        // The next day; a day between without data is left out.
        h.record(at(2 * DAY_MS + HOUR_MS), Sample::new(3), [("qs1", 3)]);
        let days = peaks(&h, at(2 * DAY_MS + 2 * HOUR_MS), 7);
        assert_eq!(days.len(), 2);
        assert_eq!(days[0].date, "2025-12-02");
        let first = &days[1];
        assert_eq!(first.date, "2025-11-30");
        assert_eq!(
            first.peak,
            Peak {
                active_users: 12,
                at: at(9 * HOUR_MS + 30_000)
            }
        );
        assert_eq!(first.hours.len(), 2);
        assert_eq!(first.hours[1].peak.active_users, 7);
        assert_eq!(
            first.hours[0].hosts["qs1"],
            Peak {
                active_users: 8,
                at: at(9 * HOUR_MS)
            }
        );
        assert_eq!(first.hours[1].hosts["qs2"].active_users, 6);
        assert_eq!(
            first.hosts["qs2"],
            Peak {
                active_users: 6,
                at: at(14 * HOUR_MS)
            }
        );
        // Only today.
        assert_eq!(peaks(&h, at(2 * DAY_MS + 2 * HOUR_MS), 1).len(), 1);
    }
}
